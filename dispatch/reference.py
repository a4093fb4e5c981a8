"""Attention written out in plain torch ops: the float64 reference and the same-dtype baseline.

One definition of the contract's math (bottom-right causal, sliding window, logit softcap,
attention sinks, GQA head mapping, empty rows give zeros and lse = -inf, or lse = sink with sinks)
that the tests, the tuner and the demo all measure against.

Conventions (flash_attn's): query i sits at p = i + Sk - Sq; with window=(left, right) it sees key
j iff p - left <= j <= p + right, -1 meaning unbounded on that side; causal=True sets right to 0.
softcap c > 0 maps a scaled score s to c * tanh(s / c) before masking. sinks (Hq,) are one logit per
query head that joins the softmax denominator and carries no value.
"""

from __future__ import annotations

import torch

NO_WINDOW = (-1, -1)


def visible_mask(sq: int, sk: int, *, causal: bool = False, window: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j (causal and/or window, bottom-right).
    rows=(r0, r1), cols=(c0, c1): only the block r0 <= i < r1, c0 <= j < c1 of that mask,
    (r1 - r0, c1 - c0), built as such."""
    r0, r1 = rows if rows is not None else (0, sq)
    c0, c1 = cols if cols is not None else (0, sk)
    i = torch.arange(r0, r1, device=device).unsqueeze(1)
    j = torch.arange(c0, c1, device=device).unsqueeze(0)
    return _keep(torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=device), i + (sk - sq), j, causal, window)


def cache_visible_mask(sq: int, capacity: int, cache_seqlens: torch.Tensor, *, causal: bool = False,
                       window: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool (B, Sq, capacity) for a KV cache ((B, 1, capacity) when no causal or window rule
    applies: it broadcasts over the queries): query i of sequence b sits at p = i + L_b - Sq
    (L_b = cache_seqlens[b]) and sees slot j iff j < L_b and the rule of `visible_mask` keeps it.
    Built on cache_seqlens' device without reading it on the host."""
    dev = cache_seqlens.device
    lens = cache_seqlens.long().view(-1, 1, 1)
    j = torch.arange(capacity, device=dev).view(1, 1, capacity)
    p = torch.arange(sq, device=dev).view(1, sq, 1) + lens - sq
    return _keep(j < lens, p, j, causal, window)


def _keep(keep: torch.Tensor, p: torch.Tensor, j: torch.Tensor, causal: bool,
          window: tuple[int, int] | None) -> torch.Tensor:
    """keep & the causal/window rule for queries at positions p and keys j (broadcasting)."""
    left, right = window if window is not None else NO_WINDOW
    if causal:
        right = 0
    if right >= 0:
        keep = keep & (j <= p + right)
    if left >= 0:
        keep = keep & (j >= p - left)
    return keep


def causal_mask(sq: int, sk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j (j <= i + Sk - Sq)."""
    return visible_mask(sq, sk, causal=True, device=device)


# Largest score block (elements) the reference builds at once when no autograd graph is wanted:
# 2^25 float64 scores are 256 MiB, so a 16k x 16k head or a batch-64 decode check stays within a
# few hundred MiB instead of materialising every head at once (and the upcast K/V of every query head).
REFERENCE_BLOCK_ELEMENTS = 1 << 25


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    upcast: bool = True,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out, lse). upcast=True computes in float64 (the reference); False in q's dtype with
    float32 softmax statistics (what plain PyTorch would do), which sets the error budget.

    Shapes as `flashdispatch.attention`; out in the compute dtype, lse (B, Hq, Sq) float32/64.
    Differentiable (sinks included) when the inputs require grad. Without a graph to record, the
    scores are built in blocks (one batch entry, one K/V head's query group, a slice of query rows)
    of at most REFERENCE_BLOCK_ELEMENTS, so memory stays bounded for any problem size.
    """
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    if scale is None:
        scale = q.shape[-1] ** -0.5
    args = (scale, causal, window, softcap, upcast)
    wants_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, sinks))
    if wants_graph or b * hq * sq * sk <= REFERENCE_BLOCK_ELEMENTS:
        out, lse = _attention_block(q, k, v, sinks, (0, sq), sq, *args)
    else:
        dt = torch.float64 if upcast else q.dtype
        out = torch.empty(b, hq, sq, v.shape[-1], dtype=dt, device=q.device)
        lse = torch.empty(b, hq, sq, dtype=torch.float64 if upcast else torch.float32, device=q.device)
        rows = max(1, REFERENCE_BLOCK_ELEMENTS // (group * sk))
        for i in range(b):
            for h in range(hkv):
                heads = slice(h * group, (h + 1) * group)
                sink = sinks[heads] if sinks is not None else None
                for r0 in range(0, sq, rows):
                    r1 = min(sq, r0 + rows)
                    o, ls = _attention_block(q[i:i + 1, heads, r0:r1], k[i:i + 1, h:h + 1], v[i:i + 1, h:h + 1],
                                             sink, (r0, r1), sq, *args)
                    out[i:i + 1, heads, r0:r1] = o
                    lse[i:i + 1, heads, r0:r1] = ls
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse


def _attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                     rows: tuple[int, int], sq: int, scale: float, causal: bool,
                     window: tuple[int, int] | None, softcap: float | None,
                     upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_math on bhsd blocks: q holds query rows rows[0]:rows[1] of Sq = sq, every K/V head
    serves hq / hkv consecutive query heads."""
    dt = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() if not upcast else torch.matmul(q, k.transpose(-1, -2))
    s = s * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    sk = k.shape[2]
    if causal or (window is not None and tuple(window) != NO_WINDOW):
        keep = visible_mask(sq, sk, causal=causal, window=window, device=s.device, rows=rows)
        s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        # the sink is one more logit per row that carries no value
        sink_col = sinks.to(s.dtype).view(1, hq, 1, 1).expand(s.shape[0], hq, s.shape[2], 1)
        lse = torch.logsumexp(torch.cat([s, sink_col], dim=-1), dim=-1)
    else:
        lse = torch.logsumexp(s, dim=-1)
    # rows with no visible key: lse = -inf, probabilities 0 (never NaN)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.matmul(p.to(v.dtype), v), lse
