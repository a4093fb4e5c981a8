"""Split-KV decode: a few new queries (Sq <= 16) against a long KV cache.

Why a second kernel: with Sq this small, the prefill grid (Sq / BLOCK_M x B x Hq programs) leaves
most SMs idle and reads every kv head Hq / Hkv times. Here one program owns one kv head and one key
range ("split"): its M dimension holds the whole query group, (Hq / Hkv) heads x Sq queries, so
each K/V byte is read once per group; the key sequence is spread over enough splits to fill the
device. Each split writes a partial output (normalised) and its log-sum-exp (base 2); a small merge
kernel combines the splits by their lse. With a single split the first kernel writes the result
directly and the merge is skipped.

Bottom-right causal for decode: query i of Sq sees key j iff j <= i + Sk - Sq, so only the last
Sq - 1 keys are ever masked.

Sliding window: the splits cover only the keys some query of the call can see, [kv_lo, kv_hi)
computed on the host, so the work and the time follow the window, not the cache length. Softcap
is applied to the scores in the split kernel; sinks join the softmax once: in the split kernel
when it writes the result directly, else in the merge (one more lse term with no value).

The split kernel is written from parts (`_split_rows`, `_split_load_q`, `_split_init`,
`_split_step`, `_split_store`) that paged.py's kernel over a paged cache runs too: only where the
keys come from differs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from flashdispatch.problem import window_key_range

from . import configs
from .launch import BoundLaunch, DirectLauncher, cuda_index, run_on_device
from .forward import (
    LN2,
    LOG2E,
    PLAIN,
    Variant,
    check_sinks,
    fast_tanh_on,
    make_variant,
    prepare_forward,
    tanh,
    variant_scalars,
    OutputPlan,
    _check_inputs,
    _empty_output,
    _finish,
    _needs_offs64,
    attention_forward,
    plan_launch,
    cached_plan,
    launch_options,
    dot,
    online_softmax_step,
    row_max,
    row_sum,
)


# --- the split kernel's parts, shared with paged.py's kernel over a (paged) KV cache ----------------


@triton.jit
def _split_rows(pid_m, hk, group, seq_q, BLOCK_M: tl.constexpr):
    """This program's M rows: (head in group, query) pairs of kv head hk -> (in_rows, qi, h)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < group * seq_q
    qi = rows % seq_q
    h = hk * group + rows // seq_q
    return in_rows, qi, h


@triton.jit
def _split_load_q(Q_b, qi, h64, in_rows, offs_d, sqm, sqh, sqd, head_dim, PAD_D: tl.constexpr):
    """The rows' queries (BLOCK_M, BLOCK_D) from the sequence's base pointer Q_b."""
    q_mask = in_rows[:, None]
    if PAD_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    q_ptrs = Q_b + h64[:, None] * sqh + qi.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd
    return tl.load(q_ptrs, mask=q_mask, other=0.0)


@triton.jit
def _split_init(SINKS, h, in_rows, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr,
                DIRECT: tl.constexpr):
    """(m, l, acc) before the first key; the sink joins here when one split writes the result
    directly (else in the merge)."""
    if HAS_SINKS and DIRECT:
        m_i = tl.load(SINKS + h, mask=in_rows, other=0.0).to(tl.float32) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def _split_step(acc, l_i, m_i, q, kt, v, qi, offs_n, in_k, causal_offset, qk_scale,
                window_left, window_right, softcap_in, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold one loaded key block (keys offs_n, in_k: inside the split) into (acc, l, m)."""
    qk = dot(q, kt, tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32), IEEE)
    if SOFTCAP:
        qk = tanh(qk * softcap_in, SOFTCAP)
    visible = in_k[None, :]
    if WINDOW:
        p = qi[:, None] + causal_offset
        visible = visible & (offs_n[None, :] >= p - window_left) & (offs_n[None, :] <= p + window_right)
    elif CAUSAL:
        visible = visible & (offs_n[None, :] <= qi[:, None] + causal_offset)
    qk = tl.where(visible, qk, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, True, IEEE)


@triton.jit
def _split_store(acc, l_i, m_i, O, LSE, PO, PL, b64, h64, qi, in_rows, offs_dv, sob, soh, som, sod,
                 heads_q, seq_q, num_splits, split, head_dim_v,
                 BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr, DIRECT: tl.constexpr):
    """One split's result: the output and lse themselves (one split), else its partials in the
    merge kernel's layout, (B*Hq*Sq, splits, BLOCK_DV) outputs and (B*Hq*Sq, splits) lse in base 2."""
    out, lse = _finish(acc, l_i, m_i)
    if DIRECT:
        o_mask = in_rows[:, None]
        if PAD_DV:
            o_mask = o_mask & (offs_dv[None, :] < head_dim_v)
        o_ptrs = (O + b64 * sob + h64[:, None] * soh + qi.to(tl.int64)[:, None] * som
                  + offs_dv[None, :] * sod)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
        lse_row = (b64 * heads_q + h64) * seq_q + qi
        tl.store(LSE + lse_row, lse, mask=in_rows)
    else:
        row = ((b64 * heads_q + h64) * seq_q + qi) * num_splits + split
        tl.store(PO + row[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=in_rows[:, None])
        tl.store(PL + row, lse * (1.0 / LN2), mask=in_rows)


@triton.jit
def _decode_split_kernel(
    Q, K, V, PO, PL, O, LSE, SINKS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    heads_q, heads_kv, group, seq_q, seq_k, qk_scale, head_dim, head_dim_v,
    keys_per_split, num_splits, kv_lo, kv_hi, window_left, window_right, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr, OFFS64: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    pid_bkv = tl.program_id(0)  # B * Hkv may pass the 65535 limit of grid dims 1 and 2
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bkv // heads_kv
    hk = pid_bkv % heads_kv
    b64 = b.to(tl.int64)

    # -- rows of this program: (head in group, query) pairs of one kv head
    in_rows, qi, h = _split_rows(pid_m, hk, group, seq_q, BLOCK_M)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    cols_n = offs_n0.to(tl.int64) if OFFS64 else offs_n0
    q = _split_load_q(Q + b64 * sqb, qi, h64, in_rows, offs_d, sqm, sqh, sqd, head_dim, PAD_D)

    K_base = K + b64 * skb + hk.to(tl.int64) * skh
    V_base = V + b64 * svb + hk.to(tl.int64) * svh
    kt_off = cols_n[None, :] * skn + offs_d[:, None] * skd
    v_off = cols_n[:, None] * svn + offs_dv[None, :] * svd
    m_i, l_i, acc = _split_init(SINKS, h, in_rows, BLOCK_M, BLOCK_DV, HAS_SINKS, DIRECT)

    # the splits share [kv_lo, kv_hi): the keys some query of the call can see
    n_lo = kv_lo + split * keys_per_split
    n_hi = tl.minimum(kv_hi, n_lo + keys_per_split)
    causal_offset = seq_k - seq_q
    lo64 = tl.cast(n_lo, tl.int64)
    kt_ptrs = K_base + lo64 * skn + kt_off
    v_ptrs = V_base + lo64 * svn + v_off
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        in_k = offs_n < n_hi
        kt_mask = in_k[None, :]
        v_mask = in_k[:, None]
        if PAD_D:
            kt_mask = kt_mask & (offs_d[:, None] < head_dim)
        if PAD_DV:
            v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        kt_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
        acc, l_i, m_i = _split_step(acc, l_i, m_i, q, kt, v, qi, offs_n, in_k, causal_offset, qk_scale,
                                    window_left, window_right, softcap_in, BLOCK_M, BLOCK_N, CAUSAL, IEEE,
                                    WINDOW, SOFTCAP)

    _split_store(acc, l_i, m_i, O, LSE, PO, PL, b64, h64, qi, in_rows, offs_dv, sob, soh, som, sod,
                 heads_q, seq_q, num_splits, split, head_dim_v, BLOCK_DV, PAD_DV, DIRECT)


@triton.jit
def _decode_merge_kernel(
    PO, PL, O, LSE, SINKS,
    sob, soh, som, sod,
    heads_q, seq_q, num_splits, head_dim_v,
    BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Sq + i
    qi = row % seq_q
    bh = row // seq_q
    h = bh % heads_q
    b = bh // heads_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_s = offs_s < num_splits
    lse_s = tl.load(PL + row * num_splits + offs_s, mask=in_s, other=float("-inf"))
    m = row_max(lse_s, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + h).to(tl.float32) * LOG2E
        m = tl.maximum(m, sink)
    # every split empty (row sees no key): weights 0, out 0, lse -inf (or the sink)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = row_sum(tl.math.exp2(lse_s - m_use), 0)
    if HAS_SINKS:  # one more term of the denominator, with no value
        total += tl.math.exp2(sink - m_use)
    # the partial outputs in chunks of CHUNK_S splits: a (splits x Dv) fp32 tile in registers
    # at once spills (128 x 256 over 64 threads: 5.7 KB per thread)
    acc = tl.full([BLOCK_DV], 0.0, dtype=tl.float32)
    offs_c = tl.arange(0, CHUNK_S)
    for s0 in range(0, num_splits, CHUNK_S):
        in_c = (s0 + offs_c) < num_splits
        w = tl.math.exp2(tl.load(PL + row * num_splits + s0 + offs_c, mask=in_c, other=float("-inf")) - m_use)
        o_c = tl.load(PO + (row * num_splits + s0 + offs_c)[:, None] * BLOCK_DV + offs_dv[None, :],
                      mask=in_c[:, None], other=0.0)
        acc += row_sum(w[:, None] * o_c, 0)
    safe = tl.where(total == 0.0, 1.0, total)
    out = acc / safe
    lse = tl.where(total == 0.0, float("-inf"), (m_use + tl.math.log2(safe)) * LN2)
    o_mask = offs_dv < head_dim_v
    tl.store(O + b * sob + h * soh + qi * som + offs_dv * sod, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + row, lse)


# Splits the merge folds per step: CHUNK x BLOCK_DV fp32 over its warps stays in registers.
MERGE_CHUNK_S = 16


def merge_meta(splits: int, block_dv: int, dv: int, has_sinks: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constexprs, options) of the merge launch of `splits` partial results (decode and paged)."""
    block_s = 1 << (splits - 1).bit_length()
    return (dict(BLOCK_S=block_s, CHUNK_S=min(block_s, MERGE_CHUNK_S), BLOCK_DV=block_dv, PAD_DV=block_dv != dv,
                 HAS_SINKS=has_sinks),
            {"num_warps": 1 if block_dv <= 64 else 2})


def decode_plan(cfg: dict[str, Any], batch: int, heads_q: int, heads_kv: int, seq_q: int, seq_k: int,
                sm_count: int) -> tuple[int, int, int]:
    """(BLOCK_M, number of M blocks, number of splits) of one decode launch."""
    block_m, m_blocks, splits, _ = _plan(int(cfg["BLOCK_N"]), int(cfg.get("NUM_SPLITS") or 0), batch, heads_q,
                                         heads_kv, seq_q, seq_k, sm_count)
    return block_m, m_blocks, splits


@functools.lru_cache(maxsize=4096)
def _plan(block_n: int, num_splits: int, batch: int, heads_q: int, heads_kv: int, seq_q: int, seq_k: int,
          sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, M blocks, splits, keys per split); cached: decode calls are launch-bound."""
    rows = (heads_q // heads_kv) * seq_q
    block_m = configs.decode_block_m(rows)
    m_blocks = -(-rows // block_m)
    cfg = {"BLOCK_N": block_n, "NUM_SPLITS": num_splits}
    splits = configs.decode_num_splits(cfg, batch * heads_kv * m_blocks, seq_k, sm_count)
    # whole key blocks per split; rounding may leave fewer splits than asked
    keys_per_split = -(-(-(-seq_k // splits)) // block_n) * block_n
    splits = -(-seq_k // keys_per_split)
    return block_m, m_blocks, splits, keys_per_split


def visible_key_range(causal: bool, window: tuple[int, int], seq_q: int, seq_k: int) -> tuple[int, int]:
    """[lo, hi): the keys that some query of a (Sq, Sk) call can see under causal and window
    (causal folds into right = 0, as the kernels take it; one query row sees up to the last key)."""
    left, right = window
    return window_key_range(seq_q, seq_k, (left, 0 if causal and seq_q > 1 else right))


class _DecodePlan:
    """One decode call signature's launches (split, then merge), made once (decode is launch-bound):
    a repeated call allocates its outputs and partials and launches."""

    __slots__ = ("forward", "outputs", "part_shapes", "device", "index", "split", "merge")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                 config: dict[str, Any], variant: Variant = PLAIN) -> None:
        _check_inputs(q, k, v)
        arch = configs.arch_of_tensor(q)
        cfg = configs.resolve_decode(config, arch, q.shape[3])
        self.forward: dict[str, Any] | None = None
        if cfg["PATH"] == "forward":
            self.forward = {key: val for key, val in config.items()
                            if key not in configs.DECODE_KEYS - configs.FORWARD_KEYS}
            return
        bsz, hq, sq, d = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        self.outputs = OutputPlan(q, sk, dv)
        self.device = q.device
        self.index = cuda_index(q)
        self.split = self.merge = None
        self.part_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        if self.outputs.finished:
            return
        out = _empty_output(bsz, hq, sq, dv, self.outputs.bshd, q.dtype, "meta")  # strides only
        # stages and key block to fit the shared memory, counted with the largest query block
        fitted = configs.shrink_to_fit({**cfg, "BLOCK_M": configs.DECODE_MAX_BLOCK_M}, arch, d, dv, q.element_size())
        cfg = {**cfg, "num_stages": fitted["num_stages"], "BLOCK_N": fitted["BLOCK_N"]}
        block_n = int(cfg["BLOCK_N"])
        block_d, block_dv = configs.block_dim(d), configs.block_dim(dv)
        index = self.index or 0  # also the launcher's key on the CPU (interpreter)
        sm_count = configs.sm_count_of(q.device.type, index)
        effective_causal = bool(causal) and sq > 1
        qk_scale, left, right, softcap_in, flags = variant_scalars(variant, effective_causal, scale, sq, sk,
                                                                   fast_tanh_on(q))
        kv_lo, kv_hi = visible_key_range(effective_causal, variant.window, sq, sk)
        kv_lo = (kv_lo // block_n) * block_n  # whole key blocks from a block boundary
        # an empty range still takes one split: it writes zeros and lse = -inf (or the sink)
        block_m, m_blocks, splits, keys_per_split = _plan(block_n, int(cfg.get("NUM_SPLITS") or 0), bsz,
                                                          hq, hkv, sq, max(kv_hi - kv_lo, 1), sm_count)
        direct = splits == 1
        if not direct:
            self.part_shapes = ((bsz * hq * sq, splits, block_dv), (bsz * hq * sq, splits))
        self.split = BoundLaunch(_SPLIT, (bsz * hkv, splits, m_blocks), 8, (
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            hq, hkv, hq // hkv, sq, sk, qk_scale, d, dv,
            keys_per_split, splits, kv_lo, kv_hi, left, right, softcap_in,
        ), dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                CAUSAL=effective_causal, PAD_D=block_d != d, PAD_DV=block_dv != dv,
                IEEE=q.dtype == torch.float32, DIRECT=direct, OFFS64=_needs_offs64(q, k, v, out), **flags),
            launch_options(cfg), index)
        if not direct:
            self.merge = BoundLaunch(_MERGE, (bsz * hq * sq,), 5, (*out.stride(), hq, sq, splits, dv),
                                     *merge_meta(splits, block_dv, dv, flags["HAS_SINKS"]), index)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_on_device(self.index, self._run, q, k, v, sinks)

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.outputs.allocate()
        if self.outputs.finished:
            if sinks is not None and lse.numel():  # no key at all: every row's lse is its sink
                lse.copy_(sinks.view(1, -1, 1).expand_as(lse))
            return out, lse
        sk_ptr = lse if sinks is None else sinks  # never read without sinks
        if self.merge is None:
            # po/pl are unused by the kernel when DIRECT: lse stands in for both
            self.split((q, k, v, lse, lse, out, lse, sk_ptr), (out, lse))
            return out, lse
        shape_o, shape_l = self.part_shapes  # type: ignore[misc]
        po = torch.empty(shape_o, dtype=torch.float32, device=self.device)
        pl = torch.empty(shape_l, dtype=torch.float32, device=self.device)
        self.split((q, k, v, po, pl, out, lse, sk_ptr), (po, pl))
        self.merge((po, pl, out, lse, sk_ptr), (out, lse))
        return out, lse


_PLANS: dict[tuple[Any, ...], _DecodePlan] = {}


def decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    config: dict[str, Any],
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention for short queries; same contract as forward.attention_forward.

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), bhsd-indexed views of any strides;
    window, softcap and sinks as forward.attention_forward.
    Returns out (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32 (natural log).
    """
    variant = make_variant(window, softcap, sinks)
    if sinks is not None:
        check_sinks(sinks, q)
    plan = cached_plan(_PLANS, _DecodePlan, q, k, v, causal, scale, config, variant)
    if plan.forward is not None:
        return attention_forward(q, k, v, causal=causal, scale=scale, config=plan.forward, window=window,
                                 softcap=softcap, sinks=sinks)
    return plan.run(q, k, v, sinks)


def prepare_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                   config: dict[str, Any], window: tuple[int, int] | None = None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """decode_forward for exactly this call signature, its plan looked up once: f(q, k, v, sinks=None)."""
    plan = cached_plan(_PLANS, _DecodePlan, q, k, v, causal, scale, config, make_variant(window, softcap, sinks))
    if plan.forward is not None:  # the plan hands this signature to the dense forward
        return prepare_forward(q, k, v, causal=causal, scale=scale, config=plan.forward, window=window,
                               softcap=softcap, sinks=sinks)
    return plan_launch(plan)


_SPLIT = DirectLauncher(_decode_split_kernel)
_MERGE = DirectLauncher(_decode_merge_kernel)
