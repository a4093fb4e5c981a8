"""Ulysses (all-to-all of heads) and the hybrid: Ulysses in groups of U ranks x the ring across groups.

The ranks of the group (W of them, each holding S/W tokens of every head, in `shard`'s layout) form
W/U groups of U consecutive ranks. Inside a group an all-to-all sends head block i (H/U heads) of
the rank's tokens to member i, so that member i then holds its H/U heads for all of the group's
tokens, put back in sequence order. With U = W that is the whole sequence (Ulysses), and each rank
runs plain flashdispatch.attention on it: the dispatcher's best kernel for the full-length problem,
with its own backward. With U < W each group holds the load-balanced slice of a ring of R = W/U:
the fine layout (2W chunks, rank r holding chunks r and 2W-1-r) makes group j's tokens exactly
chunks j and 2R-1-j of 2R coarse chunks, the ring's own layout, so the ring runs unchanged over the
R ranks that share a place in their groups. A second all-to-all sends each output head block home.

    group j = ranks [jU, (j+1)U)        member m = rank - jU       ring: ranks m, U+m, 2U+m, ...

Under causal the received pieces are put in sequence order: member i's slice is [fine chunk jU+i |
fine chunk 2W-1-(jU+i)], so the group's tokens are the first halves in member order followed by
the second halves in reverse member order. Without causal the order of keys does not matter and
the pieces are simply concatenated (any even split works, as for the ring).

GQA: the K/V heads split over the group as the query heads do (query head h of block i reads the
kv heads of block i). Where Hkv < U (U a multiple of Hkv) each kv head is first repeated U/Hkv
times; its gradient sums over the copies through autograd.

The all-to-alls are one `all_to_all_single` over the parent group with zero-sized pieces for the
ranks outside the rank's own group (no sub-groups are created, so nothing has to be set up by every
rank of the world beforehand). Bytes travel as uint8: the collective moves data of any dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from ..api import attention as local_attention
from .comm import RingComm
from .ring import RingAttention, bhsd


class Split(NamedTuple):
    """This rank's place in the U x R split of the parent group."""

    group: dist.ProcessGroup  # the parent group of all W ranks
    world: int
    rank: int  # in the parent group
    u: int  # ranks per all-to-all group
    causal: bool  # pieces in sequence order (the load-balanced layout)

    @property
    def r(self) -> int:
        return self.world // self.u

    @property
    def ring_rank(self) -> int:
        return self.rank // self.u

    @property
    def member(self) -> int:
        return self.rank % self.u

    def split_sizes(self, nbytes: int) -> list[int]:
        """all_to_all_single's per-rank sizes: nbytes for the members of this rank's group, 0 else."""
        lo = self.ring_rank * self.u
        return [nbytes if lo <= p < lo + self.u else 0 for p in range(self.world)]


class GroupRing(RingComm):
    """The ring across groups: ranks that share a member index, ring rank = group index, over the
    parent group (P2P peers are global ranks)."""

    def __init__(self, split: Split) -> None:  # noqa: D107 (RingComm's __init__ derives a plain ring)
        self.group = split.group
        self.rank = split.ring_rank
        self.world = split.r
        m, u = split.member, split.u
        self.next_peer = dist.get_global_rank(split.group, ((self.rank + 1) % self.world) * u + m)
        self.prev_peer = dist.get_global_rank(split.group, ((self.rank - 1) % self.world) * u + m)


# --- the all-to-alls ----------------------------------------------------------------------------


def _all_to_all(send: torch.Tensor, split: Split) -> torch.Tensor:
    """send (U, n) contiguous: row i goes to member i; returns (U, n), row i from member i."""
    if split.u == 1:
        return send
    recv = torch.empty_like(send)
    sizes = split.split_sizes(send[0].numel() * send.element_size())
    dist.all_to_all_single(recv.view(-1).view(torch.uint8), send.view(-1).view(torch.uint8), sizes, sizes,
                           group=split.group)
    return recv


def to_heads(xs: Sequence[torch.Tensor], split: Split) -> list[torch.Tensor]:
    """(B, H, s, D) bhsd-indexed local slices -> (B, H/U, U*s, D) contiguous: this member's heads
    over the group's tokens (in sequence order under causal). One all-to-all for all of xs."""
    u = split.u
    if u == 1:
        return list(xs)
    sizes = [x.numel() // u for x in xs]
    ref = xs[0]
    send = torch.empty(u, sum(sizes), dtype=ref.dtype, device=ref.device)
    at = 0
    for x, n in zip(xs, sizes):
        b, h, s, d = x.shape
        send[:, at:at + n].view(u, b, h // u, s, d).copy_(x.reshape(b, u, h // u, s, d).transpose(0, 1))
        at += n
    recv = _all_to_all(send, split)
    outs, at = [], 0
    for x, n in zip(xs, sizes):
        b, h, s, d = x.shape
        piece = recv[:, at:at + n].view(u, b, h // u, s, d)
        at += n
        y = torch.empty(b, h // u, u * s, d, dtype=x.dtype, device=x.device)
        if split.causal:
            c = s // 2
            y5, p6 = y.view(b, h // u, 2 * u, c, d), piece.view(u, b, h // u, 2, c, d)
            y5[:, :, :u].copy_(p6[:, :, :, 0].permute(1, 2, 0, 3, 4))
            y5[:, :, u:].copy_(p6[:, :, :, 1].flip(0).permute(1, 2, 0, 3, 4))
        else:
            y.view(b, h // u, u, s, d).copy_(piece.permute(1, 2, 0, 3, 4))
        outs.append(y)
    return outs


def to_seq(ys: Sequence[torch.Tensor], split: Split, outs: Sequence[torch.Tensor]) -> None:
    """The inverse of to_heads: (B, H/U, U*s, D) -> written into outs, bhsd-indexed (B, H, s, D)."""
    u = split.u
    if u == 1:
        for y, o in zip(ys, outs):
            o.copy_(y)
        return
    sizes = [y.numel() // u for y in ys]
    ref = ys[0]
    send = torch.empty(u, sum(sizes), dtype=ref.dtype, device=ref.device)
    at = 0
    for y, n in zip(ys, sizes):
        b, hh, su, d = y.shape
        s = su // u
        piece = send[:, at:at + n].view(u, b, hh, s, d)
        at += n
        if split.causal:
            c = s // 2
            y5, p6 = y.reshape(b, hh, 2 * u, c, d), piece.view(u, b, hh, 2, c, d)
            p6[:, :, :, 0].copy_(y5[:, :, :u].permute(2, 0, 1, 3, 4))
            p6[:, :, :, 1].copy_(y5[:, :, u:].flip(2).permute(2, 0, 1, 3, 4))
        else:
            piece.copy_(y.reshape(b, hh, u, s, d).permute(2, 0, 1, 3, 4))
    recv = _all_to_all(send, split)
    at = 0
    for y, n, o in zip(ys, sizes, outs):
        b, hh, su, d = y.shape
        s = su // u
        o.copy_(recv[:, at:at + n].view(u, b, hh, s, d).transpose(0, 1).reshape(b, u * hh, s, d))
        at += n


class ToHeads(torch.autograd.Function):
    """to_heads with its inverse as the backward (the all-to-all is a permutation of elements)."""

    @staticmethod
    def forward(ctx, split: Split, *xs):  # type: ignore[no-untyped-def, override]
        ctx.split = split
        ctx.shapes = [(tuple(x.shape), x.dtype) for x in xs]
        ctx.device = xs[0].device
        return tuple(to_heads(xs, split))

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[no-untyped-def, override]
        split, u = ctx.split, ctx.split.u
        gs = [g.contiguous() if g is not None else torch.zeros(b, h // u, u * s, d, dtype=dtype, device=ctx.device)
              for g, ((b, h, s, d), dtype) in zip(grads, ctx.shapes)]
        outs = [torch.empty(shape, dtype=dtype, device=ctx.device) for shape, dtype in ctx.shapes]
        to_seq(gs, split, outs)
        return (None, *outs)


class ToSeq(torch.autograd.Function):
    """(B, H/U, U*s, Dv) heads-split output -> the user's layout (B, H, s, Dv) / (B, s, H, Dv), contiguous."""

    @staticmethod
    def forward(ctx, split: Split, layout: str, y):  # type: ignore[no-untyped-def, override]
        ctx.split, ctx.layout = split, layout
        b, hh, su, d = y.shape
        h, s = hh * split.u, su // split.u
        out = torch.empty((b, h, s, d) if layout == "bhsd" else (b, s, h, d), dtype=y.dtype, device=y.device)
        to_seq([y], split, [bhsd(out, layout)])
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        (gh,) = to_heads([bhsd(g, ctx.layout)], ctx.split)
        return None, None, gh


# --- the attention ------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    split: Split,
    *,
    scale: float,
    layout: str,
    return_lse: bool,
    backend: str | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out in q's layout and dtype, lse (B, Hq, s) float32 or None) for this rank's rows.

    split.u ranks per all-to-all group; with split.r > 1 the ring runs across the groups."""
    from . import ring_spec  # the package's: the ring's schedule and block kernels

    u = split.u
    qb, kb, vb = (bhsd(t, layout) for t in (q, k, v))
    hkv = kb.shape[1]
    if hkv < u:
        kb, vb = kb.repeat_interleave(u // hkv, dim=1), vb.repeat_interleave(u // hkv, dim=1)
    qh, kh, vh = ToHeads.apply(split, qb, kb, vb) if u > 1 else (qb, kb, vb)
    if split.r == 1:
        res = local_attention(qh, kh, vh, causal=split.causal, scale=scale, layout="bhsd", return_lse=return_lse,
                              backend=backend)
        oh, lh = res if return_lse else (res, None)
    else:
        spec = ring_spec(qh, kh, vh, rank=split.ring_rank, world=split.r, causal=split.causal, scale=scale,
                         layout="bhsd", backend=backend)
        oh, lh = RingAttention.apply(qh, kh, vh, spec, GroupRing(split))
    out = ToSeq.apply(split, layout, oh)
    lse = None
    if return_lse:
        assert lh is not None
        lse = torch.empty(qb.shape[:3], dtype=torch.float32, device=q.device)
        to_seq([lh.detach().float().unsqueeze(-1).contiguous()], split, [lse.unsqueeze(-1)])
    return out, lse
