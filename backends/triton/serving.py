"""The triton family's varlen and KV-cache paths: the kernels of varlen.py and paged.py behind
the calling convention of dispatch/serving.py (`sp` is its ServingProblem; its fields are read):
what they serve (serving_reasons), what explain() says of them (serving_notes), and the calls."""

from __future__ import annotations

from typing import Any

import torch

# modules, not their functions: the CPU tests redefine the kernels under the interpreter by
# reloading paged.py and varlen.py, which updates these module objects in place
from . import paged, varlen


# window, softcap and sinks run inside the kernels (the cost model predicts them at the visible work)
FUSES_VARIANTS = True
VARIANTS_RUN_AS = ""
FALLBACK = False  # our kernels: before the fallback wherever they run natively


def serving_reasons(impl: Any, sp: Any, dev: Any) -> list[str]:
    """Why the kernels cannot serve sp on dev (empty: they can): the dense capabilities of `impl`
    (the triton implementation) for the call's dense problem, and what the KV-cache kernel adds."""
    r = impl.capabilities(dev).reasons(sp.dense(), dev)
    if sp.kind == "kvcache":
        r = [x for x in r if not x.startswith("requires_grad")]
        if sp.needs_grad:
            r.append("requires_grad (the KV-cache kernel is forward only)")
        if sp.block_size and sp.block_size % 16:
            r.append(f"block_size={sp.block_size} (the paged kernel needs a multiple of 16)")
    return r


def serving_notes(impl: Any, sp: Any, dev: Any) -> list[str]:
    """What explain() says of the path that runs sp."""
    if sp.kind == "varlen":
        notes = ["packed varlen kernel: sequence starts and lengths read from cu_seqlens on the device, "
                 f"grid sized by max_seqlen_q={sp.seqlen_q}"]
        try:  # the tiles the forward runs by default here: a TMA config takes the descriptor kernel
            tma = bool(impl.default_config(sp.dense(), dev).get("TMA"))
        except Exception:  # no config for this device (the CPU): nothing more to say
            tma = False
        if tma:
            notes.append("forward: tensor descriptors over each sequence's rows where the rows are 16-byte "
                         "aligned and the grid fits the descriptor scratch, else the pointer kernel")
        return notes
    paged_ = f"pages of {sp.block_size} gathered in the kernel" if sp.block_size else "contiguous cache"
    return [f"split-KV kernel against the cache ({paged_}); splits planned from the capacity {sp.seqlen_k}, "
            "lengths read on the device: CUDA-graph safe"]


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
