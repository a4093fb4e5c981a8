"""The triton family's varlen and KV-cache paths: the kernels of varlen.py and paged.py behind
the calling convention of dispatch/serving.py (`sp` is its ServingProblem; its fields are read)."""

from __future__ import annotations

from typing import Any

import torch

# modules, not their functions: the CPU tests redefine the kernels under the interpreter by
# reloading paged.py and varlen.py, which updates these module objects in place
from . import paged, varlen


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   sp: Any, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse (Hq, total_q)); through the autograd Function when sp.needs_grad."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if sp.needs_grad:
        return varlen.VarlenFunction.apply(q, k, v, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, sp.causal, sp.scale, None,
                                    sp.window, sp.softcap, sinks)
    return varlen.varlen_forward(q, k, v, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, causal=sp.causal, scale=sp.scale,
                           window=sp.window, softcap=sp.softcap, sinks=sinks)


def varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, sp: Any,
                    sinks: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv[, dsinks]) from the forward's out and lse."""
    return varlen.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, causal=sp.causal,
                            scale=sp.scale, window=sp.window, softcap=sp.softcap, sinks=sinks)


def kvcache_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None, sp: Any, sinks: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, Dv), lse (B, Hq, Sq)); reads no device value on the host."""
    return paged.kvcache_forward(_unit_last(q), k_cache, v_cache, cache_seqlens, block_table, causal=sp.causal,
                                 scale=sp.scale, window=sp.window, softcap=sp.softcap, sinks=sinks, out=out)
