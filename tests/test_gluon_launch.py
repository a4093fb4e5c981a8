"""The Gluon forward's host path on the CPU, with a stand-in for the compiled kernel: one plan per
call signature, Triton's JIT only for the first (compiling, then checked) launches, then the
compiled launcher with light descriptor records that must say what Triton's TensorDescriptor says."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from flashdispatch.backends.triton import gluon_forward as gf  # noqa: E402
from flashdispatch.backends.triton import launch  # noqa: E402


def _layouts() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    bshd = torch.randn(2, 40, 8, 128, generator=g).to(torch.bfloat16).transpose(1, 2)  # (B, H, S, D) view
    return [
        ("bhsd", torch.randn(2, 8, 40, 128, generator=g).to(torch.bfloat16)),
        ("bshd", bshd),
        ("batch and heads of one", torch.randn(1, 1, 33, 64, generator=g).to(torch.float16)),
        ("head slice", torch.randn(1, 12, 50, 128, generator=g).to(torch.bfloat16)[:, 4:8]),
    ]


@pytest.mark.parametrize("name, t", _layouts(), ids=[n for n, _ in _layouts()])
def test_records_say_what_the_descriptor_says(name: str, t: torch.Tensor) -> None:
    desc = gf._descriptor(t, 64)
    rec = launch.HostDescriptor(t, *gf._box(t))
    # the compiled launcher reads exactly these four fields of either
    assert rec.base is desc.base
    assert list(rec.shape) == list(desc.shape) and list(rec.strides) == list(desc.strides)
    assert rec.padding == desc.padding
    assert desc.block_shape == [1, 1, 64, t.shape[3]]


class _Compiled:
    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def run(self, *a: Any) -> None:
        self.calls.append(a)


class _Jit:
    arg_names = list(gf._attn_fwd_kernel.arg_names)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.compiled = _Compiled()

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch_(*args: Any, **kwargs: Any) -> _Compiled:
            self.calls.append(args)
            return self.compiled
        return launch_


@pytest.fixture()
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> tuple[_Jit, list[int]]:
    jit = _Jit()
    launcher = launch.DirectLauncher(jit)
    checks: list[int] = []

    def agrees(*args: Any) -> bool:
        checks.append(1)
        return True

    monkeypatch.setattr(launcher, "agrees_with_jit", agrees)
    monkeypatch.setattr(launch.DirectLauncher, "_stream", staticmethod(lambda device: 77))
    monkeypatch.setattr(launch, "_current_stream", lambda: (lambda device: 77))
    monkeypatch.setattr(gf, "_LAUNCHER", launcher)
    monkeypatch.setattr(gf, "check_inputs", lambda q, k, v: None)  # meta tensors stand in for CUDA ones
    monkeypatch.setattr(gf, "_sm_count", lambda index: 132)
    monkeypatch.setattr(gf, "_l2_bytes", lambda index: 50 * 2**20)
    monkeypatch.setattr(gf, "_PLANS", {})
    return jit, checks


def _qkv(bshd: bool = False) -> tuple[torch.Tensor, ...]:
    if bshd:
        q = torch.empty(2, 300, 16, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
        kv = [torch.empty(2, 300, 4, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2) for _ in range(2)]
        return (q, *kv)
    q = torch.empty(2, 16, 300, 128, dtype=torch.bfloat16, device="meta")
    return (q, *(torch.empty(2, 4, 300, 128, dtype=torch.bfloat16, device="meta") for _ in range(2)))


@pytest.mark.parametrize("bshd", [False, True])
def test_jit_compiles_then_checked_launches_then_records(fake_kernel: tuple[_Jit, list[int]], bshd: bool) -> None:
    jit, checks = fake_kernel
    q, k, v = _qkv(bshd)
    for _ in range(3):  # compile (JIT), the checked direct launch, the direct launch that binds the kernel
        out, lse = gf.gluon_attention_forward(q, k, v, causal=True, scale=0.125)
    assert len(jit.calls) == 1 and len(gf._PLANS) == 1
    plan = next(iter(gf._PLANS.values()))
    assert plan.launch.kernel is jit.compiled and checks == [1]  # DirectLauncher's own check
    assert all(type(a).__name__ == "TensorDescriptor" for a in jit.calls[0][:4])

    jit.compiled.calls.clear()
    gf.gluon_attention_forward(q, k, v, causal=True, scale=0.125)  # records: checked once more, then trusted
    gf.gluon_attention_forward(q, k, v, causal=True, scale=0.125)
    assert checks == [1, 1] and plan.launch.checked and len(jit.calls) == 1
    call = jit.compiled.calls[-1]
    grid, stream, rest = call[:3], call[3], call[9:]
    num_tiles = 2 * 16 * -(-300 // (gf.HALF_M * gf.default_config(128)["CONSUMERS"]))
    assert grid == (min(132, num_tiles), 1, 1) and stream == 77
    records, lse_arg, scalars = rest[:4], rest[4], rest[5:13]
    assert all(isinstance(r, launch.HostDescriptor) for r in records)
    assert [tuple(r.base.shape) for r in records] == [tuple(t.shape) for t in (q, k, v)] + [tuple(q.shape)]
    assert [r.strides for r in records[:3]] == [gf._box(t)[1] for t in (q, k, v)]
    assert records[3].strides == gf._box(out)[1]  # the output keeps q's physical layout
    assert lse_arg.shape == (2, 16, 300)
    assert scalars == (300, 300, 16, 4, num_tiles, pytest.approx(0.125 * gf.LOG2E), 0, 0)
    cfg = gf.default_config(128)
    assert rest[13:] == (cfg["BLOCK_N"], 128, cfg["STAGES"], True, cfg["O_SEPARATE"], cfg["PINGPONG"],
                         cfg["CONSUMERS"], cfg["XTILE"], False, gf.ORDER_HEAD)


@pytest.mark.parametrize("causal, window, left, right, on", [
    (True, (255, 0), 255, 0, True),  # Mistral-style
    (True, (255, 9), 255, 0, True),  # causal sets right to 0
    (False, (3, -1), 3, 600, True),  # an unbounded side: Sk + Sq, past every key
    (False, (-1, 7), 600, 7, True),
    (True, (-1, 0), 0, 0, False),  # hides nothing beyond causal: the plain causal kernel
    (False, None, 0, 0, False),
])
def test_window_reaches_the_kernel(fake_kernel: tuple[_Jit, list[int]], causal: bool, window: Any, left: int,
                                   right: int, on: bool) -> None:
    jit, _ = fake_kernel
    q, k, v = _qkv()
    gf.gluon_attention_forward(q, k, v, causal=causal, scale=0.125, window=window)
    args = jit.calls[-1]
    assert args[11:13] == (left, right)
    plan = next(iter(gf._PLANS.values()))
    assert plan.launch.constexprs["WINDOW"] is on and plan.launch.constexprs["CAUSAL"] is causal


def test_softcap_and_sinks_are_refused(fake_kernel: tuple[_Jit, list[int]]) -> None:
    from flashdispatch.backends.triton.forward import Variant

    q, k, v = _qkv()
    with pytest.raises(ValueError, match="variant: the Gluon forward takes a window only"):
        gf._GluonPlan(q, k, v, True, 0.125, {}, Variant((-1, -1), 50.0, False))


def test_unaligned_layout_stays_on_the_checked_path(fake_kernel: tuple[_Jit, list[int]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    jit, _ = fake_kernel
    # D = 64 columns of a 68-wide buffer: a 136-byte row stride the copy engine cannot take
    q = torch.empty(1, 4, 100, 68, dtype=torch.float16, device="meta")[..., :64]
    k = torch.empty(1, 4, 100, 64, dtype=torch.float16, device="meta")
    copies: list[tuple[int, ...]] = []
    monkeypatch.setattr(gf, "_tma_ready", lambda t: (copies.append(tuple(t.stride())), t.contiguous())[1])
    for _ in range(4):
        gf.gluon_attention_forward(q, k, k, causal=False, scale=0.1)
    plan = next(iter(gf._PLANS.values()))
    assert plan.boxes is None and plan.launch.kernel is None
    assert len(copies) == 4 * 4  # every call prepares q, k, v and out for the copy engine
    assert not any(isinstance(a, launch.HostDescriptor) for c in jit.compiled.calls for a in c)


@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 1, 5, 64), (2, 3, 7, 128)])
def test_a_view_at_an_odd_address_is_copied_for_the_copy_engine(shape: tuple[int, ...]) -> None:
    # one element into a buffer: 2 bytes off the 16-byte grid; torch calls the (1, 1, 1, 64) view
    # contiguous, which is how it reached the copy engine unaligned on an H100
    n = 1
    for x in shape:
        n *= x
    t = torch.arange(n + 1, dtype=torch.float16)[1:].view(shape)
    assert t.data_ptr() % 16 and t.is_contiguous()
    ready = gf._tma_ready(t)
    assert ready.data_ptr() % 16 == 0 and gf._strides_ready(ready)
    assert torch.equal(ready, t)
    aligned = torch.zeros(shape, dtype=torch.float16)
    assert gf._tma_ready(aligned) is aligned


def test_a_failing_record_launch_goes_back_to_the_jit(fake_kernel: tuple[_Jit, list[int]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    jit, _ = fake_kernel
    q, k, v = _qkv()
    for _ in range(3):
        gf.gluon_attention_forward(q, k, v, causal=False, scale=0.1)

    def broken(*a: Any) -> None:
        raise TypeError("the launcher's interface moved")

    monkeypatch.setattr(jit.compiled, "run", broken)
    gf.gluon_attention_forward(q, k, v, causal=False, scale=0.1)
    assert not gf._LAUNCHER.enabled and len(jit.calls) == 2  # this call's result came from the JIT
    gf.gluon_attention_forward(q, k, v, causal=False, scale=0.1)
    assert len(jit.calls) == 3


def test_the_implementations_bound_launch_runs_its_plan_and_looks_up_other_strides(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """triton:gluon's prepare() as the plan cache keeps it (bound_forward): the plan made for the
    first call's tensors runs while the strides are the same; other strides go through
    gluon_attention_forward's lookup (a stand-in plan)."""
    from flashdispatch.backend import Inputs, bound_forward
    from flashdispatch.problem import problem_from_tensors
    from flashdispatch.registry import REGISTRY

    made: list[tuple[Any, ...]] = []
    ran: list[int] = []

    class _Plan:
        def __init__(self, q, k, v, causal, scale, config, variant) -> None:  # type: ignore[no-untyped-def]
            made.append((q.stride(), causal, scale, dict(config), variant))
            self.index = len(made)

        def run(self, q, k, v):  # type: ignore[no-untyped-def]
            ran.append(self.index)
            return q, None

    monkeypatch.setattr(gf, "_GluonPlan", _Plan)
    monkeypatch.setattr(gf, "_PLANS", {})
    q, k, v = (torch.randn(1, 4, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    p = problem_from_tensors(q, k, v, causal=True, scale=None, layout="bhsd", return_lse=False, window=(15, 0))
    launch_fn = bound_forward(REGISTRY.get("triton:gluon"), Inputs(q, k, v), p, {"STAGES": 3})
    assert made == [(q.stride(), True, p.scale, {"STAGES": 3}, gf.make_variant((15, 0), None, None))]
    q2 = torch.randn_like(q)
    assert launch_fn(Inputs(q2, k, v))[0] is q2 and ran == [1] and len(made) == 1
    wide = torch.randn(1, 4, 48, 64, dtype=torch.bfloat16)[:, :, :40]  # same shape, another head stride
    assert launch_fn(Inputs(wide, k, v))[0] is wide
    assert len(made) == 2 and ran == [1, 2] and made[1][0] == wide.stride()
