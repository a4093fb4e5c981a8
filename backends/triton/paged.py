"""Split-KV attention against a KV cache, contiguous or paged: decode, speculative verification and
chunked prefill (Sq >= 1 new queries per sequence), CUDA-graph safe.

q (B, Sq, Hq, D) against a cache of per-sequence length cache_seqlens[b] (int32, on the device):
- contiguous: k_cache, v_cache (B, Smax, Hkv, D);
- paged: k_cache, v_cache (num_blocks, PAGE, Hkv, D) and block_table (B, max_blocks) int32; key j
  of sequence b lives in page block_table[b, j // PAGE], row j % PAGE. The kernel gathers the pages
  itself (one table load per key block): no gather copy. PAGE is any multiple of 16.

Bottom-right causal per sequence: query i sees key j iff j <= i + cache_seqlens[b] - Sq.

The program layout and its parts (rows, query load, softmax step, result or partials) are
decode.py's split-KV ones: a program owns one (sequence, kv head, key range)
with the whole GQA group x Sq queries in its M dimension, so each K/V byte is read once per group.
Nothing here reads a device tensor on the host: the number of splits is planned from the cache's
capacity (Smax, or max_blocks x PAGE), each program reads its sequence's length on the device and
a split past the end of its sequence leaves an empty partial (lse = -inf) that the merge (decode.py's
merge kernel) weighs 0. Grid, arguments and allocations depend on shapes only, so one capture
replays with new cache_seqlens and block tables.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import configs
from .decode import _MERGE, _plan, _split_init, _split_load_q, _split_rows, _split_step, _split_store, merge_meta
from .forward import (
    Variant,
    check_sinks,
    fast_tanh_on,
    kernel_window,
    launch_options,
    make_variant,
    variant_scalars,
)
from .launch import BoundLaunch, DirectLauncher, cuda_index, run_on_device


@triton.jit
def _paged_split_kernel(
    Q, K, V, PO, PL, O, LSE, SINKS, SEQLENS, TABLE,
    sqb, sqm, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, som, soh, sod,
    stb, stn,
    heads_q, heads_kv, group, seq_q, qk_scale, head_dim, head_dim_v,
    keys_per_split, num_splits, window_left, window_right, softcap_in,
    PAGE: tl.constexpr, PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bkv // heads_kv
    hk = pid_bkv % heads_kv
    b64 = b.to(tl.int64)
    seq_k = tl.load(SEQLENS + b)

    # -- rows of this program: (head in group, query) pairs of one kv head
    in_rows, qi, h = _split_rows(pid_m, hk, group, seq_q, BLOCK_M)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _split_load_q(Q + b64 * sqb, qi, h64, in_rows, offs_d, sqm, sqh, sqd, head_dim, PAD_D)
    m_i, l_i, acc = _split_init(SINKS, h, in_rows, BLOCK_M, BLOCK_DV, HAS_SINKS, DIRECT)

    causal_offset = seq_k - seq_q
    # the keys some query can see start at kv_lo (a window's left edge), end at seq_k
    kv_lo = 0
    if WINDOW:
        kv_lo = (tl.maximum(causal_offset - window_left, 0) // BLOCK_N) * BLOCK_N
    n_lo = kv_lo + split * keys_per_split
    n_hi = tl.minimum(seq_k, n_lo + keys_per_split)
    kv_head_k = hk.to(tl.int64) * skh
    kv_head_v = hk.to(tl.int64) * svh
    if not PAGED:
        K_seq = K + b64 * skb + kv_head_k
        V_seq = V + b64 * svb + kv_head_v
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        in_k = offs_n < n_hi
        if PAGED:
            # page of each key from the table (rows past the end read page 0, masked below)
            page = tl.load(TABLE + b64 * stb + (offs_n // PAGE) * stn, mask=in_k, other=0).to(tl.int64)
            k_rows = page * skb + (offs_n % PAGE) * skn + kv_head_k
            v_rows = page * svb + (offs_n % PAGE) * svn + kv_head_v
            kt_ptrs = K + k_rows[None, :] + offs_d[:, None] * skd
            v_ptrs = V + v_rows[:, None] + offs_dv[None, :] * svd
        else:
            kt_ptrs = K_seq + offs_n.to(tl.int64)[None, :] * skn + offs_d[:, None] * skd
            v_ptrs = V_seq + offs_n.to(tl.int64)[:, None] * svn + offs_dv[None, :] * svd
        kt_mask = in_k[None, :]
        v_mask = in_k[:, None]
        if PAD_D:
            kt_mask = kt_mask & (offs_d[:, None] < head_dim)
        if PAD_DV:
            v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        acc, l_i, m_i = _split_step(acc, l_i, m_i, q, kt, v, qi, offs_n, in_k, causal_offset, qk_scale,
                                    window_left, window_right, softcap_in, BLOCK_M, BLOCK_N, CAUSAL, IEEE,
                                    WINDOW, SOFTCAP)

    # the result, or partials in decode.py's layout for its merge kernel
    _split_store(acc, l_i, m_i, O, LSE, PO, PL, b64, h64, qi, in_rows, offs_dv, sob, soh, som, sod,
                 heads_q, seq_q, num_splits, split, head_dim_v, BLOCK_DV, PAD_DV, DIRECT)


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
           block_table: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices that would corrupt memory if wrong (the public call checks the rest)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor, got {t.dim()}-d")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit last stride, got strides {t.stride()}")
    if k_cache.shape[:3] != v_cache.shape[:3] or q.shape[3] != k_cache.shape[3]:
        raise ValueError(f"k_cache, v_cache: expected matching (blocks, rows, Hkv) and q's D, got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if k_cache.shape[2] == 0 or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"heads: expected Hq divisible by Hkv, got Hq={q.shape[2]}, Hkv={k_cache.shape[2]}")
    if cache_seqlens.dtype != torch.int32 or tuple(cache_seqlens.shape) != (q.shape[0],):
        raise ValueError(f"cache_seqlens: expected int32 of shape ({q.shape[0]},), got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    if block_table is not None:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
            raise ValueError(f"block_table: expected int32 of shape ({q.shape[0]}, max_blocks), got "
                             f"{block_table.dtype} {tuple(block_table.shape)}")
        if k_cache.shape[1] % 16:
            raise ValueError(f"k_cache: expected a block size that is a multiple of 16, got {k_cache.shape[1]}")
    elif k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache: expected batch {q.shape[0]} (a contiguous cache), got {k_cache.shape[0]}")


# The plan knows the capacity, not the lengths (a CUDA graph captures shapes only). With lengths
# spread evenly below the capacity, half of the splits are empty: MIXED_LENGTH_SPLIT_FACTOR x the
# dense decode's programs per SM keeps the device as busy. And the sequences' work is uneven: one
# split must stay a small part of an SM's share, or the longest sequences' splits run alone at the
# end. So the plan takes more splits where that count leaves few: enough for MIXED_LENGTH_BALANCE x
# the dense programs per SM (a split then stays under ~1/8 of an SM's share), as long as a split
# keeps MIXED_LENGTH_MIN_KEYS keys (finer splits pay their partial's write and merge for little).
# On an H100 (bf16, 32 query / 8 KV heads, D=128, lengths uniform in 512..32k, graph replays) the
# first count alone left B=64 at 0.88x of the key bandwidth of SDPA on a contiguous mean-length
# cache (2 splits); 8-16 splits read 0.96x, B=256 0.97-0.98x at 2-8 (0.95x at 1), B=8 ran fastest
# at 8-16 splits, and B=1 (one 32k sequence) at the first count (66).
MIXED_LENGTH_SPLIT_FACTOR = 2
MIXED_LENGTH_BALANCE = 16
MIXED_LENGTH_MIN_KEYS = 2048


class _PagedPlan:
    """One call signature's launches (split, then merge), made once: decode is launch-bound, and a
    CUDA graph captures exactly these launches (shapes only, no device values)."""

    __slots__ = ("split", "merge", "shape", "lse_shape", "part_shapes", "device", "dtype", "index", "empty")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor | None, causal: bool, scale: float, config: dict[str, Any],
                 variant: Variant) -> None:
        bsz, sq, hq, d = q.shape
        hkv, dv = k_cache.shape[2], v_cache.shape[3]
        paged = block_table is not None
        page = int(k_cache.shape[1]) if paged else 1
        capacity = block_table.shape[1] * page if paged else int(k_cache.shape[1])  # type: ignore[union-attr]
        self.shape = (bsz, sq, hq, dv)
        self.lse_shape = (bsz, hq, sq)
        self.device, self.dtype = q.device, q.dtype
        self.index = cuda_index(q)
        self.split = self.merge = None
        self.part_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.empty = 0 in (bsz, sq, hq) or capacity == 0
        if self.empty:
            return
        arch = configs.arch_of_tensor(q)
        cfg = configs.resolve_decode({k: val for k, val in (config or {}).items() if k != "PATH"}, arch, d)
        fitted = configs.shrink_to_fit({**cfg, "BLOCK_M": configs.DECODE_MAX_BLOCK_M}, arch, d, dv, q.element_size())
        block_n = int(fitted["BLOCK_N"])
        cfg = {**cfg, "num_stages": fitted["num_stages"], "BLOCK_N": block_n}
        block_d, block_dv = configs.block_dim(d), configs.block_dim(dv)
        index = self.index or 0
        sm_count = configs.sm_count_of(q.device.type, index)
        causal = bool(causal)
        qk_scale, _, _, softcap_in, flags = variant_scalars(variant, causal, scale, sq, capacity, fast_tanh_on(q))
        win = kernel_window(causal, variant.window, sq, capacity)
        left, right = win if win is not None else (0, 0)
        flags["WINDOW"] = win is not None
        # the keys one sequence's queries can see: all of the capacity, or a window's span
        span = capacity if win is None else min(capacity, left + sq + 2 * block_n)
        # splits are planned over the capacity, and a sequence shorter than it leaves its last
        # splits empty (they exit at once); see MIXED_LENGTH_SPLIT_FACTOR
        asked = int(cfg.get("NUM_SPLITS") or 0)
        plan = _plan(block_n, asked, bsz, hq, hkv, sq, max(span, 1), sm_count * MIXED_LENGTH_SPLIT_FACTOR)
        if not asked:
            finer = _plan(block_n, 0, bsz, hq, hkv, sq, max(span, 1), sm_count * MIXED_LENGTH_BALANCE)[2]
            wanted = min(finer, max(1, span // MIXED_LENGTH_MIN_KEYS))
            if wanted > plan[2]:
                plan = _plan(block_n, wanted, bsz, hq, hkv, sq, max(span, 1), sm_count)
        block_m, m_blocks, splits, keys_per_split = plan
        direct = splits == 1
        if not direct:
            self.part_shapes = ((bsz * hq * sq, splits, block_dv), (bsz * hq * sq, splits))
        o_strides = (sq * hq * dv, hq * dv, dv, 1)  # (B, Sq, Hq, Dv) contiguous
        t_strides = tuple(block_table.stride()) if paged else (0, 0)  # type: ignore[union-attr]
        self.split = BoundLaunch(_SPLIT, (bsz * hkv, splits, m_blocks), 10, (
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *o_strides, *t_strides,
            hq, hkv, hq // hkv, sq, qk_scale, d, dv, keys_per_split, splits, left, right, softcap_in,
        ), dict(PAGE=page, PAGED=paged, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                CAUSAL=causal, PAD_D=block_d != d, PAD_DV=block_dv != dv, IEEE=q.dtype == torch.float32,
                DIRECT=direct, **flags), launch_options(cfg), index)
        if not direct:
            # decode.py's merge, with the output's strides in (b, h, i, d) order
            self.merge = BoundLaunch(_MERGE, (bsz * hq * sq,), 5, (o_strides[0], o_strides[2], o_strides[1],
                                                                     o_strides[3], hq, sq, splits, dv),
                                     *merge_meta(splits, block_dv, dv, flags["HAS_SINKS"]), index)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            block_table: torch.Tensor | None, sinks: torch.Tensor | None,
            out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_on_device(self.index, self._run, q, k_cache, v_cache, cache_seqlens, block_table, sinks, out)

    def _run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
             block_table: torch.Tensor | None, sinks: torch.Tensor | None,
             out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if self.empty:
            out.zero_()
            if sinks is not None and lse.numel():
                lse.copy_(sinks.view(1, -1, 1).expand_as(lse))
            else:
                lse.fill_(float("-inf"))
            return out, lse
        sk_ptr = lse if sinks is None else sinks  # never read without sinks
        table = cache_seqlens if block_table is None else block_table  # never read when not paged
        if self.merge is None:
            self.split((q, k_cache, v_cache, lse, lse, out, lse, sk_ptr, cache_seqlens, table), (out, lse))
            return out, lse
        shape_o, shape_l = self.part_shapes  # type: ignore[misc]
        po = torch.empty(shape_o, dtype=torch.float32, device=self.device)
        pl = torch.empty(shape_l, dtype=torch.float32, device=self.device)
        self.split((q, k_cache, v_cache, po, pl, out, lse, sk_ptr, cache_seqlens, table), (po, pl))
        self.merge((po, pl, out, lse, sk_ptr), (out, lse))
        return out, lse


_PLANS: dict[tuple[Any, ...], _PagedPlan] = {}
MAX_PLANS = 1024


def kvcache_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    *,
    causal: bool = True,
    scale: float,
    config: dict[str, Any] | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, Sq, Hq, D) against a contiguous (B, Smax, Hkv, D) or paged
    (num_blocks, PAGE, Hkv, D) + block_table cache of cache_seqlens[b] keys per sequence.

    Returns out (B, Sq, Hq, Dv) in q's dtype (written into `out` when given: a static buffer for
    CUDA graphs, contiguous) and lse (B, Hq, Sq) float32, natural log. cache_seqlens and
    block_table are trusted here (the public call validates their values, once, when asked).
    Reads no device value on the host; allocates only its outputs and the split partials.
    """
    _check(q, k_cache, v_cache, cache_seqlens, block_table)
    variant = make_variant(window, softcap, sinks)
    if sinks is not None:
        check_sinks(sinks, q.transpose(1, 2))
    if out is not None and (tuple(out.shape) != (*q.shape[:3], v_cache.shape[3]) or not out.is_contiguous()
                            or out.dtype != q.dtype):
        raise ValueError(f"out: expected a contiguous {q.dtype} tensor of shape "
                         f"{(*q.shape[:3], v_cache.shape[3])}, got {out.dtype} {tuple(out.shape)}")
    paged = block_table is not None
    try:
        key: tuple[Any, ...] | None = (
            q.shape, k_cache.shape, v_cache.shape, q.stride(), k_cache.stride(), v_cache.stride(),
            None if block_table is None else (block_table.shape, block_table.stride()), q.dtype, k_cache.dtype,
            q.device, bool(causal), float(scale), tuple(config.items()) if config else None, variant, paged)
        plan = _PLANS.get(key)  # type: ignore[arg-type]
    except TypeError:
        key, plan = None, None
    if plan is None:
        plan = _PagedPlan(q, k_cache, v_cache, block_table, causal, scale, config or {}, variant)
        if key is not None:
            if len(_PLANS) >= MAX_PLANS:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan.run(q, k_cache, v_cache, cache_seqlens, block_table, sinks, out)


_SPLIT = DirectLauncher(_paged_split_kernel)
