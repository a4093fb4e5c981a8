"""Point-to-point traffic round the ring: send to rank r+1, receive from rank r-1.

`exchange` posts the sends and receives and returns at once, so that the caller computes on the
block it holds while the next one travels (NCCL runs p2p on its own stream; gloo in its own
threads). `Pending.wait` hands back the received tensors; on CUDA it only makes the current stream
wait for the transfer, the host does not block.
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
