"""FlashAttention-2 forward in Triton: the kernels and their launcher (autograd: dispatch/autograd.py).

Algorithm (FlashAttention-2): one program owns BLOCK_M query rows of one (batch, query head) and
streams the key/value blocks of its kv head through an online softmax kept in base 2 (scores are
multiplied by scale * log2(e) once, so every exponential is an exp2). Bottom-right causal
(query i sees key j iff j <= i + Sk - Sq) splits the key range of a program in two loops:

- blocks every row of the program sees in full: no mask at all;
- the diagonal blocks (and the ragged tail of Sk): masked.
Blocks no row sees are never visited. Rows that see no key keep l = 0 and leave with out = 0 and
lse = -inf.

GQA maps query head h to kv head h // (Hq // Hkv) in the address arithmetic: K/V are never
expanded. Head dims that are not powers of two run in a BLOCK_D = next_power_of_2(D) tile whose
padding columns are masked (pointer path) or zero-filled by the tensor-memory engine (TMA path).

Two kernels share the softmax step:
- `_fwd_kernel`: pointer arithmetic over all four strides of q, k, v and o; portable (NVIDIA and
  AMD), the one the AOT check compiles for every target.
- `_fwd_kernel_tma`: Hopper only (sm_90+): device-side tensor descriptors over each (b, h) plane,
  optionally warp-specialised. Needs 16-byte aligned bases and strides; the launcher falls back to
  the pointer kernel when they are not.

Shared jit helpers (names are stable): `online_softmax_step`, `dot`, `tanh`, `kv_block_range`,
`query_block_of` (the program order of the forward kernels),
`LOG2E`, `LN2` for the decode and paged kernels; `_fwd_blocks` (every key block one query block
sees, masked only at the edges) and its descriptor twin `_fwd_blocks_tma` for varlen.py's kernels.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import configs
from .launch import BoundLaunch, DirectLauncher, cuda_index, run_on_device

log = logging.getLogger("flashdispatch")

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# A tile offset (block size x stride) must fit int32; above this stride the kernels use int64 tiles.
_INT32_TILE_STRIDE_LIMIT = (2**31 - 1) // 256


# --- device helpers ------------------------------------------------------------------------------


# Kernels call only builtins and this module's own jit functions (no tl.sum, tl.max, tl.zeros,
# tl.cdiv): the library's jit helpers are compiled or interpreted as decided when triton was first
# imported, and the CPU tests turn the interpreter on later, for these modules alone.


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


@triton.jit
def row_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _max2)


@triton.jit
def row_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add2)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; IEEE for fp32 inputs (tf32 would miss the fp32 error budget)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def kv_block_range(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    """(n_full, n_end) for the query rows [start_m, start_m + BLOCK_M).

    Keys [0, n_full) are visible to every row and lie in whole BLOCK_N blocks inside Sk: no mask.
    Keys [n_full, n_end) need the causal and/or Sk mask. Keys from n_end on are seen by no row.
    """
    if CAUSAL:
        offset = seq_k - seq_q
        n_end = tl.minimum(seq_k, start_m + BLOCK_M + offset)
        n_end = tl.maximum(n_end, 0)
        n_full = tl.minimum(seq_k, start_m + offset + 1)
        n_full = tl.maximum(n_full, 0)
        n_full = (n_full // BLOCK_N) * BLOCK_N
    else:
        n_end = seq_k
        n_full = (seq_k // BLOCK_N) * BLOCK_N
    return n_full, n_end


@triton.jit
def window_block_range(start_m, seq_q, seq_k, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_lo, full_lo, full_hi, n_end) for query rows [start_m, start_m + BLOCK_M) under a window.

    Row i at p = i + Sk - Sq sees keys [p - left, p + right] (the launcher passes unbounded sides as
    Sk + Sq and folds causal into right = 0). Keys [full_lo, full_hi) lie in whole blocks that every
    row sees: no mask. [n_lo, full_lo) and [full_hi, n_end) are masked. Blocks outside [n_lo, n_end)
    are never visited, so the work is proportional to the visible pairs. Every operand of // is
    clamped to >= 0 first (the compiler truncates, the interpreter floors).
    """
    offset = seq_k - seq_q
    first_p = start_m + offset
    last_p = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + offset
    n_lo = (tl.maximum(first_p - left, 0) // BLOCK_N) * BLOCK_N
    n_lo = tl.minimum(n_lo, seq_k)
    n_end = tl.maximum(tl.minimum(last_p + right + 1, seq_k), n_lo)
    full_lo = ((tl.maximum(last_p - left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, n_lo), n_end)
    full_hi = (tl.maximum(tl.minimum(first_p + right + 1, seq_k), 0) // BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), n_end)
    return n_lo, full_lo, full_hi, n_end


@triton.jit
def tanh(x, MODE: tl.constexpr):
    """tanh for softcap. MODE 2 (bf16 on NVIDIA): the tanh.approx.f32 instruction, one
    special-function op beside the softmax's exp2 (relative error < 2^-10.9, below bf16's score
    rounding; see fast_tanh_on). MODE 1 (fp16/fp32, AMD, the interpreter): 1 - 2 / (exp2(2x log2 e)
    + 1), exact at +-inf, |error| ~ 1e-7."""
    if MODE == 2:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def visible_keys(offs_m, offs_n, seq_k, causal_offset, left, right, CAUSAL: tl.constexpr,
                 WINDOW: tl.constexpr):
    """Bool (BLOCK_M, BLOCK_N): key offs_n inside Sk and inside row offs_m's causal/window range."""
    visible = offs_n[None, :] < seq_k
    if WINDOW:
        p = offs_m[:, None] + causal_offset
        visible = visible & (offs_n[None, :] >= p - left) & (offs_n[None, :] <= p + right)
    elif CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return visible


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """Fold one key block into (acc, l, m). qk: raw scores, -inf where masked; m in log2 units."""
    m_new = tl.maximum(m_i, row_max(qk, 1) * qk_scale)
    if MASKED:
        # a row that has seen only masked keys keeps m = -inf; subtracting 0 keeps exp2 at 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    p_op = p.to(v.dtype)
    if v.dtype == tl.float16:
        # l sums the weights the dot receives: the FMA above leaves the row's largest score
        # exp2(residual), which fp16 P rounds away (docs/design.md, "fp16 softmax keeps the row max
        # in score units"; on an H100 it had cost dK 0.197 against 0.047 allowed on an outlier channel).
        l_i = l_i * alpha + row_sum(p_op.to(tl.float32), 1)
    else:
        l_i = l_i * alpha + row_sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(p_op, v, acc, IEEE)
    return acc, l_i, m_new


@triton.jit
def query_block_of(pid, num_m, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(query block, b * Hq + h) of program `pid` of a 1-d grid (y/z grid dims stop at 65535): one
    head's query blocks adjacent, so that its K/V stay in L2, and under causal without a window the
    last blocks (whose rows see the most keys) first, for a shorter tail."""
    pid_m = pid % num_m
    pid_bh = pid // num_m
    if CAUSAL and not WINDOW:
        pid_m = num_m - 1 - pid_m
    return pid_m, pid_bh


@triton.jit
def _softmax_init(SINKS, h, BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr):
    """(m, l) before the first key: empty, or the head's sink as a key of weight 1 and no value
    (m = sink in log2 units, l = 1), which is all a sink is: the online softmax does the rest."""
    if HAS_SINKS:
        m_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32) + tl.load(SINKS + h).to(tl.float32) * LOG2E
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    return m_i, l_i


@triton.jit
def _finish(acc, l_i, m_i):
    """Normalised output and natural-log lse; rows with no visible key give 0 and -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


# --- portable pointer kernel -----------------------------------------------------------------------


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m, n_lo, n_hi,
              seq_k, causal_offset, qk_scale, offs_d, offs_dv, head_dim, head_dim_v,
              left, right, softcap_in,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    lo64 = tl.cast(n_lo, tl.int64)
    kt_ptrs = K_base + lo64 * skn + kt_off
    v_ptrs = V_base + lo64 * svn + v_off
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # -- load K^T (BLOCK_D, BLOCK_N) and V (BLOCK_N, BLOCK_DV)
        if MASKED:
            in_k = offs_n < seq_k
            kt_mask = in_k[None, :]
            v_mask = in_k[:, None]
            if PAD_D:
                kt_mask = kt_mask & (offs_d[:, None] < head_dim)
            if PAD_DV:
                v_mask = v_mask & (offs_dv[None, :] < head_dim_v)
            kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
            v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        else:
            if PAD_D:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
            if PAD_DV:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
            else:
                v = tl.load(v_ptrs)
        # -- compute qk
        qk = dot(q, kt, tl.full([q.shape[0], BLOCK_N], 0.0, dtype=tl.float32), IEEE)
        if SOFTCAP:  # c * tanh(s / c): the c (and log2 e) sit in qk_scale
            qk = tanh(qk * softcap_in, SOFTCAP)
        if MASKED:
            visible = visible_keys(offs_m, offs_n, seq_k, causal_offset, left, right, CAUSAL, WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, MASKED, IEEE)
        kt_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    return acc, l_i, m_i


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m, start_m, seq_q, seq_k,
                qk_scale, offs_d, offs_dv, head_dim, head_dim_v, left, right, softcap_in,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """Every key block that query rows [start_m, start_m + BLOCK_M) see, masked only where some
    row sees part of a block (shared by this kernel and varlen.py's)."""
    causal_offset = seq_k - seq_q
    if WINDOW:
        n_lo, full_lo, full_hi, n_end = window_block_range(start_m, seq_q, seq_k, left, right, BLOCK_M, BLOCK_N)
        # -- left edge of the window: masked
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                  n_lo, full_lo, seq_k, causal_offset, qk_scale, offs_d, offs_dv,
                                  head_dim, head_dim_v, left, right, softcap_in,
                                  BLOCK_N, True, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)
        # -- blocks every row sees: no mask
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                  full_lo, full_hi, seq_k, causal_offset, qk_scale, offs_d, offs_dv,
                                  head_dim, head_dim_v, left, right, softcap_in,
                                  BLOCK_N, False, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)
        # -- right edge (the diagonal under causal) and the Sk tail: masked
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                  full_hi, n_end, seq_k, causal_offset, qk_scale, offs_d, offs_dv,
                                  head_dim, head_dim_v, left, right, softcap_in,
                                  BLOCK_N, True, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)
    else:
        n_full, n_end = kv_block_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        # -- blocks every row sees: no mask
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                  0, n_full, seq_k, causal_offset, qk_scale, offs_d, offs_dv,
                                  head_dim, head_dim_v, left, right, softcap_in,
                                  BLOCK_N, False, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)
        # -- diagonal blocks and the Sk tail: masked
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m,
                                  n_full, n_end, seq_k, causal_offset, qk_scale, offs_d, offs_dv,
                                  head_dim, head_dim_v, left, right, softcap_in,
                                  BLOCK_N, True, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, SINKS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    heads_q, group, seq_q, seq_k, qk_scale, head_dim, head_dim_v,
    window_left, window_right, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr, IEEE: tl.constexpr,
    OFFS64: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m, pid_bh = query_block_of(tl.program_id(0), (seq_q + BLOCK_M - 1) // BLOCK_M, CAUSAL, WINDOW)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    b64 = b.to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n0 = tl.arange(0, BLOCK_N)
    if OFFS64:
        rows = offs_m.to(tl.int64)
        cols_n = offs_n0.to(tl.int64)
    else:
        rows = offs_m
        cols_n = offs_n0

    Q_base = Q + b64 * sqb + h.to(tl.int64) * sqh
    K_base = K + b64 * skb + hk.to(tl.int64) * skh
    V_base = V + b64 * svb + hk.to(tl.int64) * svh
    kt_off = cols_n[None, :] * skn + offs_d[:, None] * skd
    v_off = cols_n[:, None] * svn + offs_dv[None, :] * svd

    # -- load the query tile once
    in_q = offs_m < seq_q
    q_mask = in_q[:, None]
    if PAD_D:
        q_mask = q_mask & (offs_d[None, :] < head_dim)
    q = tl.load(Q_base + rows[:, None] * sqm + offs_d[None, :] * sqd, mask=q_mask, other=0.0)

    m_i, l_i = _softmax_init(SINKS, h, BLOCK_M, HAS_SINKS)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, kt_off, v_off, skn, svn, offs_m, start_m,
                                seq_q, seq_k, qk_scale, offs_d, offs_dv, head_dim, head_dim_v,
                                window_left, window_right, softcap_in,
                                BLOCK_M, BLOCK_N, CAUSAL, PAD_D, PAD_DV, IEEE, WINDOW, SOFTCAP)

    # epilogue
    out, lse = _finish(acc, l_i, m_i)
    O_base = O + b64 * sob + h.to(tl.int64) * soh
    o_mask = in_q[:, None]
    if PAD_DV:
        o_mask = o_mask & (offs_dv[None, :] < head_dim_v)
    tl.store(O_base + rows[:, None] * som + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=o_mask)
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=in_q)


# --- Hopper kernel: tensor descriptors (TMA), optional warp specialisation -----------------------


@triton.jit
def _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, n_lo, n_hi, seq_k, causal_offset,
                  qk_scale, left, right, softcap_in, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, IEEE: tl.constexpr, WS: tl.constexpr, WINDOW: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(n_lo, n_hi, BLOCK_N, warp_specialize=WS):
        # rows past Sk and columns past D arrive as zeros from the copy engine
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        qk = dot(q, k.T, tl.full([q.shape[0], BLOCK_N], 0.0, dtype=tl.float32), IEEE)
        if SOFTCAP:
            qk = tanh(qk * softcap_in, SOFTCAP)
        if MASKED:
            offs_n = start_n + offs_n0
            visible = visible_keys(offs_m, offs_n, seq_k, causal_offset, left, right, CAUSAL, WINDOW)
            qk = tl.where(visible, qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, qk_scale, MASKED, IEEE)
    return acc, l_i, m_i


@triton.jit
def _fwd_blocks_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, start_m, seq_q, seq_k, qk_scale,
                    window_left, window_right, softcap_in,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                    WS: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """_fwd_blocks over tensor descriptors (shared by _fwd_kernel_tma and varlen.py's TMA kernel):
    the unmasked middle loop is the one that may be warp-specialised."""
    causal_offset = seq_k - seq_q
    if WINDOW:
        n_lo, full_lo, full_hi, n_end = window_block_range(start_m, seq_q, seq_k, window_left, window_right,
                                                           BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, n_lo, full_lo, seq_k,
                                      causal_offset, qk_scale, window_left, window_right, softcap_in,
                                      BLOCK_N, True, CAUSAL, IEEE, False, WINDOW, SOFTCAP)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, full_lo, full_hi, seq_k,
                                      causal_offset, qk_scale, window_left, window_right, softcap_in,
                                      BLOCK_N, False, CAUSAL, IEEE, WS, WINDOW, SOFTCAP)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, full_hi, n_end, seq_k,
                                      causal_offset, qk_scale, window_left, window_right, softcap_in,
                                      BLOCK_N, True, CAUSAL, IEEE, False, WINDOW, SOFTCAP)
    else:
        n_full, n_end = kv_block_range(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, 0, n_full, seq_k,
                                      causal_offset, qk_scale, window_left, window_right, softcap_in,
                                      BLOCK_N, False, CAUSAL, IEEE, WS, WINDOW, SOFTCAP)
        acc, l_i, m_i = _fwd_loop_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, n_full, n_end, seq_k,
                                      causal_offset, qk_scale, window_left, window_right, softcap_in,
                                      BLOCK_N, True, CAUSAL, IEEE, False, WINDOW, SOFTCAP)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel_tma(
    Q, K, V, O, LSE, SINKS,
    sqb, sqh, sqm,
    skb, skh, skn,
    svb, svh, svn,
    sob, soh, som,
    heads_q, group, seq_q, seq_k, qk_scale, head_dim, head_dim_v,
    window_left, window_right, softcap_in,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, WS: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid_m, pid_bh = query_block_of(tl.program_id(0), (seq_q + BLOCK_M - 1) // BLOCK_M, CAUSAL, WINDOW)
    b = pid_bh // heads_q
    h = pid_bh % heads_q
    hk = h // group
    b64 = b.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    # one 2-d plane (S, D) per (batch, head): any batch/head strides, OOB reads are zeros
    q_desc = tl.make_tensor_descriptor(Q + b64 * sqb + h.to(tl.int64) * sqh, shape=[seq_q, head_dim],
                                       strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b64 * skb + hk.to(tl.int64) * skh, shape=[seq_k, head_dim],
                                       strides=[skn, 1], block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b64 * svb + hk.to(tl.int64) * svh,
                                       shape=[seq_k, head_dim_v], strides=[svn, 1],
                                       block_shape=[BLOCK_N, BLOCK_DV])
    o_desc = tl.make_tensor_descriptor(O + b64 * sob + h.to(tl.int64) * soh,
                                       shape=[seq_q, head_dim_v], strides=[som, 1],
                                       block_shape=[BLOCK_M, BLOCK_DV])
    q = q_desc.load([start_m, 0])

    m_i, l_i = _softmax_init(SINKS, h, BLOCK_M, HAS_SINKS)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    acc, l_i, m_i = _fwd_blocks_tma(acc, l_i, m_i, q, k_desc, v_desc, offs_m, start_m, seq_q, seq_k, qk_scale,
                                    window_left, window_right, softcap_in,
                                    BLOCK_M, BLOCK_N, CAUSAL, IEEE, WS, WINDOW, SOFTCAP)
    out, lse = _finish(acc, l_i, m_i)
    # the copy engine clips the store to (Sq, Dv)
    o_desc.store([start_m, 0], out.to(O.dtype.element_ty))
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


# --- launcher ------------------------------------------------------------------------------------

_FWD = DirectLauncher(_fwd_kernel)
_FWD_TMA = DirectLauncher(_fwd_kernel_tma)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d bhsd-indexed tensor, got shape {tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q/k/v: expected (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"heads: expected Hq divisible by Hkv, got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in configs.DTYPES:
        raise TypeError(
            f"q/k/v dtype: expected one of {sorted(str(d) for d in configs.DTYPES)} for all three, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v device: expected one device for all three, got {q.device}/{k.device}/{v.device}")
    if max(q.shape[3], v.shape[3]) > configs.MAX_HEAD_DIM:
        raise ValueError(f"head dim: expected at most {configs.MAX_HEAD_DIM}, got D={q.shape[3]}, "
                         f"Dv={v.shape[3]}")


def out_is_bshd(q: torch.Tensor) -> bool:
    """Whether q's heads lie inside its sequence (bshd storage); dims of extent 1 have arbitrary
    strides, so they say nothing."""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def _empty_output(b: int, h: int, s: int, dv: int, bshd: bool, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    if bshd:
        return torch.empty((b, s, h, dv), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((b, h, s, dv), dtype=dtype, device=device)


class OutputPlan:
    """The outputs of one call signature: out (B, Hq, Sq, Dv) in q's physical layout and lse
    (B, Hq, Sq) float32, and `finished` when there is nothing to launch (an empty output, or no
    key at all, where the contract says out 0 and lse -inf)."""

    __slots__ = ("shape", "bshd", "lse_shape", "device", "dtype", "strides", "finished")

    def __init__(self, q: torch.Tensor, sk: int, dv: int) -> None:
        b, h, sq, _ = q.shape
        self.bshd = out_is_bshd(q)
        self.shape = (b, sq, h, dv) if self.bshd else (b, h, sq, dv)
        self.lse_shape = (b, h, sq)
        self.device, self.dtype = q.device, q.dtype
        probe = _empty_output(b, h, sq, dv, self.bshd, q.dtype, "meta")  # strides, no memory
        self.strides: tuple[int, ...] = probe.stride()
        self.finished = probe.numel() == 0 or sk == 0

    def allocate(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.bshd:
            out = out.transpose(1, 2)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        if self.finished and out.numel() and lse.numel():  # no key: every row sees nothing
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse


def _needs_offs64(*tensors: torch.Tensor) -> bool:
    return any(st > _INT32_TILE_STRIDE_LIMIT for t in tensors for st in t.stride())


def tma_strides_ok(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Tensor descriptors need 16-byte aligned row strides and a unit last stride (and 16-byte
    aligned bases, which the plan checks per call)."""
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Device-side descriptors live in a scratch buffer that Triton asks the host to allocate
    (on the current device, which run_on_device sets)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def ensure_tma_allocator() -> None:
    """Install _tma_scratch unless an allocator is set. Triton keeps the allocator in a ContextVar,
    so every thread (a serving worker, a DataLoader thread) starts without one; a user's own
    allocator is left in place."""
    try:
        current = _allocation._allocator.get()
        if not isinstance(current, _allocation.NullAllocator):
            return
    except AttributeError:  # Triton moved its internals: setting ours is what the kernel needs
        pass
    triton.set_allocator(_tma_scratch)


def launch_options(config: dict[str, Any]) -> dict[str, Any]:
    """Compiler options of a config (num_warps, num_stages, AMD knobs), without the tile sizes."""
    return {k: config[k] for k in configs.LAUNCH_KEYS if k in config}


class Variant(NamedTuple):
    """The attention variant of a launch, hashable for the plan caches: window (left, right) as the
    caller gave it ((-1, -1): none), softcap (0.0: none), and whether sinks come with the call."""

    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    sinks: bool = False


PLAIN = Variant()


def make_variant(window: tuple[int, int] | None, softcap: float | None, sinks: torch.Tensor | None) -> Variant:
    """The Variant of keyword arguments as attention_forward takes them (values already checked by
    the caller's validation; the launchers check only what would corrupt memory)."""
    if window is None and not softcap and sinks is None:
        return PLAIN
    w = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    return Variant(w, float(softcap or 0.0), sinks is not None)


def kernel_window(causal: bool, window: tuple[int, int], seq_q: int, seq_k: int) -> tuple[int, int] | None:
    """(left, right) as the kernels take them, or None when plain causal/non-causal masking covers it.

    The window kernels know no "unbounded": such a side becomes Sk + Sq, past every key. causal
    folds into right = 0 (flash_attn's convention). A window whose left side is unbounded and
    whose right side is unbounded or 0 under causal hides nothing beyond causal: no window.
    """
    left, right = window
    if causal:
        right = 0
    if left < 0 and (right < 0 or causal):
        return None
    big = seq_k + seq_q
    return (big if left < 0 else left, big if right < 0 else right)


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> None:
    """A sinks tensor the kernels can index: float32 (Hq,) with unit stride on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected a torch.Tensor, got {type(sinks).__name__}")
    if sinks.dtype != torch.float32 or tuple(sinks.shape) != (q.shape[1],) or sinks.device != q.device:
        raise ValueError(f"sinks: expected float32 of shape ({q.shape[1]},) on {q.device}, got {sinks.dtype} "
                         f"{tuple(sinks.shape)} on {sinks.device}")
    if sinks.shape[0] > 1 and sinks.stride(0) != 1:
        raise ValueError(f"sinks: expected a unit stride, got {sinks.stride()}")


def variant_scalars(variant: Variant, causal: bool, scale: float, seq_q: int, seq_k: int, fast_tanh: bool
                    ) -> tuple[float, int, int, float, dict[str, Any]]:
    """(qk_scale, window_left, window_right, softcap_in, constexprs) of a launch.

    Scores enter the online softmax as raw dot products times qk_scale (log2 units). With softcap
    c the kernels first take tanh(qk * softcap_in) with softcap_in = scale / c, and qk_scale is
    c * log2(e): c * tanh(s / c) in log2 units.
    """
    win = kernel_window(bool(causal), variant.window, seq_q, seq_k)
    left, right = win if win is not None else (0, 0)
    if variant.softcap:
        qk_scale, softcap_in = variant.softcap * 1.4426950408889634, float(scale) / variant.softcap
    else:
        qk_scale, softcap_in = float(scale) * 1.4426950408889634, 1.0
    flags = {"WINDOW": win is not None, "SOFTCAP": softcap_mode(variant.softcap, fast_tanh),
             "HAS_SINKS": variant.sinks}
    return qk_scale, left, right, softcap_in, flags


def softcap_mode(softcap: float | None, fast_tanh: bool) -> int:
    """The kernels' SOFTCAP constexpr: 0 none, 1 portable tanh, 2 NVIDIA's tanh.approx."""
    if not softcap:
        return 0
    return 2 if fast_tanh else 1


def fast_tanh_on(t: torch.Tensor) -> bool:
    """Whether softcap takes tanh.approx.f32: bf16 on CUDA (PTX; not ROCm, not the interpreter).

    Its relative error (< 2^-10.9) moves a saturated logit of c = 50 by up to 0.02: below the
    rounding of bf16 scores and probabilities, which sets bf16's error budget, but as large as
    fp16's, so fp16 and fp32 take the exp2 form (absolute error ~1e-7; one more special-function
    op per score)."""
    return t.is_cuda and torch.version.hip is None and t.dtype == torch.bfloat16


class _ForwardPlan:
    """Everything one forward launch needs that depends on shapes, strides, dtypes, device and
    config only: made once per call signature, so that a repeated call allocates its outputs and
    launches (attention is launch-bound at decode and small prefill sizes)."""

    __slots__ = ("outputs", "tma", "pointer", "index")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                 config: dict[str, Any], variant: Variant = PLAIN) -> None:
        _check_inputs(q, k, v)
        bsz, hq, sq, d = q.shape
        hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
        self.outputs = OutputPlan(q, sk, dv)
        self.tma = self.pointer = None
        self.index = cuda_index(q)
        if self.outputs.finished:
            return
        effective_causal = bool(causal) and sq > 1
        arch = configs.arch_of_tensor(q)
        cfg = configs.shrink_to_fit(configs.resolve_forward(config, arch, max(d, dv), effective_causal, sq, sk),
                                    arch, d, dv, q.element_size())
        block_d, block_dv = configs.block_dim(d), configs.block_dim(dv)
        grid = (-(-sq // cfg["BLOCK_M"]) * bsz * hq,)
        qk_scale, left, right, softcap_in, flags = variant_scalars(variant, effective_causal, scale, sq, sk,
                                                                   fast_tanh_on(q))
        ieee = q.dtype == torch.float32
        options = launch_options(cfg)
        index = self.index or 0  # also the launcher's key on the CPU (interpreter)
        o_strides = self.outputs.strides
        probe = _empty_output(bsz, hq, sq, dv, self.outputs.bshd, q.dtype, "meta")
        if cfg.get("TMA") and tma_strides_ok((q, k, v, probe)):
            self.tma = BoundLaunch(_FWD_TMA, grid, 6, (
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                o_strides[0], o_strides[1], o_strides[2],
                hq, hq // hkv, sq, sk, qk_scale, d, dv, left, right, softcap_in,
            ), dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_DV=block_dv,
                    CAUSAL=effective_causal, IEEE=ieee, WS=bool(cfg.get("WS", False)), **flags), options, index)
        # the pointer kernel (unaligned calls of a TMA plan too) runs pointer tiles
        pcfg = configs.shrink_to_fit(configs.pointer_config(cfg, arch, max(d, dv)), arch, d, dv, q.element_size())
        self.pointer = BoundLaunch(_FWD, (-(-sq // pcfg["BLOCK_M"]) * bsz * hq,), 6, (
            *q.stride(), *k.stride(), *v.stride(), *o_strides,
            hq, hq // hkv, sq, sk, qk_scale, d, dv, left, right, softcap_in,
        ), dict(BLOCK_M=pcfg["BLOCK_M"], BLOCK_N=pcfg["BLOCK_N"], BLOCK_D=block_d, BLOCK_DV=block_dv,
                CAUSAL=effective_causal, PAD_D=block_d != d, PAD_DV=block_dv != dv, IEEE=ieee,
                OFFS64=_needs_offs64(q, k, v, probe), **flags), launch_options(pcfg), index)

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
        # without sinks the kernel never reads its SINKS pointer: lse stands in
        tensors = (q, k, v, out, lse, lse if sinks is None else sinks)
        if self.tma is not None and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            ensure_tma_allocator()
            self.tma(tensors, (out, lse))
        else:
            self.pointer(tensors, (out, lse))
        return out, lse


_PLANS: dict[tuple[Any, ...], _ForwardPlan] = {}
MAX_PLANS = 1024


def plan_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
             config: dict[str, Any] | None, variant: Variant = PLAIN) -> tuple[Any, ...]:
    """What a launch plan depends on; a config with unhashable values raises TypeError."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, causal, scale, tuple(config.items()) if config else None, variant)


def cached_plan(cache: dict[tuple[Any, ...], Any], make: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool, scale: float, config: dict[str, Any] | None, variant: Variant = PLAIN) -> Any:
    """The plan for this call signature from `cache`, made by make(q, k, v, causal, scale, config, variant)."""
    try:
        key: tuple[Any, ...] | None = plan_key(q, k, v, causal, scale, config, variant)
        plan = cache.get(key)  # type: ignore[arg-type]
    except TypeError:  # a config value that cannot be hashed: plan every call
        key, plan = None, None
    if plan is None:
        plan = make(q, k, v, causal, scale, config or {}, variant)
        if key is not None:
            if len(cache) >= MAX_PLANS:
                cache.clear()
            cache[key] = plan
    return plan


def attention_forward(
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
    """Forward attention on bhsd-indexed views of any strides (no autograd).

    q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); causal is bottom-right aligned.
    window (left, right): query i at p = i + Sk - Sq sees key j iff p - left <= j <= p + right
    (-1: unbounded; causal sets right to 0); softcap c > 0: scores c * tanh(s / c) before masking;
    sinks: float32 (Hq,), one extra logit per query head in the softmax denominator.
    Returns out (B, Hq, Sq, Dv) in q's dtype (stored in q's physical layout) and lse (B, Hq, Sq)
    float32, natural log (the sink included), -inf (or the sink) for rows that see no key.
    `config` holds BLOCK_M, BLOCK_N, num_warps, num_stages (and TMA/WS on Hopper,
    waves_per_eu/matrix_instr_nonkdim on AMD); missing keys come from configs.forward_defaults.
    """
    variant = make_variant(window, softcap, sinks)
    if sinks is not None:
        check_sinks(sinks, q)
    return cached_plan(_PLANS, _ForwardPlan, q, k, v, causal, scale, config, variant).run(q, k, v, sinks)


def prepare_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                    config: dict[str, Any], window: tuple[int, int] | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """attention_forward for exactly this call signature (shapes, strides, dtypes, devices,
    options), its plan looked up once: f(q, k, v, sinks=None)."""
    return plan_launch(cached_plan(_PLANS, _ForwardPlan, q, k, v, causal, scale, config,
                                   make_variant(window, softcap, sinks)))


def plan_launch(plan: Any) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """f(q, k, v, sinks=None): plan.run with the sinks checked as the looked-up path checks them."""

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> Any:
        if sinks is not None:
            check_sinks(sinks, q)
        return plan.run(q, k, v, sinks)

    return launch


# --- whether the backward pair is there ----------------------------------------------------------


@functools.lru_cache(maxsize=None)  # an import attempt per call: selection asks for every new problem
def backward_available() -> bool:
    """True once backends/triton/backward.py provides attention_backward."""
    try:
        from . import backward  # noqa: F401  (written by the backward engineer)
    except ImportError:
        return False
    return hasattr(backward, "attention_backward")
