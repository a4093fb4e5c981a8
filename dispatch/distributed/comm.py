"""Point-to-point traffic round the ring: send to rank r+1, receive from rank r-1.

`exchange` posts the sends and receives and returns at once, so that the caller computes on the
block it holds while the next one travels (NCCL runs p2p on its own stream; gloo in its own
threads). `Pending.wait` hands back the received tensors; on CUDA it only makes the current stream
wait for the transfer, the host does not block.

`all_agree` turns a per-rank condition into one every rank shares, for branches that lead into
collective work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass
class Pending:
    works: list
    received: list[torch.Tensor]

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.received


def group_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective on `group` takes its tensors on: the current CUDA device where the
    group's backend is NCCL (NCCL takes CUDA tensors only), else the CPU (gloo)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(flag: bool, group: dist.ProcessGroup | None = None, *, device: torch.device | None = None) -> bool:
    """True on every rank of `group` when `flag` is true on every rank, else False on every rank.

    A collective: every rank of the group must call it, in the same order as its other collectives.
    Use it before a branch that runs collectives (a second ring run, an all_gather): a condition
    each rank decides alone (its block kernels, a self-check that passed on one GPU only) may differ
    between ranks, and ranks that disagree there would wait for one another forever. One int32
    all_reduce (MIN) on `device` (default: `group_device(group)`), with a host sync.
    """
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device or group_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class RingComm:
    """The ring over a process group (group ranks r -> r+1 mod world)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        # P2POp peers are global ranks, whatever group the ops run in
        self.next_peer = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev_peer = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> Pending:
        """Send `tensors` (contiguous) to the next rank; receive as many of the same shapes from the previous."""
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev_peer, self.group, tag) for r in received]
        return Pending(dist.batch_isend_irecv(ops), received)


class LoopbackComm:
    """A ring of one: what is "sent" comes straight back. Serves world == 1 and compute-only timing
    (the same kernels as the ring, with no traffic)."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank = rank
        self.world = world

    def exchange(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> Pending:
        return Pending([], list(tensors))
