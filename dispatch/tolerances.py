"""The numerical test policy (flash-attention's scheme), in one place.

A backend passes when max|out - ref| <= FACTOR * max|out_torch - ref| + FLOOR, where ref is the
float64 result and out_torch is the same math in the input dtype. NaN never passes.
"""

from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
# Absolute floor per dtype: covers cases where plain torch is (nearly) exact, e.g. tiny shapes.
FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.double() - ref.double()).abs()
    if torch.isnan(d).any():
        return float("nan")
    return float(d.max())


def budget(out_torch: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad: bool = False) -> float:
    factor = GRAD_FACTOR if grad else FORWARD_FACTOR
    return factor * max_abs_err(out_torch, ref) + FLOOR[dtype]


def within_budget(
    out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad: bool = False
) -> tuple[bool, float, float]:
    """(passes, error, allowed)."""
    err = max_abs_err(out, ref)
    allowed = budget(out_torch, ref, dtype, grad=grad)
    return (err == err and err <= allowed), err, allowed
