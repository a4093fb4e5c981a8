"""`explain`: the strategy a distributed call would run on this rank, why, and its kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..api import explain as local_explain
from ..problem import LAYOUTS, problem_from_tensors
from ..selection import Decision
from .ring import bhsd
from .strategy import STRATEGIES, CostModel, StrategyChoice, Topology, choose, default_cost, dims_of, topology


@dataclass(frozen=True)
class ContextPlan:
    """The strategy with every candidate's prediction, and what runs locally: the ring's steps
    (ring and hybrid: over the head-split group tensors for the hybrid) or the local call (Ulysses)."""

    rank: int
    world: int
    choice: StrategyChoice
    ring: object | None  # RingPlan
    local: Decision | None

    @property
    def strategy(self) -> str:
        return self.choice.strategy

    def __str__(self) -> str:
        lines = [f"distributed attention plan: rank {self.rank} of {self.world}", str(self.choice)]
        if self.ring is not None:
            lines.append(str(self.ring))
        if self.local is not None:
            lines.append("local attention of each rank (its heads, the whole sequence):")
            lines.append(str(self.local))
        return "\n".join(lines)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    backend: str | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    device: str | None = None,
    strategy: str = "auto",
    ulysses_size: int | None = None,
    cost: CostModel | None = None,
    ranks_per_node: int | None = None,
    needs_grad: bool | None = None,
) -> ContextPlan:
    """What `attention` would run on this rank: the strategy, why (the predicted time of each), and
    its kernels.

    q, k, v are the local slices. `world_size` and `rank` plan without a process group (both or
    neither); `ranks_per_node` gives the topology (default: gathered from the group once, a
    collective, or world_size on one node when planning without a group); `device` answers for a
    simulated device key ("h100", ...) as flashdispatch.explain does, and picks that device's
    default cost model. needs_grad: plan forward+backward (default: whether q, k or v requires grad).
    """
    from . import _check_local, _group_of, explain_ring

    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True)  # validates
    _check_local(q, k, v, causal=causal, layout=layout)
    if (world_size is None) != (rank is None):
        raise TypeError("world_size/rank: expected both or neither, got one")
    if world_size is None:
        g = _group_of(group)
        world_size, rank = dist.get_world_size(g), dist.get_rank(g)
        if ranks_per_node is None:
            ranks_per_node = topology(g).ranks_per_node if world_size > 1 else 1
    assert rank is not None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    rpn = Topology.uniform(world_size, ranks_per_node or world_size).ranks_per_node
    if needs_grad is None:
        needs_grad = any(t.requires_grad for t in (q, k, v))
    dims = dims_of(q, k, v, layout=layout, world=world_size, causal=causal, needs_grad=needs_grad)
    choice = choose(dims, strategy=strategy, ulysses_size=ulysses_size,
                    cost=cost or default_cost(q.device, key=device), ranks_per_node=rpn)
    u = choice.ulysses_size
    common = dict(causal=causal, scale=scale, backend=backend, device=device)
    if u == 1:
        ring = explain_ring(q, k, v, layout=layout, world_size=world_size, rank=rank, **common)
        return ContextPlan(rank, world_size, choice, ring, None)
    # the tensors each rank holds after the all-to-all: its H/U heads over the group's U*s tokens
    qb, kb, vb = (bhsd(t, layout) for t in (q, k, v))
    b, hq, s, d = qb.shape
    hkv = max(kb.shape[1], u)

    def heads(h: int, dim: int) -> torch.Tensor:
        return torch.empty(b, h // u, u * s, dim, dtype=q.dtype, device=q.device)

    qh, kh, vh = heads(hq, d), heads(hkv, d), heads(hkv, vb.shape[3])
    if choice.ring_size > 1:
        ring = explain_ring(qh, kh, vh, layout="bhsd", world_size=choice.ring_size, rank=rank // u, **common)
        return ContextPlan(rank, world_size, choice, ring, None)
    local = local_explain(qh, kh, vh, layout="bhsd", needs_grad=needs_grad, **common)
    return ContextPlan(rank, world_size, choice, None, local)
