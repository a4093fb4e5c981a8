"""triton:gluon in the registry (CPU): what it serves and what it declines, with the reasons users
read; its configs are the kernel's own keys."""

from __future__ import annotations

import pytest

from flashdispatch.device import simulated_device
from flashdispatch.problem import problem_from_shape
from flashdispatch.registry import REGISTRY

pytest.importorskip("triton.experimental.gluon")


def _impl():
    return REGISTRY.get("triton:gluon")


@pytest.mark.parametrize("device", ["h100", "h200"])
def test_serves_hopper_problems(device: str) -> None:
    impl, dev = _impl(), simulated_device(device)
    assert impl.availability() is None
    for shape, causal in (((2, 16, 4, 1000, 1000, 128), True), ((4, 32, 32, 512, 8192, 128), True),
                          ((1, 8, 8, 1, 4096, 64), False), ((1, 4, 4, 300, 300, 256), False)):
        for dtype in ("bf16", "fp16"):
            p = problem_from_shape(shape, dtype=dtype, causal=causal, return_lse=True, needs_grad=True)
            assert impl.not_supported_reasons(p, dev) == [], (shape, dtype)


@pytest.mark.parametrize("device", ["h100", "h200"])
def test_serves_windows_in_the_kernel(device: str) -> None:
    """Sliding windows run in the kernel (Mistral's causal one, two-sided ones, Sq != Sk, GQA, with
    gradients through the Triton backward); the plan notes say the hidden blocks are skipped."""
    impl, dev = _impl(), simulated_device(device)
    caps = impl.capabilities(dev)
    assert caps.window and caps.fuses_variants and not caps.softcap and not caps.sinks
    for shape, causal, window in (((1, 32, 8, 16384, 16384, 128), True, (4095, 0)),
                                  ((2, 8, 8, 333, 777, 64), False, (50, 90)),
                                  ((1, 4, 2, 1027, 129, 256), True, (63, 0)),
                                  ((1, 4, 4, 500, 500, 128), False, (-1, 0))):
        p = problem_from_shape(shape, dtype="bf16", causal=causal, window=window, return_lse=True, needs_grad=True)
        assert p.has_window, (shape, window)
        assert impl.not_supported_reasons(p, dev) == [], (shape, window)
        notes = impl.plan_notes(p, dev, impl.default_config(p, dev))
        assert any("outside the window are skipped" in n for n in notes), notes


def test_declines_softcap_and_sinks_with_reasons() -> None:
    impl, h100 = _impl(), simulated_device("h100")
    p = problem_from_shape((1, 8, 8, 1000, 1000, 128), dtype="bf16", causal=True, softcap=50.0)
    assert any("softcap=50" in r for r in impl.not_supported_reasons(p, h100))
    p = problem_from_shape((1, 8, 8, 1000, 1000, 128), dtype="bf16", causal=True, window=(127, 0), sinks=True)
    reasons = impl.not_supported_reasons(p, h100)
    assert any("sinks" in r for r in reasons) and not any("window" in r for r in reasons), reasons


def test_declines_with_reasons() -> None:
    impl, h100 = _impl(), simulated_device("h100")
    p = problem_from_shape((1, 2, 2, 100, 100, 128), dtype="bf16")
    assert any("arch=sm_80" in r for r in impl.not_supported_reasons(p, simulated_device("a100")))
    assert any("device=cpu" in r for r in impl.not_supported_reasons(p, simulated_device("cpu")))
    assert any("device=rocm" in r for r in impl.not_supported_reasons(p, simulated_device("mi300x")))
    p = problem_from_shape((1, 2, 2, 100, 100, 96), dtype="bf16")
    assert any("head_dim=96" in r for r in impl.not_supported_reasons(p, h100))
    p = problem_from_shape((1, 2, 2, 100, 100, 64), dtype="fp32")
    assert any("dtype=fp32" in r for r in impl.not_supported_reasons(p, h100))


def test_configs_are_the_kernels_own() -> None:
    from flashdispatch.backends.triton import gluon_forward as gf

    impl, h200 = _impl(), simulated_device("h200")
    for d in gf.HEAD_DIMS:
        p = problem_from_shape((1, 16, 16, 4096, 4096, d), dtype="bf16", causal=True)
        space = impl.config_space(p, h200)
        assert space[0] == impl.default_config(p, h200) == gf.default_config(d, True, 4096, 4096)
        assert all(set(c) == gf.CONFIG_KEYS for c in space)
        assert len({tuple(sorted(c.items())) for c in space}) == len(space)
        notes = impl.plan_notes(p, h200, space[-1])
        assert notes and "Gluon forward" in notes[0]


def test_d64_consumer_count_follows_the_keys_a_row_sees() -> None:
    """D=64 takes three consumer warpgroups where rows see many keys (measured faster there) and two
    on short or short-causal rows and windows; the tuner tries both counts either way."""
    from flashdispatch.backends.triton import gluon_forward as gf

    impl, h100 = _impl(), simulated_device("h100")
    cases = [((1, 32, 32, 4096, 4096, 64), False, None, 3), ((1, 32, 32, 16384, 16384, 64), True, None, 3),
             ((1, 32, 32, 4096, 4096, 64), True, None, 2), ((16, 32, 32, 1024, 1024, 64), False, None, 2),
             ((16, 32, 32, 1024, 1024, 64), True, None, 2), ((4, 32, 32, 512, 8192, 64), True, None, 2),
             ((1, 32, 32, 16384, 16384, 64), True, (4095, 0), 2), ((1, 32, 32, 16384, 16384, 128), False, None, 2)]
    for shape, causal, window, consumers in cases:
        p = problem_from_shape(shape, dtype="bf16", causal=causal, window=window)
        cfg = impl.default_config(p, h100)
        assert cfg["CONSUMERS"] == consumers, (shape, causal, window, cfg)
        assert impl.plan_notes(p, h100, {})[0].startswith(f"Gluon forward: {consumers} consumer warpgroups")
        space = impl.config_space(p, h100)
        assert space[0] == cfg
        if shape[-1] == 64:
            assert {c["CONSUMERS"] for c in space} == {2, 3}
            # every config the tuner may pick is one the GPU tests run (tests/test_gluon_gpu.py)
            tested = [gf.resolve_config(64, o) for o in ({}, {"CONSUMERS": 3}, {"STAGES": 2}, {"STAGES": 4},
                                                         {"CONSUMERS": 3, "BLOCK_N": 64, "STAGES": 4},
                                                         {"XTILE": True})]
            assert all(c in tested for c in space), space
    # the bounds: a row block of at least C3_MIN_ROWS rows whose rows see C3_MIN_MEAN_KEYS keys on average
    assert gf.mean_visible_keys(True, 4096, 4096) == 4096 - 4095 / 2
    assert gf.mean_visible_keys(True, 8, 4) == 4 * 5 / 16
    assert gf.mean_visible_keys(False, 8, 4) == 4
    assert gf.default_config(64, False, gf.C3_MIN_ROWS, gf.C3_MIN_MEAN_KEYS)["CONSUMERS"] == 3
    assert gf.default_config(64, False, gf.C3_MIN_ROWS - 1, 10**6)["CONSUMERS"] == 2
    assert gf.default_config(64, False, 10**6, gf.C3_MIN_MEAN_KEYS - 1)["CONSUMERS"] == 2
    assert gf.default_config(64)["CONSUMERS"] == 2
