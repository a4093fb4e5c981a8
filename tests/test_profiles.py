"""Every shipped profile validates, says honestly where it comes from, and holds only configs that
compile for its device's architecture (Triton ahead of time, CUDA through nvcc)."""

from __future__ import annotations

import importlib
import shutil
from importlib import resources
from typing import Any

import pytest

from flashdispatch.device import DEVICE_TABLE, simulated_device
from flashdispatch.problem import problem_from_shape
from flashdispatch.profile_store import Profile, parse_profile
from flashdispatch.registry import REGISTRY

_FILES = sorted(
    (f for f in resources.files("flashdispatch.profiles").iterdir() if f.name.endswith(".yaml")),
    key=lambda f: f.name,
)
PROFILES: dict[str, tuple[str, Profile]] = {}
for _f in _FILES:
    _text = _f.read_text(encoding="utf-8")
    PROFILES[_f.name[:-5]] = (_text, parse_profile(_text, str(_f)))
ARCH_OF = {d.key: d.arch for d in DEVICE_TABLE}
# Profiles that must ship (h100.yaml measured by `flashdispatch tune` on an H100; the others argued).
REQUIRED = ("h100", "a100", "mi250x", "mi300x")


def _entry_problem(prof: Profile, e: Any):  # type: ignore[no-untyped-def]
    """A Problem that falls in an entry's bucket, on the profile's (simulated) device."""
    m = e.match
    dev = simulated_device(prof.key)
    dims = (m.get("batch", 1), 32, 32 // m["gqa"], m.get("seqlen_q", m["seqlen"]), m["seqlen"], m["head_dim"])
    p = problem_from_shape(dims, dtype=m["dtype"], device_kind=dev.kind, causal=bool(m["causal"]),
                           needs_grad=m["pass"] == "fwd_bwd")
    return p, dev


def test_the_required_profiles_ship() -> None:
    assert set(REQUIRED) <= set(PROFILES), f"missing: {set(REQUIRED) - set(PROFILES)}"


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_profile_is_valid_and_names_its_device(key: str) -> None:
    _, prof = PROFILES[key]
    assert prof.key == key and key in ARCH_OF
    assert prof.device["arch"] == ARCH_OF[key]
    assert prof.entries, "a profile with no entries decides nothing"
    names = set(REGISTRY.all())
    for e in prof.entries:
        assert e.ranking and len(set(e.ranking)) == len(e.ranking), e.label()
        assert set(e.ranking) <= names, f"{e.label()}: unknown backends {set(e.ranking) - names}"
        assert set(e.config) <= set(e.ranking), f"{e.label()}: config for a backend it does not rank"


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_every_ranked_backend_can_serve_its_entry_on_that_device(key: str) -> None:
    _, prof = PROFILES[key]
    for e in prof.entries:
        p, dev = _entry_problem(prof, e)
        for name in e.ranking:
            reasons = REGISTRY.get(name).not_supported_reasons(p, dev)
            assert not reasons, f"{key} {e.label()}: {name} ranked but cannot serve: {reasons}"


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.measured))
def test_measured_profile_ranks_fastest_measured_first_with_provenance(key: str) -> None:
    _, prof = PROFILES[key]
    g = prof.generated
    for field in ("date", "card", "command", "torch", "triton"):
        assert g.get(field), f"generated.{field} is required in a measured profile"
    for e in prof.entries:
        assert set(e.ms) == set(e.ranking), f"{e.label()}: every ranked backend needs its time"
        times = [e.ms[n] for n in e.ranking]
        assert times == sorted(times), f"{e.label()}: ranking is not fastest-measured-first: {e.ms}"
        assert all(t > 0 for t in times)


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if not p.measured))
def test_unmeasured_profile_holds_no_numbers_and_argues_its_ranking(key: str) -> None:
    text, prof = PROFILES[key]
    assert all(not e.ms for e in prof.entries), "an unmeasured profile must not carry times"
    assert "\n    ms:" not in text
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "NOT MEASURED" in header and "published figures" in header  # says so, and cites its figures
    assert "not measured" in prof.provenance().lower()


def test_h200_profile_is_either_measured_on_an_h200_or_absent() -> None:
    if "h200" not in PROFILES:
        pytest.skip("no H200 was available to measure on (docs/profiles.md)")
    _, prof = PROFILES["h200"]
    assert prof.measured and "H200" in prof.generated["card"]


# --- the configs compile for the profile's architecture ----------------------------------------


def _triton_targets() -> list[tuple[str, str]]:
    """(aot target, arch family) for every architecture that has a shipped profile."""
    try:
        aot = importlib.import_module("flashdispatch.tools.aot_triton")
    except ImportError:
        return []
    from flashdispatch.backends.triton import configs

    out = {}
    for key, (_, prof) in PROFILES.items():
        arch = prof.device["arch"]
        fam = configs.arch_family("rocm" if arch.startswith("gfx") else "cuda", arch)
        for target, (_, _, _, tfam) in aot.TARGETS.items():
            if tfam == fam:
                out[target] = fam
    return sorted(out.items())


@pytest.mark.parametrize("target,arch", _triton_targets() or [pytest.param("-", "-", marks=pytest.mark.skip(
    reason="tools/aot_triton.py is not there yet"))])
def test_triton_configs_of_the_profiles_compile_for_their_arch(target: str, arch: str) -> None:
    aot = pytest.importorskip("flashdispatch.tools.aot_triton")
    pytest.importorskip("triton")
    cases = list(dict.fromkeys(aot._profile_cases(arch)))  # every triton config of every profile on this arch
    if not cases:
        pytest.skip(f"no triton config in the profiles for {arch}")
    bad = [str(r) for r in (aot.check_one(target, c) for c in cases) if not r.ok]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.device["arch"].startswith("sm_")))
def test_cupy_configs_of_the_profiles_compile_with_nvcc(key: str) -> None:
    nvcc_check = pytest.importorskip("flashdispatch.tools.nvcc_check")
    warmup = pytest.importorskip("flashdispatch.tools.warmup")
    from flashdispatch.backends.cupy.kernels import module_source

    if nvcc_check.find_nvcc() is None or shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    _, prof = PROFILES[key]
    if not any("cupy" in e.config for e in prof.entries):
        pytest.skip(f"{key}: no cupy config")
    arch = prof.device["arch"]
    specs = warmup.specs_from_profile(prof, int(arch[3:]))
    assert specs
    r = nvcc_check.nvcc_compile(module_source(specs), arch)
    assert r.ok, r.log[-3000:]
