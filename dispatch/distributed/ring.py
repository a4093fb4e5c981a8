"""The ring schedule, forward and backward, as one autograd.Function.

Forward, per step: post the transfer of the K/V slice held now to the next rank, run the
dispatcher's backend on this step's block (flashdispatch.attention(..., return_lse=True)), fold
the block into the running (out, lse), then wait for the next slice.

Backward, per step: post the K/V transfer, compute the block's (dq, dk, dv) against the global out
and lse, add dq locally, add dk/dv to the partial sums that arrived for this slice, and send those
on. A slice's dK/dV accumulators follow it round the ring and arrive home after `world` hops; K/V
make `world - 1`. The dK/dV send of step s overlaps the compute of step s + 1.

Accumulators are float32 (float64 for float64 inputs); dK/dV travel in that dtype so that the sum
over ranks rounds once, at the end.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import torch

from ..api import attention as local_attention
from . import aten_cudnn
from .block_backward import accumulation_dtype, block_backward, softmax_delta
from .comm import Pending
from .layout import Block
from .merge import merge_into

KV_TAG = 0
DKV_TAG = 1


class Comm(Protocol):
    rank: int
    world: int

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> Pending: ...


class RingSpec(NamedTuple):
    blocks: tuple[Block, ...]  # step s: the block computed while holding rank blocks[s].src's slice
    scale: float
    layout: str  # of the user's tensors; the ring works on bhsd-indexed views of them
    backend: str | None  # forced forward backend, None lets the dispatcher choose per block
    backward_path: str  # "cudnn" (aten_cudnn, forward too) | an implementation's backward pair (selection's) | "math"
    backward_config: dict | None = None  # that pair's config from the decision (None: its defaults)

    @property
    def aten_cudnn(self) -> bool:
        """Every block's forward and backward through torch's cuDNN ops (aten_cudnn.blocks_reason)."""
        return self.backward_path == "cudnn"


def bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def _zeros_user(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=dtype, device=like.device)


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec, comm: Comm
) -> tuple[torch.Tensor, torch.Tensor]:
    """out in q's layout and dtype, lse float32 (B, Hq, S). k and v must be contiguous (they travel)."""
    acc = accumulation_dtype(q.dtype)
    qb = bhsd(q, spec.layout)
    wire = [k, v]
    out_user = out = lse = None
    n = len(spec.blocks)
    for s, blk in enumerate(spec.blocks):
        pending = comm.exchange(wire, KV_TAG) if s + 1 < n else None
        kb, vb = bhsd(wire[0], spec.layout), bhsd(wire[1], spec.layout)
        qs, ks, vs = qb[:, :, blk.q_rows], kb[:, :, blk.kv_rows], vb[:, :, blk.kv_rows]
        if spec.aten_cudnn:
            o, l = aten_cudnn.forward(qs, ks, vs, causal=blk.causal, scale=spec.scale)
        else:
            o, l = local_attention(
                qs, ks, vs, causal=blk.causal, scale=spec.scale, layout="bhsd", return_lse=True, backend=spec.backend
            )
        if s == 0:
            # step 0 is the rank's own slice, whose block covers every local query row
            shape = list(q.shape)
            shape[-1] = o.shape[-1]
            out_user = torch.empty(shape, dtype=acc, device=q.device)
            out = bhsd(out_user, spec.layout)
            out.copy_(o)
            lse = l.to(acc)
        else:
            merge_into(out[:, :, blk.q_rows], lse[:, :, blk.q_rows], o, l)
        if pending is not None:
            wire = pending.wait()
    assert out_user is not None and lse is not None
    return out_user.to(q.dtype), lse.float()


def ring_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: RingSpec,
    comm: Comm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the layouts and dtypes of q, k, v; k and v contiguous."""
    acc = accumulation_dtype(q.dtype)
    L = spec.layout
    qb, ob, dob = bhsd(q, L), bhsd(out, L), bhsd(do, L)
    # the backends' backward pairs and cuDNN's compute rowsum(dO * O) themselves
    delta = softmax_delta(dob, ob) if spec.backward_path in ("math", "none") and not spec.aten_cudnn else None
    dq_user = _zeros_user(q, acc)
    dqb = bhsd(dq_user, L)
    wire = [k, v]
    pending_dkv: Pending | None = None
    n = len(spec.blocks)
    for s, blk in enumerate(spec.blocks):
        pending_kv = comm.exchange(wire, KV_TAG) if s + 1 < n else None
        kb, vb = bhsd(wire[0], L), bhsd(wire[1], L)
        rows, kv_rows = blk.q_rows, blk.kv_rows
        args = (dob[:, :, rows], qb[:, :, rows], kb[:, :, kv_rows], vb[:, :, kv_rows], ob[:, :, rows], lse[:, :, rows])
        if spec.aten_cudnn:
            dq_b, dk_b, dv_b = aten_cudnn.backward(*args, causal=blk.causal, scale=spec.scale)
        else:
            dq_b, dk_b, dv_b = block_backward(
                spec.backward_path, spec.backward_config, *args, None if delta is None else delta[:, :, rows],
                causal=blk.causal, scale=spec.scale,
            )
        dqb[:, :, rows] += dq_b
        dk_user, dv_user = _zeros_user(k, acc), _zeros_user(v, acc)
        bhsd(dk_user, L)[:, :, kv_rows] += dk_b
        bhsd(dv_user, L)[:, :, kv_rows] += dv_b
        if pending_dkv is not None:
            # the partial sums for the slice held now, from the ranks it visited before
            dk_in, dv_in = pending_dkv.wait()
            dk_user += dk_in
            dv_user += dv_in
        pending_dkv = comm.exchange([dk_user, dv_user], DKV_TAG)
        if pending_kv is not None:
            wire = pending_kv.wait()
    assert pending_dkv is not None
    dk, dv = pending_dkv.wait()  # this rank's own slice, home after `world` hops
    return dq_user.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """(q, k, v) -> (out, lse) over the ring; lse is returned without gradient."""

    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec, comm: Comm):  # type: ignore[no-untyped-def, override]
        k, v = k.contiguous(), v.contiguous()
        out, lse = ring_forward(q, k, v, spec, comm)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.comm = spec, comm
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.spec, ctx.comm)
        return dq, dk, dv, None, None
