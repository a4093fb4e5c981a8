"""The triton family's varlen and KV-cache paths: the kernels of varlen.py and paged.py behind
the calling convention of dispatch/serving.py (`sp` is its ServingProblem; its fields are read):
what they serve (serving_reasons), what explain() says of them (serving_notes), and the calls."""

from __future__ import annotations

from typing import Any

import torch

from flashdispatch.autograd import apply_pair
from flashdispatch.backend import Gradients, Inputs

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


class _VarlenPair:
    """The varlen kernels as a forward/backward pair for the dispatcher's one autograd Function
    (dispatch/autograd.py): the packed tensors are q, k, v, the sequence bounds and the sinks ride
    as extra inputs (no gradient for cu_seqlens), `p` is the call's ServingProblem."""

    name = "triton varlen"

    def forward(self, inp: Inputs, p: Any, config: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = inp.extras
        return varlen.varlen_forward(inp.q, inp.k, inp.v, x["cu_seqlens_q"], x["cu_seqlens_k"], p.seqlen_q,
                                     p.seqlen_k, causal=p.causal, scale=p.scale, config=config, window=p.window,
                                     softcap=p.softcap, sinks=x.get("sinks"))

    def backward(self, inp: Inputs, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, p: Any,
                 config: dict[str, Any] | None) -> Gradients:
        x = inp.extras
        g = varlen.varlen_backward(do, inp.q, inp.k, inp.v, out, lse, x["cu_seqlens_q"], x["cu_seqlens_k"],
                                   p.seqlen_q, p.seqlen_k, causal=p.causal, scale=p.scale, config=config,
                                   window=p.window, softcap=p.softcap, sinks=x.get("sinks"))
        return Gradients(g[0], g[1], g[2], {"sinks": g[3]} if len(g) > 3 else {})


VARLEN_PAIR = _VarlenPair()


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   sp: Any, sinks: torch.Tensor | None,
                   config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse (Hq, total_q)); recorded for the backward (dispatch/autograd.py's Function joining
    VARLEN_PAIR's forward and backward) when sp.needs_grad. `config`: the kernels' tiles (None:
    their defaults)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if sp.needs_grad:
        extras = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
        if sinks is not None:
            extras["sinks"] = sinks
        return apply_pair(VARLEN_PAIR, Inputs(q, k, v, extras), sp, config)  # type: ignore[arg-type]
    return varlen.varlen_forward(q, k, v, cu_q, cu_k, sp.seqlen_q, sp.seqlen_k, causal=sp.causal, scale=sp.scale,
                                 config=config, window=sp.window, softcap=sp.softcap, sinks=sinks)


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
