"""Context parallelism over NCCL against float64 single-device attention: the ring on 2 GPUs, and
every strategy (ring, Ulysses, hybrid, auto) on every GPU of the machine (2-8).

Plainly (`pytest -m gpu tests/test_distributed_gpu.py`) it spawns its processes itself: 2 for the
ring's tests, one per GPU for the strategies'. Under torchrun each process takes the GPU of its
rank and the world is the launcher's (the ring's tests need 2 and skip otherwise):
    torchrun --nproc_per_node 2 -m pytest -m gpu tests/test_distributed_gpu.py
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist

import flashdispatch.distributed as fdd
from flashdispatch.distributed.comm import all_agree
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
from ranks import run_ranks

pytestmark = pytest.mark.gpu

WORLD = 2
TIMEOUT_S = 300
# (dtype, layout, causal, Hq, Hkv, full S, D): odd chunk lengths (S / 4), GQA, both layouts
CASES = [
    (torch.bfloat16, "bhsd", True, 4, 4, 4 * 253, 128),
    (torch.float16, "bshd", True, 8, 2, 4 * 301, 64),
    (torch.bfloat16, "bshd", False, 6, 3, 4 * 131, 72),
]


def _case_id(c: tuple) -> str:
    dt, layout, causal, hq, hkv, s, d = c
    return f"{str(dt).split('.')[-1]}-{layout}-{'causal' if causal else 'full'}-h{hq}/{hkv}-S{s}-D{d}"


class _Expected:
    """One case's full inputs (the same on every rank: the same seed), the float64 reference and the
    same-dtype baseline with their gradients, and the budget check of a sharded result against them."""

    def __init__(self, dt: torch.dtype, layout: str, causal: bool, batch: int, hq: int, hkv: int, s: int, d: int,
                 seed: int, device: torch.device) -> None:
        self.dt, self.device, self.sd = dt, device, 2 if layout == "bhsd" else 1
        g = torch.Generator(device=device).manual_seed(seed)

        def make(h: int) -> torch.Tensor:
            shape = (batch, h, s, d) if layout == "bhsd" else (batch, s, h, d)
            return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dt)

        self.q, self.k, self.v, self.do = make(hq), make(hkv), make(hkv), make(hq)
        self.kw: dict[str, Any] = dict(causal=causal, layout=layout)
        self.ref_in = [t.double().requires_grad_() for t in (self.q, self.k, self.v)]
        self.out_ref, self.lse_ref = attention_math(*self.ref_in, **self.kw)
        self.out_ref.backward(self.do.double())
        self.base_in = [t.clone().requires_grad_() for t in (self.q, self.k, self.v)]
        self.out_t, self.lse_t = attention_math(*self.base_in, upcast=False, **self.kw)
        self.out_t.backward(self.do)

    def local(self) -> list[torch.Tensor]:
        return [fdd.shard(t, self.sd).requires_grad_() for t in (self.q, self.k, self.v)]

    def gather(self, x: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
        return fdd.unshard(x.detach(), dim,
                           out=torch.full(like.shape, float("nan"), dtype=x.dtype, device=self.device))

    def check(self, out_l: torch.Tensor, lse_l: torch.Tensor, local: list[torch.Tensor]) -> dict[str, Any]:
        """out, lse and the three gradients of a sharded run, each within_budget's verdict."""
        dt, sd = self.dt, self.sd
        res: dict[str, Any] = {
            "out": within_budget(self.gather(out_l, sd, self.out_ref), self.out_t.detach(), self.out_ref.detach(), dt),
            "lse": within_budget(self.gather(lse_l, 2, self.lse_ref), self.lse_t.detach(), self.lse_ref.detach(), dt),
        }
        for name, loc, ref, base in zip(("dq", "dk", "dv"), local, self.ref_in, self.base_in):
            res[name] = within_budget(self.gather(loc.grad, sd, ref), base.grad, ref.grad, dt, grad=True)
        return res


def _run_case(case: tuple, seed: int, device: torch.device) -> dict[str, Any]:
    dt, layout, causal, hq, hkv, s, d = case
    e = _Expected(dt, layout, causal, 2, hq, hkv, s, d, seed, device)
    kw, sd = e.kw, e.sd
    local = e.local()
    out_l, lse_l = fdd.attention(*local, return_lse=True, strategy="ring", **kw)
    out_l.backward(fdd.shard(e.do, sd))
    torch.cuda.synchronize()
    res = e.check(out_l, lse_l, local)
    plan = fdd.explain(*(t.detach() for t in local), strategy="ring", **kw)
    res["plan"] = str(plan)
    res["blocks"] = fdd.ring_spec(*local, rank=dist.get_rank(), world=WORLD, scale=d ** -0.5, **kw).backward_path
    # the other block kernels, forced, on the same inputs: every path the ring can take is checked.
    # The forced run is a ring (collectives), so every rank must take this branch or none: each rank
    # chose its block kernels alone, and ranks that disagreed here would hang in the transfers.
    if all_agree(res["blocks"] == "cudnn"):
        for t in local:
            t.grad = None
        out_f, _ = fdd.attention(*local, return_lse=True, backend="triton", strategy="ring", **kw)
        out_f.backward(fdd.shard(e.do, sd))
        res["triton blocks out"] = within_budget(e.gather(out_f, sd, e.out_ref), e.out_t.detach(), e.out_ref.detach(),
                                                 dt)
        res["triton blocks dq"] = within_budget(e.gather(local[0].grad, sd, e.ref_in[0]), e.base_in[0].grad,
                                                e.ref_in[0].grad, dt, grad=True)
    return res


def _all_cases(rank: int, world: int = WORLD) -> dict[str, Any]:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return {_case_id(c): _run_case(c, 100 + i, device) for i, c in enumerate(CASES)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if dist.is_torchelastic_launched():
        # torchrun: this process is one rank; the other runs the same tests in the same order
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if dist.get_world_size() != WORLD:
            pytest.skip(f"needs {WORLD} ranks, torchrun gave {dist.get_world_size()}")
        return [_all_cases(dist.get_rank())]
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    return run_ranks(_all_cases, WORLD, tmp_path_factory.mktemp("nccl"), backend="nccl", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_ring_on_two_gpus_matches_single_device(reports: list[dict[str, Any]], case: tuple) -> None:
    failures = []
    for rep in reports:
        r = rep[_case_id(case)]
        print(r["plan"])
        print(f"{_case_id(case)}: blocks through {r['blocks']}")
        for name in ("out", "lse", "dq", "dk", "dv", "triton blocks out", "triton blocks dq"):
            if name not in r:
                continue
            ok, err, allowed = r[name]
            print(f"{_case_id(case)} {name}: error {err:.3g} allowed {allowed:.3g}")
            if not ok:
                failures.append(f"{name}: error {err:.3g} > allowed {allowed:.3g}")
    assert not failures, "\n".join(failures)


def test_ring_runs_cudnn_blocks_where_sdpa_is_chosen(reports: list[dict[str, Any]]) -> None:
    """bf16 MHA D=128 on an H100: the dispatcher picks SDPA (cuDNN) for the local problem, so the
    ring's blocks run cuDNN with lse (aten_cudnn) unless its self-check fails here."""
    from flashdispatch.distributed import aten_cudnn

    why = aten_cudnn.self_check(torch.device("cuda", 0), torch.bfloat16)
    if why:
        pytest.skip(f"cuDNN blocks unusable here: {why}")
    if "H100" not in torch.cuda.get_device_name(0):
        pytest.skip("the profile that picks SDPA for this case is the H100's")
    assert [rep[_case_id(CASES[0])]["blocks"] for rep in reports] == ["cudnn"] * len(reports)


# --- every strategy on every GPU of the machine ------------------------------------------------------

# (strategy, ulysses_size, dtype, layout, causal, Hq, Hkv, chunk (S = 2 * world * chunk), D): the
# benchmark's heads (32 / 8, D=128) in bf16, odd chunks; K/V repeat (Hkv=2 < U) in fp16; a hybrid
# case for every proper divisor U of the world (added per world in _strategy_cases).
STRATEGY_CASES = [
    ("ulysses", None, torch.bfloat16, "bhsd", True, 32, 8, 129, 128),
    ("ulysses", None, torch.float16, "bshd", False, 16, 2, 67, 64),
    ("ring", None, torch.bfloat16, "bshd", True, 32, 8, 129, 128),
    ("auto", None, torch.bfloat16, "bhsd", True, 32, 8, 257, 128),
]


def _strategy_cases(world: int) -> list[tuple]:
    hybrids = [("hybrid", u, torch.bfloat16, "bshd" if u % 4 else "bhsd", True, 32, 8, 129, 128)
               for u in range(2, world) if world % u == 0]
    return STRATEGY_CASES + hybrids


def _strategy_id(c: tuple) -> str:
    strategy, u, dt, layout, causal, hq, hkv, chunk, d = c
    us = f"-U{u}" if u else ""
    return (f"{strategy}{us}-{str(dt).split('.')[-1]}-{layout}-{'causal' if causal else 'full'}-h{hq}/{hkv}-"
            f"chunk{chunk}-D{d}")


def _run_strategy(case: tuple, seed: int, device: torch.device, world: int) -> dict[str, Any]:
    strategy, u, dt, layout, causal, hq, hkv, chunk, d = case
    e = _Expected(dt, layout, causal, 1, hq, hkv, 2 * world * chunk, d, seed, device)
    local = e.local()
    plan = fdd.explain(*(t.detach() for t in local), strategy=strategy, ulysses_size=u, needs_grad=True, **e.kw)
    out_l, lse_l = fdd.attention(*local, return_lse=True, strategy=strategy, ulysses_size=u, **e.kw)
    out_l.backward(fdd.shard(e.do, e.sd))
    torch.cuda.synchronize()
    res = e.check(out_l, lse_l, local)
    res["plan"] = str(plan)
    res["ran"] = (plan.strategy, plan.choice.ulysses_size)
    return res


def _all_strategies(rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return {_strategy_id(c): _run_strategy(c, 500 + i, device, world) for i, c in enumerate(_strategy_cases(world))}


@pytest.fixture(scope="module")
def strategy_reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if dist.is_torchelastic_launched():
        if not dist.is_initialized():
            dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=TIMEOUT_S))
        if dist.get_world_size() < 2:
            pytest.skip("needs 2 or more ranks")
        return [_all_strategies(dist.get_rank(), dist.get_world_size())]
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip(f"needs 2 or more GPUs, found {world}")
    return run_ranks(_all_strategies, world, tmp_path_factory.mktemp("nccl-cp"), backend="nccl", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("case", _strategy_cases(8), ids=[_strategy_id(c) for c in _strategy_cases(8)])
def test_every_strategy_on_every_gpu_matches_single_device(strategy_reports: list[dict[str, Any]],
                                                           case: tuple) -> None:
    """Cases of a hybrid size the world does not allow are skipped (the list is the 8-GPU one)."""
    cid = _strategy_id(case)
    if cid not in strategy_reports[0]:
        pytest.skip(f"{cid}: not a split of this world")
    failures = []
    for rank, rep in enumerate(strategy_reports):
        r = rep[cid]
        if rank == 0:
            print(r["plan"])
        strategy, u = case[0], case[1]
        ran_strategy, ran_u = r["ran"]
        if strategy != "auto" and (ran_strategy != strategy or (u is not None and ran_u != u)):
            failures.append(f"rank {rank}: asked {strategy} U={u}, planned {ran_strategy} U={ran_u}")
        for name in ("out", "lse", "dq", "dk", "dv"):
            ok, err, allowed = r[name]
            print(f"{cid} rank {rank} {name}: error {err:.3g} allowed {allowed:.3g}")
            if not ok:
                failures.append(f"rank {rank} {name}: error {err:.3g} > allowed {allowed:.3g}")
    assert not failures, "\n".join(failures)
