"""cupy backend without a GPU: every selectable kernel compiles with nvcc for sm_80 and sm_90,
the configs are consistent, and a missing CuPy makes the backend "unavailable" with a reason."""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import pytest
import torch

from flashdispatch.backends.cupy import configs
from flashdispatch.backends.cupy.configs import KernelSpec
from flashdispatch.backends.cupy.impl import CupyAttention
from flashdispatch.backends.cupy.kernels import header_text, module_source
from flashdispatch.device import simulated_device
from flashdispatch.problem import problem_from_shape
from flashdispatch.registry import REGISTRY
from flashdispatch.tools import nvcc_check

MAX_SPILL_BYTES = 128
needs_nvcc = pytest.mark.skipif(nvcc_check.find_nvcc() is None, reason="nvcc not on PATH")


def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _compiled(arch: str) -> nvcc_check.NvccResult:
    """One nvcc per arch and process, shared by the two tests below (under -n, a worker compiles only
    the archs of the tests it runs)."""
    return nvcc_check.check_arch(arch, ("sm_80", "sm_90"))


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_selectable_kernels_compile(arch: str) -> None:
    r = _compiled(arch)
    assert r.ok, r.log[-3000:]
    cc = int(arch[3:])
    want = {s.symbol for s in nvcc_check.selectable_specs(("sm_80", "sm_90")) if configs.fits(s, cc)}
    assert want <= set(r.kernels), f"missing from ptxas report: {sorted(want - set(r.kernels))[:5]}"
    defaults = {
        s.symbol for d in configs.HEAD_DIMS for s in configs.specs_for([configs.default_config(d, cc)], [d])
    }
    # ptxas sometimes parks a few words in local memory (seen: 8 bytes for dK/dV D=96 on sm_80;
    # 104 bytes for dK/dV D=64 32x128w4 non-causal on sm_90, which still measured fastest on an
    # H100, docs/cupy.md); what matters is that no default config spills its accumulators.
    spilling = [k.symbol for k in r.kernels.values() if k.symbol in defaults and k.spill_bytes > MAX_SPILL_BYTES]
    assert not spilling, f"default configs spill registers on {arch}: {spilling}"


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_variant_kernels_compile(arch: str) -> None:
    """Window / softcap / sinks instantiations compile and keep their accumulators in registers."""
    r = _compiled(arch)
    assert r.ok, r.log[-3000:]
    want = {s.symbol for s in nvcc_check.variant_specs(("sm_80", "sm_90")) if configs.fits(s, int(arch[3:]))}
    assert want and want <= set(r.kernels), f"missing: {sorted(want - set(r.kernels))[:5]}"
    spilling = [k.symbol for k in r.kernels.values() if k.symbol in want and k.spill_bytes > MAX_SPILL_BYTES]
    assert not spilling, f"variant kernels spill registers on {arch}: {spilling}"


def test_variant_specs_are_distinct_kernels() -> None:
    base = configs.fwd_spec(128, "bf16", True, configs.default_config(128))
    every = configs.fwd_spec(128, "bf16", True, configs.default_config(128), window=True, softcap=True, sinks=True)
    assert base.symbol == "fd_fwd_d128_m128_n64_w4_c_bf16" and every.symbol == base.symbol + "_win_cap_sink"
    assert "true, true, true>" in module_source([every]) and "true, false, false, false>" in module_source([base])
    bad = KernelSpec("bwd_dq", 128, "bf16", True, 128, 32, 4, sinks=True)
    assert any("sinks" in p for p in bad.problems())


def test_window_arguments_take_a_canonical_form() -> None:
    from flashdispatch.backends.cupy.ops import _UNBOUNDED_MARGIN, _check_softcap, _mask

    big_l, big_r = 900 + _UNBOUNDED_MARGIN, 700 + _UNBOUNDED_MARGIN
    assert _mask(700, 900, False, -1, -1) == (False, False, big_l, big_r)  # no window: plain kernel
    assert _mask(700, 900, False, -1, 0) == (True, False, big_l, big_r)  # right = 0 is causal
    assert _mask(700, 900, True, 255, 7) == (True, True, 255, big_r)  # causal bounds the right
    assert _mask(700, 900, False, 10**9, 3) == (False, True, big_l, 3)  # wider than the keys: no bound
    assert _mask(1, 900, True, -1, -1) == (False, False, big_l, 1 + _UNBOUNDED_MARGIN)  # one query
    assert _mask(1, 900, False, 5, -1).window
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="window_left"):
            _mask(10, 10, False, bad, -1)
    with pytest.raises(ValueError, match="window_right"):
        _mask(10, 10, False, -1, -3)
    with pytest.raises(ValueError, match="window: supported for Sq"):
        _mask(2**29, 2**29, False, 5, -1)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            _check_softcap(bad)
    assert _check_softcap(0) == 0.0 and _check_softcap(30) == 30.0


@needs_nvcc
def test_object_compile_of_each_kernel_kind() -> None:
    """nvcc -c (host + device object) as well as --cubin."""
    specs = configs.specs_for([configs.default_config(64)], [64], ["bf16"], [True])
    r = nvcc_check.nvcc_compile(module_source(specs), "sm_80", mode="object")
    assert r.ok, r.log[-3000:]
    assert {s.symbol for s in specs} <= set(r.kernels)


def test_source_has_no_host_headers() -> None:
    """NVRTC has no host headers: the .cuh must include nothing."""
    assert "#include" not in header_text()


def test_parse_ptxas() -> None:
    log = (
        "ptxas info    : Compiling entry function 'fd_x' for 'sm_90'\n"
        "ptxas info    : Function properties for fd_x\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    k = nvcc_check.parse_ptxas(log)["fd_x"]
    assert (k.registers, k.stack_bytes, k.spill_bytes) == (255, 8, 8)


@pytest.mark.parametrize("cc", [80, 86, 90])
@pytest.mark.parametrize("d", configs.HEAD_DIMS)
def test_defaults_valid_and_fit(d: int, cc: int) -> None:
    cfg = configs.default_config(d, cc)
    assert all(k in cfg for k in configs.FWD_KEYS)
    specs = configs.specs_for([cfg], [d])
    assert specs and all(configs.fits(s, cc) for s in specs)
    assert (d in configs.BACKWARD_HEAD_DIMS) == any(s.kind == "bwd_dkdv" for s in specs)


@pytest.mark.parametrize("cc", [80, 86, 90])
def test_config_space_fits_shared_memory(cc: int) -> None:
    for d in configs.HEAD_DIMS:
        space = configs.config_space(d, cc, backward=True)
        assert configs.default_config(d, cc) in space or space
        for cfg in space:
            for s in configs.specs_for([cfg], [d], ["fp16"], [False]):
                assert s.smem_bytes() <= configs.smem_limit(cc), (d, cfg, s)
                assert not s.problems(), (d, cfg, s.problems())


def test_spec_problems_name_what_is_wrong() -> None:
    bad = KernelSpec("fwd", 64, "fp16", False, 96, 64, 4)
    assert any("multiple of 16 * WARPS = 64" in p for p in bad.problems())
    assert any("head_dim=80" in p for p in KernelSpec("fwd", 80, "fp16", False, 64, 64, 4).problems())
    with pytest.raises(ValueError, match="unknown keys"):
        configs.parse_config({"BLOCK_K": 3}, 64)
    with pytest.raises(ValueError, match="BLOCK_M: expected an int"):
        configs.parse_config({"BLOCK_M": "128"}, 64)
    dq = configs.bwd_specs(64, "fp16", True, {**configs.default_config(64), "DQ_BLOCK_M": 128,
                                                 "DQ_BLOCK_N": 16, "DQ_WARPS": 4})[1]
    assert (dq.kind, dq.block_m, dq.block_n, dq.warps) == ("bwd_dq", 128, 16, 4)
    with pytest.raises(ValueError, match="kernel spec"):
        module_source([bad])


def test_capabilities_and_reasons() -> None:
    impl = CupyAttention()
    h100 = simulated_device("h100")
    ok = problem_from_shape((2, 8, 2, 100, 300, 128), dtype="bf16", causal=True, return_lse=True, needs_grad=True)
    assert impl.not_supported_reasons(ok, h100) == []
    p = problem_from_shape((1, 2, 2, 10, 10, 80), dtype="fp16")
    assert any("head_dim=80" in r for r in impl.not_supported_reasons(p, h100))
    p = problem_from_shape((1, 2, 2, 10, 10, 256), dtype="fp16", needs_grad=True)
    assert any("requires_grad with head_dim=256" in r for r in impl.not_supported_reasons(p, h100))
    p = problem_from_shape((70000, 2, 2, 10, 10, 64), dtype="fp16")
    assert any("CUDA grid limit" in r for r in impl.not_supported_reasons(p, h100))
    p = problem_from_shape((1, 2, 2, 10, 10, 64), dtype="fp32")
    assert any("dtype=fp32" in r for r in impl.not_supported_reasons(p, h100))
    assert any("device=cpu" in r for r in impl.not_supported_reasons(p, simulated_device("cpu")))
    assert any("rocm" in r for r in impl.not_supported_reasons(p, simulated_device("mi300x")))
    space = impl.config_space(ok, h100)
    required = set(configs.FWD_KEYS + configs.BWD_KEYS)
    assert space and all(required <= set(c) <= set(configs.CONFIG_KEYS) for c in space)
    assert any(set(configs.DQ_KEYS) <= set(c) for c in space)


@pytest.mark.skipif(_cupy_importable() and torch.cuda.is_available(), reason="CuPy and a GPU are present")
def test_unavailable_with_reason() -> None:
    reason = REGISTRY.availability("cupy")
    assert reason and ("CuPy" in reason or "CUDA" in reason)
    from flashdispatch.tools.warmup import warmup_main

    assert warmup_main([]) == 2


def test_without_an_nvidia_gpu_the_reason_is_the_gpu_not_cupy(monkeypatch, capsys) -> None:
    """On a CPU machine (or ROCm) the cupy backend is unavailable for want of an NVIDIA GPU: info,
    backends(), explain and warmup say so, instead of advising to install CuPy, which would not help."""
    from flashdispatch.backends.cupy import impl as cupy_impl
    from flashdispatch.tools.warmup import warmup_main

    def fresh() -> str | None:
        cupy_impl._availability.cache_clear()
        REGISTRY._availability.pop("cupy", None)
        return REGISTRY.availability("cupy")

    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.version, "hip", None)
        reason = fresh()
        assert reason and "no CUDA device" in reason and "NVIDIA" in reason and "pip install" not in reason
        assert warmup_main([]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "no CUDA device" in err
        monkeypatch.setattr(torch.version, "hip", "6.4")
        reason = fresh()
        assert reason and "ROCm" in reason and "NVIDIA" in reason
    finally:
        monkeypatch.undo()
        fresh()


@pytest.mark.slow
def test_import_does_not_import_cupy() -> None:
    code = (
        "import sys, flashdispatch\n"
        "from flashdispatch.registry import REGISTRY\n"
        "REGISTRY.all()\n"
        "import flashdispatch.backends.cupy\n"
        "assert 'cupy' not in sys.modules, 'cupy imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_warmup_of_a_partial_config_compiles_what_the_runtime_launches() -> None:
    from flashdispatch.tools import warmup

    bwd_only = {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_WARPS": 4}
    specs = set(warmup.specs_from_items([bwd_only], 90))
    for d in configs.BACKWARD_HEAD_DIMS:
        runtime = configs.parse_config(bwd_only, d, 90)  # what a call with this config runs
        for causal in (False, True):
            assert set(configs.bwd_specs(d, "bf16", causal, runtime)) <= specs
            assert configs.fwd_spec(d, "bf16", causal, runtime) in specs


@pytest.mark.parametrize("cc", [86, 89, 120])
def test_a_profile_config_too_large_for_the_card_falls_back_to_one_that_fits(cc: int) -> None:
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "WARPS": 8, "BWD_BLOCK_M": 64, "BWD_BLOCK_N": 128, "BWD_WARPS": 8}
    assert not configs.fits(configs.fwd_spec(128, "bf16", False, big), cc)  # an A100/H100 tile
    cfg = configs.runnable_config(big, 128, cc)
    assert configs.fits(configs.fwd_spec(128, "bf16", True, cfg), cc)
    assert all(configs.fits(s, cc) for s in configs.bwd_specs(128, "bf16", True, cfg))
    on_h100 = configs.runnable_config(big, 128, 90)  # fits there: kept as given
    assert {k: on_h100[k] for k in big} == big


def test_no_fitting_tile_is_a_reason_not_a_crash() -> None:
    assert configs.no_fit_reasons(128, 90, backward=True) == ()
    reasons = configs.no_fit_reasons(256, 75, backward=False)  # 48 KiB of shared memory
    assert reasons and "D=256" in reasons[0] and "shared memory" in reasons[0]


def test_cache_files_are_written_whole_and_readable(tmp_path) -> None:
    import os
    import stat

    from flashdispatch.backends.cupy import kernels

    path = str(tmp_path / "cupy" / "abc.cubin")
    kernels.write_atomic(path, b"\x7fELF" + bytes(100))
    assert open(path, "rb").read() == b"\x7fELF" + bytes(100)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044  # group/others may read a shared cache
    assert os.listdir(tmp_path / "cupy") == ["abc.cubin"]  # no temporary file left


def test_an_unloadable_cache_file_is_removed_and_reported(tmp_path, monkeypatch, caplog) -> None:
    from flashdispatch.backends.cupy import kernels

    bad = tmp_path / "broken.cubin"
    bad.write_bytes(b"truncated")

    def load(path: str, symbol: str) -> None:
        raise RuntimeError("CUDA_ERROR_INVALID_IMAGE")

    monkeypatch.setattr(kernels, "_load", load)
    with caplog.at_level("WARNING", logger="flashdispatch"):
        assert kernels._from_disk(str(bad), "fd_fwd") is None
    assert not bad.exists() and any("recompiling" in r.getMessage() for r in caplog.records)


def test_nvrtc_target_falls_back_to_ptx_for_a_gpu_newer_than_nvrtc() -> None:
    from flashdispatch.backends.cupy.kernels import nvrtc_target

    assert nvrtc_target("sm_90", (75, 80, 86, 89, 90)) == "sm_90"
    assert nvrtc_target("sm_120", (75, 80, 86, 89, 90)) == "compute_90"  # the driver JITs the PTX
    assert nvrtc_target("sm_90", None) == "sm_90"  # no query available: the device's own


def test_the_bound_launch_runs_its_plan_and_looks_up_other_strides(monkeypatch: pytest.MonkeyPatch) -> None:
    """cupy's prepare() as the plan cache keeps it (bound_forward): the launch plan made for the
    first call's tensors runs while the strides are the same (sinks checked and passed on), other
    strides go through cupy_forward's lookup (a stand-in plan: no GPU here)."""
    from flashdispatch.backend import Inputs, bound_forward
    from flashdispatch.backends.cupy import ops
    from flashdispatch.problem import problem_from_tensors
    from flashdispatch.registry import REGISTRY

    made: list[tuple[Any, ...]] = []
    ran: list[tuple[int, bool]] = []

    class _Plan:
        def __init__(self, q, k, v, causal, scale, config, out_bshd,  # type: ignore[no-untyped-def]
                     left, right, softcap, has_sinks):
            made.append((q.stride(), causal, scale, out_bshd, left, right, softcap, has_sinks))
            self.index = len(made)

        def run(self, q, k, v, sinks):  # type: ignore[no-untyped-def]
            ran.append((self.index, sinks is not None))
            return q, None

    monkeypatch.setattr(ops, "_ForwardPlan", _Plan)
    monkeypatch.setattr(ops, "_FWD_PLANS", {})
    q, k, v = (torch.randn(1, 40, 4, 64, dtype=torch.float16).transpose(1, 2) for _ in range(3))  # bshd memory
    sinks = torch.zeros(4)
    p = problem_from_tensors(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, scale=None,
                             layout="bshd", return_lse=False, window=(15, 0), sinks=sinks)
    launch = bound_forward(REGISTRY.get("cupy"), Inputs(q, k, v, {"sinks": sinks}), p, {})
    assert made == [(q.stride(), True, p.scale, True, 15, 0, 0.0, True)]
    q2 = torch.randn(1, 40, 4, 64, dtype=torch.float16).transpose(1, 2)
    assert launch(Inputs(q2, k, v, {"sinks": sinks}))[0] is q2 and ran == [(1, True)] and len(made) == 1
    other = torch.randn(1, 4, 40, 64, dtype=torch.float16)  # same shape, bhsd memory: other strides
    assert launch(Inputs(other, k, v, {"sinks": sinks}))[0] is other
    assert len(made) == 2 and ran == [(1, True), (2, True)] and made[1][0] == other.stride()
