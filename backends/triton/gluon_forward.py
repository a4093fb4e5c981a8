"""Attention forward for Hopper (sm_90) in Gluon: FlashAttention-3's warp-specialised schedule.

One persistent CTA per SM walks a static list of query tiles. A tile is 128 query rows of one
(batch, query head); it is split between two consumer warpgroups of 64 rows each, which share the
key/value blocks that one producer warp streams into shared memory with the copy engine (TMA).
(CONSUMERS=3 makes 192-row tiles for three warpgroups taking turns in a round; the drawing below
shows the default two.)
Tiles are numbered head by head (a head's K/V stay in L2 while its tiles run) and dealt to the CTAs
in rounds in snake order (0..G-1, then G-1..0). Under causal the launcher may instead deal each head's
row blocks in pairs, a heavy one with its light mirror (ORDER_PAIRS), or number them bottom row block
first across heads (ORDER_BOTTOM): schedule() picks the order whose CTAs stay busiest.

Partitions (12 warps: 2 consumer warpgroups, 1 producer warp padded to a warpgroup)

    producer (1 warp, 24 regs)     consumer WG0 (rows 0..63)        consumer WG1 (rows 64..127)
    --------------------------     -------------------------        ---------------------------
    per tile:                      per tile:                        (the same, rows 64..127)
      wait q_empty[w]; TMA Q_w ->    wait q_ready[0]
        q_ready[w]   (w = 0, 1)      for each key block j:
      per key block j (stage s):       wait k_ready[s]; wait v_ready[s']   (s' = stage of j-1)
        wait k_empty[s]; TMA K_j ->    wait turn[0] ......................  (WG1: turn[1])
          k_ready[s]                   issue S_j = Q K_j^T           (async wgmma)
        wait v_empty[s]; TMA V_j ->    O *= alpha_{j-1}; issue O += P_{j-1} V_{j-1}   (async wgmma)
          v_ready[s]                   arrive turn[1] ....................  (WG1: turn[0])
                                       wait S_j; arrive k_empty[s]
                                       softmax(S_j) -> P_j, alpha_j   (overlaps PV_{j-1} and the
                                                                       other warpgroup's wgmmas)
                                       wait O; arrive v_empty[s']
                                     arrive q_empty[0]     (O_SEPARATE: every S is done)
                                     last: O *= alpha; O += P V (in turn); O /= l
                                     O -> O's buffer -> TMA store      (O_SEPARATE; else O goes
                                                                       out through Q's buffer and
                                                                       q_empty is arrived after)

Barriers (mbarrier; "count" = arrivals that complete one phase)
    q_ready[w]  1 + TMA bytes   producer -> consumer w   Q rows of warpgroup w have landed
    q_empty[w]  1               consumer w -> producer   w's Q buffer is free again
    k_ready[s]  1 + TMA bytes   producer -> consumers    K block in stage s has landed
    k_empty[s]  2               consumers -> producer    both warpgroups' S = Q K^T are done with it
    v_ready[s]  1 + TMA bytes   producer -> consumers    V block in stage s has landed
    v_empty[s]  2               consumers -> producer    both warpgroups' O += P V are done with it
    turn[w]     1               consumer 1-w -> w        ping-pong: w may issue its next wgmmas
                                                         (PINGPONG=False: never used)

The turn barriers only order the two warpgroups' wgmma issue (WG0, WG1, WG0, ...) so that one
warpgroup's softmax runs while the tensor cores work on the other's GEMMs; correctness rests on
the ready/empty pairs alone. Inside one warpgroup, S_j and P_{j-1} V_{j-1} are in flight together
and the softmax of S_j runs while P V still computes (FA3's intra-warpgroup overlap).

Softmax is the online one, in base 2 on the accumulator registers (scores times scale * log2(e)),
with P converted to a register operand of the P @ V wgmma: P never touches shared memory.
Bottom-right causal (query i sees key j iff j <= i + Sk - Sq): both warpgroups walk the key blocks
the tile's 128 rows need; blocks every row sees in full run without a mask, the diagonal blocks and
the ragged end of Sk with one. A sliding window (WINDOW, flash_attn's window=(left, right): query i
at p = i + Sk - Sq sees key j iff p - left <= j <= p + right) is another compiled kernel: a tile
visits only the key blocks [n_lo, n_end) that hold a visible key, masked at the window's left edge
and at its right edge (the diagonal under causal), so its work follows the visible pairs. A row that
sees no key leaves with out = 0 and lse = -inf. GQA maps query head h to kv head h // (Hq // Hkv)
in the TMA coordinates. Tensor descriptors are 4-d (B, H, S, D) over the caller's strides, so the
copy engine zero-fills reads past S and clips the output store at S for every (batch, head) plane.

Returns out (B, Hq, Sq, D) in q's dtype and physical layout, and lse (B, Hq, Sq) float32 in natural
log, the pair the Triton backward (backward.py) consumes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import numpy as np
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashdispatch.alignment import aligned16
from flashdispatch.problem import causal_visible_pairs

from .forward import PLAIN, OutputPlan, Variant, cached_plan, kernel_window, make_variant
from .launch import BoundDescriptorLaunch, DirectLauncher, HostDescriptor, cuda_index, run_on_device

log = logging.getLogger("flashdispatch")

LOG2E = 1.4426950408889634
HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})
HALF_M = 64  # query rows per consumer warpgroup (one wgmma M of 64); a tile has CONSUMERS x 64 rows
NUM_WARPS = 4  # the default partition: consumer warpgroup 0
# setmaxnreg per partition: the CTA's warpgroups (consumers + the producer's) share 65536 registers,
# 512 per thread slot: 2 consumers 240 + 240 + 24, 3 consumers 3 x 160 + 24
CONSUMER_REGS_2WG = gl.constexpr(240)
CONSUMER_REGS_3WG = gl.constexpr(160)
PRODUCER_REGS = gl.constexpr(24)


def max_regs_per_thread(consumers: int) -> int:
    """The launch's register cap (maxnreg): 65536 over (consumers + 1) warpgroups, rounded down to 8."""
    return 65536 // ((consumers + 1) * 128) // 8 * 8


CONFIG_KEYS: frozenset[str] = frozenset({"BLOCK_N", "STAGES", "O_SEPARATE", "PINGPONG", "CONSUMERS", "XTILE"})
# accepted beside them but never tuned: ORDER forces a tile order (benchmarks and tests)
FORCE_KEYS: frozenset[str] = frozenset({"ORDER"})


# D=64: three consumer warpgroups (192-row tiles) let two softmaxes run while the third warpgroup's
# products do, where a row block visits many key blocks; on short rows and short causal tiles the
# longer prologue and the 3-way register split (160 per thread: spills under the causal mask) cost
# more. Measured on the H100 (bf16, docs/gluon.md): non-causal S=4k and 16k 1.22x and 1.33x the
# two-warpgroup tile, causal S=16k 1.10x; causal S=4k (2048 keys per row on average) 0.95x, S=1k
# 0.54x-1.01x. Three warpgroups where a row sees at least C3_MIN_MEAN_KEYS keys on average and the
# call has at least C3_MIN_ROWS query rows (the measured range; both bounds sit between measured
# shapes), without a window (not measured).
C3_MIN_MEAN_KEYS = 3072
C3_MIN_ROWS = 2048


def mean_visible_keys(causal: bool, seq_q: int, seq_k: int) -> float:
    """Keys a query row sees on average: Sk without a mask, the bottom-right causal mask's visible
    pairs per row under it (Sk - (Sq - 1) / 2 for Sq <= Sk)."""
    if not causal or seq_q <= 1:
        return float(seq_k)
    return causal_visible_pairs(seq_q, seq_k) / seq_q


def default_config(head_dim: int, causal: bool = False, seq_q: int = 0, seq_k: int = 0,
                   windowed: bool = False) -> dict[str, Any]:
    """The kernel's config per head dim (at D=64 also per shape: the consumer count, above; without
    a shape, two). BLOCK_N: keys per block; STAGES: K/V ring slots;
    O_SEPARATE: O has its own staging buffer (else it goes out through Q's); PINGPONG: the turn
    barriers order the consumers' wgmma issue; CONSUMERS: consumer warpgroups (64 query rows
    each); XTILE: a tile's last P V goes out with the next tile's first S (two Q buffers per
    warpgroup; needs O_SEPARATE). ORDER (not a default: schedule() picks it per launch) forces a tile
    order, ORDER_HEAD / ORDER_BOTTOM / ORDER_PAIRS. Shared memory: Q 64 C x D, STAGES x (K + V)
    BLOCK_N x D, O 64 C x D when separate, in the 227 KiB of an sm_90 CTA."""
    if head_dim == 64:
        wide = (not windowed and seq_q >= C3_MIN_ROWS
                and mean_visible_keys(causal, seq_q, seq_k) >= C3_MIN_MEAN_KEYS)
        return {"BLOCK_N": 128, "STAGES": 3, "O_SEPARATE": True, "PINGPONG": True, "CONSUMERS": 3 if wide else 2,
                "XTILE": False}
    if head_dim == 128:
        return {"BLOCK_N": 128, "STAGES": 2, "O_SEPARATE": True, "PINGPONG": True, "CONSUMERS": 2, "XTILE": False}
    if head_dim == 256:
        return {"BLOCK_N": 64, "STAGES": 2, "O_SEPARATE": False, "PINGPONG": True, "CONSUMERS": 2, "XTILE": False}
    raise ValueError(f"head_dim: expected one of {HEAD_DIMS}, got {head_dim}")


def config_space(head_dim: int, causal: bool = False, seq_q: int = 0, seq_k: int = 0,
                 windowed: bool = False) -> list[dict[str, Any]]:
    """What the tuner tries for a shape: its default first, then configs that won or came close on
    some shape when measured (H100 and H200, bf16); at D=64 both consumer counts."""
    base = default_config(head_dim, causal, seq_q, seq_k, windowed)
    others: list[dict[str, Any]] = []
    if head_dim == 64:
        # (three warpgroups on 64-key blocks, 4 stages, lost to three on 128-key blocks on every shape
        # measured on the H100: not tried)
        others = [{"CONSUMERS": 2}, {"CONSUMERS": 3}, {"CONSUMERS": 2, "STAGES": 2},
                  {"CONSUMERS": 2, "XTILE": True}]
    elif head_dim == 128:
        # (XTILE at D=128 was within 1% of the default or behind it on every shape measured on the H100,
        # 0.82x of it on short causal rows: not tried)
        others = [{"STAGES": 3, "O_SEPARATE": False}]
    space = [base]
    for o in others:
        cfg = {**base, **o}
        if cfg not in space:
            space.append(cfg)
    return space


def resolve_config(head_dim: int, config: dict[str, Any] | None, causal: bool = False, seq_q: int = 0,
                   seq_k: int = 0, windowed: bool = False) -> dict[str, Any]:
    """default_config for this shape updated by the keys of `config` that this kernel knows,
    CONFIG_KEYS and FORCE_KEYS (others, such as the tl kernel's BLOCK_M or num_warps, are not for it)."""
    return {**default_config(head_dim, causal, seq_q, seq_k, windowed),
            **{k: v for k, v in (config or {}).items() if k in CONFIG_KEYS or k in FORCE_KEYS}}


# --- helpers -----------------------------------------------------------------------------------------


# Tile orders (the launcher picks one per call signature, schedule() below):
ORDER_HEAD = 0  # head by head, row blocks in order: a round's CTAs read one head's K/V in step
ORDER_BOTTOM = 1  # bottom row block first across all heads: equal-cost rounds, K/V of every head live
ORDER_PAIRS = 2  # head by head, row blocks zigzag (last, first, last-1, ...), dealt in pairs


@gluon.jit
def _tile_of(r, pid, nprog, ORDER: gl.constexpr):
    """The tile of CTA pid's r-th turn: units of consecutive tiles (two under ORDER_PAIRS, else one)
    dealt to the CTAs in rounds of nprog units in snake order (pid, then nprog - 1 - pid, ...), so
    that a CTA that drew a heavy unit in one round draws a light one in the next."""
    unit: gl.constexpr = 2 if ORDER == 2 else 1  # ORDER_PAIRS: two tiles a turn
    ur = r // unit
    return (ur * nprog + pid + (ur % 2) * (nprog - 1 - 2 * pid)) * unit + r % unit


@gluon.jit
def _rounds(pid, nprog, num_tiles, ORDER: gl.constexpr):
    """How many tiles CTA pid runs (nprog <= the number of units: every CTA has one; only the last
    round can come up short, and only the last unit of all)."""
    unit: gl.constexpr = 2 if ORDER == 2 else 1
    units = (num_tiles + unit - 1) // unit
    n = (units + nprog - 1) // nprog
    last = (n - 1) * nprog + pid + ((n - 1) % 2) * (nprog - 1 - 2 * pid)  # this CTA's unit of round n - 1
    n = n - (last >= units)
    last = (n - 1) * nprog + pid + ((n - 1) % 2) * (nprog - 1 - 2 * pid)
    return n * unit - (last == units - 1) * (units * unit - num_tiles)


@gluon.jit
def _tile_coords(tile, num_m, num_bh, heads_q, group, ORDER: gl.constexpr, BLOCK_M: gl.constexpr):
    """(first query row of the tile, b * Hq + h, b, h, kv head) of a linear tile index in ORDER
    (the ORDER_* values as literals: a jit function reads only constexpr globals).

    ORDER_HEAD: every tile costs about the same (no causal mask, a window, or a chunk whose rows see
    a long prefix): the tiles of one head are adjacent, so the CTAs of a round read its K/V in step
    (once from memory, the rest from L2).
    ORDER_PAIRS (causal): a tile's cost grows with its row block; numbered last, first, last - 1,
    second, ... within each head and dealt two at a time, every unit costs the same with an even
    number of row blocks (a heavy tile and its light mirror), and a head's tiles still run side by side.
    ORDER_BOTTOM (causal, when every head's K/V fits in L2 at once): bottom row block first across
    all heads, the rounds of equal cost, the best balance when there are few rounds."""
    if ORDER == 1:  # ORDER_BOTTOM
        m_blk = num_m - 1 - tile // num_bh
        bh = tile % num_bh
    else:
        bh = tile // num_m
        k = tile % num_m
        if ORDER == 2:  # ORDER_PAIRS
            m_blk = (k % 2) * (k // 2) + (1 - k % 2) * (num_m - 1 - k // 2)
        else:
            m_blk = k
    b = bh // heads_q
    h = bh % heads_q
    return m_blk * BLOCK_M, bh, b, h, h // group


@gluon.jit
def _key_blocks(start_m, seq_q, seq_k, left, right, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, WINDOW: gl.constexpr):
    """(n_lo, full_lo, full_hi, n_end) in key blocks for query rows [start_m, start_m + BLOCK_M).

    The tile visits blocks [n_lo, n_end), exactly those holding a key that some row sees (none:
    n_end <= n_lo). Blocks [full_lo, full_hi) are seen in full by every row (no mask); the masked
    ones are [n_lo, full_lo) (a window's left edge) and [full_hi, n_end) (the causal diagonal or
    the window's right edge, and the ragged end of Sk). Without a window n_lo = full_lo = 0.

    Under WINDOW row i at p = i + Sk - Sq sees keys [p - left, p + right] (the launcher passes an
    unbounded side as Sk + Sq and folds causal into right = 0); the rows' ranges overlap, so the
    tile's keys are the one range [first_p - left, last_p + right] within [0, Sk).

    Written with Python's min/max and // of non-negative operands only (the compiler truncates,
    Python floors): the plain function, _key_blocks.fn, runs in the CPU tests with ints."""
    offset = seq_k - seq_q
    if WINDOW:
        first_p = start_m + offset
        last_p = min(start_m + BLOCK_M, seq_q) - 1 + offset
        lo = max(first_p - left, 0)
        hi = max(min(last_p + right + 1, seq_k), 0)
        n_lo = lo // BLOCK_N
        n_end = (hi + BLOCK_N - 1) // BLOCK_N
        if hi <= lo:  # no row sees a key
            n_end = n_lo
        full_lo = min(max((max(last_p - left, 0) + BLOCK_N - 1) // BLOCK_N, n_lo), n_end)
        full_hi = min(max(max(min(first_p + right + 1, seq_k), 0) // BLOCK_N, full_lo), n_end)
    else:
        if CAUSAL:
            hi = max(min(start_m + BLOCK_M + offset, seq_k), 0)
            full = max(min(start_m + offset + 1, seq_k), 0)
        else:
            hi = seq_k
            full = seq_k
        n_lo = 0
        full_lo = 0
        full_hi = full // BLOCK_N
        n_end = (hi + BLOCK_N - 1) // BLOCK_N
    return n_lo, full_lo, full_hi, n_end


@gluon.jit
def _stage(it, STAGES: gl.constexpr):
    """(ring slot, phase parity) of the it-th key block this CTA consumes."""
    return it % STAGES, (it // STAGES) & 1


@gluon.jit
def _softmax(s, m_i, l_i, qk_scale, rows, cols, bounds,
             MASKED: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, RAW_MAX: gl.constexpr):
    """Fold one block of raw scores into (m, l); returns (P unnormalised, m, l, alpha) with alpha the
    factor the output accumulator still owes. m is in log2 units (m = max score * qk_scale), or with
    RAW_MAX (fp16) in score units, so that the row's largest score gets exactly p = 1.
    bounds = (Sk, Sk - Sq, window left, window right): what the mask of a MASKED block needs."""
    seq_k, causal_offset, left, right = bounds
    if MASKED:
        if WINDOW:
            # key j is visible to row i at p = i + Sk - Sq iff p - left <= j <= min(p + right, Sk - 1)
            pos = rows + causal_offset
            first = pos - left
            last = gl.minimum(pos + right, seq_k - 1)
            s = gl.where((cols[None, :] >= first[:, None]) & (cols[None, :] <= last[:, None]), s, float("-inf"))
        elif CAUSAL:
            # key j is visible to row i iff j <= min(i + Sk - Sq, Sk - 1): one compare per score
            last = gl.minimum(rows + causal_offset, seq_k - 1)
            s = gl.where(cols[None, :] <= last[:, None], s, float("-inf"))
        else:
            s = gl.where(cols[None, :] < seq_k, s, float("-inf"))
    if RAW_MAX:
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
    else:
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    if MASKED:
        # a row that has seen only masked keys keeps m = -inf; subtracting 0 keeps exp2 at 0
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if RAW_MAX:
        # fp16: (s - m) is exact for the largest score, whose weight is then exactly 1, as P carries
        # it; the FMA form below leaves it exp2(residual) in l (docs/design.md, "fp16 softmax keeps
        # the row max in score units"). One more multiply per score, no more registers.
        p = gl.exp2((s - m_use[:, None]) * qk_scale)
        alpha = gl.exp2((m_i - m_use) * qk_scale)
    else:
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _take_turn(turn_bars, turn_it, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """Wait until the previous warpgroup in the round (WG0, WG1, ..., WG0, ...) has issued its
    wgmmas. WG0's first wait passes on the fresh barrier (parity 1); WG w > 0 waits for WG w-1's
    arrival of the same round."""
    if PINGPONG:
        if WG == 0:
            mbarrier.wait(turn_bars.index(WG), (turn_it & 1) ^ 1)
        else:
            mbarrier.wait(turn_bars.index(WG), turn_it & 1)


@gluon.jit
def _pass_turn(turn_bars, WG: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn_bars.index((WG + 1) % NC), count=1)


# --- consumer step: one key block --------------------------------------------------------------------


@gluon.jit
def _consume_block(acc, m_i, l_i, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready,
                   v_empty, turn_bars, kv_it, turn_it, qk_scale, rows, n_start, bounds,
                   WG: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                   MASKED: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr, NC: gl.constexpr,
                   PINGPONG: gl.constexpr, RAW_MAX: gl.constexpr,
                   s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """Key block kv_it (not the first of the tile): S_j and the previous block's P V in flight
    together, the softmax of S_j while P V finishes."""
    slot, phase = _stage(kv_it, STAGES)
    pslot, pphase = _stage(kv_it - 1, STAGES)
    mbarrier.wait(k_ready.index(slot), phase)
    mbarrier.wait(v_ready.index(pslot), pphase)
    _take_turn(turn_bars, turn_it, WG, PINGPONG)
    s_tok = warpgroup_mma(q_buf, k_smem.index(slot).permute((1, 0)),
                          gl.zeros([64, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    o_tok = warpgroup_mma(p_op, v_smem.index(pslot), acc, is_async=True)
    _pass_turn(turn_bars, WG, NC, PINGPONG)
    # -- S_j ready (P V may still run): release K, softmax
    s = warpgroup_mma_wait(1, deps=[s_tok])
    mbarrier.arrive(k_empty.index(slot), count=1)
    cols = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, qk_scale, rows, cols, bounds, MASKED, CAUSAL, WINDOW, RAW_MAX)
    p_op = gl.convert_layout(p.to(q_buf.dtype), p_layout)
    # -- O ready: release V of the previous block
    acc = warpgroup_mma_wait(0, deps=[o_tok])
    mbarrier.arrive(v_empty.index(pslot), count=1)
    return acc, m_i, l_i, p_op, alpha, kv_it + 1, turn_it + 1


@gluon.jit
def _first_block(q_buf, k_smem, k_ready, k_empty, turn_bars, kv_it, turn_it, qk_scale, rows, n_start, bounds,
                 WG: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 WINDOW: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr, RAW_MAX: gl.constexpr,
                 s_layout: gl.constexpr, p_layout: gl.constexpr):
    """A tile's first key block (keys from n_start): S_0 alone (masked: it may be the diagonal, a
    window's edge or the Sk tail).
    Returns P_0 (the next P V's operand) and the fresh row state."""
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    slot, phase = _stage(kv_it, STAGES)
    mbarrier.wait(k_ready.index(slot), phase)
    _take_turn(turn_bars, turn_it, WG, PINGPONG)
    s_tok = warpgroup_mma(q_buf, k_smem.index(slot).permute((1, 0)),
                          gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    _pass_turn(turn_bars, WG, NC, PINGPONG)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    mbarrier.arrive(k_empty.index(slot), count=1)
    cols = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    p, m_i, l_i, alpha = _softmax(s, gl.full([64], float("-inf"), gl.float32, row_layout),
                                  gl.full([64], 0.0, gl.float32, row_layout), qk_scale, rows, cols, bounds,
                                  True, CAUSAL, WINDOW, RAW_MAX)
    p_op = gl.convert_layout(p.to(q_buf.dtype), p_layout)
    return p_op, m_i, l_i, alpha, kv_it + 1, turn_it + 1


@gluon.jit
def _first_block_with_last_pv(acc, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                              turn_bars, kv_it, turn_it, qk_scale, rows, n_start, bounds,
                              WG: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                              CAUSAL: gl.constexpr, WINDOW: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr,
                              RAW_MAX: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                              p_layout: gl.constexpr):
    """XTILE: this tile's S_0 issued in one turn with the previous tile's last P V, whose output
    accumulator comes back finished; returns it with P_0 and this tile's fresh row state."""
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    slot, phase = _stage(kv_it, STAGES)
    pslot, pphase = _stage(kv_it - 1, STAGES)
    mbarrier.wait(k_ready.index(slot), phase)
    mbarrier.wait(v_ready.index(pslot), pphase)
    _take_turn(turn_bars, turn_it, WG, PINGPONG)
    s_tok = warpgroup_mma(q_buf, k_smem.index(slot).permute((1, 0)),
                          gl.zeros([64, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    o_tok = warpgroup_mma(p_op, v_smem.index(pslot), acc, is_async=True)
    _pass_turn(turn_bars, WG, NC, PINGPONG)
    s = warpgroup_mma_wait(1, deps=[s_tok])
    mbarrier.arrive(k_empty.index(slot), count=1)
    cols = n_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    p, m_i, l_i, alpha = _softmax(s, gl.full([64], float("-inf"), gl.float32, row_layout),
                                  gl.full([64], 0.0, gl.float32, row_layout), qk_scale, rows, cols, bounds,
                                  True, CAUSAL, WINDOW, RAW_MAX)
    p_op = gl.convert_layout(p.to(q_buf.dtype), p_layout)
    acc = warpgroup_mma_wait(0, deps=[o_tok])
    mbarrier.arrive(v_empty.index(pslot), count=1)
    return acc, p_op, m_i, l_i, alpha, kv_it + 1, turn_it + 1


@gluon.jit
def _last_pv(acc, p_op, alpha, v_smem, v_ready, v_empty, turn_bars, kv_it, turn_it,
             WG: gl.constexpr, STAGES: gl.constexpr, NC: gl.constexpr, PINGPONG: gl.constexpr,
             o_layout: gl.constexpr):
    """A tile's last P V, alone in its turn."""
    pslot, pphase = _stage(kv_it - 1, STAGES)
    mbarrier.wait(v_ready.index(pslot), pphase)
    _take_turn(turn_bars, turn_it, WG, PINGPONG)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    o_tok = warpgroup_mma(p_op, v_smem.index(pslot), acc, is_async=True)
    _pass_turn(turn_bars, WG, NC, PINGPONG)
    acc = warpgroup_mma_wait(0, deps=[o_tok])
    mbarrier.arrive(v_empty.index(pslot), count=1)
    return acc, turn_it + 1


@gluon.jit
def _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr, b, h, bh, row0, seq_q,
                RAW_MAX: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """O / l through shared memory and a TMA store (clipped at Sq), lse in natural log; rows that saw
    no key (l = 0) get 0 and -inf. Waits for this warpgroup's previous store to have read o_buf."""
    rows = row0 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    if RAW_MAX:  # m in score units (_softmax)
        m_log2 = m_i * qk_scale
    else:
        m_log2 = m_i
    lse = gl.where(empty, float("-inf"), (m_log2 + gl.log2(l_safe)) * 0.6931471805599453)
    gl.store(lse_ptr + bh.to(gl.int64) * seq_q + rows, lse, mask=rows < seq_q)
    tma.store_wait(0)
    o_buf.store(out.to(o_buf.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, row0, 0], o_buf)


# --- partitions --------------------------------------------------------------------------------------


@gluon.jit
def _consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr,
              seq_q, seq_k, heads_q, group, num_m, num_tiles, ORDER: gl.constexpr, qk_scale, left, right,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              WINDOW: gl.constexpr, NC: gl.constexpr, O_SEPARATE: gl.constexpr, PINGPONG: gl.constexpr,
              XTILE: gl.constexpr, QBUF: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Consumer warpgroup WG of NC: rows [64 WG, 64 WG + 64) of every tile this CTA owns.

    O_SEPARATE: the output leaves through its own buffer and Q is handed back as soon as the last
    S = Q K^T of the tile is done (the producer loads the next Q during the last P V and the store);
    otherwise O goes out through Q's buffer, handed back once the store has read it.
    XTILE (with O_SEPARATE and QBUF = 2 Q buffers per warpgroup): a tile's last P V is issued in one
    turn with the next tile's S_0, so the tensor cores see no half-empty turn between tiles."""
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars = bars
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_smem.dtype
    # fp16 keeps the row max in score units (_softmax), so the largest score's weight is exactly 1
    RAW_MAX: gl.constexpr = dtype == gl.float16
    o_buf = o_smem.index(WG)
    bounds = (seq_k, seq_k - seq_q, left, right)
    kv_it = 0
    turn_it = 0
    tile_it = 0
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_bh = num_tiles // num_m
    if XTILE:
        # carried from tile to tile: the state that the previous tile's last P V needs (whether there
        # is one, and where its output goes, is recomputed from the previous round's tile)
        acc = gl.zeros([64, HEAD_D], gl.float32, o_layout)
        m_i = gl.full([64], float("-inf"), gl.float32, row_layout)
        l_i = gl.full([64], 0.0, gl.float32, row_layout)
        alpha = gl.full([64], 0.0, gl.float32, row_layout)
        p_op = gl.zeros([64, BLOCK_N], dtype, p_layout)
    for r in range(_rounds(pid, nprog, num_tiles, ORDER)):
        start_m, bh, b, h, hk = _tile_coords(_tile_of(r, pid, nprog, ORDER), num_m, num_bh, heads_q, group, ORDER,
                                             NC * 64)
        n_lo, full_lo, full_hi, n_end = _key_blocks(start_m, seq_q, seq_k, left, right, NC * 64, BLOCK_N, CAUSAL,
                                                    WINDOW)
        row0 = start_m + WG * 64
        rows = row0 + gl.arange(0, 64, layout=row_layout)
        if XTILE:
            # the previous round's tile: its last P V is pending when it had keys
            prev_m, prev_bh, prev_b, prev_h, prev_hk = _tile_coords(_tile_of(r - 1, pid, nprog, ORDER), num_m,
                                                                    num_bh, heads_q, group, ORDER, NC * 64)
            prev_blocks = _key_blocks(prev_m, seq_q, seq_k, left, right, NC * 64, BLOCK_N, CAUSAL, WINDOW)
            pend = (r > 0) & (prev_blocks[3] > prev_blocks[0])
            prev_row0 = prev_m + WG * 64
        qi = WG * QBUF + tile_it % QBUF
        q_buf = q_smem.index(qi)
        if not XTILE:
            m_i = gl.full([64], float("-inf"), gl.float32, row_layout)
            l_i = gl.full([64], 0.0, gl.float32, row_layout)
            acc = gl.zeros([64, HEAD_D], gl.float32, o_layout)
        mbarrier.wait(q_ready.index(qi), (tile_it // QBUF) & 1)
        if n_end > n_lo:
            # -- first key block
            if XTILE:
                if pend:
                    acc, p_op, m_new, l_new, alpha, kv_it, turn_it = _first_block_with_last_pv(
                        acc, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, turn_bars,
                        kv_it, turn_it, qk_scale, rows, n_lo * BLOCK_N, bounds,
                        WG, STAGES, BLOCK_N, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, o_layout, p_layout)
                    _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr,
                                prev_b, prev_h, prev_bh, prev_row0, seq_q,
                                RAW_MAX, s_layout, o_layout)
                    m_i = m_new
                    l_i = l_new
                else:
                    p_op, m_i, l_i, alpha, kv_it, turn_it = _first_block(
                        q_buf, k_smem, k_ready, k_empty, turn_bars, kv_it, turn_it, qk_scale, rows, n_lo * BLOCK_N,
                        bounds, WG, STAGES, BLOCK_N, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, p_layout)
            else:
                p_op, m_i, l_i, alpha, kv_it, turn_it = _first_block(
                    q_buf, k_smem, k_ready, k_empty, turn_bars, kv_it, turn_it, qk_scale, rows, n_lo * BLOCK_N,
                    bounds, WG, STAGES, BLOCK_N, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, p_layout)
            acc = gl.zeros([64, HEAD_D], gl.float32, o_layout)
            if WINDOW:
                # -- the window's left edge: masked
                for j in range(n_lo + 1, full_lo):
                    acc, m_i, l_i, p_op, alpha, kv_it, turn_it = _consume_block(
                        acc, m_i, l_i, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                        turn_bars, kv_it, turn_it, qk_scale, rows, j * BLOCK_N, bounds,
                        WG, STAGES, BLOCK_N, True, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, o_layout, p_layout)
            # -- blocks every row of the tile sees in full: no mask
            for j in range(max(full_lo, n_lo + 1), full_hi):
                acc, m_i, l_i, p_op, alpha, kv_it, turn_it = _consume_block(
                    acc, m_i, l_i, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                    turn_bars, kv_it, turn_it, qk_scale, rows, j * BLOCK_N, bounds,
                    WG, STAGES, BLOCK_N, False, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, o_layout, p_layout)
            # -- the diagonal (or the window's right edge) and the ragged end of Sk: masked
            for j in range(max(full_hi, n_lo + 1), n_end):
                acc, m_i, l_i, p_op, alpha, kv_it, turn_it = _consume_block(
                    acc, m_i, l_i, p_op, alpha, q_buf, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                    turn_bars, kv_it, turn_it, qk_scale, rows, j * BLOCK_N, bounds,
                    WG, STAGES, BLOCK_N, True, CAUSAL, WINDOW, NC, PINGPONG, RAW_MAX, s_layout, o_layout, p_layout)
            if O_SEPARATE:  # every S of the tile is done: Q may be overwritten
                mbarrier.arrive(q_empty.index(qi), count=1)
            # -- the last block's P V: now, or (XTILE) with the next tile's first S
            if not XTILE:
                acc, turn_it = _last_pv(acc, p_op, alpha, v_smem, v_ready, v_empty, turn_bars, kv_it, turn_it,
                                        WG, STAGES, NC, PINGPONG, o_layout)
        else:
            # -- a tile whose rows see no key (bottom-right causal or a window, Sq > Sk): zeros and -inf
            if XTILE:
                if pend:
                    acc, turn_it = _last_pv(acc, p_op, alpha, v_smem, v_ready, v_empty, turn_bars, kv_it, turn_it,
                                            WG, STAGES, NC, PINGPONG, o_layout)
                    _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr,
                                prev_b, prev_h, prev_bh, prev_row0, seq_q,
                                RAW_MAX, s_layout, o_layout)
                acc = gl.zeros([64, HEAD_D], gl.float32, o_layout)
                m_i = gl.full([64], float("-inf"), gl.float32, row_layout)
                l_i = gl.full([64], 0.0, gl.float32, row_layout)
            if O_SEPARATE:
                mbarrier.arrive(q_empty.index(qi), count=1)
        if XTILE:
            if n_end <= n_lo:
                _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr, b, h, bh, row0, seq_q,
                            RAW_MAX, s_layout, o_layout)
        else:
            _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr, b, h, bh, row0, seq_q,
                        RAW_MAX, s_layout, o_layout)
        if not O_SEPARATE:  # O went out through Q's buffer: hand it back once the store has read it
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(qi), count=1)
        tile_it += 1
    if XTILE:
        # the last round's tile
        last = _rounds(pid, nprog, num_tiles, ORDER) - 1
        prev_m, prev_bh, prev_b, prev_h, prev_hk = _tile_coords(_tile_of(last, pid, nprog, ORDER), num_m, num_bh,
                                                                heads_q, group, ORDER, NC * 64)
        prev_blocks = _key_blocks(prev_m, seq_q, seq_k, left, right, NC * 64, BLOCK_N, CAUSAL, WINDOW)
        if prev_blocks[3] > prev_blocks[0]:
            acc, turn_it = _last_pv(acc, p_op, alpha, v_smem, v_ready, v_empty, turn_bars, kv_it, turn_it,
                                    WG, STAGES, NC, PINGPONG, o_layout)
            _store_tile(acc, m_i, l_i, qk_scale, o_buf, o_desc, lse_ptr,
                        prev_b, prev_h, prev_bh, prev_m + WG * 64, seq_q,
                        RAW_MAX, s_layout, o_layout)
    tma.store_wait(0)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars,
              seq_q, seq_k, heads_q, group, num_m, num_tiles, ORDER: gl.constexpr, left, right,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, WINDOW: gl.constexpr,
              NC: gl.constexpr, QBUF: gl.constexpr):
    """The TMA warp: each consumer's Q rows of a tile (into the next of its QBUF buffers), then the
    tile's key/value blocks [n_lo, n_end) through the STAGES ring (the consumers walk the same
    blocks: the ring's phases count them)."""
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars = bars
    kv_it = 0
    tile_it = 0
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_bh = num_tiles // num_m
    for r in range(_rounds(pid, nprog, num_tiles, ORDER)):
        start_m, bh, b, h, hk = _tile_coords(_tile_of(r, pid, nprog, ORDER), num_m, num_bh, heads_q, group, ORDER,
                                             NC * 64)
        n_lo, full_lo, full_hi, n_end = _key_blocks(start_m, seq_q, seq_k, left, right, NC * 64, BLOCK_N, CAUSAL,
                                                    WINDOW)
        for w in gl.static_range(NC):
            qi = w * QBUF + tile_it % QBUF
            # a fresh barrier counts as if its phase 1 had completed: the first wait passes
            mbarrier.wait(q_empty.index(qi), ((tile_it // QBUF) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qi), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, start_m + w * 64, 0], q_ready.index(qi), q_smem.index(qi))
        for j in range(n_lo, n_end):
            slot, phase = _stage(kv_it, STAGES)
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, hk, j * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, hk, j * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))
            kv_it += 1
        tile_it += 1


# --- kernel ------------------------------------------------------------------------------------------


# shapes vary per call: one compiled kernel per (dtype, D, causal, config), whatever their divisibility
@gluon.jit(do_not_specialize=["seq_q", "seq_k", "heads_q", "group", "num_tiles", "window_left", "window_right"])
def _attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr,
                     seq_q, seq_k, heads_q, group, num_tiles, qk_scale, window_left, window_right,
                     BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                     O_SEPARATE: gl.constexpr, PINGPONG: gl.constexpr, NC: gl.constexpr, XTILE: gl.constexpr,
                     WINDOW: gl.constexpr, ORDER: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    # operand buffers are 2-d (rows, D) for the wgmmas; the 4-d descriptors' boxes are (1, 1, rows, D)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    if XTILE:
        gl.static_assert(O_SEPARATE, "XTILE needs O_SEPARATE (Q is handed back before the tile's output)")
        QBUF: gl.constexpr = 2
    else:
        QBUF: gl.constexpr = 1
    q_smem = gl.allocate_shared_memory(dtype, [NC * QBUF, 64, HEAD_D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    if O_SEPARATE:
        o_smem = gl.allocate_shared_memory(dtype, [NC, 64, HEAD_D], q_layout)
    else:
        o_smem = q_smem
    q_ready = gl.allocate_shared_memory(gl.int64, [NC * QBUF, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NC * QBUF, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(NC * QBUF):
        mbarrier.init(q_ready.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
    for w in gl.static_range(NC):
        mbarrier.init(turn_bars.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=NC)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=NC)
    fence_async_shared()
    bars = (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn_bars)
    num_m = (seq_q + NC * 64 - 1) // (NC * 64)
    if NC == 2:
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr, seq_q, seq_k, heads_q, group,
                         num_m, num_tiles, ORDER, qk_scale, window_left, window_right, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                         WINDOW, NC, O_SEPARATE, PINGPONG, XTILE, QBUF, s_layout, o_layout)),
            (_consumer, (1, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr, seq_q, seq_k, heads_q, group,
                         num_m, num_tiles, ORDER, qk_scale, window_left, window_right, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                         WINDOW, NC, O_SEPARATE, PINGPONG, XTILE, QBUF, s_layout, o_layout)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, seq_q, seq_k, heads_q, group, num_m,
                         num_tiles, ORDER, window_left, window_right, BLOCK_N, STAGES, CAUSAL, WINDOW, NC,
                         QBUF)),
        ], [4, 1], [CONSUMER_REGS_2WG, PRODUCER_REGS])
    else:
        gl.static_assert(NC == 3, "NC: 2 or 3 consumer warpgroups")
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr, seq_q, seq_k, heads_q, group,
                         num_m, num_tiles, ORDER, qk_scale, window_left, window_right, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                         WINDOW, NC, O_SEPARATE, PINGPONG, XTILE, QBUF, s_layout, o_layout)),
            (_consumer, (1, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr, seq_q, seq_k, heads_q, group,
                         num_m, num_tiles, ORDER, qk_scale, window_left, window_right, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                         WINDOW, NC, O_SEPARATE, PINGPONG, XTILE, QBUF, s_layout, o_layout)),
            (_consumer, (2, q_smem, k_smem, v_smem, o_smem, bars, o_desc, lse_ptr, seq_q, seq_k, heads_q, group,
                         num_m, num_tiles, ORDER, qk_scale, window_left, window_right, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                         WINDOW, NC, O_SEPARATE, PINGPONG, XTILE, QBUF, s_layout, o_layout)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, seq_q, seq_k, heads_q, group, num_m,
                         num_tiles, ORDER, window_left, window_right, BLOCK_N, STAGES, CAUSAL, WINDOW, NC,
                         QBUF)),
        ], [4, 4, 1], [CONSUMER_REGS_3WG, CONSUMER_REGS_3WG, PRODUCER_REGS])


# --- host launch -------------------------------------------------------------------------------------

_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
_SIG_DTYPES = {"fp16": gl.float16, "bf16": gl.bfloat16}


@functools.cache  # a pure function of its arguments, 7 us a call: four per launch
def _box_layout(rows: int, head_dim: int, dtype: Any) -> Any:
    """Shared layout of a (1, 1, rows, D) TMA box: the same swizzle as the 2-d (rows, D) buffer."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], dtype)


def _strides_ready(t: torch.Tensor) -> bool:
    """Whether the copy engine can read t's layout: a unit last stride and 16-byte aligned strides
    on every dim of extent > 1 (the base's alignment is checked per call)."""
    es = t.element_size()
    return t.stride(3) == 1 and all((st * es) % 16 == 0 for st, n in zip(t.stride()[:3], t.shape[:3]) if n > 1)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """t itself when the copy engine can read it (16-byte aligned base and strides, unit last
    stride), else aligned16's dense copy (which also copies a view at an odd address that torch
    counts as contiguous, a (1, 1, 1, D) slice of a larger buffer; contiguous() would not)."""
    if _strides_ready(t) and t.data_ptr() % 16 == 0:
        return t
    log.debug("gluon forward: copying a %s tensor with strides %s (TMA needs 16-byte alignment)",
              tuple(t.shape), t.stride())
    return aligned16(t)


def _box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, strides) of the 4-d descriptor over t (B, H, S, D). Dims of extent 1 get a harmless
    aligned stride (their coordinate is always 0)."""
    shape = tuple(t.shape)
    strides = list(t.stride())
    for i in range(2, -1, -1):
        if shape[i] == 1:
            strides[i] = strides[i + 1] * shape[i + 1]
    return shape, tuple(strides)


def _descriptor(t: torch.Tensor, rows: int) -> Any:
    """Triton's 4-d descriptor over t (B, H, S, D) with a (1, 1, rows, D) box."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    shape, strides = _box(t)
    d = shape[3]
    return TensorDescriptor(t, list(shape), list(strides), [1, 1, rows, d], _box_layout(rows, d, _GL_DTYPES[t.dtype]))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0))


# a tile's fixed cost (its first S alone, its last P V alone, the output's store), in key blocks
_TILE_OVERHEAD_BLOCKS = 1.0
# orders within this much of the best balance count as equal (then the one that reads less wins)
_BALANCE_SLACK = 0.02


def order_unit(order: int) -> int:
    """Tiles per unit that a CTA takes in one turn (_tile_of's `unit`)."""
    return 2 if order == ORDER_PAIRS else 1


def programs(order: int, num_tiles: int, sms: int) -> int:
    """CTAs to start: one per SM, at most one per unit (each CTA must own a unit: _rounds)."""
    return min(sms, -(-num_tiles // order_unit(order)))


def dealt_to(num_tiles: int, nprog: int, unit: int) -> np.ndarray:
    """The CTA that runs each tile index, as _tile_of deals them: units of `unit` tiles, rounds of
    nprog units in snake order."""
    u = np.arange(num_tiles) // unit
    rnd, pos = u // nprog, u % nprog
    return np.where(rnd % 2 == 0, pos, nprog - 1 - pos)


def row_blocks(order: int, num_bh: int, num_m: int) -> np.ndarray:
    """The query row block of each tile index in `order` (_tile_coords' numbering)."""
    k = np.arange(num_m)
    if order == ORDER_BOTTOM:
        return np.repeat(k[::-1], num_bh)
    if order == ORDER_PAIRS:
        return np.tile(np.where(k % 2 == 1, k // 2, num_m - 1 - k // 2), num_bh)
    return np.tile(k, num_bh)


def tile_heads(order: int, num_bh: int, num_m: int) -> np.ndarray:
    """The b * Hq + h of each tile index in `order` (_tile_coords' numbering)."""
    h = np.arange(num_bh)
    return np.tile(h, num_m) if order == ORDER_BOTTOM else np.repeat(h, num_m)


def causal_row_block_costs(num_m: int, seq_q: int, seq_k: int, block_m: int, block_n: int) -> np.ndarray:
    """Key blocks each query row block visits under bottom-right causal without a window, as
    _key_blocks counts them."""
    visible = np.clip((np.arange(num_m) + 1) * block_m + seq_k - seq_q, 0, seq_k)
    return -(-visible // block_n)


def balance(costs: np.ndarray, order: int, sms: int) -> float:
    """Share of the SMs' time spent working when tiles of these costs (per tile index) are dealt in
    `order` to programs(order, ...) CTAs."""
    unit = order_unit(order)
    nprog = programs(order, costs.size, sms)
    load = np.bincount(dealt_to(costs.size, nprog, unit), weights=costs + _TILE_OVERHEAD_BLOCKS, minlength=nprog)
    return float(load.sum() / (sms * load.max()))


@functools.lru_cache(maxsize=256)
def schedule(num_bh: int, num_m: int, seq_q: int, seq_k: int, block_m: int, block_n: int, causal: bool,
             windowed: bool, sms: int, kv_bytes: int, l2_bytes: int) -> tuple[int, int]:
    """(tile order, CTAs) for one launch. Without a causal mask (or with a window) tiles cost the same
    and run head by head. Under causal, the order whose CTAs stay busiest (`balance`, from the tiles'
    key-block counts) among: head by head; zigzag pairs; and, when the K/V of all heads (kv_bytes)
    fit in half of L2, bottom row block first across heads (beyond that it makes every round read
    every head's K/V from memory: docs/gluon.md). Ties within _BALANCE_SLACK go to the order that
    keeps a head's tiles together (head, then pairs)."""
    num_tiles = num_bh * num_m
    if not causal or windowed:
        return ORDER_HEAD, programs(ORDER_HEAD, num_tiles, sms)
    cost_m = causal_row_block_costs(num_m, seq_q, seq_k, block_m, block_n).astype(np.float64)
    candidates = [ORDER_HEAD, ORDER_PAIRS] + ([ORDER_BOTTOM] if kv_bytes * 2 <= l2_bytes else [])
    scored = [(balance(cost_m[row_blocks(o, num_bh, num_m)], o, sms), o, programs(o, num_tiles, sms))
              for o in candidates]
    best = max(score for score, _, _ in scored)
    order, nprog = next((o, n) for score, o, n in scored if score >= best - _BALANCE_SLACK)
    return order, nprog


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise for what this kernel cannot run (the dispatcher's capabilities say the same first)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d bhsd-indexed tensor, got shape {tuple(t.shape)}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q/k/v dtype: expected float16 or bfloat16 for all three, got {q.dtype}/{k.dtype}/{v.dtype}")
    d = q.shape[3]
    if d not in HEAD_DIMS or k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"head dim: expected D = Dv in {HEAD_DIMS}, got D={q.shape[3]}, Dk={k.shape[3]}, "
                         f"Dv={v.shape[3]}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k/v: expected (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D) with Hq divisible by "
                         f"Hkv, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.is_cuda:
        raise ValueError(f"q: expected a CUDA tensor, got device {q.device}")


_LAUNCHER = DirectLauncher(_attn_fwd_kernel)
_N_DESCRIPTORS = 4  # q, k, v, o: the kernel's leading arguments, then lse and the scalars


class _GluonPlan:
    """Everything one launch needs that depends on shapes, strides, dtypes, device and config
    only: made once per call signature (attention is launch-bound at small sizes, and Triton's JIT
    dispatch of descriptor arguments costs more host time than a small call's GPU time)."""

    __slots__ = ("outputs", "index", "rows", "boxes", "launch")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                 config: dict[str, Any], variant: Variant = PLAIN) -> None:
        check_inputs(q, k, v)
        if variant.softcap or variant.sinks:
            raise ValueError(f"variant: the Gluon forward takes a window only, got softcap={variant.softcap}, "
                             f"sinks={variant.sinks}")
        bsz, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        self.outputs = OutputPlan(q, sk, d)
        self.index = cuda_index(q)
        self.launch: BoundDescriptorLaunch | None = None
        self.rows: tuple[int, ...] = ()
        self.boxes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] | None = None
        if self.outputs.finished:
            return
        causal = bool(causal) and sq > 1  # one query row sees every key (bottom-right)
        win = kernel_window(causal, variant.window, sq, sk)  # None: plain causal/non-causal masking covers it
        cfg = resolve_config(d, config, causal, sq, sk, win is not None)
        left, right = win if win is not None else (0, 0)
        block_m = HALF_M * cfg["CONSUMERS"]
        num_m = triton.cdiv(sq, block_m)
        num_tiles = bsz * hq * num_m
        index = self.index or 0
        kv_bytes = bsz * hkv * sk * d * 2 * q.element_size()
        if cfg.get("ORDER") is None:
            order, nprog = schedule(bsz * hq, num_m, sq, sk, block_m, cfg["BLOCK_N"], causal, win is not None,
                                    _sm_count(index), kv_bytes, _l2_bytes(index))
        else:  # forced (benchmarks, tests); every order is correct
            if cfg["ORDER"] not in (ORDER_HEAD, ORDER_BOTTOM, ORDER_PAIRS):
                raise ValueError(f"config['ORDER']: expected ORDER_HEAD, ORDER_BOTTOM or ORDER_PAIRS "
                                 f"({ORDER_HEAD}, {ORDER_BOTTOM}, {ORDER_PAIRS}), got {cfg['ORDER']!r}")
            order, nprog = cfg["ORDER"], programs(cfg["ORDER"], num_tiles, _sm_count(index))
        self.rows = (HALF_M, cfg["BLOCK_N"], cfg["BLOCK_N"], HALF_M)  # q, k, v, o boxes
        out = torch.empty_strided((bsz, hq, sq, d), self.outputs.strides, dtype=q.dtype, device="meta")
        # the records' shapes and strides, where every stride suits the copy engine (a call whose
        # bases are also aligned may then take the bound kernel)
        if all(_strides_ready(t) for t in (q, k, v, out)):
            self.boxes = tuple(_box(t) for t in (q, k, v, out))
        self.launch = BoundDescriptorLaunch(
            _LAUNCHER, (nprog,), _N_DESCRIPTORS + 1,
            (sq, sk, hq, hq // hkv, num_tiles, float(scale) * LOG2E, left, right),
            dict(BLOCK_N=cfg["BLOCK_N"], HEAD_D=d, STAGES=cfg["STAGES"], CAUSAL=causal,
                 O_SEPARATE=cfg["O_SEPARATE"], PINGPONG=cfg["PINGPONG"], NC=cfg["CONSUMERS"], XTILE=cfg["XTILE"],
                 WINDOW=win is not None, ORDER=order),
            dict(num_warps=NUM_WARPS, maxnreg=max_regs_per_thread(cfg["CONSUMERS"])), self.index or 0)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.outputs.allocate()
        if not self.outputs.finished:
            run_on_device(self.index, self._launch, q, k, v, out, lse)
        return out, lse

    def _launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        assert self.launch is not None
        rows = self.rows
        if self.boxes is not None and not (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr()) & 15:
            tensors = (q, k, v, out)
            records = tuple(HostDescriptor(t, *box) for t, box in zip(tensors, self.boxes))
            self.launch(lambda: tuple(_descriptor(t, r) for t, r in zip(tensors, rows)), records, (lse,), (out, lse))
            return
        # a layout or base the copy engine cannot read: through contiguous copies, on the checked path
        ready = tuple(_tma_ready(t) for t in (q, k, v, out))
        self.launch(lambda: tuple(_descriptor(t, r) for t, r in zip(ready, rows)), None, (lse,), (ready[3], lse))
        if ready[3] is not out:
            out.copy_(ready[3])


_PLANS: dict[tuple[Any, ...], _GluonPlan] = {}


def gluon_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                            config: dict[str, Any] | None = None, window: tuple[int, int] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward attention on bhsd-indexed views (no autograd), Hopper only.

    q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), D in (64, 128, 256), fp16 or bf16; causal is
    bottom-right aligned. window (left, right): query i at p = i + Sk - Sq sees key j iff
    p - left <= j <= p + right (-1: unbounded; causal sets right to 0); key blocks outside the
    window are never loaded. Returns out (B, Hq, Sq, D) in q's dtype and physical layout and lse
    (B, Hq, Sq) float32, natural log, -inf for rows that see no key. `config` holds the keys of
    CONFIG_KEYS (defaults: default_config for the shape). scale > 0 (the fp16 softmax takes the row
    max of the unscaled scores).
    """
    return prepare_gluon_forward(q, k, v, causal=causal, scale=scale, config=config, window=window)(q, k, v)


def prepare_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                          config: dict[str, Any] | None = None, window: tuple[int, int] | None = None
                          ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """gluon_attention_forward for exactly this call signature, its plan looked up once: f(q, k, v)."""
    if not scale > 0:
        raise ValueError(f"scale: expected a positive float, got {scale!r}")
    return cached_plan(_PLANS, _GluonPlan, q, k, v, causal, scale, config, make_variant(window, None, None)).run


# --- ahead-of-time compilation (CPU checks) -----------------------------------------------------------


def aot_compile(head_dim: int, causal: bool, dtype: str = "bf16", config: dict[str, Any] | None = None,
                window: bool = False, order: int = ORDER_HEAD) -> Any:
    """Compile the kernel for sm_90 without a GPU (window: the sliding-window kernel; order: the tile
    order, ORDER_*); returns
    Triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata.shared)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = resolve_config(head_dim, config)
    gdt = _SIG_DTYPES[dtype]

    def desc(rows: int) -> str:
        return f"tensordesc<{dtype}[1, 1, {rows}, {head_dim}],{_box_layout(rows, head_dim, gdt)!r}>"

    signature = {"q_desc": desc(HALF_M), "k_desc": desc(cfg["BLOCK_N"]), "v_desc": desc(cfg["BLOCK_N"]),
                 "o_desc": desc(HALF_M), "lse_ptr": "*fp32", "seq_q": "i32", "seq_k": "i32", "heads_q": "i32",
                 "group": "i32", "num_tiles": "i32", "qk_scale": "fp32", "window_left": "i32",
                 "window_right": "i32", "BLOCK_N": "constexpr", "HEAD_D": "constexpr", "STAGES": "constexpr",
                 "CAUSAL": "constexpr", "O_SEPARATE": "constexpr", "PINGPONG": "constexpr", "NC": "constexpr",
                 "XTILE": "constexpr", "WINDOW": "constexpr", "ORDER": "constexpr"}
    constexprs = {"BLOCK_N": cfg["BLOCK_N"], "HEAD_D": head_dim, "STAGES": cfg["STAGES"], "CAUSAL": causal,
                  "O_SEPARATE": cfg["O_SEPARATE"], "PINGPONG": cfg["PINGPONG"], "NC": cfg["CONSUMERS"],
                  "XTILE": cfg["XTILE"], "WINDOW": window, "ORDER": order}
    src = GluonASTSource(fn=_attn_fwd_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": NUM_WARPS, "maxnreg": max_regs_per_thread(cfg["CONSUMERS"])})
