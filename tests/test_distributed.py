"""Ring attention on CPU: gloo, 2 and 4 processes, against single-process float64 attention
(strategy="ring" forced; tests/test_distributed_strategies.py covers Ulysses, the hybrid and the choice).

The schedule, the lse merge and the per-block backward are checked in this process; the ring itself
runs in spawned workers (one spawn per world size, every case inside it) that send their error
measurements back, so that each case still gets its own readable test id.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist

import flashdispatch as fd
import flashdispatch.distributed as fdd
from flashdispatch.distributed.block_backward import block_backward_math, softmax_delta
from flashdispatch.distributed.layout import check_divisible, ring_blocks
from flashdispatch.distributed.merge import merge_into
from flashdispatch.reference import attention_math, causal_mask
from flashdispatch.tolerances import within_budget
from inputs import make_qkv_do
from ranks import run_ranks

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
WORKER_TIMEOUT_S = 150


class Case(NamedTuple):
    dtype: str
    layout: str
    causal: bool
    hq: int
    hkv: int
    seq: int  # full sequence length
    d: int
    balanced: bool = True
    batch: int = 2

    @property
    def id(self) -> str:
        mode = "causal" if self.causal else "full"
        split = "" if self.balanced else "-contiguous"
        return f"{self.dtype}-{self.layout}-{mode}-h{self.hq}/{self.hkv}-S{self.seq}-D{self.d}{split}"


# Odd chunk lengths and head dims on purpose; every case crosses the ring in both directions.
CASES: dict[int, list[Case]] = {
    2: [
        Case("fp32", "bhsd", True, 2, 2, 4 * 17, 40),
        Case("fp32", "bshd", True, 4, 2, 4 * 13, 24),
        Case("fp32", "bhsd", False, 3, 1, 2 * 23, 16, balanced=False),
        Case("fp32", "bshd", False, 2, 2, 4 * 9, 72),
        Case("bf16", "bshd", True, 4, 1, 4 * 19, 32),
        Case("fp16", "bhsd", False, 2, 2, 4 * 11, 40),
        Case("fp16", "bhsd", True, 6, 3, 4 * 15, 24),
        Case("fp64", "bhsd", True, 2, 1, 4 * 9, 16),
    ],
    4: [
        Case("fp32", "bhsd", True, 4, 2, 8 * 7, 24),
        Case("bf16", "bshd", True, 2, 2, 8 * 9, 32),
        Case("fp32", "bshd", False, 2, 1, 4 * 11, 40, balanced=False),
        Case("fp16", "bhsd", True, 3, 3, 8 * 5, 16, batch=1),
    ],
}
# Cases run on sub-groups: world 1 (each rank alone) within 2 processes, two rings of 2 within 4.
SUBGROUP_CASES: dict[int, list[Case]] = {
    2: [Case("fp32", "bhsd", True, 2, 1, 2 * 11, 24)],
    4: [Case("fp32", "bshd", True, 4, 2, 4 * 13, 24)],
}
ERROR_CHECKS = ("shard-uneven", "unshard-out-shape", "causal-odd-local", "ranks-disagree", "kv-length")


def _budget_dtype(dtype: torch.dtype) -> torch.dtype:
    # The contract's lse is float32, so float64 inputs merge through float32 weights: they are held
    # to float32's budget, not float64's (documented in docs/distributed.md).
    return torch.float32 if dtype == torch.float64 else dtype


def _seq_dim(layout: str) -> int:
    return 2 if layout == "bhsd" else 1


def _run_case(case: Case, seed: int, group: Any) -> list[tuple[str, bool, float, float]]:
    dt = DTYPES[case.dtype]
    q, k, v, do = make_qkv_do(case.batch, case.hq, case.hkv, case.seq, case.seq, case.d, dtype=dt,
                              layout=case.layout, seed=seed)
    sd = _seq_dim(case.layout)
    kw = dict(causal=case.causal, layout=case.layout)

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_ref, lse_ref = attention_math(*ref_in, **kw)
    out_ref.backward(do.double())
    base_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_t, lse_t = attention_math(*base_in, upcast=False, **kw)
    out_t.backward(do)

    local = [fdd.shard(t, sd, group, balanced=case.balanced).requires_grad_() for t in (q, k, v)]
    do_local = fdd.shard(do, sd, group, balanced=case.balanced)
    out_l, lse_l = fdd.attention(*local, group=group, return_lse=True, strategy="ring", **kw)
    out_l.backward(do_local)

    def gather(x: torch.Tensor, dim: int, like: torch.Tensor) -> torch.Tensor:
        poisoned = torch.full(like.shape, float("nan"), dtype=x.dtype)
        return fdd.unshard(x.detach(), dim, group, balanced=case.balanced, out=poisoned)

    bd = _budget_dtype(dt)
    out_ref, lse_ref, out_t, lse_t = (t.detach() for t in (out_ref, lse_ref, out_t, lse_t))
    results = [
        ("out", *within_budget(gather(out_l, sd, out_ref), out_t, out_ref, bd)),
        ("lse", *within_budget(gather(lse_l, 2, lse_ref), lse_t, lse_ref, bd)),
    ]
    for name, loc, ref, base in zip(("dq", "dk", "dv"), local, ref_in, base_in):
        results.append((name, *within_budget(gather(loc.grad, sd, ref), base.grad, ref.grad, bd, grad=True)))
    out_dtype_ok = out_l.dtype == dt and tuple(out_l.shape) == tuple(local[0].shape)
    results.append(("out dtype/shape", out_dtype_ok, 0.0, 0.0))
    return results


def _expect_value_error(fn: Any, *fragments: str) -> tuple[bool, str]:
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        return all(f in msg for f in fragments), msg
    return False, "no ValueError"


def _error_checks(rank: int, world: int) -> dict[str, tuple[bool, str]]:
    x = torch.randn(1, 2, 4 * world + 2, 8)
    local_len = 7 if rank == 0 else 9
    odd = torch.randn(1, 2, 7, 8)
    return {
        "shard-uneven": _expect_value_error(
            lambda: fdd.shard(x, 2), f"x.size(2): expected a multiple of 2 * world = {2 * world}",
            f"got {4 * world + 2}"),
        "unshard-out-shape": _expect_value_error(
            lambda: fdd.unshard(odd[:, :, :6], 2, out=torch.empty(1)), "out: expected shape"),
        "causal-odd-local": _expect_value_error(
            lambda: fdd.attention(odd, odd, odd, causal=True), "expected an even number", "got 7"),
        "ranks-disagree": _expect_value_error(
            lambda: fdd.attention(*(torch.randn(1, 2, local_len, 8) for _ in range(3))),
            "expected the same local shapes", "rank 1: q(1, 2, 9, 8)"),
        "kv-length": _expect_value_error(
            lambda: fdd.attention(odd, odd[:, :, :6], odd[:, :, :6]), "k sequence length (local)", "got 6"),
    }


def _agree_checks(rank: int, world: int, subgroup: Any) -> dict[str, bool]:
    """all_agree over gloo: what each rank gets back (every rank must get the same)."""
    return {
        "all true": fdd.all_agree(True),
        "all false": fdd.all_agree(False),
        "only rank 0": fdd.all_agree(rank == 0),
        "all but the last": fdd.all_agree(rank != world - 1),
        "sub-group, all but the last": fdd.all_agree(rank != world - 1, subgroup),
    }


AGREE_EXPECTED: dict[int, dict[str, list[bool]]] = {
    # per check: what each rank must get back
    2: {"all true": [True] * 2, "all false": [False] * 2, "only rank 0": [False] * 2,
        "all but the last": [False] * 2,
        # sub-groups of one: each rank agrees with itself
        "sub-group, all but the last": [True, False]},
    4: {"all true": [True] * 4, "all false": [False] * 4, "only rank 0": [False] * 4,
        "all but the last": [False] * 4,
        # sub-groups {0, 1} (true on both: true) and {2, 3} (true, false: false on both)
        "sub-group, all but the last": [True, True, False, False]},
}


def _body(rank: int, world: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for i, case in enumerate(CASES[world]):
        report[case.id] = _run_case(case, 1000 + i, None)
    # sub-groups: new_group must be called by every rank, in the same order
    size = 1 if world == 2 else 2
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
    mine = groups[rank // size]
    for i, case in enumerate(SUBGROUP_CASES[world]):
        report["group-of-" + str(size) + "-" + case.id] = _run_case(case, 2000 + i, mine)
    report["errors"] = _error_checks(rank, world)
    report["agree"] = _agree_checks(rank, world, mine)
    return report


@pytest.fixture(scope="module")
def ring_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    return {world: run_ranks(_body, world, tmp_path_factory.mktemp(f"store{world}"), backend="gloo",
                             timeout_s=WORKER_TIMEOUT_S) for world in CASES}


def _all_ids() -> list[tuple[int, str]]:
    ids = [(w, c.id) for w, cs in CASES.items() for c in cs]
    for w, cs in SUBGROUP_CASES.items():
        size = 1 if w == 2 else 2
        ids += [(w, f"group-of-{size}-{c.id}") for c in cs]
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("world,case_id", _all_ids(), ids=[f"world{w}-{c}" for w, c in _all_ids()])
def test_ring_matches_single_process(ring_reports: dict[int, list[dict[str, Any]]], world: int, case_id: str) -> None:
    failures = []
    for rank, report in enumerate(ring_reports[world]):
        for name, ok, err, allowed in report[case_id]:
            if not ok:
                failures.append(f"rank {rank} {name}: error {err:.3g} > allowed {allowed:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # the module's spawned process groups
@pytest.mark.parametrize("world", sorted(CASES))
@pytest.mark.parametrize("check", ERROR_CHECKS)
def test_bad_inputs_rejected(ring_reports: dict[int, list[dict[str, Any]]], world: int, check: str) -> None:
    for rank, report in enumerate(ring_reports[world]):
        ok, msg = report["errors"][check]
        assert ok, f"rank {rank}: {msg}"


@pytest.mark.slow  # the module's spawned process groups
@pytest.mark.parametrize("world", sorted(CASES))
def test_all_agree_gives_every_rank_the_same_answer(ring_reports: dict[int, list[dict[str, Any]]], world: int) -> None:
    """all_agree (the guard before branches that run collectives): true on every rank only where
    the flag is true on every rank of the group, over the world and over sub-groups."""
    got = {check: [report["agree"][check] for report in ring_reports[world]] for check in AGREE_EXPECTED[world]}
    assert got == AGREE_EXPECTED[world]


# --- in-process checks: schedule, merge, per-block backward --------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_schedule_covers_the_mask_exactly_once_with_equal_work(world: int, causal: bool) -> None:
    chunk = 3
    seq = 2 * world * chunk
    pos = [fdd.layout.global_positions(seq, r, world) for r in range(world)]
    hits = torch.zeros(seq, seq, dtype=torch.int64)
    work = []
    for r in range(world):
        pairs = 0
        for blk in ring_blocks(r, world, 2 * chunk, causal):
            qi = pos[r][blk.q_rows]
            kj = pos[blk.src][blk.kv_rows]
            m = causal_mask(len(qi), len(kj)) if blk.causal else torch.ones(len(qi), len(kj), dtype=torch.bool)
            hits[qi.unsqueeze(1), kj.unsqueeze(0)] += m.long()
            pairs += int(m.sum())
        work.append(pairs)
    want = causal_mask(seq, seq).long() if causal else torch.ones(seq, seq, dtype=torch.int64)
    assert torch.equal(hits, want)
    assert len(set(work)) == 1, f"unequal work per rank: {work}"


def test_positions_invert_the_layout() -> None:
    for world in (1, 2, 4):
        allpos = torch.cat([fdd.layout.global_positions(40, r, world) for r in range(world)])
        assert torch.equal(allpos.sort().values, torch.arange(40))
    assert fdd.layout.global_positions(8, 1, 2).tolist() == [2, 3, 4, 5]


def test_check_divisible_names_argument_expected_and_got() -> None:
    with pytest.raises(ValueError, match=r"x.size\(1\): expected a multiple of 2 \* world = 8 .*got 12"):
        check_divisible(12, 4, True, "x.size(1)")
    with pytest.raises(ValueError, match=r"n: expected a multiple of world = 4, got 10"):
        check_divisible(10, 4, False, "n")


def test_merge_is_exact_and_stable_with_rows_that_see_nothing() -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 16, generator=g, dtype=torch.float64)
    # Sq=9 > Sk=5 under bottom-right causal: rows 0..3 see nothing at all, others see part of block 1
    out_ref, lse_ref = attention_math(q, k, v, causal=True)
    full_mask = causal_mask(9, 5)
    parts = []
    for cols in (slice(0, 2), slice(2, 5)):
        s = (q @ k[:, :, cols].transpose(-1, -2)) / 4.0
        s = s.masked_fill(~full_mask[:, cols], float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        parts.append((p @ v[:, :, cols], lse))
    out = torch.full_like(out_ref, float("nan"))
    lse = torch.full_like(lse_ref, float("nan"))
    out.copy_(parts[0][0])
    lse.copy_(parts[0][1])
    merge_into(out, lse, *parts[1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[:, :, :4]).all() and (out[:, :, :4] == 0).all()
    assert torch.allclose(out, out_ref, atol=1e-12) and torch.allclose(lse, lse_ref, atol=1e-12)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_backward_math_sums_to_full_gradients(hq: int, hkv: int, causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split the keys into two blocks: block gradients with the global out/lse add up to the full ones."""
    import flashdispatch.distributed.block_backward as bb

    monkeypatch.setattr(bb, "MATH_CHUNK_ELEMENTS", 64)  # force several row chunks
    g = torch.Generator().manual_seed(11)
    sq, d = 13, 24
    q, k, v, do = (torch.randn(2, h, sq, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention_math(*leaves, causal=causal)
    out.backward(do)
    delta = softmax_delta(do, out.detach())
    split = 6
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    # keys [0:6) are fully visible to rows >= 5 only under causal: use the diagonal block for [6:13)
    # by treating rows [6:13) x keys [6:13) as a causal square and rows x keys [0:6) through a mask
    # that the math path gets from its own bottom-right rule when Sq == Sk.
    if causal:
        blocks = [(slice(0, split), slice(0, split), True), (slice(split, sq), slice(split, sq), True),
                  (slice(split, sq), slice(0, split), False)]
    else:
        blocks = [(slice(0, sq), slice(0, split), False), (slice(0, sq), slice(split, sq), False)]
    for rows, cols, blk_causal in blocks:
        a, b, c = block_backward_math(do[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                      lse[:, :, rows].detach(), delta[:, :, rows], causal=blk_causal, scale=d ** -0.5)
        dq[:, :, rows] += a
        dk[:, :, cols] += b
        dv[:, :, cols] += c
    for got, leaf in zip((dq, dk, dv), leaves):
        assert torch.allclose(got, leaf.grad, atol=1e-10), float((got - leaf.grad).abs().max())


def test_explain_plans_without_a_process_group() -> None:
    q = torch.randn(1, 4, 10, 16)
    k = v = torch.randn(1, 2, 10, 16)
    plan = fdd.explain_ring(q, k, v, causal=True, world_size=4, rank=1)
    assert [s.block.src for s in plan.steps] == [1, 0, 3, 2]
    assert plan.steps[0].block.causal and not any(s.block.causal for s in plan.steps[1:])
    assert all(s.decision.variant == "sdpa:math" for s in plan.steps)  # the CPU backend with lse
    text = str(plan)
    assert "q[5:10] x kv[0:10] full" in text and "backward per block: torch ops" in text
    with pytest.raises(ValueError, match="expected an even number"):
        fdd.explain_ring(q[:, :, :9], k[:, :, :9], v[:, :, :9], causal=True, world_size=2, rank=0)


def test_attention_without_process_group_names_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    t = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="group: expected an initialized torch.distributed process group"):
        fdd.attention(t, t, t)


_TRITON_BLOCK_CHECK = r"""
import json, torch
from flashdispatch.distributed.block_backward import block_backward, block_backward_math, softmax_delta
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
g = torch.Generator().manual_seed(5)
res = {}
for causal, hq, hkv in ((False, 2, 2), (True, 4, 2)):
    s, d = 24, 32
    q, k, v, do = (torch.randn(1, h, s, d, generator=g) for h in (hq, hkv, hkv, hq))
    out, lse = attention_math(q, k, v, causal=causal)
    out, lse = out.float(), lse.float()
    # a ring block: the last rows against the first keys (unmasked), and the whole causal square
    for name, rows, cols, blk_causal in (("split", slice(8, s), slice(0, 8), False), ("square", slice(0, s), slice(0, s), causal)):
        args = [t[:, :, r] for t, r in ((do, rows), (q, rows), (k, cols), (v, cols))]
        got = block_backward("triton", None, *args, out[:, :, rows], lse[:, :, rows], None, causal=blk_causal, scale=d ** -0.5)
        ref = block_backward_math(*(a.double() for a in args), lse[:, :, rows].double(),
                                  softmax_delta(do, out)[:, :, rows].double(), causal=blk_causal, scale=d ** -0.5)
        base = block_backward_math(*args, lse[:, :, rows], softmax_delta(do, out)[:, :, rows], causal=blk_causal, scale=d ** -0.5)
        for gname, a, r, b in zip(("dq", "dk", "dv"), got, ref, base):
            res[f"causal={causal}-h{hq}/{hkv}-{name}-{gname}"] = within_budget(a, b, r, torch.float32, grad=True)
print(json.dumps(res))
"""


@pytest.mark.slow
def test_triton_block_backward_takes_global_out_and_lse() -> None:
    """The triton backend's functional backward, as the ring calls it on a GPU (a block of rows and
    keys with the whole row's out and lse), against the torch-ops block backward: under Triton's
    CPU interpreter, in a child process so that no other test sees the interpreter."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_BLOCK_CHECK], env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in res.items() if not v[0]}
    assert len(res) == 12 and not bad, bad


def test_cudnn_blocks_only_where_sdpa_is_chosen_on_cuda() -> None:
    from flashdispatch.distributed import aten_cudnn

    q = torch.randn(1, 4, 64, 128, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    assert "chose triton" in aten_cudnn.blocks_reason(q, k, v, "triton")
    assert aten_cudnn.blocks_reason(q, k, v, "sdpa") == "device cpu: cuDNN blocks need CUDA"
    spec = fdd.ring_spec(q, k, v, rank=0, world=2, causal=True, scale=128 ** -0.5, layout="bhsd")
    assert spec.backward_path != "cudnn" and not spec.aten_cudnn


def test_cudnn_blocks_reason_names_the_problem_before_the_device() -> None:
    """On meta tensors (no device could run them) each problem the private path cannot take is
    named for itself, not as "need CUDA": the problem's checks come before the device's."""
    from flashdispatch.distributed import aten_cudnn

    def meta(hq: int, hkv: int, d: int, dv: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
        return [torch.empty(1, h, 64, e, dtype=dtype, device="meta") for h, e in ((hq, d), (hkv, d), (hkv, dv))]

    assert aten_cudnn.blocks_reason(*meta(4, 2, 128, 128), "sdpa:cudnn") == (
        "GQA (Hq=4, Hkv=2): the private op path is MHA only")
    assert aten_cudnn.blocks_reason(*meta(4, 4, 128, 128, torch.float32), "sdpa") == (
        "dtype torch.float32: cuDNN blocks take fp16/bf16")
    for d, dv in ((256, 256), (72, 64), (60, 60)):
        why = aten_cudnn.blocks_reason(*meta(4, 4, d, dv), "sdpa")
        assert why == f"head dims D={d}, Dv={dv}: cuDNN blocks take D == Dv, a multiple of 8, at most 128"
    # a problem the path takes: only then the device
    assert aten_cudnn.blocks_reason(*meta(4, 4, 128, 128), "sdpa") == "device meta: cuDNN blocks need CUDA"


def test_cudnn_blocks_only_on_sm90_with_cudnn_sdpa_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device gate, on a CUDA device faked on the CPU: cuDNN SDPA enabled in torch, and
    compute capability 9 (the H100, the only place the path was measured)."""
    from flashdispatch.distributed import aten_cudnn

    cuda0 = torch.device("cuda", 0)
    capability = {"cap": (9, 0)}
    enabled = {"on": True}
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: enabled["on"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cap"])
    assert aten_cudnn.device_reason(cuda0) is None
    capability["cap"] = (8, 0)
    assert aten_cudnn.device_reason(cuda0) == (
        "cuDNN ring blocks measured only on sm90 (H100); this device is sm80")
    capability["cap"] = (10, 0)
    assert "this device is sm100" in aten_cudnn.device_reason(cuda0)
    capability["cap"] = (9, 0)
    enabled["on"] = False
    assert aten_cudnn.device_reason(cuda0) == (
        "cuDNN SDPA is disabled in torch (torch.backends.cuda.cudnn_sdp_enabled() is False)")
    assert aten_cudnn.device_reason(torch.device("cpu")) == "device cpu: cuDNN blocks need CUDA"


def test_cudnn_blocks_reason_runs_every_gate_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """blocks_reason past the problem's checks: the device gate, torch's gate on the blocks, then
    the cached self-check, each only when the one before passes (the later ones are patched here:
    the CPU has no CUDA device)."""
    from flashdispatch.distributed import aten_cudnn

    q = torch.empty(1, 4, 64, 128, dtype=torch.bfloat16, device="meta")
    calls: list[str] = []
    verdicts = {"device": None, "blocks": None, "self": None}

    def gate(name: str):  # type: ignore[no-untyped-def]
        def f(*args: Any, **kw: Any) -> str | None:
            calls.append(name)
            return verdicts[name]
        return f

    monkeypatch.setattr(aten_cudnn, "device_reason", gate("device"))
    monkeypatch.setattr(aten_cudnn, "sdpa_block_reason", gate("blocks"))
    monkeypatch.setattr(aten_cudnn, "_checked", gate("self"))
    monkeypatch.setattr(aten_cudnn, "device_index", lambda device: 0)
    assert aten_cudnn.blocks_reason(q, q, q, "sdpa:cudnn") is None and calls == ["device", "blocks", "self"]
    for failing, expected_calls in (("self", 3), ("blocks", 2), ("device", 1)):
        calls.clear()
        verdicts[failing] = f"{failing} says no"
        assert aten_cudnn.blocks_reason(q, q, q, "sdpa") == f"{failing} says no"
        assert len(calls) == expected_calls


def test_torch_cudnn_gate_is_asked_once_per_block_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """sdpa_block_reason asks torch.backends.cuda.can_use_cudnn_attention about each distinct
    (rows, keys, causal) block of the ring, and names the block it refuses."""
    from flashdispatch.distributed import aten_cudnn

    asked: list[tuple[int, int, bool, bool]] = []

    class Params:
        def __init__(self, q, k, v, mask, dropout, causal, gqa):  # type: ignore[no-untyped-def]
            self.sq, self.sk, self.causal = q.shape[2], k.shape[2], causal

    def can_use(p: Params, debug: bool) -> bool:
        asked.append((p.sq, p.sk, p.causal, debug))
        return p.sk > 1  # like cuDNN: no key/value sequence of length 1

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", Params)
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", can_use)
    q = torch.randn(1, 2, 8, 16)
    # rank 1 of 4, causal: its own square, two blocks against the first half of the keys, one of
    # the last queries against all keys
    assert aten_cudnn.sdpa_block_reason(q, q, q, ring_blocks(1, 4, 8, True)) is None
    assert asked == [(8, 8, True, False), (8, 4, False, False), (4, 8, False, False)]
    asked.clear()
    # a causal local slice of 2 rows: one key per half, which cuDNN refuses
    why = aten_cudnn.sdpa_block_reason(q[:, :, :2], q[:, :, :2], q[:, :, :2], ring_blocks(1, 2, 2, True))
    assert why == ("torch's SDPA would not run cuDNN on block q[0:2] x kv[0:1] full (Sq=2, Sk=1): "
                   "torch.backends.cuda.can_use_cudnn_attention is False; its debug=True says why")
    assert asked == [(2, 2, True, False), (2, 1, False, False)]  # stops at the first refusal
    # no blocks given: the whole local problem as one unmasked block
    asked.clear()
    assert aten_cudnn.sdpa_block_reason(q, q, q) is None and asked == [(8, 8, False, False)]

    def broken(*args: Any) -> None:
        raise TypeError("SDPAParams() takes 8 arguments")

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", broken)
    assert aten_cudnn.sdpa_block_reason(q, q, q) == (
        "torch.backends.cuda.can_use_cudnn_attention failed: TypeError: SDPAParams() takes 8 arguments")


def test_torch_cudnn_gate_refuses_cpu_tensors() -> None:
    """The real torch gate (whatever this torch build is): CPU tensors are never cuDNN's."""
    from flashdispatch.distributed import aten_cudnn

    if not hasattr(torch.backends.cuda, "can_use_cudnn_attention"):
        pytest.skip("this torch has no can_use_cudnn_attention")
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    why = aten_cudnn.sdpa_block_reason(q, q, q, ring_blocks(0, 2, 8, True))
    assert why is not None and why.startswith("torch's SDPA would not run cuDNN on block q[0:8] x kv[0:8] causal")


def test_block_backward_pair_comes_from_selection() -> None:
    """The ring's per-block backward is the pair of the implementation selection picks for the local
    problem with a gradient and its lse (as any caller's), not a backend named in the ring."""
    from flashdispatch.distributed.block_backward import block_pair
    from flashdispatch.registry import REGISTRY

    pytest.importorskip("triton")
    for device in ("h100", "h200"):
        d = fd.explain(shape=(1, 8, 8, 4096, 4096, 128), device=device, causal=True, needs_grad=True,
                       return_lse=True)
        name, config = block_pair(d)
        pair = REGISTRY.get(d.variant).lse_pair()
        assert pair is not None and name == pair.name and pair.has_backward, (device, d.variant, name)
        assert config == (dict(d.config) or None)
    # a decision for an implementation without a backward pair of its own: torch ops
    d = fd.explain(shape=(1, 2, 2, 64, 64, 32), causal=True, needs_grad=True, return_lse=True, backend="sdpa:math")
    assert REGISTRY.get("sdpa:math").lse_pair() is None and block_pair(d) == ("math", None)


def test_a_forced_backend_without_a_pair_leaves_the_ring_backward_to_the_dispatcher() -> None:
    """backend='sdpa' (or one that cannot serve the block with its lse) for the ring's forward does
    not turn its backward into torch ops where the dispatcher has a kernel pair for it."""
    from flashdispatch.distributed.block_backward import pick_block_pair

    pytest.importorskip("triton")

    def decide(forced):  # type: ignore[no-untyped-def]
        return fd.explain(shape=(1, 8, 2, 4096, 4096, 128), device="h100", causal=True, needs_grad=True,
                          return_lse=True, backend=forced)

    unforced = decide(None).variant
    for forced in ("sdpa", "sdpa:math", "sdpa:flash", None):
        path, _ = pick_block_pair(decide, forced)
        assert path == fd.registry.REGISTRY.get(unforced).lse_pair().name, forced  # type: ignore[union-attr]
    assert pick_block_pair(decide, "cupy")[0] in ("cupy", unforced)  # its own pair where it serves

    def fp64(forced):  # type: ignore[no-untyped-def]
        return fd.explain(shape=(1, 2, 2, 64, 64, 32), dtype="fp64", device="h100", needs_grad=True,
                          return_lse=True, backend=forced)

    # triton cannot serve fp64 (NoBackendError), and what can (sdpa:math) has no pair: torch ops
    assert pick_block_pair(fp64, "triton") == ("math", None)
