"""The numerical test policy (flash-attention's scheme), in one place.

A backend passes when max|out - ref| <= FACTOR * max|out_torch - ref| + floor, where ref is the
float64 result and out_torch is the same math in the input dtype. NaN never passes.

floor = FLOOR[dtype] + eps(dtype) * max|ref|: an absolute term for tiny shapes where plain torch is
(nearly) exact, plus one unit of rounding at the reference's magnitude, since merely storing the
exact answer in the input dtype is off by up to half of that (flash-attention's tests use the same
idea: the rounding error of the reference at its own magnitude).
"""

from __future__ import annotations

import torch

FORWARD_FACTOR = 2.0
GRAD_FACTOR = 3.0
# Gradients for inputs of large magnitude (x30, x100, an outlier channel, values near the fp16 range):
# every flash-style backward, cuDNN's and torch's flash included, computes delta = rowsum(dO * O) from
# the stored low-precision O and rounds dS to the input dtype before dS @ K, which an outlier in K
# amplifies; measured on an H200, those kernels read 1.3-4x the error of plain torch's math (which
# keeps the softmax in fp32 throughout). The factor still fails garbage, NaN and lost terms.
LARGE_MAGNITUDE_GRAD_FACTOR = 8.0
# ... and a sharp softmax concentrates many rows' dO on one key's dV: a few units of rounding there.
LARGE_MAGNITUDE_GRAD_ULPS = 4.0
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


def budget(out_torch: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad: bool = False,
           factor: float | None = None, ulps: float = 1.0) -> float:
    if factor is None:
        factor = GRAD_FACTOR if grad else FORWARD_FACTOR
    magnitude = float(ref.abs().max()) if ref.numel() else 0.0
    if magnitude != magnitude or magnitude == float("inf"):
        magnitude = 0.0
    return factor * max_abs_err(out_torch, ref) + FLOOR[dtype] + ulps * torch.finfo(dtype).eps * magnitude


def within_budget(
    out: torch.Tensor, out_torch: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, grad: bool = False,
    factor: float | None = None, ulps: float = 1.0,
) -> tuple[bool, float, float]:
    """(passes, error, allowed). `factor` overrides the forward/gradient factor; `ulps` widens the
    rounding term of the floor (units of rounding at the reference's magnitude)."""
    err = max_abs_err(out, ref)
    allowed = budget(out_torch, ref, dtype, grad=grad, factor=factor, ulps=ulps)
    return (err == err and err <= allowed), err, allowed
