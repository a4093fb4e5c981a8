"""Every shipped profile validates, says honestly where it comes from, and holds only configs that
compile for its device's architecture (Triton ahead of time, CUDA through nvcc)."""

from __future__ import annotations

import importlib
import shutil
from importlib import resources
from typing import Any

import pytest

from flashdispatch.costmodel import SERVING_CLASSES, features, group_key, point_problem
from flashdispatch.device import DEVICE_TABLE, simulated_device
from flashdispatch.profile_store import SCHEMA_VERSION, Profile, parse_profile
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
# Profiles that must ship (h100.yaml and h200.yaml measured by `flashdispatch tune`; the others argued).
REQUIRED = ("h100", "a100", "mi250x", "mi300x")


def _points(prof: Profile) -> list[tuple[Any, Any]]:
    """(group, point) of every point of the profile."""
    return [(g, pt) for g in prof.groups for pt in g.points]


def _where(g: Any, pt: Any) -> str:
    return f"{g.key.label()} {pt.describe()}"


def test_the_required_profiles_ship() -> None:
    assert set(REQUIRED) <= set(PROFILES), f"missing: {set(REQUIRED) - set(PROFILES)}"


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_profile_is_valid_schema_2_and_names_its_device(key: str) -> None:
    _, prof = PROFILES[key]
    assert prof.key == key and key in ARCH_OF
    assert prof.schema == SCHEMA_VERSION, "shipped profiles are written in the current schema"
    assert prof.device["arch"] == ARCH_OF[key]
    assert prof.device["sm_count"] == simulated_device(key).sm_count
    assert prof.groups, "a profile with no groups decides nothing"
    names = set(REGISTRY.all())
    for g, pt in _points(prof):
        named = pt.ranking or tuple(pt.ms)
        assert named and len(set(named)) == len(named), _where(g, pt)
        assert set(named) <= names, f"{_where(g, pt)}: unknown backends {set(named) - names}"
        assert set(pt.config) <= set(named), f"{_where(g, pt)}: config for a backend it does not measure"
        assert set(pt.host_us) <= set(named), f"{_where(g, pt)}: host time for a backend it does not measure"
    for g in prof.groups:
        assert set(g.config) <= set(g.implementations()) | {n for pt in g.points for n in pt.ranking}, g.key


@pytest.mark.parametrize("key", sorted(PROFILES))
def test_every_ranked_or_measured_backend_can_serve_its_point_on_that_device(key: str) -> None:
    _, prof = PROFILES[key]
    dev = simulated_device(prof.key)
    for g, pt in _points(prof):
        if g.key.cls in SERVING_CLASSES:  # serving families, checked by tests/test_serving_selection.py
            continue
        p = point_problem(g.key, pt, dev.kind)
        assert group_key(p) == g.key, f"{_where(g, pt)} falls in {group_key(p).label()}"
        for name in pt.ranking or tuple(pt.ms):
            reasons = REGISTRY.get(name).not_supported_reasons(p, dev)
            assert not reasons, f"{key} {_where(g, pt)}: {name} listed but cannot serve: {reasons}"


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.measured))
def test_measured_profile_has_times_fits_and_provenance(key: str) -> None:
    text, prof = PROFILES[key]
    g0 = prof.generated
    for field in ("date", "card", "command", "torch", "triton"):
        assert g0.get(field), f"generated.{field} is required in a measured profile"
    assert "fits:" in text, "a measured profile ships its fitted models (not only fitted on load)"
    for g, pt in _points(prof):
        assert pt.ms and not pt.ranking, _where(g, pt)
        assert all(t > 0 for t in pt.ms.values()), _where(g, pt)
    for g in prof.groups:
        measured = g.implementations()
        assert set(g.fits) == set(measured), f"{g.key.label()}: a fit for every measured implementation"
        for name, f in g.fits.items():
            own = [pt for pt in g.points if name in pt.ms]
            assert f.n + len(f.excluded) == len(own) and all(c >= 0 for c in f.coef) and f.coef[1] + f.coef[2] > 0, (
                g.key.label(), name)
            # the model reproduces its own points within its fit error (and the file is not stale); a
            # slow outlier it left out is slower than the model says
            for j, pt in enumerate(own):
                x = features(point_problem(g.key, pt), prof.sm_count)
                r = pt.ms[name] * 1e3 / f.predict_us(x)
                assert (r > 1.0) if j in f.excluded else abs(1 / r - 1) <= max(0.5, 3 * f.rms), (
                    g.key.label(), name, pt.describe())


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.measured))
def test_measured_profile_fits_are_what_the_fitter_makes_of_its_points(key: str) -> None:
    """The shipped fits are not stale: refitting the points gives them back (to the 4 significant
    digits written). After a change of the fit, rewrite the files (tools/profile_writer.py)."""
    import math

    from flashdispatch.costmodel import Group

    _, prof = PROFILES[key]
    for g in prof.groups:
        fresh = Group(g.key, list(g.points))
        fresh.refit(prof.sm_count)
        assert set(fresh.fits) == set(g.fits), g.key.label()
        for name, f in g.fits.items():
            again = fresh.fits[name]
            for a, b in zip(f.coef, again.coef):
                assert math.isclose(a, b, rel_tol=2e-3, abs_tol=1e-9), (g.key.label(), name, f.coef, again.coef)
            assert (f.n, f.excluded) == (again.n, again.excluded), (g.key.label(), name)
            for a, b in ((f.lo_gflop, again.lo_gflop), (f.hi_gflop, again.hi_gflop)):
                assert math.isclose(a, b, rel_tol=2e-3), (g.key.label(), name)


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if not p.measured))
def test_unmeasured_profile_holds_no_numbers_and_argues_its_ranking(key: str) -> None:
    text, prof = PROFILES[key]
    assert all(pt.ranking and not pt.ms and not pt.host_us for _, pt in _points(prof)), \
        "an unmeasured profile carries rankings, not times"
    assert all(not g.fits for g in prof.groups) and "fits:" not in text and "ms:" not in text
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "NOT MEASURED" in header and "published figures" in header  # says so, and cites its figures
    assert "not measured" in prof.provenance().lower()


def test_h200_profile_is_either_measured_on_an_h200_or_absent() -> None:
    if "h200" not in PROFILES:
        pytest.skip("no H200 was available to measure on (docs/profiles.md)")
    _, prof = PROFILES["h200"]
    assert prof.measured and "H200" in prof.generated["card"]


@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.measured))
def test_a_measured_device_decides_from_its_model(key: str) -> None:
    """Every measured point, asked of the dispatcher on that (simulated) device, is decided by
    the profile's model, not by the built-in order."""
    from flashdispatch.selection import select

    _, prof = PROFILES[key]
    dev = simulated_device(key)
    for g, pt in _points(prof):
        dec = select(point_problem(g.key, pt), device=dev)
        assert dec.source.startswith("profile:"), f"{_where(g, pt)}: {dec.source}"
        assert dec.predicted, _where(g, pt)


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
def test_triton_configs_of_the_profiles_are_compiled_ahead_of_time(target: str, arch: str) -> None:
    """Every triton config of every profile on this arch is among the cases that
    tests/test_triton_aot.py compiles for `target` (and checks against its shared memory and spills)."""
    aot = pytest.importorskip("flashdispatch.tools.aot_triton")
    pytest.importorskip("triton")
    cases = list(dict.fromkeys(aot._profile_cases(arch)))  # every triton config of every profile on this arch
    if not cases:
        pytest.skip(f"no triton config in the profiles for {arch} (unmeasured profiles hold none: the defaults "
                    "run, and tests/test_triton_aot.py compiles them)")
    compiled = {c.without_origin() for c in aot.default_cases(target)}
    missing = [str(c) for c in cases if c.without_origin() not in compiled]
    assert not missing, "profile configs the ahead-of-time check does not compile:\n" + "\n".join(missing)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(k for k, (_, p) in PROFILES.items() if p.device["arch"].startswith("sm_")))
def test_cupy_configs_of_the_profiles_compile_with_nvcc(key: str) -> None:
    nvcc_check = pytest.importorskip("flashdispatch.tools.nvcc_check")
    warmup = pytest.importorskip("flashdispatch.tools.warmup")
    from flashdispatch.backends.cupy.kernels import module_source

    if nvcc_check.find_nvcc() is None or shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    _, prof = PROFILES[key]
    if not any("cupy" in g.config or any("cupy" in pt.config for pt in g.points) for g in prof.groups):
        pytest.skip(f"{key}: no cupy config")
    arch = prof.device["arch"]
    specs = warmup.specs_from_profile(prof, int(arch[3:]))
    assert specs
    r = nvcc_check.nvcc_compile(module_source(specs), arch)
    assert r.ok, r.log[-3000:]
