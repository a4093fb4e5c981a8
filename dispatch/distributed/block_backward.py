"""Gradients of one ring block, computed against the GLOBAL softmax statistics.

The forward pass merges blocks through their lse, so the probabilities of a block inside the whole
row are P = exp(S * scale - lse_global), and FlashAttention-2's backward applies block by block:

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta),  delta = rowsum(dO * O_global)
    dQ = scale * dS K  dK = scale * dS^T Q

On a GPU the backward pair that selection gives the rank's local problem (the chosen
implementation's `lse_pair()`, whose `backward` takes the global out and lse: triton's, cupy's) does
this in its kernels; elsewhere `block_backward_math` does it in torch ops, in chunks of query rows
so that the (rows x keys) score matrix stays bounded.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..backend import Implementation, Inputs
from ..problem import problem_from_tensors
from ..reference import visible_mask
from ..registry import REGISTRY

log = logging.getLogger("flashdispatch.distributed")

# Elements of one (B, Hq, rows, Sk) score chunk in the torch-ops backward: 2^24 float32 = 64 MiB per
# temporary, a handful of which are live at once.
MATH_CHUNK_ELEMENTS = 1 << 24

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) over the head dimension, (B, H, S), in the accumulation dtype."""
    acc = accumulation_dtype(out.dtype)
    return (do.to(acc) * out.to(acc)).sum(-1)


def block_backward_math(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> Grads:
    """dq (B, Hq, Sq, D), dk (B, Hkv, Sk, D), dv (B, Hkv, Sk, Dv) in the accumulation dtype.

    bhsd-indexed inputs (any strides); lse and delta (B, Hq, Sq) are the whole row's. GQA is
    handled by viewing the Hq query heads as (Hkv, group) so that K/V are never repeated.
    """
    acc = accumulation_dtype(q.dtype)
    b, hq, sq, d = q.shape
    hkv, sk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    kf = k.to(acc).unsqueeze(2)  # (B, Hkv, 1, Sk, D): broadcasts over the group
    vf = v.to(acc).unsqueeze(2)
    dq = torch.empty(b, hq, sq, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, hkv, sk, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, hkv, sk, dv_dim, dtype=acc, device=q.device)
    rows = max(1, MATH_CHUNK_ELEMENTS // max(1, b * hq * sk))
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        n = r1 - r0

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t[:, :, r0:r1].to(acc).reshape(b, hkv, g, n, *t.shape[3:])

        qc, doc = grouped(q), grouped(do)
        s = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # (B, Hkv, g, n, Sk)
        if causal:
            s = s.masked_fill(~visible_mask(sq, sk, causal=True, device=q.device, rows=(r0, r1)), float("-inf"))
        row_lse = grouped(lse).unsqueeze(-1)
        # a row with lse = -inf saw no key anywhere: +inf makes every probability exp(-inf) = 0
        row_lse = torch.where(torch.isneginf(row_lse), torch.full_like(row_lse, float("inf")), row_lse)
        p = torch.exp(s - row_lse)
        dv += torch.matmul(p.transpose(-1, -2), doc).sum(2)
        dp = torch.matmul(doc, vf.transpose(-1, -2))
        ds = p * (dp - grouped(delta).unsqueeze(-1))
        dq[:, :, r0:r1] = (torch.matmul(ds, kf) * scale).reshape(b, hq, n, d)
        dk += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
    return dq, dk, dv


def _block_backward_impl(name: str) -> Implementation | None:
    """The implementation `name` when it is available here and has a backward of its own (one that
    takes the given out and lse), else None."""
    try:
        impl = REGISTRY.get(name)
    except KeyError:
        return None
    why = REGISTRY.availability(name)
    if why is not None or not impl.has_backward:
        log.debug("%s has no usable backward pair here: %s", name, why or "it defines none")
        return None
    return impl


def choose_block_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, backend: str | None = None
) -> tuple[str, dict | None]:
    """The block backward pair selection gives this rank: the implementation the dispatcher picks
    for the local problem with a gradient and its lse (the forced `backend` first, if any), as its
    `lse_pair()` (a forward returning lse and a backward from the whole row's out and lse), with the
    decision's config. A forced backend without such a pair (sdpa) leaves the backward to the
    dispatcher's own choice; ('math', None) off CUDA or where no implementation has a usable pair
    (torch ops).

    q, k, v: the local slices, bhsd-indexed.
    """
    if q.device.type != "cuda":
        return "math", None
    from ..api import explain

    return pick_block_pair(lambda forced: explain(q, k, v, causal=causal, scale=scale, layout="bhsd",
                                                  return_lse=True, needs_grad=True, backend=forced), backend)


def pick_block_pair(decide: Callable[[str | None], Any], backend: str | None) -> tuple[str, dict | None]:
    """The pair of decide(backend)'s implementation, else of decide(None)'s (the dispatcher's own
    choice), else ('math', None). `decide` raises NoBackendError where nothing can serve."""
    from ..errors import NoBackendError

    for forced in dict.fromkeys((backend, None)):  # the forced backend, then the dispatcher's choice
        try:
            d = decide(forced)
        except NoBackendError as e:
            log.debug("ring backward: %s", e)
            continue
        path, config = block_pair(d)
        if path != "math":
            return path, config
    return "math", None


def block_pair(decision: Any) -> tuple[str, dict | None]:
    """(the decided implementation's backward pair, the decision's config), or ('math', None)
    when it has none usable here."""
    pair = REGISTRY.get(decision.variant).lse_pair()
    if pair is None or _block_backward_impl(pair.name) is None:
        log.debug("ring backward through torch ops: %s has no usable backward pair", decision.variant)
        return "math", None
    return pair.name, (dict(decision.config) or None)


def block_backward(
    path: str,
    config: dict | None,
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor | None,
    *,
    causal: bool,
    scale: float,
) -> Grads:
    """One block's (dq, dk, dv) through `path` (an implementation with a backward pair, such as
    'triton', with `config`; or 'math'); out, lse and delta are the whole row's."""
    if path not in ("math", "none"):
        impl = _block_backward_impl(path)
        if impl is None:
            raise RuntimeError(f"block backward path {path!r} chosen but that backend's backward is not usable here")
        p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout="bhsd", return_lse=False)
        return tuple(impl.backward(Inputs(q, k, v), out, lse, do, p, config)[:3])  # type: ignore[return-value]
    if delta is None:
        delta = softmax_delta(do, out)
    return block_backward_math(do, q, k, v, lse, delta, causal=causal, scale=scale)
