"""Context-parallel strategies on CPU (gloo, 2, 4 and 8 processes): Ulysses, the hybrid and the
forced ring, each against single-process float64 attention, gradients included; bad splits
rejected on every rank; and the strategy choice on synthetic costs (in this process).

One spawn of 8 processes runs every case and sends back error measurements, so that each case
keeps its own test id (as tests/test_distributed.py does): the cases of world 8 over the whole
job, those of world 4 in two groups of 4 and those of world 2 in four groups of 2 at once (so the
groups' ranks differ from the global ones, which the all-to-all and the ring across groups map).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist

import flashdispatch.distributed as fdd
from flashdispatch.distributed import strategy as st
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
from inputs import make_qkv_do
from ranks import run_ranks

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
WORKER_TIMEOUT_S = 150


class Case(NamedTuple):
    strategy: str
    ulysses_size: int | None
    dtype: str
    layout: str
    causal: bool
    hq: int
    hkv: int
    seq: int  # full sequence
    d: int
    balanced: bool = True
    batch: int = 2
    grad: bool = True

    @property
    def id(self) -> str:
        u = "" if self.ulysses_size is None else f"-U{self.ulysses_size}"
        mode = "causal" if self.causal else "full"
        split = "" if self.balanced else "-contiguous"
        g = "" if self.grad else "-nograd"
        return (f"{self.strategy}{u}-{self.dtype}-{self.layout}-{mode}-h{self.hq}/{self.hkv}-S{self.seq}-D{self.d}"
                f"{split}{g}")


# Odd chunk lengths and head dims; GQA everywhere it is possible, K/V repeat (Hkv < U) included.
CASES: dict[int, list[Case]] = {
    2: [
        Case("ulysses", None, "fp64", "bhsd", True, 4, 2, 4 * 9, 24),
        Case("ulysses", None, "fp64", "bshd", False, 6, 2, 2 * 11, 40, balanced=False),
        Case("ulysses", None, "fp64", "bshd", True, 2, 1, 4 * 7, 16),  # Hkv=1 < U=2: K/V repeated
        Case("ulysses", None, "fp32", "bhsd", True, 4, 4, 4 * 5, 8, grad=False),
        Case("ulysses", None, "bf16", "bshd", True, 4, 2, 4 * 13, 32),
        Case("auto", None, "fp64", "bhsd", True, 2, 2, 4 * 5, 16),
    ],
    4: [
        Case("ulysses", None, "fp64", "bhsd", True, 8, 4, 8 * 5, 24),
        Case("hybrid", 2, "fp64", "bhsd", True, 4, 2, 8 * 7, 16),
        Case("hybrid", 2, "fp64", "bshd", False, 2, 2, 4 * 9, 24, balanced=False),
        Case("hybrid", 2, "fp64", "bshd", True, 6, 1, 8 * 3, 8),  # Hkv=1 < U=2
        Case("hybrid", 1, "fp64", "bhsd", True, 2, 1, 8 * 3, 8),  # U=1: the ring through the hybrid path
        Case("ring", None, "fp64", "bhsd", True, 4, 2, 8 * 3, 16),
    ],
    8: [
        Case("hybrid", 2, "fp64", "bhsd", True, 4, 2, 16 * 3, 8, batch=1),
        Case("hybrid", 4, "fp64", "bshd", True, 4, 1, 16 * 3, 8, batch=1),
        Case("ulysses", None, "fp64", "bhsd", True, 8, 2, 16 * 2, 8, batch=1),
        Case("ring", None, "fp64", "bshd", True, 2, 1, 16 * 2, 8, batch=1),
    ],
}
ERROR_CHECKS = ("heads-not-divisible", "kv-heads", "hybrid-no-split", "ulysses-size-not-divisor",
                "strategy-disagrees", "uneven-shards", "unknown-strategy")


def _budget_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs meet the ring's float32 lse merge (docs/distributed.md): float32's budget
    return torch.float32 if dtype == torch.float64 else dtype


def _run_case(case: Case, seed: int, group: Any) -> list[tuple[str, bool, float, float]]:
    dt = DTYPES[case.dtype]
    q, k, v, do = make_qkv_do(case.batch, case.hq, case.hkv, case.seq, case.seq, case.d, dtype=dt,
                              layout=case.layout, seed=seed)
    sd = 2 if case.layout == "bhsd" else 1
    kw = dict(causal=case.causal, layout=case.layout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_math(*ref_in, **kw)
    out_ref.backward(do.double())
    base_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_t, lse_t = attention_math(*base_in, upcast=False, **kw)
    out_t.backward(do)

    local = [fdd.shard(t, sd, group, balanced=case.balanced).requires_grad_(case.grad) for t in (q, k, v)]
    out_l, lse_l = fdd.attention(*local, group=group, return_lse=True, strategy=case.strategy,
                                 ulysses_size=case.ulysses_size, **kw)
    if case.grad:
        out_l.backward(fdd.shard(do, sd, group, balanced=case.balanced))

    def gather(x: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
        poisoned = torch.full(like.shape, float("nan"), dtype=x.dtype)
        return fdd.unshard(x.detach(), dim, group, balanced=case.balanced, out=poisoned)

    bd = _budget_dtype(dt)
    out_ref, lse_ref, out_t, lse_t = (t.detach() for t in (out_ref, lse_ref, out_t, lse_t))
    res = [("out", *within_budget(gather(out_l, sd, out_ref), out_t, out_ref, bd)),
           ("lse", *within_budget(gather(lse_l, 2, lse_ref), lse_t, lse_ref, bd))]
    if case.grad:
        for name, loc, ref, base in zip(("dq", "dk", "dv"), local, ref_in, base_in):
            res.append((name, *within_budget(gather(loc.grad, sd, ref), base.grad, ref.grad, bd, grad=True)))
    shape_ok = out_l.dtype == dt and tuple(out_l.shape) == tuple(local[0].shape) and out_l.is_contiguous()
    res.append(("out dtype/shape/contiguous", shape_ok, 0.0, 0.0))
    if dt == torch.float64 and case.strategy == "ulysses":
        # no lse merge on this path: the whole row in one float64 call
        err = float((gather(out_l, sd, out_ref) - out_ref).abs().max())
        res.append(("out float64-exact", err < 1e-12, err, 1e-12))
    return res


def _expect_value_error(fn: Any, *fragments: str) -> tuple[bool, str]:
    try:
        fn()
    except ValueError as e:
        return all(f in str(e) for f in fragments), str(e)
    return False, "no ValueError"


def _error_checks(rank: int, world: int, group: Any) -> dict[str, tuple[bool, str]]:
    """Each bad call must raise on every rank; the barrier after each one proves that no rank is
    left waiting in a collective that another skipped."""

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape)

    q2 = t(1, 2, 4, 8)
    local_len = 4 if rank == 0 else 6
    q1 = t(1, 1, 4, 8)
    g = dict(group=group)
    checks = {
        "heads-not-divisible": lambda: fdd.attention(t(1, 3, 4, 8), t(1, 3, 4, 8), t(1, 3, 4, 8),
                                                     strategy="ulysses", **g),
        "kv-heads": lambda: fdd.attention(t(1, 3 * world, 4, 8), t(1, 3, 4, 8), t(1, 3, 4, 8),
                                          strategy="ulysses", **g),
        "hybrid-no-split": lambda: fdd.attention(q1, q1, q1, strategy="hybrid", **g),
        "ulysses-size-not-divisor": lambda: fdd.attention(q2, q2, q2, strategy="hybrid", ulysses_size=3, **g),
        "strategy-disagrees": lambda: fdd.attention(q2, q2, q2, strategy="ring" if rank == 0 else "ulysses", **g),
        "uneven-shards": lambda: fdd.attention(*(t(1, 2, local_len, 8) for _ in range(3)), strategy="ulysses",
                                               **g),
        "unknown-strategy": lambda: fdd.attention(q2, q2, q2, strategy="zigzag", **g),
    }
    out: dict[str, tuple[bool, str]] = {}
    for name, call in checks.items():
        try:
            call()
            out[name] = (False, "no ValueError")
        except ValueError as e:
            out[name] = (True, str(e))
        dist.barrier(group)
    return out


EXPECTED_FRAGMENTS = {
    "heads-not-divisible": ("Hq=3 is not divisible by", "strategy='ulysses'"),
    "kv-heads": ("Hkv=3 is neither a multiple nor a divisor",),
    "hybrid-no-split": ("strategy='hybrid': expected a group size with a divisor",),
    "ulysses-size-not-divisor": ("ulysses_size: expected a divisor of the group size", "got 3"),
    "strategy-disagrees": ("expected the same local shapes", "strategy=ring", "strategy=ulysses"),
    "uneven-shards": ("expected the same local shapes", "rank 1: q(1, 2, 6, 8)"),
    "unknown-strategy": ("strategy: expected one of", "'zigzag'"),
}


def _auto_checks(rank: int, world: int, group: Any) -> dict[str, Any]:
    """strategy='auto' runs what the cost model picks: a cost that favours each split in turn,
    checked through the path the call takes (ulysses.attention called or not) and its result."""
    import flashdispatch.distributed.ulysses as uly

    calls: list[int] = []
    real = uly.attention

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(a[3].u)
        return real(*a, **kw)

    uly.attention = counting  # type: ignore[assignment]
    try:
        g = torch.Generator().manual_seed(77)
        q, k, v = (torch.randn(1, 8, 4 * world, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = attention_math(q, k, v, causal=True)[0]
        local = [fdd.shard(t, 2, group) for t in (q, k, v)]
        fast_links = st.CostModel(1e9, 1e9, 1e15, 1e15, 1e15, step_s=1e-3, a2a_s=0.0)  # ring pays steps
        slow_links = st.CostModel(1e15, 1e15, 1e6, 1e6, 1e15, step_s=0.0, a2a_s=0.0)  # traffic dominates
        report = {}
        for name, cost in (("fast links", fast_links), ("slow links", slow_links)):
            calls.clear()
            plan = fdd.explain(*local, group=group, causal=True, cost=cost, needs_grad=False)
            out = fdd.attention(*local, group=group, causal=True, cost=cost)
            err = float((fdd.unshard(out, 2, group) - ref).abs().max())
            report[name] = (plan.strategy, plan.choice.ulysses_size, list(calls), err)
        return report
    finally:
        uly.attention = real  # type: ignore[assignment]


JOB = 8  # processes; the cases of world W run in JOB // W groups of W at once


def _body(rank: int, job: int) -> dict[int, dict[str, Any]]:
    report: dict[int, dict[str, Any]] = {}
    for world in sorted(CASES):
        # new_group: every rank creates every group, in the same order
        groups = [dist.new_group(list(range(s, s + world))) for s in range(0, job, world)]
        group = groups[rank // world]
        grank = dist.get_rank(group)
        rep: dict[str, Any] = {c.id: _run_case(c, 3000 + i, group) for i, c in enumerate(CASES[world])}
        rep["errors"] = _error_checks(grank, world, group)
        rep["auto"] = _auto_checks(grank, world, group)
        report[world] = rep
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Per world size, every process's report (JOB of them: each in its own group of that size)."""
    got = run_ranks(_body, JOB, tmp_path_factory.mktemp("cp"), backend="gloo", timeout_s=WORKER_TIMEOUT_S)
    return {w: [got[r][w] for r in range(JOB)] for w in CASES}


_IDS = [(w, c.id) for w, cs in CASES.items() for c in cs]


@pytest.mark.slow  # its fixture spawns the process groups: 20-30 s on 2 cores
@pytest.mark.parametrize("world,case_id", _IDS, ids=[f"world{w}-{c}" for w, c in _IDS])
def test_strategy_matches_single_process(reports: Any, world: int, case_id: str) -> None:
    failures = []
    for rank, report in enumerate(reports[world]):
        for name, ok, err, allowed in report[case_id]:
            if not ok:
                failures.append(f"rank {rank} {name}: error {err:.3g} > allowed {allowed:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # the module's spawned process groups
@pytest.mark.parametrize("world", sorted(CASES))
@pytest.mark.parametrize("check", ERROR_CHECKS)
def test_bad_split_rejected_on_every_rank(reports: Any, world: int, check: str) -> None:
    for rank, report in enumerate(reports[world]):
        ok, msg = report["errors"][check]
        assert ok, f"rank {rank}: {msg}"
        frags = EXPECTED_FRAGMENTS[check]
        assert all(f in msg for f in frags), f"rank {rank}: {msg!r} lacks one of {frags}"


@pytest.mark.slow  # the module's spawned process groups
@pytest.mark.parametrize("world", sorted(CASES))
def test_auto_runs_the_split_the_cost_model_picks(reports: Any, world: int) -> None:
    for rank, report in enumerate(reports[world]):
        fast, slow = report["auto"]["fast links"], report["auto"]["slow links"]
        # free links, costly ring steps: Ulysses (one local call); links that cost everything: the
        # ring at W=2 (its hop hides nothing, but it sends K/V only: half Ulysses' q, k, v, out);
        # from W=4 on, Ulysses' (U-1)/U of q, k, v, out is less than the ring's W-1 K/V hops
        assert fast[:3] == ("ulysses", world, [world]), (rank, fast)
        want_slow = ("ring", 1, []) if world == 2 else ("ulysses", world, [world])
        assert slow[:3] == want_slow, (rank, slow)
        assert fast[3] < 1e-6 and slow[3] < 1e-6, (rank, fast, slow)


# --- the choice on synthetic costs (no process group) ------------------------------------------------

UNIT = st.CostModel(fwd_flops=1e12, bwd_flops=1e12, intra_bw=1e11, inter_bw=1e10, copy_bw=1e12, step_s=0.0,
                    a2a_s=0.0)


def _dims(world: int, *, hq: int = 8, hkv: int = 8, s: int = 8192, d: int = 128, causal: bool = True,
          grad: bool = True) -> st.Dims:
    return st.Dims(1, hq, hkv, s, d, d, 2, causal, world, grad)


def test_communication_volumes_are_the_written_formulas() -> None:
    """Bytes each rank sends, forward + backward, as docs/distributed.md writes them out."""
    w, s_loc, hq, hkv, d, e = 8, 1024, 8, 2, 128, 2
    dims = _dims(w, hq=hq, hkv=hkv, s=w * s_loc)
    ring = st.predict(dims, 1, UNIT, ranks_per_node=8)
    assert ring.a2a_bytes == 0
    kv = s_loc * hkv * 2 * d * e
    dkv = s_loc * hkv * 2 * d * 4
    assert ring.ring_bytes == (w - 1) * kv + (w - 1) * kv + w * dkv
    uly = st.predict(dims, w, UNIT, ranks_per_node=8)  # Hkv=2 < U=8: K/V repeated to 8 heads
    qkv = s_loc * (hq * d + 8 * 2 * d) * e
    o = s_loc * hq * d * e
    assert uly.ring_bytes == 0 and uly.a2a_bytes == int((w - 1) / w * 2 * (qkv + o))
    hyb = st.predict(dims, 2, UNIT, ranks_per_node=8)  # U=2 divides Hkv=2: no repeat; R=4
    qkv2 = s_loc * (hq * d + hkv * 2 * d) * e
    assert hyb.a2a_bytes == int(0.5 * 2 * (qkv2 + o))
    assert hyb.ring_bytes == 3 * kv + 3 * kv + 4 * dkv
    assert (ring.ring_size, uly.ring_size, hyb.ring_size) == (8, 1, 4)


def test_free_links_leave_only_compute() -> None:
    """With infinitely fast links and no fixed costs every split takes the compute time: W-way
    parallel attention, whatever the strategy."""
    free = st.CostModel(1e12, 1e12, 1e30, 1e30, 1e30, step_s=0.0, a2a_s=0.0)
    dims = _dims(8)
    times = [st.predict(dims, u, free, 8).total_s for u in (1, 2, 4, 8)]
    want = dims.flops() * 3.5 / 8 / 1e12
    assert all(abs(t / want - 1) < 1e-9 for t in times), (times, want)


def test_choice_follows_the_links() -> None:
    dims = _dims(8, s=65536)
    # compute-bound (fast links, long sequence): the ring hides its hops and needs no copies;
    # Ulysses pays its all-to-alls in full
    fast = st.CostModel(1e12, 1e12, 1e13, 1e13, 1e11, step_s=0.0, a2a_s=0.0)
    assert st.choose(dims, cost=fast, ranks_per_node=8).strategy == "ring"
    # slow links: the ring's 7 hops of K/V cost more than Ulysses' one all-to-all each way
    slow = st.CostModel(1e15, 1e15, 1e9, 1e9, 1e13, step_s=0.0, a2a_s=0.0)
    c = st.choose(dims, cost=slow, ranks_per_node=8)
    assert c.strategy == "ulysses" and c.ulysses_size == 8
    assert "auto: fastest predicted" in c.reason and [p.total_s for p in c.predictions] == sorted(
        p.total_s for p in c.predictions)


def test_choice_across_nodes_keeps_the_all_to_all_inside_a_node() -> None:
    """64 ranks, 8 per node, 2k tokens each, a network 10x slower than NVLink: Ulysses inside each node and the
    ring across the 8 nodes (the hybrid, U=8) beats the ring over 64 and any all-to-all that
    crosses nodes."""
    dims = _dims(64, hq=32, hkv=8, s=1 << 17)
    cost = st.CostModel(600e12, 500e12, 200e9, 20e9, 2e12)
    c = st.choose(dims, cost=cost, ranks_per_node=8)
    assert (c.strategy, c.ulysses_size, c.ring_size) == ("hybrid", 8, 8), str(c)
    by_u = {p.ulysses_size: p for p in c.predictions}
    assert by_u[1].total_s > 2 * by_u[8].total_s  # the ring over 64 waits on the network at every hop
    assert by_u[8].a2a_link == "nvlink" and by_u[16].a2a_link == "nvlink+network"
    assert (64, "Hq=32 is not divisible by 64") in c.rejected
    assert "ulysses U=64: not possible: Hq=32 is not divisible by 64" in str(c)


def test_forced_strategies_and_the_default_hybrid_split() -> None:
    dims = _dims(16, hq=16, hkv=4)
    cost = st.CostModel(1e12, 1e12, 1e11, 1e10, 1e12)
    assert st.choose(dims, strategy="ring", cost=cost, ranks_per_node=8).ulysses_size == 1
    assert st.choose(dims, strategy="ulysses", cost=cost, ranks_per_node=8).ulysses_size == 16
    h = st.choose(dims, strategy="hybrid", cost=cost, ranks_per_node=4)
    assert (h.strategy, h.ulysses_size, h.ring_size) == ("hybrid", 4, 4) and "4 ranks per node" in h.reason
    # one node holds every rank: no node-sized proper split, the fastest proper one instead
    h = st.choose(dims, strategy="hybrid", cost=cost, ranks_per_node=16)
    assert 1 < h.ulysses_size < 16 and "fastest proper split" in h.reason
    assert st.choose(dims, strategy="hybrid", ulysses_size=2, cost=cost, ranks_per_node=8).ulysses_size == 2
    # auto restricted to one U
    assert st.choose(dims, ulysses_size=8, cost=cost, ranks_per_node=8).ulysses_size == 8


def test_bad_splits_name_the_argument() -> None:
    cost = UNIT
    with pytest.raises(ValueError, match=r"strategy='ulysses' over 4 ranks: Hq=6 is not divisible by 4"):
        st.choose(_dims(4, hq=6, hkv=2), strategy="ulysses", cost=cost, ranks_per_node=4)
    with pytest.raises(ValueError, match=r"ulysses_size=4: Hkv=6 is neither a multiple nor a divisor of 4"):
        st.choose(_dims(8, hq=12, hkv=6), strategy="hybrid", ulysses_size=4, cost=cost, ranks_per_node=8)
    with pytest.raises(ValueError, match=r"ulysses_size: expected a divisor of the group size 8 \(1..8\), got 3"):
        st.choose(_dims(8), strategy="hybrid", ulysses_size=3, cost=cost, ranks_per_node=8)
    with pytest.raises(ValueError, match=r"ulysses_size: expected None or 1 with strategy='ring', got 2"):
        st.choose(_dims(8), strategy="ring", ulysses_size=2, cost=cost, ranks_per_node=8)
    with pytest.raises(ValueError, match=r"strategy='hybrid': expected a group size with a divisor strictly"):
        st.choose(_dims(2), strategy="hybrid", cost=cost, ranks_per_node=2)
    with pytest.raises(ValueError, match=r"strategy: expected one of .*got 'best'"):
        st.choose(_dims(2), strategy="best", cost=cost, ranks_per_node=2)
    with pytest.raises(ValueError, match=r"CostModel.intra_bw: expected a number > 0, got 0"):
        st.CostModel(1e12, 1e12, 0, 1e9, 1e12)
    # heads that allow no all-to-all: auto falls to the ring, and says what it could not do
    c = st.choose(_dims(4, hq=3, hkv=3), cost=cost, ranks_per_node=4)
    assert c.strategy == "ring" and "the only valid split" in c.reason and len(c.rejected) == 2


def test_topology_ranks_per_node() -> None:
    assert st.Topology((5, 5, 5, 5)).ranks_per_node == 4
    assert st.Topology((1, 1, 2, 2, 3, 3)).ranks_per_node == 2
    assert st.Topology.uniform(64, 8).ranks_per_node == 8
    assert st.Topology((1, 2, 1, 2)).ranks_per_node == 1  # interleaved hosts: no consecutive blocks
    assert st.Topology((1, 1, 1, 2)).ranks_per_node == 1  # uneven nodes
    with pytest.raises(ValueError, match="ranks_per_node: expected a divisor of world=8, got 3"):
        st.Topology.uniform(8, 3)


def test_explain_names_the_strategy_and_each_prediction_without_a_group() -> None:
    q = torch.randn(1, 32, 1024, 128)  # 64k tokens over 64 ranks, 8 per node
    k = torch.randn(1, 8, 1024, 128)
    plan = fdd.explain(q, k, k, causal=True, world_size=64, rank=9, ranks_per_node=8, device="h100",
                       needs_grad=True)
    text = str(plan)
    assert plan.strategy == "hybrid" and plan.choice.ulysses_size == 8
    assert "context-parallel strategy: hybrid (U=8 all-to-all x R=8 ring)" in text
    for strategy in ("ring     U=1 x R=64", "hybrid   U=8 x R=8", "hybrid   U=2 x R=32"):
        assert strategy in text
    assert plan.ring is not None and plan.ring.world == 8 and plan.ring.rank == 1  # the ring across groups
    uly = fdd.explain(q, k, k, causal=True, world_size=8, rank=0, device="h100", strategy="ulysses")
    assert uly.ring is None and uly.local is not None and uly.local.problem.heads_q == 4
    assert uly.local.problem.seqlen_q == 8 * 1024 and uly.local.problem.heads_kv == 1
    ring = fdd.explain(q, k, k, causal=True, world_size=4, rank=1, strategy="ring")
    assert [s.block.src for s in ring.ring.steps] == [1, 0, 3, 2]


def test_fit_cost_reads_rates_and_bandwidth_from_bench_rows() -> None:
    """fit_cost inverts the model's compute and hop terms: rows made from known rates give them back."""
    base = st.DEFAULT_COSTS["h100"]
    dims = _dims(4, hq=32, hkv=8, s=65536)
    f = dims.flops() / 4
    fwd_rate, bwd_rate, bw = 500e12, 400e12, 150e9
    cf, cb = f / fwd_rate, 2.5 * f / bwd_rate
    ring_cf, ring_cb = cf / 0.8, cb / 0.8  # ring blocks at 0.8 of the whole-sequence rate
    hop_bytes = 1 << 28
    row = {"batch": 1, "heads": 32, "kv_heads": 8, "seqlen": 65536, "dim": 128, "dtype": "bf16", "causal": True,
           "world": 4, "ranks_per_node": 4, "splits": [
               {"ring_size": 1, "compute_fwd_ms": cf * 1e3, "compute_ms": (cf + cb) * 1e3},
               {"ring_size": 4, "compute_fwd_ms": ring_cf * 1e3, "compute_ms": (ring_cf + ring_cb) * 1e3,
                "kv_hop_ms": hop_bytes / bw * 1e3, "kv_hop_bytes": hop_bytes}]}
    fit = st.fit_cost([row], base)
    assert fit.fwd_flops == pytest.approx(fwd_rate) and fit.bwd_flops == pytest.approx(bwd_rate)
    assert fit.ring_efficiency == pytest.approx(0.8) and fit.intra_bw == pytest.approx(bw)
    assert fit.inter_bw == base.inter_bw and fit.source.startswith("fitted (")
