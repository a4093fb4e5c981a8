"""FlashAttention-2 backward in Triton: dq, dk, dv from the forward's saved out and lse.

Three launches and, by default, no float atomics, so the result is bitwise deterministic:

1. ``_bwd_preprocess_kernel``  delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]  (fp32)
2. ``_bwd_dkdv_kernel``        one program per (kv block, batch, kv head): recomputes P from the
                               saved lse block by block over the query blocks that can see the kv
                               block, for every query head of the GQA group, and accumulates
                               dV = P^T dO and dK = dS^T Q in registers (the group sum is a loop
                               in the kernel, never a K/V expansion in memory).
3. ``_bwd_dq_kernel``          one program per (query block, batch, query head): recomputes P and
                               dP over the visible kv blocks and accumulates dQ = dS K.

The price of determinism is recomputing QK^T and dO V^T in the dq pass (7 block matmuls instead of
FlashAttention-2's 5 with atomics on dq). A config may opt into that atomic variant instead
(BWD_DQ_ATOMIC); on H100 it measured slower, so it is never the default.

Masking follows the contract's bottom-right causal rule: query i sees key j iff j <= i + Sk - Sq.
Whole blocks that no query of a block can see are skipped; blocks that every query sees run
without the mask; only the diagonal band pays for the elementwise mask. Rows that see no key carry
lse = -inf from the forward; the kernels treat them as lse = +inf so that their probabilities are
exactly 0 (never inf * 0 = NaN).

Exponentials are computed in base 2: P = exp2(qk * scale * log2(e) - lse * log2(e)).
Head dims that are not powers of two are padded to BLOCK_D = next power of two with masked loads.
Offsets of whole heads and blocks are 64-bit; offsets inside one tile stay 32-bit.
Nothing here is CUDA-only: the same source compiles for sm_80/sm_90 and gfx90a/gfx942.
Block shapes: configs.py (its backward section: defaults, the tuner's space, validation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from flashdispatch.problem import Problem, device_kind_of, normalised_window

from . import configs
from .launch import cuda_index, on_device

LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


# Only builtins and this module's own jit functions are called from the kernels (no tl.cdiv,
# tl.sum): the library's jit helpers are compiled or interpreted as decided when triton was first
# imported, and the CPU tests turn the interpreter on later, for this module alone.


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    # fp32 inputs need true fp32 products: tf32 would miss the fp32 error budget
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tanh(x, MODE: tl.constexpr):
    # the forward's tanh (MODE 2: tanh.approx.f32; 1: through one exp2), repeated here: kernels
    # call only this module's jit functions. The same MODE as the forward's, so that P here is
    # the P whose lse the forward saved.
    if MODE == 2:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _window_keep(rows, cols, causal_offset, left, right):
    # bool (len(rows), len(cols)): row i at p = i + Sk - Sq sees key j iff p - left <= j <= p + right
    p = rows[:, None] + causal_offset
    return (cols[None, :] >= p - left) & (cols[None, :] <= p + right)


@triton.jit
def _window_key_blocks(m0, SEQ_Q, SEQ_K, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_lo, full_hi, end) in keys for query rows [m0, m0 + BLOCK_M) under a window: the
    forward's window_block_range (same clamps, every // on operands >= 0)."""
    offset = SEQ_K - SEQ_Q
    first_p = m0 + offset
    last_p = tl.minimum(m0 + BLOCK_M, SEQ_Q) - 1 + offset
    lo = tl.minimum((tl.maximum(first_p - left, 0) // BLOCK_N) * BLOCK_N, SEQ_K)
    end = tl.maximum(tl.minimum(last_p + right + 1, SEQ_K), lo)
    full_lo = ((tl.maximum(last_p - left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), end)
    full_hi = (tl.maximum(tl.minimum(first_p + right + 1, SEQ_K), 0) // BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return lo, full_lo, full_hi, end


@triton.jit
def _window_query_blocks(n0, SEQ_Q, SEQ_K, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first, full_lo, full_hi, end) in query blocks for keys [n0, n0 + BLOCK_N) under a window:
    blocks [first, end) hold every row that sees one of the keys, [full_lo, full_hi) only rows
    that see all of them (the last, partial block included: its padding rows carry p = 0)."""
    offset = SEQ_K - SEQ_Q
    n_m = _cdiv(SEQ_Q, BLOCK_M)
    n_last = tl.minimum(n0 + BLOCK_N, SEQ_K) - 1
    first = tl.minimum(tl.maximum(n0 - right - offset, 0) // BLOCK_M, n_m)
    row_end = tl.minimum(tl.maximum(n_last + left - offset + 1, 0), SEQ_Q)
    end = tl.maximum(_cdiv(row_end, BLOCK_M), first)
    full_lo = _cdiv(tl.maximum(n_last - right - offset, 0), BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, first), end)
    full_row_end = tl.minimum(tl.maximum(n0 + left - offset + 1, 0), SEQ_Q)
    full_hi = tl.where(full_row_end >= SEQ_Q, n_m, full_row_end // BLOCK_M)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return first, full_lo, full_hi, end


@triton.jit
def _query_blocks(n0, SEQ_Q, SEQ_K, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(first, full, full_hi, end) in query blocks for keys [n0, n0 + BLOCK_N): blocks [first, full)
    and [full_hi, end) need the mask, [full, full_hi) see every key of the block."""
    n_m_blocks = _cdiv(SEQ_Q, BLOCK_M)
    if WINDOW:
        first, full, full_hi, end = _window_query_blocks(n0, SEQ_Q, SEQ_K, left, right, BLOCK_M, BLOCK_N)
    elif CAUSAL:
        # rows before n0 - offset see none of this block; from `full` on, rows see all of it
        causal_offset = SEQ_K - SEQ_Q
        first = tl.maximum(n0 - causal_offset, 0) // BLOCK_M
        full = tl.maximum(n0 + BLOCK_N - 1 - causal_offset + BLOCK_M - 1, 0) // BLOCK_M
        first = tl.minimum(first, n_m_blocks)
        full = tl.minimum(tl.maximum(full, first), n_m_blocks)
        full_hi = n_m_blocks
        end = n_m_blocks
    else:
        first = n0 * 0
        full = n0 * 0
        full_hi = n_m_blocks
        end = n_m_blocks
    return first, full, full_hi, end


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    # Out-of-range rows and padded head-dim columns read as 0: they then add 0 to every product.
    if EVEN_ROWS:
        if EVEN_COLS:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        if EVEN_COLS:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return t


@triton.jit
def _store_tile(ptrs, val, rows, n_rows, cols, n_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    if EVEN_ROWS:
        if EVEN_COLS:
            tl.store(ptrs, val)
        else:
            tl.store(ptrs, val, mask=cols[None, :] < n_cols)
    else:
        if EVEN_COLS:
            tl.store(ptrs, val, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, val, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _load_row_stats(lse_ptrs, delta_ptrs, rows, n_rows, EVEN_ROWS: tl.constexpr):
    # lse -> base 2; a row that sees no key (lse = -inf) and a row past the end both become +inf,
    # so exp2(s - lse2) is exactly 0 there.
    if EVEN_ROWS:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        lse = tl.load(lse_ptrs, mask=rows < n_rows, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=rows < n_rows, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2, delta


# ---------------------------------------------------------------------------------------------
# 1. delta = rowsum(dO * O)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, SEQ_Q, HEAD_DV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = _cdiv(SEQ_Q, BLOCK_M)
    pid_m = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = (pid_m * BLOCK_M).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = O + b * stride_ob + h * stride_oh + m0 * stride_om
    o_ptrs += offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    do_ptrs = DO + b * stride_dob + h * stride_doh + m0 * stride_dom
    do_ptrs += offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    o = _load_tile(o_ptrs, rows, SEQ_Q, offs_dv, HEAD_DV, EVEN_M, EVEN_DV).to(tl.float32)
    do = _load_tile(do_ptrs, rows, SEQ_Q, offs_dv, HEAD_DV, EVEN_M, EVEN_DV).to(tl.float32)
    delta = tl.reduce(o * do, 1, _add)
    delta_ptrs = DELTA + pid_bh.to(tl.int64) * SEQ_Q + rows
    if EVEN_M:
        tl.store(delta_ptrs, delta)
    else:
        tl.store(delta_ptrs, delta, mask=rows < SEQ_Q)


# ---------------------------------------------------------------------------------------------
# 2. dk, dv: one kv block, loop over the GQA group's query heads and their visible query blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,
    q_head, do_head, lse_head, delta_head, dqa_head,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
    m_lo, n_steps, cols_n,
    SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset, left, right, softcap_in,
    MASK: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # tile-local offsets (32-bit, loop invariant); the block's start is added as a 64-bit scalar
    q_tile = offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_tile = offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    dqa_tile = offs_m[:, None] * stride_dqam + offs_d[None, :]
    m0 = m_lo
    for _ in range(n_steps):
        m64 = m0.to(tl.int64)
        rows = m0 + offs_m
        q = _load_tile(q_head + m64 * stride_qm + q_tile, rows, SEQ_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
        do = _load_tile(do_head + m64 * stride_dom + do_tile, rows, SEQ_Q, offs_dv, HEAD_DV, EVEN_M, EVEN_DV)
        lse2, delta = _load_row_stats(lse_head + m64 * stride_lm + offs_m * stride_lm,
                                      delta_head + m64 + offs_m, rows, SEQ_Q, EVEN_M)
        # -- P^T = exp2(K Q^T * scale*log2e - lse2), (BLOCK_N, BLOCK_M)
        qk_t = _mm(k, tl.trans(q), IEEE)
        if SOFTCAP:  # capped score c * tanh(s / c); qk_scale2 holds c * log2(e)
            t_t = _tanh(qk_t * softcap_in, SOFTCAP)
            p_t = tl.exp2(t_t * qk_scale2 - lse2[None, :])
        else:
            p_t = tl.exp2(qk_t * qk_scale2 - lse2[None, :])
        if MASK:
            if WINDOW:
                p_row = rows[None, :] + causal_offset
                keep_t = (cols_n[:, None] >= p_row - left) & (cols_n[:, None] <= p_row + right)
                p_t = tl.where(keep_t, p_t, 0.0)
            else:
                p_t = tl.where(cols_n[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        # -- dV += P^T dO
        dv += _mm(p_t.to(do.dtype), do, IEEE)
        # -- dS^T = P^T * (V dO^T - delta);  dK += dS^T Q  (scale applied once at the end)
        dp_t = _mm(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # d(c tanh(u)) / du = c (1 - tanh^2); the c cancels the 1 / c inside u
            ds_t = ds_t * (1.0 - t_t * t_t)
        ds_t = ds_t.to(q.dtype)
        dk += _mm(ds_t, q, IEEE)
        if DQ_ATOMIC:
            # FlashAttention-2's variant: dQ += dS K straight from here, summed across kv blocks
            # by fp32 atomics (order-dependent rounding: not deterministic)
            dq = _mm(tl.trans(ds_t), k, IEEE) * sm_scale
            keep = (rows[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_D)
            tl.atomic_add(dqa_head + m64 * stride_dqam + dqa_tile, dq, mask=keep, sem="relaxed")
        m0 += BLOCK_M
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v,
    q_head, do_head, lse_head, delta_head, dqa_head,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
    first, full, full_hi, end, cols_n,
    SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset, left, right, softcap_in,
    CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One query head's contribution to a kv block's dk, dv over the query blocks _query_blocks
    gave: the masked edge, the blocks that see every key, and (window) the masked far edge."""
    if CAUSAL or WINDOW:
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_head, do_head, lse_head, delta_head, dqa_head,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
            first * BLOCK_M, full - first, cols_n,
            SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset, left, right, softcap_in,
            True, DQ_ATOMIC, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
    # rows that see the whole block; the kv block's own tail past Sk reads as zeros
    dk, dv = _dkdv_inner(
        dk, dv, k, v, q_head, do_head, lse_head, delta_head, dqa_head,
        stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
        full * BLOCK_M, full_hi - full, cols_n,
        SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset, left, right, softcap_in,
        False, DQ_ATOMIC, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
    )
    if WINDOW:  # rows past the window's far edge: masked again
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_head, do_head, lse_head, delta_head, dqa_head,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
            full_hi * BLOCK_M, end - full_hi, cols_n,
            SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset, left, right, softcap_in,
            True, DQ_ATOMIC, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqab, stride_dqah, stride_dqam,
    H_KV, GROUP, SEQ_Q, SEQ_K, HEAD_D, HEAD_DV,
    sm_scale, qk_scale2, window_left, window_right, softcap_in,
    CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # kv blocks vary fastest: programs running together share one head's Q/dO in L2, and under
    # causal the first kv blocks (the most query blocks to visit) start first.
    pid = tl.program_id(0)
    n_blocks = _cdiv(SEQ_K, BLOCK_N)
    pid_n = pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H_KV).to(tl.int64)
    hk = pid_bh % H_KV
    n0 = pid_n * BLOCK_N
    cols_n = n0 + tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n64 = n0.to(tl.int64)

    k_ptrs = K + b * stride_kb + hk.to(tl.int64) * stride_kh + n64 * stride_kn
    k_ptrs += offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + hk.to(tl.int64) * stride_vh + n64 * stride_vn
    v_ptrs += offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    k = _load_tile(k_ptrs, cols_n, SEQ_K, offs_d, HEAD_D, EVEN_N, EVEN_D)
    v = _load_tile(v_ptrs, cols_n, SEQ_K, offs_dv, HEAD_DV, EVEN_N, EVEN_DV)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)

    causal_offset = SEQ_K - SEQ_Q
    first, full, full_hi, end = _query_blocks(n0, SEQ_Q, SEQ_K, window_left, window_right, BLOCK_M, BLOCK_N,
                                              CAUSAL, WINDOW)
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_head = Q + b * stride_qb + h * stride_qh
        do_head = DO + b * stride_dob + h * stride_doh
        lse_head = LSE + b * stride_lb + h * stride_lh
        delta_head = DELTA + (b * H_KV * GROUP + h) * SEQ_Q
        dqa_head = DQA + b * stride_dqab + h * stride_dqah
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_head, do_head, lse_head, delta_head, dqa_head,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqam,
            first, full, full_hi, end, cols_n,
            SEQ_Q, HEAD_D, HEAD_DV, qk_scale2, sm_scale, causal_offset,
            window_left, window_right, softcap_in,
            CAUSAL, DQ_ATOMIC, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN_M, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )

    # epilogue: dS was taken w.r.t. the scaled scores
    dk *= sm_scale
    dk_ptrs = DK + b * stride_dkb + hk.to(tl.int64) * stride_dkh + n64 * stride_dkn
    dk_ptrs += offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk.to(tl.int64) * stride_dvh + n64 * stride_dvn
    dv_ptrs += offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), cols_n, SEQ_K, offs_d, HEAD_D, EVEN_N, EVEN_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), cols_n, SEQ_K, offs_dv, HEAD_DV, EVEN_N, EVEN_DV)


# ---------------------------------------------------------------------------------------------
# 3. dq: one query block, loop over its visible kv blocks
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,
    k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
    n_lo, n_steps, rows,
    SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset, left, right, softcap_in,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    n0 = n_lo
    for _ in range(n_steps):
        n64 = n0.to(tl.int64)
        cols = n0 + offs_n
        # unmasked steps only visit whole blocks, so their loads need no row mask
        k = _load_tile(k_head + n64 * stride_kn + k_tile, cols, SEQ_K, offs_d, HEAD_D, not MASK, EVEN_D)
        v = _load_tile(v_head + n64 * stride_vn + v_tile, cols, SEQ_K, offs_dv, HEAD_DV, not MASK, EVEN_DV)
        qk = _mm(q, tl.trans(k), IEEE)
        if SOFTCAP:
            t = _tanh(qk * softcap_in, SOFTCAP)
            p = tl.exp2(t * qk_scale2 - lse2[:, None])
        else:
            p = tl.exp2(qk * qk_scale2 - lse2[:, None])
        if MASK:
            keep = cols[None, :] < SEQ_K
            if WINDOW:
                keep = keep & _window_keep(rows, cols, causal_offset, left, right)
            elif CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)
        dp = _mm(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _mm(ds.to(k.dtype), k, IEEE)
        n0 += BLOCK_N
    return dq


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
    m0, rows, SEQ_Q, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset, left, right, softcap_in,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dq of query rows [m0, m0 + BLOCK_M) over every key block they see: masked edges, unmasked
    middle."""
    if WINDOW:
        lo, full_lo, full_hi, end = _window_key_blocks(m0, SEQ_Q, SEQ_K, left, right, BLOCK_M, BLOCK_N)
        # left edge (masked), keys every row sees (no mask), right edge and Sk tail (masked)
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
            lo, _cdiv(full_lo - lo, BLOCK_N), rows, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
            left, right, softcap_in,
            True, CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
            full_lo, (full_hi - full_lo) // BLOCK_N, rows, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
            left, right, softcap_in,
            False, CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
            full_hi, _cdiv(end - full_hi, BLOCK_N), rows, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
            left, right, softcap_in,
            True, CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
    else:
        if CAUSAL:
            # keys past the block's last row's horizon are invisible; keys up to the first row's
            # horizon are visible to every row of the block
            hi = tl.minimum(tl.maximum(m0 + BLOCK_M + causal_offset, 0), SEQ_K)
            full = tl.minimum(tl.maximum(m0 + causal_offset + 1, 0), hi) // BLOCK_N
        else:
            hi = SEQ_K + m0 * 0
            full = SEQ_K // BLOCK_N + m0 * 0
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
            m0 * 0, full, rows, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
            left, right, softcap_in,
            False, CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
        dq = _dq_inner(
            dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
            full * BLOCK_N, _cdiv(hi, BLOCK_N) - full, rows, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
            left, right, softcap_in,
            True, CAUSAL, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP,
        )
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H_Q, GROUP, SEQ_Q, SEQ_K, HEAD_D, HEAD_DV,
    sm_scale, qk_scale2, window_left, window_right, softcap_in,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks = _cdiv(SEQ_Q, BLOCK_M)
    # under causal the last query blocks see the most keys: start them first
    pid_m = n_blocks - 1 - pid % n_blocks
    pid_bh = pid // n_blocks
    b = (pid_bh // H_Q).to(tl.int64)
    h = pid_bh % H_Q
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    m64 = m0.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + b * stride_qb + h * stride_qh + m64 * stride_qm
    q_ptrs += offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_dob + h * stride_doh + m64 * stride_dom
    do_ptrs += offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    q = _load_tile(q_ptrs, rows, SEQ_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)
    do = _load_tile(do_ptrs, rows, SEQ_Q, offs_dv, HEAD_DV, EVEN_M, EVEN_DV)
    lse2, delta = _load_row_stats(LSE + b * stride_lb + h * stride_lh + m64 * stride_lm + offs_m * stride_lm,
                                  DELTA + pid_bh.to(tl.int64) * SEQ_Q + m64 + offs_m, rows, SEQ_Q, EVEN_M)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    k_head = K + b * stride_kb + hk * stride_kh
    v_head = V + b * stride_vb + hk * stride_vh
    causal_offset = SEQ_K - SEQ_Q
    dq = _dq_blocks(dq, q, do, lse2, delta, k_head, v_head, stride_kn, stride_kd, stride_vn, stride_vd,
                    m0, rows, SEQ_Q, SEQ_K, HEAD_D, HEAD_DV, qk_scale2, causal_offset,
                    window_left, window_right, softcap_in,
                    CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, EVEN_D, EVEN_DV, IEEE, WINDOW, SOFTCAP)

    dq *= sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqm
    dq_ptrs += offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), rows, SEQ_Q, offs_d, HEAD_D, EVEN_M, EVEN_D)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # autograd may hand in an expanded gradient (stride 0): the kernels need unit last strides
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _problem(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, *, causal: bool, scale: float, window: tuple[int, int] | None,
             softcap: float | None, sinks: torch.Tensor | None) -> Problem:
    """The backward's inputs checked against each other and described as the Problem they solve."""
    for name, t in (("q", q), ("k", k), ("v", v), ("do", do), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-d" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-d bhsd tensor, got {got}")
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    _check("k", k, (b, hkv, sk, d), q.dtype)
    _check("v", v, (b, hkv, sk, dv), q.dtype)
    _check("out", out, (b, hq, sq, dv), q.dtype)
    _check("do", do, (b, hq, sq, dv))
    _check("lse", lse, (b, hq, sq), torch.float32)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"heads: expected Hq divisible by Hkv, got Hq={hq}, Hkv={hkv}")
    if max(d, dv) > 256:
        raise ValueError(f"head_dim: expected at most 256, got D={d}, Dv={dv}")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit last stride, got strides {t.stride()}")
    causal = bool(causal)
    return Problem(
        device_kind_of(q.device), q.device.index or 0, q.dtype, b, hq, hkv, sq, sk, d, dv, causal, float(scale),
        "bhsd", contiguous=True, needs_grad=True, return_lse=True,
        window=normalised_window(None if window is None else tuple(window), causal),  # type: ignore[arg-type]
        softcap=float(softcap or 0.0), sinks=sinks is not None,
    )


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    config: dict[str, Any] | None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of attention w.r.t. q, k, v (and sinks), from the forward's saved out and lse.

    do, out (B, Hq, Sq, Dv); q (B, Hq, Sq, D); k (B, Hkv, Sk, D); v (B, Hkv, Sk, Dv): bhsd-indexed
    views of any strides with a unit last stride (bshd tensors transposed); lse float32
    (B, Hq, Sq), natural log, -inf on rows that see no key. causal is bottom-right aligned
    (query i sees key j iff j <= i + Sk - Sq); scale multiplies q.k.

    window, softcap and sinks as forward.attention_forward (the same values as the forward's).

    Returns (dq, dk, dv) with the shapes, dtypes and (for dense inputs) strides of q, k, v; dk, dv
    hold the sum over each kv head's query group; with sinks a fourth, dsinks (Hq,) float32:
    d sink_h = -sum over rows of P(sink) * delta, delta = rowsum(dO * O) (the sink carries no
    value, so its probability only scales the output down). Deterministic: no atomics.
    """
    from .forward import Variant, fast_tanh_on, kernel_window, softcap_mode

    g = _problem(do, q, k, v, out, lse, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if 0 in (g.batch, g.heads_q, g.seqlen_q, g.seqlen_k):
        # nothing is attended: every gradient is 0 (and there is nothing to launch)
        if sinks is not None:
            return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(sinks)
        return dq.zero_(), dk.zero_(), dv.zero_()

    cfg = configs.resolve_backward_config(config, g.head_dim, g.head_dim_v, fp32=q.dtype == torch.float32,
                                          arch=configs.arch_of_tensor(q))
    do = _unit_last(do)
    block_d = configs.block_dim(g.head_dim)
    block_dv = configs.block_dim(g.head_dim_v)
    bm, bn = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]
    warps, stages = cfg["BWD_num_warps"], cfg["BWD_num_stages"]
    causal = g.effective_causal  # a causal mask over a single query row hides nothing
    win = kernel_window(causal, Variant().window if window is None else tuple(window),  # type: ignore[arg-type]
                        g.seqlen_q, g.seqlen_k)
    left, right = win if win is not None else (0, 0)
    if g.softcap:  # P = exp2(tanh(qk * scale / c) * c * log2(e) - lse2)
        qk_scale2, softcap_in = g.softcap * LOG2E, g.scale / g.softcap
    else:
        qk_scale2, softcap_in = g.scale * LOG2E, 1.0
    variant = dict(WINDOW=win is not None, SOFTCAP=softcap_mode(g.softcap, fast_tanh_on(q)))
    group = g.gqa_ratio
    even_d, even_dv = g.head_dim == block_d, g.head_dim_v == block_dv
    ieee = q.dtype == torch.float32

    atomic = cfg["BWD_DQ_ATOMIC"]
    delta = torch.empty((g.batch, g.heads_q, g.seqlen_q), device=q.device, dtype=torch.float32)
    # the atomic variant sums dq in fp32 (zeroed: every kv block adds into it)
    dq_acc = (torch.zeros((g.batch, g.heads_q, g.seqlen_q, g.head_dim), device=q.device, dtype=torch.float32)
              if atomic else delta.unsqueeze(-1))
    with on_device(cuda_index(q)):
        grid = (triton.cdiv(g.seqlen_q, configs.PREPROCESS_BLOCK_M) * g.batch * g.heads_q,)
        _bwd_preprocess_kernel[grid](
            out, do, delta, *out.stride(), *do.stride(), g.heads_q, g.seqlen_q, g.head_dim_v,
            BLOCK_M=configs.PREPROCESS_BLOCK_M, BLOCK_DV=block_dv,
            EVEN_M=g.seqlen_q % configs.PREPROCESS_BLOCK_M == 0, EVEN_DV=even_dv,
        )
        grid = (triton.cdiv(g.seqlen_k, bn) * g.batch * g.heads_kv,)
        _bwd_dkdv_kernel[grid](
            q, k, v, do, lse, delta, dk, dv, dq_acc,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dk.stride(), *dv.stride(),
            *dq_acc.stride()[:3],
            g.heads_kv, group, g.seqlen_q, g.seqlen_k, g.head_dim, g.head_dim_v,
            g.scale, qk_scale2, left, right, softcap_in,
            CAUSAL=causal, DQ_ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_dv,
            EVEN_M=g.seqlen_q % bm == 0, EVEN_N=g.seqlen_k % bn == 0, EVEN_D=even_d, EVEN_DV=even_dv,
            IEEE=ieee, num_warps=warps, num_stages=stages, **variant,
        )
        if atomic:
            dq.copy_(dq_acc)
            return _with_sinks_grad((dq, dk, dv), sinks, lse, delta)
        # the dq pass: a large resident query block, small streamed kv blocks (by default the
        # dk-dv tiles swapped)
        dq_m, dq_n = cfg["BWD_DQ_BLOCK_M"], cfg["BWD_DQ_BLOCK_N"]
        grid = (triton.cdiv(g.seqlen_q, dq_m) * g.batch * g.heads_q,)
        _bwd_dq_kernel[grid](
            q, k, v, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *dq.stride(),
            g.heads_q, group, g.seqlen_q, g.seqlen_k, g.head_dim, g.head_dim_v,
            g.scale, qk_scale2, left, right, softcap_in,
            CAUSAL=causal, BLOCK_M=dq_m, BLOCK_N=dq_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            EVEN_M=g.seqlen_q % dq_m == 0, EVEN_D=even_d, EVEN_DV=even_dv, IEEE=ieee,
            num_warps=cfg["BWD_DQ_num_warps"], num_stages=cfg["BWD_DQ_num_stages"], **variant,
        )
        return _with_sinks_grad((dq, dk, dv), sinks, lse, delta)


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks (Hq,) = -sum over batch and rows of exp(sink - lse) * delta.

    P(sink) = exp(sink - lse) (lse includes the sink); out = sum_j P_j v_j shrinks by P(sink) as
    the sink grows, so d out / d sink = -P(sink) out and the row contributes -P(sink) dO . O. A row
    with lse = -inf (sink -inf, no key) contributes 0. Memory-bound torch ops over (B, Hq, Sq).
    """
    p_sink = torch.exp(sinks.view(1, -1, 1) - lse)
    p_sink = torch.where(torch.isinf(lse), torch.zeros_like(p_sink), p_sink)
    return -(p_sink * delta).sum(dim=(0, 2))


def _with_sinks_grad(grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sinks: torch.Tensor | None,
                     lse: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if sinks is None:
        return grads
    return (*grads, sinks_grad(sinks, lse, delta))
