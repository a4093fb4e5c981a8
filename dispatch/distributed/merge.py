"""Combining partial attention results through their log-sum-exp.

A block's (out_i, lse_i) is softmax attention over its keys alone. Over the union of blocks,
lse = log(sum_i exp(lse_i)) and out = sum_i exp(lse_i - lse) * out_i. A row that saw nothing in a
block has lse_i = -inf and contributes weight 0; a row that saw nothing at all keeps lse = -inf and
out = 0. Every exp() below has an argument <= 0 or -inf, never NaN.
"""

from __future__ import annotations

import torch


def _finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    # -inf - (-inf) is NaN: rows with no key anywhere subtract 0 instead and get exp(-inf) = 0
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block into the running result, in place.

    out (B, H, S, Dv) in the accumulation dtype (float32/float64), lse (B, H, S) likewise; both may be
    views (the rows a block covers). block_out (B, H, S, Dv) any float dtype, block_lse (B, H, S).
    """
    new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    base = _finite_or_zero(new)
    keep = torch.exp(lse - base).unsqueeze(-1)
    take = torch.exp(block_lse.to(lse.dtype) - base).unsqueeze(-1)
    out.mul_(keep).add_(block_out * take)  # promotes to out's dtype: one pass fewer than .to()
    lse.copy_(new)
