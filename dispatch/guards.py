"""A compiled check that q, k and v look exactly like the tensors of an earlier call.

attention()'s hot path needs to know, on every call, that nothing its decision was derived from
has changed: shapes, strides, dtypes, devices, grad flags. Read one attribute at a time from
Python that costs about 20 C calls and a tuple hash (1.8-2 us on the H100 host). Dynamo checks the
same facts before every call of a compiled graph with `TensorGuards`, a C++ object that compares a
tensor's dispatch keys (device type, autograd, inference mode), dtype, device index,
requires_grad, sizes and strides against the ones it was built from, in one call. We use it the
same way: built once per call signature, it answers "same signature as last time?" in about a
tenth of the time.

It is a private API of torch. `AVAILABLE` is False (and the hot path keeps its Python key alone)
when it is missing, its constructor changed, or a self-test at import shows that it accepts a
tensor it should reject.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("flashdispatch")

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - torch builds without Dynamo
    _TensorGuards = None


def make(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any | None:
    """A guard over the three tensors' exact metadata, or None where none can be built."""
    if _TensorGuards is None or q.is_nested or k.is_nested or v.is_nested:
        return None  # nested tensors throw inside the check, past any except
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None  # a subclass may carry symbolic sizes, compared by their example values
    try:
        # every size and stride given: all static (None would mark a dimension dynamic)
        return _TensorGuards(
            q, k, v,
            dynamic_dims_sizes=[list(q.shape), list(k.shape), list(v.shape)],
            dynamic_dims_strides=[list(q.stride()), list(k.stride()), list(v.stride())],
        )
    except Exception:  # a changed private signature: the caller goes without
        return None


def _self_test() -> bool:
    """Does a guard accept its own tensors and reject every change the decision depends on?"""
    q, k, v = (torch.zeros(1, 2, 3, 8) for _ in range(3))
    g = make(q, k, v)
    if g is None:
        return False
    others = (
        v.transpose(1, 2),  # shape
        v.transpose(2, 3).contiguous().transpose(2, 3),  # strides only
        v.double(),  # dtype
        v.clone().requires_grad_(),  # grad flag
        torch.empty_like(v, device="meta"),  # device type
    )
    try:
        return bool(g.check(q, k, torch.zeros(1, 2, 3, 8))) and not any(g.check(q, k, o) for o in others)
    except Exception:
        return False


AVAILABLE: bool = _self_test()
if not AVAILABLE:
    log.debug("torch's TensorGuards is unavailable or failed its self-test: attention() keys in Python only")
