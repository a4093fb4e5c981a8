"""Attention written out in plain torch ops: the float64 reference and the same-dtype baseline.

One definition of the contract's math (bottom-right causal, GQA head mapping, empty rows give zeros
and lse = -inf) that the tests, the tuner and the demo all measure against.
"""

from __future__ import annotations

import torch


def causal_mask(sq: int, sk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j (j <= i + Sk - Sq)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out, lse). upcast=True computes in float64 (the reference); False in q's dtype with
    float32 softmax statistics (what plain PyTorch would do), which sets the error budget.

    Shapes as `flashdispatch.attention`; out in the compute dtype, lse (B, Hq, Sq) float32/64.
    """
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    dt = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)).float() if not upcast else torch.matmul(q, k.transpose(-1, -2))
    s = s * scale
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~causal_mask(sq, sk, s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # rows with no visible key: lse = -inf, probabilities 0 (never NaN)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p.to(v.dtype), v)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse
