"""The one autograd Function of flashdispatch: it joins any implementation's forward and backward.

An implementation with a `backward` (triton, cupy) runs its forward here without recording a
graph; the Function saves q, k, v, out, lse (and any extra input tensors) and, on the way back,
hands them with dO to the implementation's `backward`. lse is returned for callers but carries no
gradient (as in flash_attn).
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import NO_EXTRAS, Implementation, Inputs, Prepared
from .problem import Problem

_new_tuple = tuple.__new__  # Inputs(...) without NamedTuple's Python __new__ (the hot path builds one per call)


class PairFunction(torch.autograd.Function):
    """forward(impl, p, config, extra names, prepared forward or None, q, k, v, *extra tensors)
    -> (out, lse)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, impl: Implementation, p: Problem, config: dict[str, Any], names: tuple[str, ...],
        prepared: Prepared | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *extras: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inp = _new_tuple(Inputs, (q, k, v, dict(zip(names, extras)) if names else NO_EXTRAS))
        out, lse = impl.forward(inp, p, config) if prepared is None else prepared(inp)
        if lse is None:
            raise RuntimeError(f"backend {impl.name} has a backward but its forward returned no lse")
        ctx.save_for_backward(q, k, v, out, lse, *extras)
        ctx.impl, ctx.p, ctx.config, ctx.names = impl, p, config, names
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None):  # type: ignore[override]
        q, k, v, out, lse, *extras = ctx.saved_tensors
        names = ctx.names
        inp = Inputs(q, k, v, dict(zip(names, extras))) if names else Inputs(q, k, v)
        g = ctx.impl.backward(inp, out, lse, dout, ctx.p, ctx.config)
        return (None, None, None, None, None, g.dq, g.dk, g.dv, *(g.extras.get(n) for n in names))


def apply_pair(impl: Implementation, inp: Inputs, p: Problem, config: dict[str, Any],
               prepared: Prepared | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of `impl` on `inp` (by `prepared`, impl.prepare()'s for this signature, when
    given), recorded so that backward() runs `impl.backward`."""
    names = tuple(inp.extras)
    return PairFunction.apply(impl, p, config, names, prepared, inp.q, inp.k, inp.v,
                              *(inp.extras[n] for n in names))
