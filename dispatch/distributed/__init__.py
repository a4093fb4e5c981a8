"""Context parallelism: attention over a sequence split across the ranks of a process group.

Every rank holds its own slice of q, k and v along the sequence; `attention` returns, on each rank,
exactly what single-device attention over the whole sequence gives for that rank's query rows,
forward and backward. Three strategies (strategy.py chooses from a cost model, `explain` says why):
the ring (K/V slices travel round the ranks, torch.distributed point-to-point: NCCL on GPUs, gloo on
CPU, while each rank runs the dispatcher's backend on the block it holds), Ulysses (an all-to-all of
heads, then the whole sequence through the dispatcher per rank) and the hybrid of both (ulysses.py).

    import flashdispatch.distributed as fdd
    q, k, v = (fdd.shard(t, dim=2) for t in (q_full, k_full, v_full))   # load-balanced slices
    out = fdd.attention(q, k, v, causal=True)                            # this rank's rows
    full = fdd.unshard(out, dim=2)                                       # every rank: whole output

See docs/distributed.md for the schedule, its traffic and how it scales.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ..api import explain as local_explain
from ..problem import DTYPE_NAMES, LAYOUTS, problem_from_tensors
from ..selection import Decision
from ..errors import NoBackendError
from . import aten_cudnn
from .block_backward import accumulation_dtype, choose_block_backward
from .comm import LoopbackComm, RingComm, all_agree
from .layout import Block, check_divisible, chunk_order, global_positions, ring_blocks
from .ring import RingAttention, RingSpec, bhsd
from . import ulysses
from .strategy import (STRATEGIES, CostModel, StrategyChoice, Topology, choose, default_cost, describe_request,
                       dims_of, request_code, topology)

log = logging.getLogger("flashdispatch.distributed")

__all__ = ["attention", "explain", "explain_ring", "shard", "unshard", "positions", "ring_spec", "all_agree",
           "RingPlan", "StepPlan", "ContextPlan", "CostModel", "StrategyChoice", "Topology", "STRATEGIES"]

_DTYPE_CODES = {d: i for i, d in enumerate(DTYPE_NAMES)}


def _group_of(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group: expected an initialized torch.distributed process group "
            "(call torch.distributed.init_process_group first), got none"
        )
    return group if group is not None else dist.group.WORLD


def _comm(group: dist.ProcessGroup | None) -> RingComm | LoopbackComm:
    g = _group_of(group)
    if dist.get_rank(g) < 0:
        raise ValueError(f"group: expected a process group that contains this rank ({dist.get_rank()}), got one that does not")
    if dist.get_world_size(g) == 1:
        return LoopbackComm()
    return RingComm(g)


def _seq_dim(layout: str) -> int:
    return 2 if layout == "bhsd" else 1


def _check_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, layout: str) -> None:
    d = _seq_dim(layout)
    sq, sk = q.shape[d], k.shape[d]
    if sk != sq:
        raise ValueError(
            f"k sequence length (local): expected q's local length {sq} (every rank holds the same "
            f"positions of q, k and v), got {sk}"
        )
    if causal and sq % 2:
        raise ValueError(
            f"q sequence length (local): expected an even number under causal=True (the load-balanced "
            f"layout gives each rank two equal chunks; use shard()), got {sq}"
        )


def _check_same_across_ranks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: str, comm: RingComm,
    request: Sequence[int] = (0, 0, 0, 0),
) -> None:
    """Every rank must send and receive blocks of one shape: compare shapes, dtype and mode once,
    and the arguments that decide which collectives run (strategy.request_code)."""
    mine = [*q.shape, *k.shape, *v.shape, _DTYPE_CODES[q.dtype], int(causal), LAYOUTS.index(layout), *request]
    t = torch.tensor(mine, dtype=torch.int64, device=q.device)
    gathered = [torch.empty_like(t) for _ in range(comm.world)]
    dist.all_gather(gathered, t, group=comm.group)
    rows = [g.tolist() for g in gathered]
    if any(r != rows[0] for r in rows):
        def say(r: list[int]) -> str:
            return (f"q{tuple(r[0:4])} k{tuple(r[4:8])} v{tuple(r[8:12])} "
                    f"{list(DTYPE_NAMES.values())[r[12]]} causal={bool(r[13])} {LAYOUTS[r[14]]} "
                    f"{describe_request(r[15:19])}")

        raise ValueError(
            "q/k/v on the ranks of group: expected the same local shapes, dtype, causal and layout on "
            "every rank (an even split of the sequence), and the same strategy, ulysses_size, return_lse "
            "and cost model, got " + "; ".join(
                f"rank {i}: {say(r)}" for i, r in enumerate(rows))
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    backend: str | None = None,
    check_ranks: bool = True,
    strategy: str = "auto",
    ulysses_size: int | None = None,
    cost: CostModel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over the sequence slices held by the ranks of `group`: ring, Ulysses or both.

    Arguments (local slices, S = this rank's share of the sequence):
        q: (B, Hq, S, D) for layout="bhsd", or (B, S, Hq, D) for "bshd".
        k: (B, Hkv, S, D) / (B, S, Hkv, D), Hq a multiple of Hkv (GQA: head h reads h // (Hq // Hkv)).
        v: (B, Hkv, S, Dv) / (B, S, Hkv, Dv).
            Same shapes, dtype and device kind on every rank (fp16/bf16; fp32/fp64 where the local
            backend serves them, e.g. on CPU).
        group: the ranks that share the sequence (default: the whole world); group rank r holds
            slice r.
        causal: the full sequence's causal mask. Requires the load-balanced layout of `shard`
            (rank r holds chunks r and 2*world-1-r of 2*world equal chunks), so S must be even.
            Without causal any split works, `shard`'s included.
        scale: multiplier of q @ k^T; default 1 / sqrt(D).
        layout: "bhsd" or "bshd".
        return_lse: also return the whole row's log-sum-exp, float32 (B, Hq, S), no gradient.
        backend: force the local backend of every block ("triton", "sdpa:math", ...); in a ring it
            must return lse. None lets the dispatcher choose per block (`explain` shows the choice).
        check_ranks: gather every rank's shapes and collective-shaping arguments (strategy,
            ulysses_size, return_lse, cost) once per call and raise a ValueError on a mismatch, on
            every rank (which would otherwise hang or corrupt the transfers). Costs one small
            all_gather and a host sync; pass False on a hot path whose shapes are known to agree.
        strategy: "auto" (the fastest predicted by the cost model, see `explain`), "ring" (K/V
            round all ranks), "ulysses" (all-to-all of heads; Hq divisible by the group size, Hkv
            a multiple or a divisor of it) or "hybrid" (Ulysses in groups of `ulysses_size`
            consecutive ranks, the ring across groups). Every one gives the same result.
        ulysses_size: ranks per all-to-all group for "hybrid" (default: the ranks of one node, from
            the group's host names) or to restrict "auto"; a divisor of the group size.
        cost: the cost model's parameters (strategy.CostModel; default: the device's,
            strategy.DEFAULT_COSTS). Every rank must pass the same.

    Returns:
        out in q's layout and dtype: this rank's rows of the full-sequence attention; with
        return_lse, (out, lse). Gradients flow to q, k and v (dK/dV travel back round the ring).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True)
    _check_local(q, k, v, causal=causal, layout=layout)
    comm = _comm(group)
    ranks_per_node = 1
    if isinstance(comm, RingComm):
        # the same collectives in the same order on every rank, whatever the arguments: the
        # topology (gathered on the group's first call only), then the agreement check
        ranks_per_node = topology(comm.group).ranks_per_node
        if check_ranks:
            _check_same_across_ranks(q, k, v, causal, layout, comm, request_code(strategy, ulysses_size, return_lse,
                                                                                cost))
    if p.is_empty:
        from ..api import attention as local_attention

        out, lse = local_attention(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True)
        return (out, lse) if return_lse else out
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    dims = dims_of(q, k, v, layout=layout, world=comm.world, causal=causal, needs_grad=needs_grad,
                   return_lse=return_lse)
    choice = choose(dims, strategy=strategy, ulysses_size=ulysses_size, cost=cost or default_cost(q.device),
                    ranks_per_node=ranks_per_node)
    if choice.ulysses_size == 1:
        spec = ring_spec(q, k, v, rank=comm.rank, world=comm.world, causal=causal, scale=p.scale,
                         layout=layout, backend=backend)
        out, lse = RingAttention.apply(q, k, v, spec, comm)
        return (out, lse) if return_lse else out
    split = ulysses.Split(comm.group, comm.world, comm.rank, choice.ulysses_size, causal)
    out, maybe_lse = ulysses.attention(q, k, v, split, scale=p.scale, layout=layout, return_lse=return_lse,
                                       backend=backend)
    return (out, maybe_lse) if return_lse else out


def ring_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rank: int,
    world: int,
    causal: bool,
    scale: float,
    layout: str,
    backend: str | None = None,
) -> RingSpec:
    """The schedule `attention` runs on `rank` (the blocks, the per-block backward and its config)."""
    s_local = q.shape[_seq_dim(layout)]
    qb, kb, vb = (bhsd(t, layout) for t in (q, k, v))
    needs_bwd = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    blocks = tuple(ring_blocks(rank, world, s_local, causal))
    if cudnn_blocks_reason(qb, kb, vb, causal=causal, scale=scale, backend=backend, needs_grad=needs_bwd,
                           blocks=blocks) is None:
        return RingSpec(blocks, scale, layout, backend, "cudnn", None)
    path, config = (choose_block_backward(qb, kb, vb, causal=causal, scale=scale, backend=backend) if needs_bwd
                    else ("none", None))
    return RingSpec(blocks, scale, layout, backend, path, config)


def cudnn_blocks_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                        backend: str | None, needs_grad: bool,
                        blocks: Sequence[Block] | None = None) -> str | None:
    """None when the ring runs its blocks through cuDNN with lse (aten_cudnn): the dispatcher (or
    the forced backend) picks SDPA for the rank's whole local problem, the device and every block
    pass aten_cudnn.blocks_reason's gates and the private ops their self-check here. q, k, v
    bhsd-indexed local slices; blocks: this rank's ring blocks."""
    if backend is not None and backend not in aten_cudnn.SDPA_VARIANTS:
        chosen: str | None = backend
    else:
        try:
            chosen = local_explain(q, k, v, causal=causal, scale=scale, layout="bhsd", needs_grad=needs_grad,
                                   backend=backend).variant
        except NoBackendError as e:
            return str(e)
    return aten_cudnn.blocks_reason(q, k, v, chosen, blocks)


# --- sharding helpers ------------------------------------------------------------------------------


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an index into a {x.dim()}-d tensor, got {dim}")
    return dim % x.dim()


def shard(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, *, balanced: bool = True) -> torch.Tensor:
    """This rank's slice of the full-sequence tensor `x` along `dim` (a new contiguous tensor).

    balanced=True (the layout causal `attention` needs): 2*world equal chunks, rank r gets chunks r
    and 2*world-1-r. balanced=False: world contiguous pieces. Differentiable (it is indexing).
    """
    g = _group_of(group)
    dim = _norm_dim(x, dim)
    world, rank = dist.get_world_size(g), dist.get_rank(g)
    c = check_divisible(x.shape[dim], world, balanced, f"x.size({dim})")
    return torch.cat([x.narrow(dim, i * c, c) for i in chunk_order(world, balanced)[rank]], dim=dim).contiguous()


def unshard(
    x: torch.Tensor,
    dim: int,
    group: dist.ProcessGroup | None = None,
    *,
    balanced: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full-sequence tensor, on every rank, from each rank's slice `x` (inverse of `shard`).

    An all_gather: every rank must call it with slices of one shape. Carries no gradient. `out`, if
    given, receives the result (shape, dtype and device of the full tensor).
    """
    g = _group_of(group)
    dim = _norm_dim(x, dim)
    world = dist.get_world_size(g)
    order = chunk_order(world, balanced)
    per_rank = len(order[0])
    if x.shape[dim] % per_rank:
        raise ValueError(f"x.size({dim}): expected a multiple of {per_rank} (chunks per rank), got {x.shape[dim]}")
    c = x.shape[dim] // per_rank
    full_shape = list(x.shape)
    full_shape[dim] = c * per_rank * world
    if out is None:
        out = torch.empty(full_shape, dtype=x.dtype, device=x.device)
    elif list(out.shape) != full_shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out: expected shape {tuple(full_shape)}, dtype {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)}, {out.dtype} on {out.device}"
        )
    xs = x.detach().contiguous()
    gathered = [torch.empty_like(xs) for _ in range(world)]
    dist.all_gather(gathered, xs, group=g)
    for r, piece in enumerate(gathered):
        for j, chunk in enumerate(order[r]):
            out.narrow(dim, chunk * c, c).copy_(piece.narrow(dim, j * c, c))
    return out


def positions(
    length: int,
    group: dist.ProcessGroup | None = None,
    *,
    balanced: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global positions (int64, local order) of this rank's slice of a `length`-long sequence, for
    position embeddings (rotary) applied after `shard`."""
    g = _group_of(group)
    return global_positions(length, dist.get_rank(g), dist.get_world_size(g), balanced=balanced, device=device)


# --- explain -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    step: int
    block: Block
    decision: Decision  # the dispatcher's choice for this block's forward (with lse)


@dataclass(frozen=True)
class RingPlan:
    rank: int
    world: int
    causal: bool
    layout: str
    local_len: int
    steps: tuple[StepPlan, ...]
    backward_path: str  # per-block: "cudnn" (forward too) | an implementation's backward pair | "math" (torch ops)
    kv_bytes: int  # K + V of one slice: what one forward step sends
    dkv_bytes: int  # dK + dV accumulators of one slice (float32/64): sent once per backward step

    def __str__(self) -> str:
        mib = 1 << 20
        lines = [
            f"ring attention plan: rank {self.rank} of {self.world}, causal={self.causal}, "
            f"layout={self.layout}, local S={self.local_len}",
            f"  {'step':>4}  {'kv of':>6}  {'block':<36} forward backend (source)",
        ]
        for sp in self.steps:
            b = sp.block
            chosen = (f"sdpa:cudnn through torch's cuDNN op with lse (SDPA chosen for the local problem)"
                      if self.backward_path == "cudnn" else f"{sp.decision.variant} ({sp.decision.source})")
            lines.append(f"  {sp.step:>4}  {'rank ' + str(b.src):>6}  {b.describe():<36} {chosen}")
        bwd = ("torch's cuDNN backward op (global out/lse)" if self.backward_path == "cudnn" else
               "torch ops, chunked over query rows" if self.backward_path in ("math", "none") else
               f"{self.backward_path}'s backward pair (global out/lse)")
        lines += [
            f"  backward per block: {bwd}",
            f"  traffic per step: forward K+V {self.kv_bytes / mib:.2f} MiB; backward K+V "
            f"{self.kv_bytes / mib:.2f} MiB + dK+dV {self.dkv_bytes / mib:.2f} MiB",
        ]
        return "\n".join(lines)


def explain_ring(
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
) -> RingPlan:
    """What the ring would run on this rank: each step's block and the backend chosen for it.

    q, k, v are the local slices. `world_size` and `rank` plan without a process group (both or
    neither); `device` answers for a simulated device key ("h100", ...), as flashdispatch.explain.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=True)
    _check_local(q, k, v, causal=causal, layout=layout)
    if (world_size is None) != (rank is None):
        raise TypeError("world_size/rank: expected both or neither, got one")
    if world_size is None:
        g = _group_of(group)
        world_size, rank = dist.get_world_size(g), dist.get_rank(g)
    assert rank is not None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    s_local = q.shape[_seq_dim(layout)]
    qb, kb, vb = (bhsd(t, layout) for t in (q, k, v))
    steps = []
    blocks = ring_blocks(rank, world_size, s_local, causal)
    for i, blk in enumerate(blocks):
        d = local_explain(
            qb[:, :, blk.q_rows], kb[:, :, blk.kv_rows], vb[:, :, blk.kv_rows], causal=blk.causal,
            scale=scale, layout="bhsd", return_lse=True, needs_grad=False, backend=backend, device=device,
        )
        steps.append(StepPlan(i, blk, d))
    acc_size = torch.empty((), dtype=accumulation_dtype(q.dtype)).element_size()
    return RingPlan(
        rank=rank,
        world=world_size,
        causal=causal,
        layout=layout,
        local_len=s_local,
        steps=tuple(steps),
        backward_path=("cudnn" if cudnn_blocks_reason(qb, kb, vb, causal=causal, scale=p.scale, backend=backend,
                                                      needs_grad=any(t.requires_grad for t in (q, k, v)),
                                                      blocks=blocks) is None
                       else choose_block_backward(qb, kb, vb, causal=causal, scale=p.scale, backend=backend)[0]),
        kv_bytes=(k.numel() + v.numel()) * k.element_size(),
        dkv_bytes=(k.numel() + v.numel()) * acc_size,
    )


from .planning import ContextPlan, explain  # noqa: E402  (it plans through explain_ring, defined above)
