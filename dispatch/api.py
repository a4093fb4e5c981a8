"""The public calls: attention() and explain()."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .backend import NO_EXTRAS, kernel_views
from .device import DEVICE_KEYS
from .plans import PLANS
from .problem import Problem, problem_from_shape, problem_from_tensors
from .selection import Decision, select, simulated_or_none

# bound once: attention() calls them on every call
_is_compiling = torch.compiler.is_compiling
_lookup = PLANS.lookup


def _empty_result(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, sinks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros (and lse = -inf, or each head's sink) without launching an attention kernel."""
    if p.layout == "bhsd":
        shape = (p.batch, p.heads_q, p.seqlen_q, p.head_dim_v)
    else:
        shape = (p.batch, p.seqlen_q, p.heads_q, p.head_dim_v)
    out = q.new_zeros(shape)
    if p.needs_grad:
        # keep the graph connected so that backward() gives zero gradients instead of an error;
        # sums over empty slices are exactly 0 (0 * q.sum() is NaN once the sum overflows fp16)
        out = out + (q.reshape(-1)[:0].sum() + k.reshape(-1)[:0].sum() + v.reshape(-1)[:0].sum()).to(out.dtype)
        if sinks is not None:
            out = out + sinks[:0].sum().to(out.dtype)
    if sinks is not None:  # no key: the sink is all a row's denominator holds
        lse = sinks.detach().view(1, -1, 1).expand(p.batch, p.heads_q, p.seqlen_q).clone()
    else:
        lse = torch.full((p.batch, p.heads_q, p.seqlen_q), float("-inf"), device=q.device, dtype=torch.float32)
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    backend: str | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention through the fastest backend that can serve the problem.

    Arguments:
        q: (B, Hq, Sq, D) for layout="bhsd", or (B, Sq, Hq, D) for layout="bshd".
        k: (B, Hkv, Sk, D) / (B, Sk, Hkv, D). Hq must be a multiple of Hkv (GQA/MQA): query head h
            reads kv head h // (Hq // Hkv).
        v: (B, Hkv, Sk, Dv) / (B, Sk, Hkv, Dv).
            q, k, v share dtype (fp16, bf16; fp32/fp64 through sdpa) and device; any strides with a
            unit last dimension.
        causal: bottom-right aligned mask (flash_attn's convention, right for KV caches): query i
            sees key j iff j <= i + Sk - Sq. For Sq == Sk this is SDPA's is_causal. With Sq=2, Sk=5
            (1 = visible)::

                1 1 1 1 0
                1 1 1 1 1

            and with Sq=5, Sk=2 the first three rows see nothing, giving zeros and lse = -inf::

                0 0
                0 0
                0 0
                1 0
                1 1
        scale: multiplier of q @ k^T; defaults to 1 / sqrt(D).
        layout: "bhsd" (torch SDPA's) or "bshd" (flash_attn's).
        return_lse: also return the log-sum-exp of the scaled scores (natural log), float32
            (B, Hq, Sq). It carries no gradient.
        backend: force a backend ("sdpa", "sdpa:cudnn", "triton", "cupy", ...). A family name
            ("triton") lets the family choose its fastest member (the Gluon forward on Hopper), a
            full name pins one ("triton:gluon"; "triton:tl" and "sdpa:plain" for the members named
            like their family). A forced backend that cannot serve the problem raises
            NoBackendError; it never falls back.
        window: sliding window (left, right), flash_attn's convention: query i, at its
            bottom-right-aligned position p = i + Sk - Sq, sees key j iff p - left <= j <= p + right;
            -1 is unbounded on that side, (-1, -1) or None no window. With causal=True right is 0.
            Mistral's 4096-token window is window=(4095, 0), causal=True.
        softcap: c > 0: the scaled scores become c * tanh(s / c) before masking (Gemma 2). None:
            no softcap.
        sinks: float32 (Hq,) on q's device: one logit per query head that joins the softmax
            denominator and carries no value (gpt-oss). The lse includes it; it takes a gradient;
            a row that sees no key gives zeros and lse = sink.
            Sliding window, softcap and sinks run fused in the triton backend; sdpa serves them
            through a mask or explicit math (correct, not fast). docs/variants.md has the details.

    Returns:
        out: q's layout and dtype, (B, Hq, Sq, Dv) / (B, Sq, Hq, Dv); with return_lse, (out, lse).
    """
    if _is_compiling():
        # Dynamo cannot trace the plan cache (and its ContextVar) or the backends' launches: the call
        # becomes the flashdispatch::attention_fwd/_bwd custom ops (dispatch/ops.py).
        p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                                 window=window, softcap=softcap, sinks=sinks)
        if p.is_empty:
            out, lse = _empty_result(q, k, v, p, sinks)
        else:
            from . import ops  # here, not at the top: it needs torch._dynamo, a 1 s import

            out, lse = ops.traced_attention(q, k, v, p, backend, sinks)
        return (out, lse) if return_lse else out
    # validated and selected on the first call with this signature; a cache hit after that
    if window is None and softcap is None and sinks is None:
        plan = _lookup(q, k, v, causal, scale, layout, return_lse, backend)
    else:
        plan = _lookup(q, k, v, causal, scale, layout, return_lse, backend, window, softcap, sinks)
    p, impl, config = plan[0], plan[1], plan[2]
    if impl is None:
        out, lse = _empty_result(q, k, v, p, sinks)
        return (out, lse) if return_lse else out
    q, k, v = kernel_views(q, k, v, p)
    launch = plan[6]  # the implementation's forward bound to this signature (Implementation.prepare), or None
    if launch is not None:
        out, lse = impl.run(q, k, v, p, config, NO_EXTRAS if sinks is None else {"sinks": sinks}, launch)
    elif sinks is None:
        out, lse = impl.run(q, k, v, p, config)
    else:
        out, lse = impl.run(q, k, v, p, config, {"sinks": sinks})
    if layout == "bshd":
        out = out.transpose(1, 2)
    if return_lse:
        if lse is None:
            raise RuntimeError(f"backend {impl.name} declared lse support but returned none")
        return out, lse
    return out


def explain(
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    shape: Sequence[int] | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    needs_grad: bool | None = None,
    head_dim_v: int | None = None,
    backend: str | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | bool | None = None,
) -> Decision:
    """Which backend `attention` would run for these inputs, with what config, and why.

    Give tensors (q, k, v as for `attention`), or `shape=(B, Hq, Hkv, Sq, Sk, D)` with `dtype` to
    plan without tensors. `device` names a device key ("h100", "mi300x", ...) to answer for a
    device that is not present; FLASHDISPATCH_DEVICE does the same. `str(decision)` is a report.
    window, softcap and sinks as for `attention` (planning by shape, sinks=True stands for a sinks
    tensor).
    Raises NoBackendError (with every backend's reasons) when nothing can serve the problem.
    """
    if device is not None and device not in DEVICE_KEYS:
        raise ValueError(f"device: expected one of {DEVICE_KEYS}, got {device!r}")
    sim = simulated_or_none(device)
    if shape is not None:
        if q is not None or k is not None or v is not None:
            raise TypeError("explain: give either tensors (q, k, v) or shape=, not both")
        kind = sim.kind if sim else ("cuda" if torch.cuda.is_available() else "cpu")
        p = problem_from_shape(
            shape, dtype=dtype, device_kind=kind, causal=causal, scale=scale, layout=layout,
            return_lse=return_lse, needs_grad=bool(needs_grad), head_dim_v=head_dim_v, window=window,
            softcap=softcap, sinks=sinks is not None and sinks is not False,
        )
    else:
        if q is None or k is None or v is None:
            raise TypeError("explain: expected tensors q, k and v, or shape=(B, Hq, Hkv, Sq, Sk, D)")
        if isinstance(sinks, bool):
            raise TypeError("sinks: with tensors q, k, v, expected None or the sinks tensor, got a bool")
        p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                                 window=window, softcap=softcap, sinks=sinks)
        if needs_grad is not None:
            p = p._replace(needs_grad=needs_grad)
        if sim is not None:
            p = p._replace(device_kind=sim.kind)
    d = select(p, backend, device=sim)
    # the cached Decision's config is the dict attention() runs with: the caller gets copies
    return dataclasses.replace(d, config=dict(d.config), rejected={n: list(r) for n, r in d.rejected.items()})
