"""Variable-length (packed) attention in Triton: the forward and the backward kernels and their launches.

Layout (flash_attn's varlen convention): q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv,
Dv); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q against rows
cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v. Causal is bottom-right within each sequence.
lse is (Hq, total_q) float32, natural log.

The kernels are the dense ones' programs with a per-sequence prologue: a program reads its
sequence's start and length from cu_seqlens (on the device: no host sync, no padding), offsets
its base pointers by the start and then runs the dense kernels' own device helpers with that
sequence's (Sq, Sk): `_fwd_blocks` from forward.py and
`_query_blocks`, `_dkdv_blocks`, `_dq_blocks` from backward.py. The grid is sized by
max_seqlen_q / max_seqlen_k; programs past their own sequence's end do nothing.

The forward has two kernels, as the dense one does: the portable pointer kernel, and on Hopper
(a TMA config, 16-byte aligned rows) `_varlen_fwd_kernel_tma`, whose tensor descriptors span one
sequence's rows of one head ((Sq, D) for q and out, (Sk, D) for k and v): the copy engine reads
zeros past the sequence's end and clips the output store there, so a tile never touches the next
sequence, and the K/V addresses leave the registers to the softmax (the pointer kernel with the
same 4-warp tiles spills).

Backward: delta = rowsum(dO * O) in torch (memory-bound, one pass), then a dk/dv kernel (one
program per kv block of one sequence and kv head, looping over the GQA group) and a dq kernel
(one program per query block): deterministic, no atomics, like the dense backward.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import backward as _bwd
from . import configs
from .forward import (
    _finish,
    _fwd_blocks,
    _fwd_blocks_tma,
    _softmax_init,
    check_sinks,
    ensure_tma_allocator,
    fast_tanh_on,
    kernel_window,
    launch_options,
    make_variant,
    query_block_of,
    softcap_mode,
    tma_strides_ok,
    variant_scalars,
)
from .backward import (
    _dkdv_blocks,
    _dq_blocks,
    _load_tile,
    _query_blocks,
    _store_tile,
)
from .launch import cuda_index, on_device

# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _sequence(CU_Q, CU_K, b):
    """(first query row, query rows, first key row, key rows) of sequence b, read from cu_seqlens."""
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    return q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, O, LSE, SINKS, CU_Q, CU_K,
    sqm, sqh, sqd,
    skn, skh, skd,
    svn, svh, svd,
    som, soh, sod,
    slh, slm,
    heads_q, group, num_m, qk_scale, head_dim, head_dim_v,
    window_left, window_right, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    # the dense kernel's order; programs past the sequence's end leave at once
    pid_m, pid_bh = query_block_of(tl.program_id(0), num_m, CAUSAL, WINDOW)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_start, seq_q, k_start, seq_k = _sequence(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    if start_m < seq_q:  # blocks past this sequence's end: nothing to do
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        offs_n0 = tl.arange(0, BLOCK_N)
        # packed rows: base pointers and block starts are 64-bit, offsets inside a tile 32-bit
        Q_base = Q + q_start.to(tl.int64) * sqm + h.to(tl.int64) * sqh
        K_base = K + k_start.to(tl.int64) * skn + hk.to(tl.int64) * skh
        V_base = V + k_start.to(tl.int64) * svn + hk.to(tl.int64) * svh
        kt_off = offs_n0[None, :] * skn + offs_d[:, None] * skd
        v_off = offs_n0[:, None] * svn + offs_dv[None, :] * svd

        in_q = offs_m < seq_q
        q_mask = in_q[:, None]
        if PAD_D:
            q_mask = q_mask & (offs_d[None, :] < head_dim)
        # the block's first row as a 64-bit offset (one sequence may hold more than 2^31 / stride rows)
        rows_in = tl.arange(0, BLOCK_M)
        q = tl.load(Q_base + start_m.to(tl.int64) * sqm + rows_in[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=q_mask, other=0.0)

        m_i, l_i = _softmax_init(SINKS, h, BLOCK_M, HAS_SINKS)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                    start_m, seq_q, seq_k, qk_scale, offs_d, offs_dv, head_dim, head_dim_v,
                                    window_left, window_right, softcap_in,
                                    BLOCK_M, BLOCK_N, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)

        out, lse = _finish(acc, l_i, m_i)
        O_base = O + q_start.to(tl.int64) * som + h.to(tl.int64) * soh
        o_mask = in_q[:, None]
        if PAD_DV:
            o_mask = o_mask & (offs_dv[None, :] < head_dim_v)
        tl.store(O_base + start_m.to(tl.int64) * som + rows_in[:, None] * som + offs_dv[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=o_mask)
        tl.store(LSE + h.to(tl.int64) * slh + (q_start.to(tl.int64) + offs_m) * slm, lse, mask=in_q)


@triton.jit
def _varlen_fwd_kernel_tma(
    Q, K, V, O, LSE, SINKS, CU_Q, CU_K,
    sqm, sqh, skn, skh, svn, svh, som, soh, slh, slm,
    heads_q, group, num_m, qk_scale, head_dim, head_dim_v,
    window_left, window_right, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WS: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    # the pointer kernel's program order
    pid_m, pid_bh = query_block_of(tl.program_id(0), num_m, CAUSAL, WINDOW)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    q_start, seq_q, k_start, seq_k = _sequence(CU_Q, CU_K, b)
    start_m = pid_m * BLOCK_M
    if start_m < seq_q:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # one (rows, D) plane per sequence and head; a sequence without keys is never read from
        # (its loops are empty), its descriptor keeps one row so that it stays well-formed
        rows_k = tl.maximum(seq_k, 1)
        q_desc = tl.make_tensor_descriptor(Q + q_start.to(tl.int64) * sqm + h.to(tl.int64) * sqh,
                                           shape=[seq_q, head_dim], strides=[sqm, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(K + k_start.to(tl.int64) * skn + hk.to(tl.int64) * skh,
                                           shape=[rows_k, head_dim], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V + k_start.to(tl.int64) * svn + hk.to(tl.int64) * svh,
                                           shape=[rows_k, head_dim_v], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
        o_desc = tl.make_tensor_descriptor(O + q_start.to(tl.int64) * som + h.to(tl.int64) * soh,
                                           shape=[seq_q, head_dim_v], strides=[som, 1],
                                           block_shape=[BLOCK_M, BLOCK_DV])
        q = q_desc.load([start_m, 0])

        m_i, l_i = _softmax_init(SINKS, h, BLOCK_M, HAS_SINKS)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
        acc, l_i, m_i = _fwd_blocks_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, start_m, seq_q, seq_k,
                                        qk_scale, window_left, window_right, softcap_in,
                                        BLOCK_M, BLOCK_N, CAUSAL, IEEE, WS, WINDOW, SOFTCAP)
        out, lse = _finish(acc, l_i, m_i)
        # clipped at this sequence's last row: the next sequence's rows are never written
        o_desc.store([start_m, 0], out.to(O.dtype.element_ty))
        tl.store(LSE + h.to(tl.int64) * slh + (q_start.to(tl.int64) + offs_m) * slm, lse, mask=offs_m < seq_q)


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _varlen_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    sqm, sqh, sqd, skn, skh, skd, svn, svh, svd, sdom, sdoh, sdod,
    slh, slm, sdkn, sdkh, sdkd, sdvn, sdvh, sdvd,
    heads_kv, group, num_n, total_q, head_dim, head_dim_v,
    sm_scale, qk_scale2, window_left, window_right, softcap_in,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # the dense backward's order: one kv head's key blocks adjacent (programs running together
    # share its Q/dO in L2), the first key blocks (the most queries under causal) first
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    b = pid_bh // heads_kv
    hk = pid_bh % heads_kv
    q_start, seq_q, k_start, seq_k = _sequence(CU_Q, CU_K, b)
    n0 = pid_n * BLOCK_N
    if n0 < seq_k:
        q0 = q_start.to(tl.int64)
        k0 = k_start.to(tl.int64)
        cols_n = n0 + tl.arange(0, BLOCK_N)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        n64 = n0.to(tl.int64)
        k_ptrs = K + (k0 + n64) * skn + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
        v_ptrs = V + (k0 + n64) * svn + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd
        k = _load_tile(k_ptrs, cols_n, seq_k, offs_d, head_dim, False, EVEN_D)
        v = _load_tile(v_ptrs, cols_n, seq_k, offs_dv, head_dim_v, False, EVEN_DV)
        dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
        dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

        causal_offset = seq_k - seq_q
        first, full, full_hi, end = _query_blocks(n0, seq_q, seq_k, window_left, window_right, BLOCK_M, BLOCK_N,
                                                  CAUSAL, WINDOW)
        for g in range(group):
            h = (hk * group + g).to(tl.int64)
            q_head = Q + q0 * sqm + h * sqh
            do_head = DO + q0 * sdom + h * sdoh
            lse_head = LSE + h * slh + q0 * slm
            delta_head = DELTA + h * total_q + q0
            # no atomic dq here: lse_head stands in for its (unused) pointer
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_head, do_head, lse_head, delta_head, lse_head,
                sqm, sqd, sdom, sdod, slm, 0,
                first, full, full_hi, end, cols_n,
                seq_q, head_dim, head_dim_v, qk_scale2, sm_scale, causal_offset,
                window_left, window_right, softcap_in,
                CAUSAL, False, BLOCK_M, BLOCK_D, BLOCK_DV, False, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
            )

        dk *= sm_scale
        dk_ptrs = DK + (k0 + n64) * sdkn + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
        dv_ptrs = DV + (k0 + n64) * sdvn + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd
        _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), cols_n, seq_k, offs_d, head_dim, False, EVEN_D)
        _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), cols_n, seq_k, offs_dv, head_dim_v, False, EVEN_DV)


@triton.jit
def _varlen_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sqm, sqh, sqd, skn, skh, skd, svn, svh, svd, sdom, sdoh, sdod,
    slh, slm, sdqm, sdqh, sdqd,
    heads_q, group, num_m, total_q, head_dim, head_dim_v,
    sm_scale, qk_scale2, window_left, window_right, softcap_in,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # one head's query blocks adjacent, the last (the most keys under causal) first
    pid = tl.program_id(0)
    pid_m = num_m - 1 - pid % num_m
    pid_bh = pid // num_m
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    q_start, seq_q, k_start, seq_k = _sequence(CU_Q, CU_K, b)
    m0 = pid_m * BLOCK_M
    if m0 < seq_q:
        q0 = q_start.to(tl.int64)
        k0 = k_start.to(tl.int64)
        m64 = m0.to(tl.int64)
        rows = m0 + tl.arange(0, BLOCK_M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_ptrs = Q + (q0 + m64) * sqm + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
        do_ptrs = DO + (q0 + m64) * sdom + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod
        q = _load_tile(q_ptrs, rows, seq_q, offs_d, head_dim, False, EVEN_D)
        do = _load_tile(do_ptrs, rows, seq_q, offs_dv, head_dim_v, False, EVEN_DV)
        lse_ptrs = LSE + h * slh + (q0 + m64) * slm + offs_m * slm
        in_rows = rows < seq_q
        lse = tl.load(lse_ptrs, mask=in_rows, other=float("inf"))
        delta = tl.load(DELTA + h * total_q + q0 + m64 + offs_m, mask=in_rows, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

        k_head = K + k0 * skn + hk * skh
        v_head = V + k0 * svn + hk * svh
        causal_offset = seq_k - seq_q
        dq = _dq_blocks(dq, q, do, lse2, delta, k_head, v_head, skn, skd, svn, svd,
                        m0, rows, seq_q, seq_k, head_dim, head_dim_v, qk_scale2, causal_offset,
                        window_left, window_right, softcap_in,
                        CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP)

        dq *= sm_scale
        dq_ptrs = DQ + (q0 + m64) * sdqm + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd
        _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), rows, seq_q, offs_d, head_dim, False, EVEN_D)


# --- host side -----------------------------------------------------------------------------------


# The descriptor kernel's programs each take TMA_SCRATCH_BYTES of global scratch for their four
# device-side descriptors, and the grid is sized by max_seqlen_q x batch x heads (most programs of a
# mixed batch exit at once): past this many programs (64 MiB of scratch) the pointer kernel runs
# instead. Triton also computes the scratch offset in 32 bits, which overflows at 2^22 programs.
TMA_SCRATCH_BYTES = 512
MAX_TMA_PROGRAMS = (64 << 20) // TMA_SCRATCH_BYTES


def _check_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                  cu_k: torch.Tensor) -> None:
    """What would corrupt memory if it were wrong (the public call validates the rest)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-d packed (total, H, D) tensor, got {t.dim()}-d")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit last stride, got strides {t.stride()}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k, v: expected (total_k, Hkv, D) and (total_k, Hkv, Dv) matching q's D, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"heads: expected Hq divisible by Hkv, got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.device != q.device:
            raise ValueError(f"{name}: expected a 1-d int32 tensor on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_k: expected {tuple(cu_q.shape)} like cu_seqlens_q, got {tuple(cu_k.shape)}")


def _window_args(causal: bool, window: tuple[int, int] | None, max_q: int, max_k: int) -> tuple[int, int, bool]:
    win = kernel_window(bool(causal), (-1, -1) if window is None else tuple(window), max_q, max_k)  # type: ignore[arg-type]
    if win is None:
        return 0, 0, False
    return win[0], win[1], True


def varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, *, causal: bool, scale: float, config: dict[str, Any] | None = None,
    window: tuple[int, int] | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward (no autograd): out (total_q, Hq, Dv) in q's dtype, lse (Hq, total_q) float32.

    cu_seqlens_* are int32 (B + 1,) on q's device, trusted (the public call validates them);
    max_seqlen_q/k bound every sequence's length (they size the grid). window, softcap and sinks
    as forward.attention_forward, per sequence.
    """
    _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if sinks is not None:
        check_sinks(sinks, q)  # q's dim 1 is Hq in the packed layout too
    total_q, hq, d = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, hq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or hq == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out, lse
    arch = configs.arch_of_tensor(q)
    cfg = configs.resolve_forward(config, arch, max(d, dv), bool(causal), max_seqlen_q, max(max_seqlen_k, 1))
    use_tma = (bool(cfg.get("TMA")) and tma_strides_ok((q, k, v, out))
               and not (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr()) & 15
               and -(-max_seqlen_q // int(cfg["BLOCK_M"])) * batch * hq <= MAX_TMA_PROGRAMS)
    if not use_tma:
        cfg = configs.pointer_config(cfg, arch, max(d, dv))
    cfg = configs.shrink_to_fit(cfg, arch, d, dv, q.element_size())
    block_m, block_n = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])
    block_d, block_dv = configs.block_dim(d), configs.block_dim(dv)
    variant = make_variant(window, softcap, sinks)
    qk_scale, _, _, softcap_in, flags = variant_scalars(variant, bool(causal), scale, max_seqlen_q, max_seqlen_k,
                                                        fast_tanh_on(q))
    left, right, has_window = _window_args(causal, window, max_seqlen_q, max_seqlen_k)
    flags["WINDOW"] = has_window
    num_m = -(-max_seqlen_q // block_m)
    grid = (num_m * batch * hq,)
    # without sinks the kernels never read their SINKS pointer: lse stands in
    sinks_arg = lse if sinks is None else sinks
    with on_device(cuda_index(q)):
        if use_tma:
            ensure_tma_allocator()
            _varlen_fwd_kernel_tma[grid](
                q, k, v, out, lse, sinks_arg, cu_seqlens_q, cu_seqlens_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), *lse.stride(),
                hq, hq // hkv, num_m, qk_scale, d, dv, left, right, softcap_in,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=bool(causal),
                IEEE=q.dtype == torch.float32, WS=bool(cfg.get("WS", False)), **flags, **launch_options(cfg),
            )
        else:
            _varlen_fwd_kernel[grid](
                q, k, v, out, lse, sinks_arg, cu_seqlens_q, cu_seqlens_k,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                hq, hq // hkv, num_m, qk_scale, d, dv, left, right, softcap_in,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=bool(causal),
                PAD_D=block_d != d, PAD_DV=block_dv != dv, IEEE=q.dtype == torch.float32, **flags,
                **launch_options(cfg),
            )
    return out, lse


def varlen_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
    causal: bool, scale: float, config: dict[str, Any] | None = None, window: tuple[int, int] | None = None,
    softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv[, dsinks]) of varlen_forward from its saved out and lse (Hq, total_q).

    dk, dv sum each kv head's query group; rows of k/v that no sequence covers get 0.
    """
    _check_packed(q, k, v, cu_seqlens_q, cu_seqlens_k)
    total_q, hq, d = q.shape
    total_k, hkv, dv = k.shape[0], k.shape[1], v.shape[2]
    batch = cu_seqlens_q.shape[0] - 1
    do = do if do.stride(-1) == 1 or do.shape[-1] <= 1 else do.contiguous()
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dvv = torch.zeros_like(v)
    # delta[h, i] = sum_d dO * O, (Hq, total_q) as the kernels index it: the dense backward's
    # preprocess kernel over the packed rows seen as one (1, Hq, total_q, Dv) batch
    delta = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)
    grads: tuple[torch.Tensor, ...] = (dq, dk, dvv)
    if total_q and hq:
        o4, do4 = out.transpose(0, 1).unsqueeze(0), do.transpose(0, 1).unsqueeze(0)
        block_dv = configs.block_dim(dv)
        with on_device(cuda_index(q)):
            _bwd._bwd_preprocess_kernel[(triton.cdiv(total_q, configs.PREPROCESS_BLOCK_M) * hq,)](
                o4, do4, delta, *o4.stride(), *do4.stride(), hq, total_q, dv,
                BLOCK_M=configs.PREPROCESS_BLOCK_M, BLOCK_DV=block_dv,
                EVEN_M=total_q % configs.PREPROCESS_BLOCK_M == 0, EVEN_DV=block_dv == dv,
            )
    if total_q and total_k and hq and batch > 0 and max_seqlen_q > 0 and max_seqlen_k > 0:
        cfg = configs.resolve_backward_config(config, d, dv, fp32=q.dtype == torch.float32,
                                              arch=configs.arch_of_tensor(q))
        bm, bn = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]
        warps, stages = cfg["BWD_num_warps"], cfg["BWD_num_stages"]
        block_d, block_dv = configs.block_dim(d), configs.block_dim(dv)
        left, right, has_window = _window_args(causal, window, max_seqlen_q, max_seqlen_k)
        if softcap:
            qk_scale2, softcap_in = float(softcap) * _bwd.LOG2E, float(scale) / float(softcap)
        else:
            qk_scale2, softcap_in = float(scale) * _bwd.LOG2E, 1.0
        flags = dict(CAUSAL=bool(causal), BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_D=block_d == d,
                     EVEN_DV=block_dv == dv, IEEE=q.dtype == torch.float32, WINDOW=has_window,
                     SOFTCAP=softcap_mode(softcap, fast_tanh_on(q)))
        with on_device(cuda_index(q)):
            num_n = -(-max_seqlen_k // bn)
            _varlen_dkdv_kernel[(num_n * batch * hkv,)](
                q, k, v, do, lse, delta, dk, dvv, cu_seqlens_q, cu_seqlens_k,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dk.stride(), *dvv.stride(),
                hkv, hq // hkv, num_n, total_q, d, dv, float(scale), qk_scale2, left, right, softcap_in,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **flags,
            )
            # the dq pass's own tiles, as the dense backward's (by default the dk-dv tiles swapped)
            dq_m, dq_n = cfg["BWD_DQ_BLOCK_M"], cfg["BWD_DQ_BLOCK_N"]
            num_m = -(-max_seqlen_q // dq_m)
            _varlen_dq_kernel[(num_m * batch * hq,)](
                q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dq.stride(),
                hq, hq // hkv, num_m, total_q, d, dv, float(scale), qk_scale2, left, right, softcap_in,
                BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=cfg["BWD_DQ_num_warps"],
                num_stages=cfg["BWD_DQ_num_stages"], **flags,
            )
    if sinks is not None:
        grads = (*grads, _bwd.sinks_grad(sinks, lse.unsqueeze(0), delta.unsqueeze(0)))
    return grads
