"""Which context-parallel strategy runs a call: the ring, Ulysses, or both (hybrid), from a cost model.

Three ways to split one attention over W ranks that each hold S/W tokens of q, k and v:

    ring     K/V slices travel round all W ranks (W steps); each step's block hides the next hop.
    ulysses  an all-to-all turns "every head, S/W tokens" into "H/W heads, every token", each rank
             runs the whole sequence for its heads through flashdispatch.attention, and a second
             all-to-all brings the output back (U = W, every head count divisible by W).
    hybrid   Ulysses inside groups of U consecutive ranks (a node), the ring across the R = W/U
             groups (ranks with the same place in their group form one ring).

`predict` writes each one's time out from explicit parameters (`CostModel`: per-rank attention
throughput, link bandwidths, fixed costs) and the traffic each moves; `choose` takes the fastest
that is valid, or checks a forced one, and says why. Nothing here runs a collective except
`topology` (once per process group, cached).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("flashdispatch.distributed")

STRATEGIES = ("auto", "ring", "ulysses", "hybrid")


# --- topology ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """Where the ranks of a group live: host id per group rank (equal ids share a node)."""

    hosts: tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.hosts)

    @property
    def ranks_per_node(self) -> int:
        """Ranks per node when every node holds the same number of consecutive group ranks;
        1 otherwise (every link counted as one between nodes: the safe guess)."""
        n = 1
        while n < self.world and self.hosts[n] == self.hosts[0]:
            n += 1
        if self.world % n:
            return 1
        for start in range(0, self.world, n):
            block = self.hosts[start:start + n]
            if len(set(block)) != 1 or block[0] in self.hosts[:start]:
                return 1
        return n

    @classmethod
    def uniform(cls, world: int, ranks_per_node: int) -> "Topology":
        """world ranks, ranks_per_node consecutive ranks per node (for planning on paper)."""
        if ranks_per_node < 1 or world % ranks_per_node:
            raise ValueError(f"ranks_per_node: expected a divisor of world={world}, got {ranks_per_node}")
        return cls(tuple(r // ranks_per_node for r in range(world)))


_TOPOLOGIES: dict[int, tuple[dist.ProcessGroup, Topology]] = {}


def topology(group: dist.ProcessGroup) -> Topology:
    """The group's topology, gathered once per group (one small all_gather of host-name hashes; a
    collective, so every rank of the group calls it at the same point) and cached."""
    hit = _TOPOLOGIES.get(id(group))
    if hit is not None and hit[0] is group:
        return hit[1]
    import socket

    from .comm import group_device

    mine = torch.tensor([zlib.crc32(socket.gethostname().encode())], dtype=torch.int64,
                        device=group_device(group))
    world = dist.get_world_size(group)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    topo = Topology(tuple(int(t.item()) for t in got))
    _TOPOLOGIES[id(group)] = (group, topo)
    return topo


# --- the cost model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """The parameters of the prediction, per rank. Rates in FLOP/s, bandwidths in bytes/s one way.

    fwd_flops/bwd_flops: the attention kernels' rate on one rank for long sequences (the FLOP
        count of Problem.flops: 4·B·H·pairs·D forward, 2.5x that backward).
    intra_bw: what one rank sends per second to ranks of its node (NVLink), ring hop or
        all-to-all alike.
    inter_bw: what one rank sends per second to other nodes (its share of the NICs).
    copy_bw: bytes copied per second on the device (the all-to-all's pack and unpack copies).
    step_s: fixed cost of one ring step (kernel launches, the lse merge, posting the transfers).
    a2a_s: fixed cost of one all-to-all (latency and the launch of its copies).
    ring_efficiency: the ring blocks' rate relative to fwd_flops/bwd_flops (1: the same kernels
        reach the same rate on a block as on the whole problem).
    """

    fwd_flops: float
    bwd_flops: float
    intra_bw: float
    inter_bw: float
    copy_bw: float
    step_s: float = 1e-4
    a2a_s: float = 5e-5
    ring_efficiency: float = 1.0
    source: str = "given"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if f.name != "source" and not (isinstance(val, (int, float)) and math.isfinite(val) and val >= 0):
                raise ValueError(f"CostModel.{f.name}: expected a finite number >= 0, got {val!r}")
        for name in ("fwd_flops", "bwd_flops", "intra_bw", "inter_bw", "copy_bw", "ring_efficiency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CostModel.{name}: expected a number > 0, got {getattr(self, name)!r}")

    def fingerprint(self) -> int:
        """A 31-bit digest of the parameters: ranks compare it before they choose (a choice made
        from different parameters would differ, and the ranks would run different collectives)."""
        vals = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source")
        return zlib.crc32(repr(vals).encode()) & 0x7FFFFFFF


# Defaults by device profile key. Rates: cuDNN bf16 D=128 on the H100 (624 TFLOP/s forward, 525
# backward alone, docs/distributed.md), which the ring's blocks also reached (515 fwd+bwd per GPU);
# the H200 ring measured the same per-GPU rate. intra_bw: our ring's K/V hop between two NVLink
# GPUs, 195-219 GB/s (H100) and 207 GB/s (H200). inter_bw: one 400 Gb/s NIC per GPU (datasheet,
# not measured here). copy_bw: about half the HBM bandwidth (a copy reads and writes). CPU: gloo
# over loopback, rough, for tests and planning only.
DEFAULT_COSTS: dict[str, CostModel] = {
    "h100": CostModel(620e12, 525e12, 210e9, 45e9, 1.5e12, source="default:h100"),
    "h200": CostModel(620e12, 525e12, 207e9, 45e9, 2.0e12, source="default:h200"),
    "gpu": CostModel(300e12, 250e12, 150e9, 25e9, 1.0e12, source="default:gpu"),
    "cpu": CostModel(2e10, 1e10, 2e9, 1e9, 5e9, step_s=1e-3, a2a_s=1e-3, source="default:cpu"),
}


def default_cost(device: torch.device | str | None = None, key: str | None = None) -> CostModel:
    """The default parameters for a device (its profile key), or for a device key given by name."""
    if key is None:
        from ..device import real_device

        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = real_device(dev.type, dev.index or 0).profile_key if dev.type == "cuda" else "cpu"
    return DEFAULT_COSTS.get(key or "gpu", DEFAULT_COSTS["gpu"])


# --- the problem as the model sees it ------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """The whole problem (S = the full sequence) and the split."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int
    head_dim: int
    head_dim_v: int
    elem: int  # bytes per element of q, k, v
    causal: bool
    world: int
    needs_grad: bool = True
    return_lse: bool = False

    @property
    def acc(self) -> int:
        """bytes per element of the ring's dK/dV accumulators (float32; float64 for float64)."""
        return 8 if self.elem == 8 else 4

    def flops(self) -> float:
        pairs = self.seqlen * (self.seqlen + 1) // 2 if self.causal else self.seqlen * self.seqlen
        return 2.0 * self.batch * self.heads_q * pairs * (self.head_dim + self.head_dim_v)


def dims_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, world: int, causal: bool,
            needs_grad: bool, return_lse: bool = False) -> Dims:
    """Dims from this rank's local slices (every rank holds S/world tokens)."""
    hd = 1 if layout == "bhsd" else 2
    sd = 2 if layout == "bhsd" else 1
    return Dims(q.shape[0], q.shape[hd], k.shape[hd], q.shape[sd] * world, q.shape[3], v.shape[3],
                q.element_size(), causal, world, needs_grad, return_lse)


def ulysses_reason(d: Dims, u: int) -> str | None:
    """None when Ulysses groups of u ranks can split these heads, else why not."""
    if u < 1 or d.world % u:
        return f"{u} is not a divisor of the group size {d.world}"
    if d.heads_q % u:
        return f"Hq={d.heads_q} is not divisible by {u}"
    if d.heads_kv % u and u % d.heads_kv:
        return f"Hkv={d.heads_kv} is neither a multiple nor a divisor of {u}"
    return None


def strategy_name(u: int, world: int) -> str:
    return "ring" if u == 1 else "ulysses" if u == world else "hybrid"


# --- the prediction ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """One split's predicted time on one rank, and what it moves (bytes sent per rank)."""

    strategy: str
    ulysses_size: int  # U: ranks of one all-to-all group (1: the ring alone)
    ring_size: int  # R = W / U: ring steps (1: Ulysses alone)
    fwd_s: float
    bwd_s: float
    compute_s: float  # forward + backward kernels alone
    a2a_bytes: int  # forward + backward, sent by one rank in all-to-alls
    ring_bytes: int  # forward + backward, sent by one rank round the ring
    a2a_link: str  # "nvlink" | "network" | "-"
    ring_link: str
    bound: str  # what limits it, in words

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s

    def describe(self) -> str:
        mib = 1 << 20
        split = f"U={self.ulysses_size} x R={self.ring_size}"
        return (f"{self.strategy:<8} {split:<13} {self.total_s * 1e3:9.3f} ms (fwd {self.fwd_s * 1e3:.3f}, bwd "
                f"{self.bwd_s * 1e3:.3f}; compute {self.compute_s * 1e3:.3f}); sends all-to-all "
                f"{self.a2a_bytes / mib:.1f} MiB over {self.a2a_link}, ring {self.ring_bytes / mib:.1f} MiB over "
                f"{self.ring_link}; {self.bound}")


def _link_time(nbytes: float, peers_on_node: int, peers_off_node: int, cost: CostModel) -> float:
    """Time to send nbytes spread evenly over peers: the node's and the network's share at once."""
    peers = peers_on_node + peers_off_node
    if peers == 0 or nbytes == 0:
        return 0.0
    on = nbytes * peers_on_node / peers / cost.intra_bw
    off = nbytes * peers_off_node / peers / cost.inter_bw
    return max(on, off)


def predict(d: Dims, u: int, cost: CostModel, ranks_per_node: int) -> Prediction:
    """The time of Ulysses groups of u consecutive ranks x a ring over world/u groups.

    Per rank, with s = S/W local tokens, e bytes per element, a = accumulator bytes, and heads
    after the all-to-all's K/V repeat Hkv' = max(Hkv, U) (K/V heads are repeated when U > Hkv):

        all-to-all, forward:  (U-1)/U · B·s·(Hq·D + Hkv'·(D+Dv) + Hq·Dv)·e   (q, k, v in; out back)
        all-to-all, backward: the same bytes (dO in; dq, dk, dv back)
        ring, forward:        (R-1) hops of K+V:    B·s·Hkv'·(D+Dv)·e each
        ring, backward:       (R-1) hops of K+V and R hops of dK+dV: B·s·Hkv'·(D+Dv)·(e+a)
        compute:              F/W forward and 2.5·F/W backward (F: the whole problem's FLOPs)

    A ring step costs max(its block, its hop) + step_s (the hop hides behind the block); the
    all-to-alls do not overlap the compute and cost their bytes over the link plus a pack and an
    unpack copy plus a2a_s.
    """
    why = ulysses_reason(d, u)
    if why:
        raise ValueError(f"ulysses_size: {why}")
    w, r = d.world, d.world // u
    n = max(1, min(ranks_per_node, w))
    s = d.seqlen / w
    hkv = max(d.heads_kv, u) if u > 1 else d.heads_kv
    e, a = d.elem, d.acc
    f_fwd = d.flops() / w
    f_bwd = 2.5 * f_fwd
    # -- all-to-all inside each group of u consecutive ranks
    in_bytes = d.batch * s * (d.heads_q * d.head_dim + hkv * (d.head_dim + d.head_dim_v)) * e
    out_bytes = d.batch * s * d.heads_q * d.head_dim_v * e + (d.batch * s * d.heads_q * 4 if d.return_lse else 0)
    if u > 1:
        # peers of a rank on its own node: all of them when groups nest in nodes, a node's worth when
        # nodes nest in groups, none counted otherwise (groups that straddle nodes: the safe guess)
        on = u - 1 if n % u == 0 else n - 1 if u % n == 0 else 0
        off = u - 1 - on
        frac = (u - 1) / u

        def a2a(nbytes: float) -> float:
            return _link_time(nbytes * frac, on, off, cost) + 2 * nbytes / cost.copy_bw + cost.a2a_s

        a2a_fwd = a2a(in_bytes) + a2a(out_bytes)
        # backward: dO in (out's bytes without lse), dq/dk/dv back (q, k, v's bytes)
        out_plain = d.batch * s * d.heads_q * d.head_dim_v * e
        a2a_bwd = a2a(out_plain) + a2a(in_bytes) if d.needs_grad else 0.0
        a2a_sent = int(frac * (in_bytes + out_bytes + ((out_plain + in_bytes) if d.needs_grad else 0)))
        a2a_link = "nvlink" if off == 0 else ("network" if on == 0 else "nvlink+network")
    else:
        a2a_fwd = a2a_bwd = 0.0
        a2a_sent = 0
        a2a_link = "-"
    # -- the ring over r groups: ranks u apart; it crosses nodes once the world does
    kv_hop = d.batch * s * hkv * (d.head_dim + d.head_dim_v) * e
    dkv_hop = d.batch * s * hkv * (d.head_dim + d.head_dim_v) * a
    ring_bw = cost.intra_bw if w <= n else cost.inter_bw
    ring_link = "-" if r == 1 else ("nvlink" if w <= n else "network")
    eff = cost.ring_efficiency if r > 1 else 1.0
    cf = f_fwd / r / (cost.fwd_flops * eff)
    cb = f_bwd / r / (cost.bwd_flops * eff)
    if r > 1:
        t_kv = kv_hop / ring_bw
        t_bkv = (kv_hop + dkv_hop) / ring_bw
        ring_fwd = r * cost.step_s + cf + (r - 1) * max(cf, t_kv)
        ring_bwd = r * cost.step_s + cb + (r - 1) * max(cb, t_bkv) + dkv_hop / ring_bw
        ring_sent = int((r - 1) * kv_hop + (((r - 1) * kv_hop + r * dkv_hop) if d.needs_grad else 0))
        ratio = min(cf / t_kv, cb / t_bkv)
    else:
        ring_fwd, ring_bwd = cost.step_s + cf, cost.step_s + cb
        ring_sent = 0
        ratio = math.inf
    fwd = a2a_fwd + ring_fwd
    bwd = (a2a_bwd + ring_bwd) if d.needs_grad else 0.0
    compute = r * (cf + (cb if d.needs_grad else 0.0))
    exposed_a2a = a2a_fwd + a2a_bwd
    parts = []
    if r > 1:
        parts.append(f"ring hops {'hidden' if ratio >= 1 else 'exposed'} (block/hop time {ratio:.2g}x over "
                     f"{ring_link})")
    if u > 1:
        parts.append(f"all-to-all {exposed_a2a / (fwd + bwd):.0%} of the time (not overlapped)")
    return Prediction(strategy_name(u, w), u, r, fwd, bwd, compute, a2a_sent, ring_sent, a2a_link, ring_link,
                      "; ".join(parts) or "compute only")


# --- the choice ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyChoice:
    """The strategy a call runs, the group split, and why (every candidate's prediction)."""

    strategy: str
    ulysses_size: int
    ring_size: int
    reason: str
    predictions: tuple[Prediction, ...]  # every valid split, fastest first
    rejected: tuple[tuple[int, str], ...] = ()  # (U, why) of the splits the heads do not allow
    cost: CostModel | None = None
    ranks_per_node: int = 1

    def __str__(self) -> str:
        lines = [f"context-parallel strategy: {self.strategy} (U={self.ulysses_size} all-to-all x "
                 f"R={self.ring_size} ring)  {self.reason}"]
        if self.cost is not None:
            c = self.cost
            lines.append(f"  cost model ({c.source}): {c.fwd_flops / 1e12:.4g}/{c.bwd_flops / 1e12:.4g} TFLOP/s "
                         f"fwd/bwd per rank, links {c.intra_bw / 1e9:.4g} GB/s in a node, {c.inter_bw / 1e9:.4g} "
                         f"GB/s across, {self.ranks_per_node} ranks per node")
        lines.append("  predicted (per rank, forward+backward):")
        for p in self.predictions:
            mark = "*" if (p.ulysses_size == self.ulysses_size) else " "
            lines.append(f"  {mark} {p.describe()}")
        for u, why in self.rejected:
            lines.append(f"    {strategy_name(u, self.ring_size * self.ulysses_size)} U={u}: not possible: {why}")
        return "\n".join(lines)


def candidate_sizes(world: int) -> list[int]:
    return [u for u in range(1, world + 1) if world % u == 0]


@functools.lru_cache(maxsize=512)  # pure: the hot path pays a dict lookup per call
def choose(
    d: Dims,
    *,
    strategy: str = "auto",
    ulysses_size: int | None = None,
    cost: CostModel,
    ranks_per_node: int,
) -> StrategyChoice:
    """The split to run, checked: a ValueError naming the argument when the heads or the group do
    not allow the one asked for.

    auto: the fastest prediction among every valid U (ring: U=1, Ulysses: U=W, hybrid: between);
        with ulysses_size given, among the strategies that use that U only.
    ring: U=1. ulysses: U=W. hybrid: U=ulysses_size, else the ranks of one node when that is a
        proper divisor of W that the heads allow, else the fastest valid proper divisor.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    w = d.world
    if ulysses_size is not None and (isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int)
                                     or ulysses_size < 1 or w % ulysses_size):
        raise ValueError(f"ulysses_size: expected a divisor of the group size {w} (1..{w}), got {ulysses_size!r}")
    preds, rejected = [], []
    for u in candidate_sizes(w):
        why = ulysses_reason(d, u)
        if why:
            rejected.append((u, why))
        else:
            preds.append(predict(d, u, cost, ranks_per_node))
    preds.sort(key=lambda p: p.total_s)
    by_u = {p.ulysses_size: p for p in preds}
    why_not = dict(rejected)

    def need(u: int, what: str) -> Prediction:
        if u in why_not:
            raise ValueError(f"{what}: {why_not[u]} (heads must split evenly over the {u} ranks of an "
                             f"all-to-all group; K/V heads are repeated when Hkv divides it)")
        return by_u[u]

    if strategy == "ring":
        if ulysses_size not in (None, 1):
            raise ValueError(f"ulysses_size: expected None or 1 with strategy='ring', got {ulysses_size}")
        pick, reason = by_u[1], "(forced: strategy='ring')"
    elif strategy == "ulysses":
        if ulysses_size not in (None, w):
            raise ValueError(f"ulysses_size: expected None or the group size {w} with strategy='ulysses', "
                             f"got {ulysses_size}")
        pick, reason = need(w, f"strategy='ulysses' over {w} ranks"), "(forced: strategy='ulysses')"
    elif strategy == "hybrid":
        if ulysses_size is not None:
            pick = need(ulysses_size, f"ulysses_size={ulysses_size}")
            reason = f"(forced: strategy='hybrid', ulysses_size={ulysses_size})"
        else:
            proper = [p for p in preds if 1 < p.ulysses_size < w]
            node = by_u.get(ranks_per_node)
            if node is not None and 1 < ranks_per_node < w:
                pick, reason = node, f"(forced: strategy='hybrid'; U = {ranks_per_node} ranks per node)"
            elif proper:
                pick = proper[0]
                reason = (f"(forced: strategy='hybrid'; the node's {ranks_per_node} ranks are no proper split "
                          f"the heads allow: fastest proper split)")
            else:
                raise ValueError(
                    f"strategy='hybrid': expected a group size with a divisor strictly between 1 and {w} that "
                    f"the heads allow (Hq={d.heads_q}, Hkv={d.heads_kv}), got group size {w}"
                    + (f"; rejected: {', '.join(f'U={u}: {y}' for u, y in rejected)}" if rejected else ""))
    else:
        pool = preds if ulysses_size is None else [need(ulysses_size, f"ulysses_size={ulysses_size}")]
        pick = pool[0]
        others = [p for p in preds if p is not pick]
        if others:
            nxt = others[0]
            reason = (f"(auto: fastest predicted, {pick.total_s * 1e3:.3g} ms; next {nxt.strategy} U={nxt.ulysses_size} "
                      f"{nxt.total_s * 1e3:.3g} ms, {nxt.total_s / pick.total_s:.2f}x)")
        else:
            reason = f"(auto: the only valid split, {pick.total_s * 1e3:.3g} ms predicted)"
    log.debug("context parallel over %d ranks: %s U=%d %s", w, pick.strategy, pick.ulysses_size, reason)
    return StrategyChoice(pick.strategy, pick.ulysses_size, pick.ring_size, reason, tuple(preds), tuple(rejected),
                          cost, ranks_per_node)


def request_code(strategy: str, ulysses_size: int | None, return_lse: bool, cost: CostModel | None) -> list[int]:
    """The call's collective-shaping arguments as integers, for the ranks' agreement check."""
    return [STRATEGIES.index(strategy), ulysses_size or 0, int(return_lse), cost.fingerprint() if cost else 0]


def describe_request(row: Sequence[int]) -> str:
    strategy, u, lse, fp = row
    return (f"strategy={STRATEGIES[strategy]} ulysses_size={u or None} return_lse={bool(lse)} "
            f"cost={'default' if not fp else hex(fp)}")


def fit_cost(rows: Sequence[dict], base: CostModel) -> CostModel:
    """The parameters measured by tools/bench_cp (its JSON rows), the rest from `base`.

    Rates from the compute-only runs: forward from the forward alone, backward from fwd+bwd minus
    forward; of the Ulysses split where there is one (the whole-sequence kernels), the ring's
    blocks' rate relative to that as ring_efficiency. intra_bw from the ring's K/V hop (bytes over
    its time) where every rank shares a node. Medians over the rows that measured each one.
    """
    import statistics

    fwd, bwd, ring_rates, hop_bw = [], [], [], []
    for row in rows:
        d = Dims(row["batch"], row["heads"], row["kv_heads"], row["seqlen"], row["dim"], row["dim"],
                 2 if row["dtype"] in ("bf16", "fp16") else 4, row["causal"], row["world"])
        f = d.flops() / d.world
        for sp in row.get("splits", ()):
            cf, cb = sp["compute_fwd_ms"] * 1e-3, (sp["compute_ms"] - sp["compute_fwd_ms"]) * 1e-3
            if cf <= 0 or cb <= 0:
                continue
            if sp["ring_size"] == 1:
                fwd.append(f / cf)
                bwd.append(2.5 * f / cb)
            else:
                ring_rates.append(3.5 * f / (cf + cb))
            if sp.get("kv_hop_ms") and row.get("ranks_per_node", 1) >= row["world"]:
                hop_bw.append(sp["kv_hop_bytes"] / (sp["kv_hop_ms"] * 1e-3))
    changes: dict = {}
    if fwd:
        changes["fwd_flops"] = statistics.median(fwd)
        changes["bwd_flops"] = statistics.median(bwd)
        if ring_rates:
            whole = 3.5 / (1 / changes["fwd_flops"] + 2.5 / changes["bwd_flops"])
            changes["ring_efficiency"] = statistics.median(ring_rates) / whole
    if hop_bw:
        changes["intra_bw"] = statistics.median(hop_bw)
    return dataclasses.replace(base, **changes, source=f"fitted ({', '.join(sorted(changes)) or 'nothing'}) "
                                                       f"over {base.source}")
