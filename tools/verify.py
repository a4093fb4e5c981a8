"""Correctness gate of the tuner and the benchmark: a candidate is checked before it is timed.

A float64 reference of a full benchmark shape (16k x 16k scores per head) is too large to build,
but attention rows are independent, so the check computes the reference for a few blocks of query
rows of a few (batch, kv-head group) pairs, at the full sequence length, and holds the candidate's
rows to flash-attention's budget (dispatch/tolerances.py) against plain torch math in the input
dtype on the same rows. Under the bottom-right causal mask, rows [r0, r1) with keys [0, r1 + Sk - Sq)
form a bottom-right causal problem of their own, so dispatch/reference.py serves unchanged; a
causal sliding window keeps that alignment (the tuner measures windows only under causal).

Every output element is also required to be finite, and candidates run on memory that was filled
with NaN just before (the caching allocator hands it back), so an unwritten element fails.
Gradients are checked on a small proxy of the same dtype, head dim, GQA ratio and mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flashdispatch.problem import Problem, problem_from_tensors
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget

# Query rows per checked block, and the sequence length up to which every row is checked.
ROW_BLOCK = 64
ALL_ROWS_UP_TO = 192
# Proxy size for the gradient check: odd, so that it ends inside a tile of any block size.
GRAD_PROXY_SEQLEN = 203
GRAD_PROXY_SEQLEN_ALIGNED = 256


@dataclass
class RowBlock:
    batch: int
    kv_head: int
    rows: tuple[int, int]
    ref: torch.Tensor  # float64 (1, g, rows, Dv)
    base: torch.Tensor  # same math in the input dtype


@dataclass
class Verdict:
    ok: bool
    error: float
    allowed: float
    reason: str = ""


def _row_ranges(sq: int) -> list[tuple[int, int]]:
    if sq <= ALL_ROWS_UP_TO:
        return [(0, sq)]
    mid = sq // 2 - 37  # off any power-of-two tile boundary
    return [(0, ROW_BLOCK), (mid, mid + ROW_BLOCK), (sq - ROW_BLOCK, sq)]


def reference_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> list[RowBlock]:
    """Reference rows for bhsd-indexed q, k, v of problem p (first and last (batch, kv head))."""
    g = p.gqa_ratio
    pairs = {(0, 0), (p.batch - 1, p.heads_kv - 1)}
    off = p.causal_offset
    if p.has_window and not p.effective_causal:
        raise ValueError(f"reference_blocks: a window needs causal=True here (rows sliced from a non-causal "
                         f"window change its alignment), got window={p.window} without causal")
    window = p.window if p.has_window else None
    blocks = []
    with torch.no_grad():
        for b, h in sorted(pairs):
            for r0, r1 in _row_ranges(p.seqlen_q):
                qs = q[b:b + 1, h * g:(h + 1) * g, r0:r1].detach()
                kend = min(p.seqlen_k, r1 + off) if p.effective_causal else p.seqlen_k
                if kend <= 0:  # every row of the block is blind: zeros by contract
                    z = torch.zeros(1, g, r1 - r0, p.head_dim_v, dtype=torch.float64, device=q.device)
                    blocks.append(RowBlock(b, h, (r0, r1), z, z.to(q.dtype)))
                    continue
                ks = k[b:b + 1, h:h + 1, :kend].detach()
                vs = v[b:b + 1, h:h + 1, :kend].detach()
                ref, _ = attention_math(qs, ks, vs, causal=p.effective_causal, scale=p.scale, upcast=True,
                                        window=window)
                base, _ = attention_math(qs, ks, vs, causal=p.effective_causal, scale=p.scale, upcast=False,
                                         window=window)
                blocks.append(RowBlock(b, h, (r0, r1), ref, base))
    return blocks


def check_output(out: torch.Tensor, p: Problem, blocks: list[RowBlock]) -> Verdict:
    want = (p.batch, p.heads_q, p.seqlen_q, p.head_dim_v)
    if tuple(out.shape) != want:
        return Verdict(False, float("nan"), 0.0, f"output shape {tuple(out.shape)}, expected {want}")
    if out.dtype != p.dtype:
        return Verdict(False, float("nan"), 0.0, f"output dtype {out.dtype}, expected {p.dtype}")
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        return Verdict(False, float("nan"), 0.0, f"{bad} output elements are NaN/inf (unwritten or overflow)")
    g = p.gqa_ratio
    worst = Verdict(True, 0.0, 0.0)
    for blk in blocks:
        r0, r1 = blk.rows
        got = out[blk.batch:blk.batch + 1, blk.kv_head * g:(blk.kv_head + 1) * g, r0:r1]
        ok, err, allowed = within_budget(got, blk.base, blk.ref, p.dtype)
        if not ok:
            return Verdict(False, err, allowed,
                           f"error {err:.3g} > allowed {allowed:.3g} (batch {blk.batch}, kv head "
                           f"{blk.kv_head}, rows {r0}:{r1})")
        if err >= worst.error:
            worst = Verdict(True, err, allowed)
    return worst


def poison_allocator(nbytes: int, device: torch.device) -> None:
    """Fill and free a NaN block so that the next allocations of this size start as NaN."""
    if device.type != "cuda" or nbytes <= 0:
        return
    t = torch.full((nbytes // 2 + 1,), float("nan"), dtype=torch.float16, device=device)
    del t


RunFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Problem], torch.Tensor]


def proxy_window(p: Problem, sq: int) -> int:
    """The proxy's left window (-1: none): p's, shrunk to a quarter of the proxy's rows so that it
    still hides keys there."""
    if not p.has_window:
        return -1
    return max(1, min(p.window[0], sq // 4)) if p.window[0] >= 0 else -1


def proxy_problem(p: Problem, seqlen: int = GRAD_PROXY_SEQLEN) -> tuple[int, ...]:
    """What identifies the gradient proxy of p: (B, Hq, Hkv, Sq, Sk, D, Dv, causal, dtype[, window])."""
    sq = min(p.seqlen_q, seqlen)
    sk = sq + max(-sq + 1, min(p.seqlen_k - p.seqlen_q, 2 * seqlen))
    hkv = min(p.heads_kv, 2)
    key = (1, hkv * p.gqa_ratio, hkv, sq, sk, p.head_dim, p.head_dim_v, int(p.causal), str(p.dtype))
    w = proxy_window(p, sq)
    return key + ((w,) if w >= 0 else ())  # type: ignore[return-value]


def grad_proxy_tensors(p: Problem, device: torch.device, generator: torch.Generator | None = None,
                       seqlen: int = GRAD_PROXY_SEQLEN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Problem]:
    """Small q, k, v (requiring grad) with p's dtype, head dims, GQA ratio, mask and Sk - Sq sign."""
    _, hq, hkv, sq, sk = proxy_problem(p, seqlen)[:5]

    def rnd(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
        return t.to(p.dtype).requires_grad_(True)

    q = rnd(1, hq, sq, p.head_dim)
    k = rnd(1, hkv, sk, p.head_dim)
    v = rnd(1, hkv, sk, p.head_dim_v)
    w = proxy_window(p, sq)
    with torch.enable_grad():
        small = problem_from_tensors(q, k, v, causal=p.causal, scale=p.scale, layout="bhsd", return_lse=False,
                                     window=(w, 0 if p.causal else p.window[1]) if w >= 0 else None)
    return q, k, v, small


def check_grads(run: RunFn, p: Problem, device: torch.device, generator: torch.Generator | None = None) -> Verdict:
    """Gradients of run() on a proxy of p against float64 autograd, within the 3x budget.

    A kernel that cannot run the odd-sized proxy (some library kernels want aligned lengths) is
    checked on an aligned one instead: a launch failure is not a wrong answer.
    """
    try:
        return _check_grads(run, p, device, generator, GRAD_PROXY_SEQLEN)
    except Exception:
        return _check_grads(run, p, device, generator, GRAD_PROXY_SEQLEN_ALIGNED)


def _check_grads(run: RunFn, p: Problem, device: torch.device, generator: torch.Generator | None,
                 seqlen: int) -> Verdict:
    q, k, v, small = grad_proxy_tensors(p, device, generator, seqlen)
    do = torch.randn(q.shape[:-1] + (p.head_dim_v,), generator=generator, device=device).to(p.dtype)
    grads = []
    for upcast in (True, False):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        ref, _ = attention_math(qq, kk, vv, causal=small.effective_causal, scale=small.scale, upcast=upcast,
                                window=small.window if small.has_window else None)
        ref.backward(do.to(ref.dtype))
        grads.append((qq.grad, kk.grad, vv.grad))
    with torch.enable_grad():
        out = run(q, k, v, small)
        out.backward(do)
    worst = Verdict(True, 0.0, 0.0)
    for name, got, g_ref, g_base in zip("qkv", (q.grad, k.grad, v.grad), grads[0], grads[1]):
        if got is None:
            return Verdict(False, float("nan"), 0.0, f"no gradient reached {name}")
        ok, err, allowed = within_budget(got, g_base, g_ref, p.dtype, grad=True)
        if not ok:
            return Verdict(False, err, allowed, f"d{name} error {err:.3g} > allowed {allowed:.3g} (proxy {small.describe()})")
        if err >= worst.error:
            worst = Verdict(True, err, allowed)
    return worst
