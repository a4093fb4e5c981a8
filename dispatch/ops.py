"""flashdispatch's attention as torch.library custom ops: how it runs inside torch.compile graphs.

Eager calls never come here: `attention()` calls the chosen implementation directly, because a trip
through the dispatcher costs more host time than the whole hot path may. Under torch.compile,
Dynamo cannot see through Triton launches, CuPy modules or the dispatcher's cached state, so
`attention()` hands the call to two opaque ops instead:

    flashdispatch::attention_fwd(q, k, v, variant, config, forced, causal, scale, layout,
                                 return_lse, needs_grad) -> (out, lse)
    flashdispatch::attention_bwd(dout, q, k, v, out, lse, variant, config, forced, causal, scale,
                                 layout, needs_grad) -> (dq, dk, dv)

Their fake implementations give shapes and strides without running anything, and the pair is
joined by `register_autograd`, so forward and backward trace into one graph with no break.

Which implementation runs is decided like this:
- `forced` (the backend argument, `use_backend()` block or FLASHDISPATCH_BACKEND) is read when the
  graph is traced and baked in as a constant: a graph traced inside `use_backend("triton")` keeps
  running triton. Re-trace (torch._dynamo.reset()) to change it.
- `variant` names an implementation and `config` is its config as JSON. `attention()` passes
  variant="" which means: select at run time for the real shapes, through the same cached
  `select()` as eager calls (a dict lookup). Dynamo cannot hand symbolic shapes to the
  dispatcher at trace time without either a graph break or a recompile per shape, so the choice
  is made where the shapes are concrete.

How a variant runs inside the ops (the plan comes from the one plan cache, dispatch/plans.py):
- an implementation with a backward of its own (triton, cupy: `Implementation.has_backward`) runs
  its forward/backward pair: the forward op calls `forward()` when a backward will follow
  (otherwise `run()`, which may pick a forward-only kernel such as split-KV decode), and the
  backward op calls `backward()` with the saved out and lse.
- every other implementation (sdpa and its pinned kernels, anything registered later) runs its own
  `run()` in the forward op; the backward op runs it again with autograd on and differentiates
  that. This costs one extra forward per backward but needs nothing from the backend.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

import torch

from .backend import Inputs
from .plans import PLANS
from .problem import Problem
from .selection import current_forced, state

log = logging.getLogger("flashdispatch")



# variant="" in the ops: choose at run time for the concrete shapes.
SELECT_AT_RUN_TIME = ""
# forced="auto": no backend forced.
NOT_FORCED = "auto"

def config_to_json(config: dict[str, Any]) -> str:
    """The config as a constant op argument (sorted, so that equal configs give equal strings)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


# --- layouts the fake and the real ops agree on --------------------------------------------------


def _bshd_storage(q: torch.Tensor) -> bool:
    # sizes of 1 leave strides arbitrary (and free to differ between trace and run): decide by
    # the dimensions that really have extent
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


def _out_strides(q: torch.Tensor, dv: int) -> tuple[int, int, int, int]:
    b, h, s, _ = q.shape
    if _bshd_storage(q):  # a bshd input gets a bshd-contiguous output: no copy when transposed back
        return (s * h * dv, dv, h * dv, 1)
    return (h * s * dv, s * dv, dv, 1)


def _empty_out(q: torch.Tensor, dv: int) -> torch.Tensor:
    b, h, s, _ = q.shape
    return torch.empty_strided((b, h, s, dv), _out_strides(q, dv), dtype=q.dtype, device=q.device)


def _as_out(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`out` in the layout the fake op promised (inductor asserts sizes and strides)."""
    if out.stride() == _out_strides(q, out.shape[-1]) or out.numel() == 0:
        return out
    fixed = _empty_out(q, out.shape[-1])
    fixed.copy_(out)
    return fixed


def _as_grad(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gradient with the strides torch.empty_like(input) has, as the fake op promised."""
    ref = torch.empty_like(like) if g.stride() != like.stride() else None
    if ref is None or g.stride() == ref.stride():
        return g
    ref.copy_(g)
    return ref


# --- resolving the implementation -----------------------------------------------------------------


def _pair_problem(p: Problem, q: torch.Tensor) -> Problem:
    """p as the forward/backward pair sees it under the ops: the output is stored in q's storage
    order (the order the fake op promised), so a bhsd view of bshd memory counts as bshd."""
    layout = "bshd" if _bshd_storage(q) else "bhsd"
    return p if p.layout == layout else p._replace(layout=layout)


@functools.lru_cache(maxsize=1)
def _autograd_keys() -> tuple[Any, ...]:
    dk = torch._C.DispatchKey
    return (dk.AutogradFunctionality, dk.AutogradOther, dk.AutogradNestedTensor)


def _with_autograd(fn: Callable[[], Any]) -> Any:
    """Run `fn` with autograd recording, from inside an op's kernel.

    A custom op's kernel runs beneath the Autograd dispatch keys (they are excluded in
    thread-local state), so torch.enable_grad() alone records nothing there. Re-including them
    for the recomputation is what lets any backend's own autograd produce its gradients.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _autograd_keys():
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            return fn()


# --- the ops --------------------------------------------------------------------------------------


@torch.library.custom_op("flashdispatch::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    variant: str,
    config: str,
    forced: str,
    causal: bool,
    scale: float,
    layout: str,
    return_lse: bool,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) in q's storage order and lse (B, Hq, Sq) float32 (zeros when the
    implementation gives none: return_lse was False, and the caller drops it)."""
    p, impl, cfg = PLANS.op_plan(q, k, v, variant, config, forced, causal, scale, layout, return_lse, needs_grad)[:3]
    # without a backward to come, run() may take a faster forward-only path (triton's split-KV
    # decode); with one, the forward whose out and lse the implementation's backward consumes
    if needs_grad and impl.has_backward:
        out, lse = impl.forward(Inputs(q, k, v), _pair_problem(p, q), cfg)
    else:
        out, lse = impl.run(q, k, v, p, cfg)
    if lse is None:
        lse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device)
    return _as_out(out, q), lse


@attention_fwd.register_fake
def _attention_fwd_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, config: str, forced: str,
    causal: bool, scale: float, layout: str, return_lse: bool, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _empty_out(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("flashdispatch::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    variant: str,
    config: str,
    forced: str,
    causal: bool,
    scale: float,
    layout: str,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) with the strides of torch.empty_like(q / k / v)."""
    p, impl, cfg = PLANS.op_plan(q, k, v, variant, config, forced, causal, scale, layout, return_lse, True)[:3]
    if impl.has_backward:
        dq, dk, dv = impl.backward(Inputs(q, k, v), out, lse, dout, _pair_problem(p, q), cfg)[:3]
    else:

        def recompute() -> tuple[torch.Tensor, ...]:
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            o, _ = impl.run(qq, kk, vv, p, cfg)
            return torch.autograd.grad(o, (qq, kk, vv), dout)

        dq, dk, dv = _with_autograd(recompute)
    return _as_grad(dq, q), _as_grad(dk, k), _as_grad(dv, v)


@attention_bwd.register_fake
def _attention_bwd_fake(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, variant: str, config: str, forced: str, causal: bool, scale: float,
    layout: str, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, variant, config, forced, causal, scale, layout, return_lse, _needs_grad = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (variant, config, forced, causal, scale, layout, return_lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * 8


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- the traced entry point -----------------------------------------------------------------------


@torch._dynamo.assume_constant_result
def forced_at_trace_time(backend: str | None) -> str:
    """The forced backend name ("auto" for none), read once while Dynamo traces."""
    forced, _source = current_forced(backend, state().settings)
    return NOT_FORCED if forced is None else forced


def traced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, backend: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `attention()` runs while torch.compile traces it: (out in p.layout, lse)."""
    forced = forced_at_trace_time(backend)
    if not p.contiguous:  # as the eager path: backends take any strides but a unit last one
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if p.layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = attention_fwd(
        q, k, v, SELECT_AT_RUN_TIME, "", forced, p.causal, p.scale, p.layout, p.return_lse,
        p.needs_grad,
    )
    if p.layout == "bshd":
        out = out.transpose(1, 2)
    return out, lse
