"""attention_varlen and attention_kvcache as torch.library custom ops: how they run inside
torch.compile graphs (fullgraph, no graph break), the way dispatch/ops.py does it for attention():

    flashdispatch::attention_varlen_fwd(q, k, v, cu_q, cu_k, sinks?, max_q, max_k, forced, causal,
                                        scale, window_left, window_right, softcap, return_lse,
                                        needs_grad) -> (out, lse)
    flashdispatch::attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, sinks?, max_q, max_k,
                                        forced, causal, scale, window_left, window_right, softcap)
                                        -> (dq, dk, dv, dsinks)
    flashdispatch::attention_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table?, sinks?,
                                         forced, causal, scale, window_left, window_right, softcap,
                                         return_lse) -> (out, lse)

window (-1, -1) and softcap 0.0 stand for none. The forced backend is read at trace time (as
attention()'s ops do); the backend is selected where the shapes are concrete, inside the op.
Eager calls never come here. The backward of a backend without a functional backward (the sdpa
fallback) recomputes its forward with autograd on and differentiates it.
"""

from __future__ import annotations

from typing import Any

import torch

from . import serving
from .ops import _with_autograd, forced_at_trace_time
from .serving import ServingProblem


def _window(left: int, right: int) -> tuple[int, int] | None:
    return None if (left, right) == (-1, -1) else (left, right)


def _varlen_sp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, sinks: torch.Tensor | None,
               max_q: int, max_k: int, causal: bool, scale: float, wl: int, wr: int, softcap: float,
               return_lse: bool, needs_grad: bool) -> ServingProblem:
    sp = serving.varlen_problem(q, k, v, cu_q, max_q, max_k, causal, scale, _window(wl, wr), softcap or None, sinks,
                                return_lse)
    return sp.evolve(needs_grad=needs_grad)


def _backend(sp: ServingProblem, forced: str) -> str:
    return serving.select_serving(sp, None if forced == "auto" else forced).variant


@torch.library.custom_op("flashdispatch::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
    sinks: torch.Tensor | None, max_q: int, max_k: int, forced: str, causal: bool, scale: float,
    window_left: int, window_right: int, softcap: float, return_lse: bool, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sp = _varlen_sp(q, k, v, cu_q, sinks, max_q, max_k, causal, scale, window_left, window_right, softcap,
                    return_lse or needs_grad, needs_grad)
    name = _backend(sp, forced)
    out, lse = serving.run_varlen(name, q, k, v, cu_q, cu_k, sp.evolve(needs_grad=False), sinks)
    return out.contiguous(), lse.contiguous()


@attention_varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_q, cu_k, sinks, max_q, max_k, forced, causal, scale, window_left,  # type: ignore[no-untyped-def]
                     window_right, softcap, return_lse, needs_grad):
    return (q.new_empty((q.shape[0], q.shape[1], v.shape[2])),
            q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32))


@torch.library.custom_op("flashdispatch::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_q: torch.Tensor, cu_k: torch.Tensor, sinks: torch.Tensor | None, max_q: int, max_k: int, forced: str,
    causal: bool, scale: float, window_left: int, window_right: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sp = _varlen_sp(q, k, v, cu_q, sinks, max_q, max_k, causal, scale, window_left, window_right, softcap, True, True)
    name = _backend(sp, forced)
    module = serving.serving_module(name)
    if hasattr(module, "varlen_backward"):
        grads = module.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, sp, sinks)
    else:
        def recompute() -> tuple[torch.Tensor, ...]:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            s = sinks.detach().requires_grad_() if sinks is not None else None
            o, _ = serving.run_varlen(name, *leaves, cu_q, cu_k, sp, s)
            return torch.autograd.grad(o, leaves + ([s] if s is not None else []), dout)

        grads = _with_autograd(recompute)
    dsinks = grads[3] if sinks is not None else q.new_zeros((0,), dtype=torch.float32)
    return grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), dsinks


@attention_varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, sinks, max_q, max_k, forced, causal, scale,  # type: ignore[no-untyped-def]
                     window_left, window_right, softcap):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _varlen_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cu_q, cu_k, sinks, max_q, max_k, forced, causal, scale, wl, wr, softcap, _lse, _grad = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.args = (max_q, max_k, forced, causal, scale, wl, wr, softcap)
    ctx.has_sinks = sinks is not None
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[Any, ...]:
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, sinks, *ctx.args)
    return (dq, dk, dv, None, None, dsinks if ctx.has_sinks else None) + (None,) * 10


attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


@torch.library.custom_op("flashdispatch::attention_kvcache_fwd", mutates_args=())
def attention_kvcache_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None, sinks: torch.Tensor | None, forced: str, causal: bool, scale: float,
    window_left: int, window_right: int, softcap: float, return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    sp = serving.kvcache_problem(q, k_cache, v_cache, block_table, causal, scale, _window(window_left, window_right),
                                 softcap or None, sinks, return_lse)
    out, lse = serving.run_kvcache(_backend(sp, forced), q, k_cache, v_cache, cache_seqlens, block_table, sp, sinks)
    return out.contiguous(), lse


@attention_kvcache_fwd.register_fake
def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_table, sinks, forced, causal, scale,  # type: ignore[no-untyped-def]
                      window_left, window_right, softcap, return_lse):
    b, sq, hq, _ = q.shape
    return q.new_empty((b, sq, hq, v_cache.shape[3])), q.new_empty((b, hq, sq), dtype=torch.float32)


# --- traced entry points ---------------------------------------------------------------------------


def traced_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  sp: ServingProblem, sinks: torch.Tensor | None, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    wl, wr = sp.window or (-1, -1)
    return attention_varlen_fwd(q, k, v, cu_q, cu_k, sinks, sp.seqlen_q, sp.seqlen_k, forced_at_trace_time(backend),
                                sp.causal, sp.scale, wl, wr, sp.softcap or 0.0, sp.return_lse, sp.needs_grad)


def traced_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                   block_table: torch.Tensor | None, sp: ServingProblem, sinks: torch.Tensor | None,
                   backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    wl, wr = sp.window or (-1, -1)
    return attention_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, sinks,
                                 forced_at_trace_time(backend), sp.causal, sp.scale, wl, wr, sp.softcap or 0.0,
                                 sp.return_lse)
