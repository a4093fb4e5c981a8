"""The plan keeps each implementation's forward bound to its call signature (Implementation.prepare):
made once per signature, run in forward()'s place, with or without autograd, and correct when a
later call brings other strides under the same key (CPU)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import flashdispatch as fd
from flashdispatch.backend import Capabilities, Gradients, Implementation, Inputs
from flashdispatch.plans import PLANS
from flashdispatch.reference import attention_math
from flashdispatch.registry import REGISTRY
from inputs import make_qkv, sdpa_switches


class _Bound(Implementation):
    """The float64 reference as a pair whose prepare() records the views it was bound to (the
    plan cache sends calls with other strides to forward())."""

    name: ClassVar[str] = "test:bound"
    backend: ClassVar[str] = "test"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.bound_to: list[tuple[tuple[int, ...], ...]] = []

    def capabilities(self, dev: Any) -> Capabilities:
        return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float64}))

    def forward(self, inp: Inputs, p: Any, config: dict[str, Any]):
        self.calls.append("forward")
        out, lse = attention_math(inp.q, inp.k, inp.v, causal=p.causal)
        return out.detach(), lse.detach().float()

    def prepare(self, inp: Inputs, p: Any, config: dict[str, Any]):
        self.calls.append("prepare")
        self.bound_to.append(tuple(t.shape for t in inp[:3]))

        def launch(inp2: Inputs):
            self.calls.append("launch")
            out, lse = attention_math(inp2.q, inp2.k, inp2.v, causal=p.causal)
            return out.detach(), lse.detach().float()

        return launch

    def backward(self, inp: Inputs, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, p: Any,
                 config: dict[str, Any]) -> Gradients:
        self.calls.append("backward")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v)]
            o, _ = attention_math(*leaves, causal=p.causal)
            return Gradients(*torch.autograd.grad(o, leaves, do))


@pytest.fixture
def bound():
    impl = _Bound()
    REGISTRY.register(impl)
    PLANS.refresh()
    try:
        yield impl
    finally:
        REGISTRY.unregister(impl.name)
        PLANS.refresh()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_the_plan_prepares_once_and_runs_the_bound_launch(bound: _Bound, layout: str) -> None:
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, dtype=torch.float64, layout=layout)
    for _ in range(3):
        out = fd.attention(q, k, v, causal=True, layout=layout, backend=bound.name)
    assert bound.calls == ["prepare", "launch", "launch", "launch"]
    assert bound.bound_to == [((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8))]  # bhsd views, as forward() gets them
    views = [t.transpose(1, 2) for t in (q, k, v)] if layout == "bshd" else [q, k, v]
    ref, _ = attention_math(*views, causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2) if layout == "bshd" else ref)


def test_other_strides_under_the_same_key_take_the_forward(bound: _Bound) -> None:
    """The plan key reads only the last stride: a second call whose other strides differ shares the
    plan, and the bound launch hands it to forward()."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, dtype=torch.float64)
    fd.attention(q, k, v, backend=bound.name)
    wide = torch.randn(1, 2, 9, 8, dtype=torch.float64)[:, :, :6]  # same shape, another head stride
    out = fd.attention(wide, k, v, backend=bound.name)
    assert bound.calls[0] == "prepare" and bound.calls.count("prepare") == 1
    assert bound.calls[-1] == "forward"
    torch.testing.assert_close(out, attention_math(wide, k, v)[0])


def test_the_bound_launch_serves_the_autograd_pair(bound: _Bound) -> None:
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        out = fd.attention(q, k, v, causal=True, backend=bound.name)
        do = torch.randn_like(out)
        q.grad = k.grad = v.grad = None
        out.backward(do)
    assert bound.calls == ["prepare", "launch", "backward", "launch", "backward"]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_math(*leaves, causal=True)
    ref.backward(do)
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        torch.testing.assert_close(got, want.grad)


def test_a_stand_in_runs_without_the_real_launch(bound: _Bound) -> None:
    """PLANS.running_instead (the host-cost tool's stand-in) drops the bound launch with the
    implementation it replaces, and the plan gets it back after."""
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float64)
    fd.attention(q, k, v, backend=bound.name)

    class _Stand:
        name = bound.name

        def run(self, q, k, v, p, config, *rest):
            assert not rest  # no launch of the real implementation handed over
            return q, None

    with PLANS.running_instead(bound, _Stand()):
        assert fd.attention(q, k, v, backend=bound.name) is q
    fd.attention(q, k, v, backend=bound.name)
    assert bound.calls == ["prepare", "launch", "launch"]


def test_an_implementation_without_prepare_runs_its_forward() -> None:
    """The base prepare() returns None: run() calls forward(), and an implementation that overrides
    run() with the older signature is never handed a launch."""

    class _Old(_Bound):
        name: ClassVar[str] = "test:old"

        def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
            return Implementation.prepare(self, inp, p, config)

        def run(self, q, k, v, p, config, extras=None):  # type: ignore[override]
            self.calls.append("run")
            return attention_math(q, k, v)[0], None

    impl = _Old()
    REGISTRY.register(impl)
    PLANS.refresh()
    try:
        q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float64)
        fd.attention(q, k, v, backend=impl.name)
        fd.attention(q, k, v, backend=impl.name)
        assert impl.calls == ["run", "run"]
    finally:
        REGISTRY.unregister(impl.name)
        PLANS.refresh()


@pytest.mark.parametrize("shape, causal, kw, binds", [
    ((2, 4, 2, 9, 9, 16), True, {}, True),  # square causal, GQA: is_causal and enable_gqa fixed once
    ((2, 4, 4, 1, 33, 16), True, {}, True),  # one query row sees every key: no mask
    ((2, 4, 4, 7, 7, 16), False, {}, True),
    ((2, 4, 4, 5, 9, 16), True, {}, False),  # bottom-right causal Sq < Sk: a mask, forward()
    ((2, 4, 4, 9, 9, 16), True, {"window": (3, 0)}, False),
    ((2, 4, 4, 9, 9, 16), False, {"softcap": 5.0}, False),
])
def test_plain_sdpa_binds_its_keywords_once_where_it_needs_no_mask(shape, causal, kw, binds) -> None:
    """sdpa's prepare(): torch's own call with the keywords fixed per signature, exactly forward()'s
    result; none for the calls that need a mask or a variant, and none for a pinned kernel."""
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float64)
    impl = REGISTRY.get("sdpa")
    p = fd.explain(q, k, v, causal=causal, backend="sdpa", **kw).problem
    inp = Inputs(q, k, v)
    launch = impl.prepare(inp, p, {})
    assert (launch is not None) == binds
    want = impl.forward(inp, p, {})[0]
    if binds:
        out, lse = launch(inp)
        assert lse is None and torch.equal(out, want)
        got = fd.attention(q, k, v, causal=causal, backend="sdpa", **kw)
        assert torch.equal(got, want)
    assert REGISTRY.get("sdpa:math").prepare(inp, p, {}) is None  # explicit math, never torch's call
    # a pinned kernel binds inside its switches (torch's CPU flash kernel: fp32)
    pin, inp32 = REGISTRY.get("sdpa:flash"), Inputs(q.float(), k.float(), v.float())
    p32 = p._replace(dtype=torch.float32)
    pinned = pin.prepare(inp32, p32, {})
    assert (pinned is not None) == binds
    if binds:
        assert torch.equal(pinned(inp32)[0], pin.forward(inp32, p32, {})[0])


def test_a_pinned_kernel_turns_only_its_switch_on_and_restores_every_one() -> None:
    """OnlyKernel: inside, exactly what torch's sdpa_kernel sets for the four GPU kernels; after,
    the switches as they were (a non-default state too), also when the block raises."""
    import torch.backends.cuda as sw
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashdispatch.backends.sdpa import OnlyKernel

    before = sdpa_switches()
    sw.enable_flash_sdp(False)  # a state that is not the default
    try:
        start = sdpa_switches()
        for kernel in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                       SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(kernel):
                want = sdpa_switches()
            with OnlyKernel(kernel):
                assert sdpa_switches() == want and sum(want) == 1
            assert sdpa_switches() == start
        with pytest.raises(RuntimeError), OnlyKernel(SDPBackend.MATH):
            raise RuntimeError("inside")
        assert sdpa_switches() == start
    finally:
        sw.enable_flash_sdp(before[0])
