"""The bound launches on a GPU (Implementation.prepare, docs/design.md): for triton:tl, triton:gluon
(sm_90) and cupy, a repeated attention() call runs the launch its plan bound without looking the
backend's plan up again, a call with other strides under the same key takes the looked-up path, and
every output and gradient stays within the float64 budget.

    pytest -m gpu tests/test_prepared_launch_gpu.py
"""

from __future__ import annotations

import pytest
import torch

import flashdispatch
from flashdispatch.registry import REGISTRY
from inputs import check_forward, check_grads, make_qkv, sdpa_switches

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _lookups(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Counts the backend's own plan lookups for `name` (triton:tl, triton:gluon, cupy)."""
    seen: list[int] = []

    def counting(mod: object, attr: str) -> None:
        real = getattr(mod, attr)

        def counted(*a: object, **kw: object) -> object:
            seen.append(1)
            return real(*a, **kw)

        monkeypatch.setattr(mod, attr, counted)

    if name == "cupy":
        from flashdispatch.backends.cupy import ops

        counting(ops, "_forward_plan")
    else:
        from flashdispatch.backends.triton import decode, forward, gluon_forward

        for mod in (forward, decode, gluon_forward):
            counting(mod, "cached_plan")
    return seen


def _usable(name: str) -> bool:
    # "triton:tl" is a pin of the "triton" implementation, not a registered name
    impl = REGISTRY.all().get(name) or REGISTRY.get(name.partition(":")[0])
    if impl.availability() is not None:
        return False
    q = torch.empty(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16)
    try:
        flashdispatch.explain(q, q, q, causal=True, backend=name)
    except flashdispatch.NoBackendError:
        return False
    return True


@pytest.mark.parametrize("name", ["triton:tl", "triton:gluon", "cupy"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_the_bound_launch_runs_exact_and_other_strides_look_up(name: str, layout: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if not _usable(name):
        pytest.skip(f"{name} cannot run on this GPU")
    flashdispatch.refresh()
    seen = _lookups(monkeypatch, name)
    q, k, v = make_qkv(2, 8, 2, 300, 300, 64, dtype=torch.bfloat16, device="cuda", layout=layout, seed=5)
    first = flashdispatch.attention(q, k, v, causal=True, layout=layout, backend=name)
    made = len(seen)
    again = flashdispatch.attention(q, k, v, causal=True, layout=layout, backend=name)
    assert len(seen) == made, "the repeated call looked the backend's plan up again"
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    check_forward(again, q, k, v, causal=True, layout=layout)
    # same shapes, dtypes and last strides, other head strides: the same plan key, another launch
    # (a view into a NaN-padded buffer at an odd offset: reading the first call's strides would fail)
    wide = make_qkv(2, 8, 2, 300, 300, 64, dtype=torch.bfloat16, device="cuda", layout=layout, seed=6,
                    noncontiguous=True)[0]
    out = flashdispatch.attention(wide, k, v, causal=True, layout=layout, backend=name)
    assert len(seen) > made
    check_forward(out, wide, k, v, causal=True, layout=layout)
    # with autograd: the pair's forward is the bound launch, the backward the implementation's own
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    check_grads(lambda a, b, c: flashdispatch.attention(a, b, c, causal=True, layout=layout, backend=name),
                qg, kg, vg, causal=True, layout=layout)


@pytest.mark.parametrize("name", ["sdpa", "sdpa:cudnn", "sdpa:flash", "sdpa:efficient"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_the_sdpa_bound_call_matches_its_forward_and_keeps_the_switches(name: str, layout: str) -> None:
    """The sdpa implementations' bound call (keywords fixed per signature, a pinned kernel inside its
    switches): the same output as forward() bit for bit, misaligned views copied as forward() does,
    torch's kernel switches as they were after every call, gradients within the float64 budget."""
    from flashdispatch.backend import Inputs, kernel_views

    if not _usable(name):
        pytest.skip(f"{name} cannot run on this GPU")

    before = sdpa_switches()
    flashdispatch.refresh()
    for seed, noncontiguous in ((5, False), (6, True)):  # the second: views at odd offsets into NaN-padded buffers
        q, k, v = make_qkv(2, 8, 2, 300, 300, 64, dtype=torch.bfloat16, device="cuda", layout=layout, seed=seed,
                           noncontiguous=noncontiguous)
        try:
            d = flashdispatch.explain(q, k, v, causal=True, layout=layout, backend=name)
        except flashdispatch.NoBackendError:
            pytest.skip(f"{name} declines GQA 8/2 here")
        impl = REGISTRY.get(d.variant)
        inp = Inputs(*kernel_views(q, k, v, d.problem))
        launch = impl.prepare(inp, d.problem, d.config)
        if impl.gqa_native:
            assert launch is not None, name
        if launch is not None:
            torch.testing.assert_close(launch(inp)[0], impl.forward(inp, d.problem, d.config)[0], rtol=0, atol=0)
        for _ in range(2):
            out = flashdispatch.attention(q, k, v, causal=True, layout=layout, backend=name)
        check_forward(out, q, k, v, causal=True, layout=layout)
        assert sdpa_switches() == before
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    check_grads(lambda a, b, c: flashdispatch.attention(a, b, c, causal=True, layout=layout, backend=name),
                qg, kg, vg, causal=True, layout=layout)
    assert sdpa_switches() == before
