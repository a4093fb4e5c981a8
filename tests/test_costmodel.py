"""The cost model: shape classes at their boundaries, the fit, prediction on shapes nobody measured,
borrowing written into the decision, and a decision from the model wherever a profile is measured."""

from __future__ import annotations

import contextlib
import math
import random
import zlib
from typing import Iterator

import numpy as np
import pytest
import torch

import flashdispatch as fd
from flashdispatch.costmodel import (
    SHAPE_CLASSES, CostModel, Group, GroupKey, Point, features, fit, group_key, point_problem, shape_class,
    variant_kind,
)
from flashdispatch.device import simulated_device
from flashdispatch.problem import DECODE_MAX_SEQLEN_Q, problem_from_shape
from flashdispatch.profile_store import Profile, load_profile, parse_profile, profile_yaml_text

H200 = simulated_device("h200")


def _p(sq: int, sk: int, *, causal: bool = True, b: int = 2, hq: int = 8, hkv: int = 8, d: int = 128, **kw):
    return problem_from_shape((b, hq, hkv, sq, sk, d), causal=causal, **kw)


# --- classes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq, sk, causal, cls", [
    (1, 4096, True, "decode"),  # one row: the causal mask hides nothing
    (1, 4096, False, "decode"),
    (1, 1, True, "dense"),  # nothing to decode against
    (2, 4096, True, "speculative"),
    (DECODE_MAX_SEQLEN_Q, 4096, True, "speculative"),
    (DECODE_MAX_SEQLEN_Q + 1, 4096, True, "chunked"),
    (DECODE_MAX_SEQLEN_Q, 4096, False, "decode"),  # few rows, no mask: they see the whole cache
    (DECODE_MAX_SEQLEN_Q + 1, 4096, False, "dense"),
    (4095, 4096, True, "chunked"),  # Sq = Sk - 1: bottom-right, one key of cache
    (4096, 4096, True, "causal"),
    (4097, 4096, True, "causal_tall"),
    (4096, 4096, False, "dense"),
    (8192, 4096, False, "dense"),
    (16, 16, True, "causal"),
    (16, 16, False, "dense"),
])
def test_class_at_every_boundary(sq, sk, causal, cls):
    p = _p(sq, sk, causal=causal)
    assert shape_class(p) == cls


def test_the_pass_and_the_variant_are_part_of_the_group():
    assert group_key(_p(512, 512, needs_grad=True)).pass_ == "fwd_bwd"
    assert group_key(_p(512, 512)).pass_ == "fwd"
    assert variant_kind(_p(512, 512, window=(128, 0))) == "window"
    assert variant_kind(_p(512, 512, softcap=30.0)) == "softcap"
    assert variant_kind(_p(512, 512, sinks=True)) == "sinks"
    assert variant_kind(_p(512, 512, window=(128, 0), sinks=True)) == "window"
    assert variant_kind(_p(512, 512)) == "plain"


# --- the fit ------------------------------------------------------------------------------------


def _synthetic_points(key: GroupKey, coef: dict[str, tuple[float, float, float, float]], dims, noise=0.0, seed=0):
    rng = random.Random(seed)
    pts = []
    for b, hq, hkv, sq, sk in dims:
        pt = Point(b, hq, hkv, sq, sk)
        x = features(point_problem(key, pt), H200.sm_count)
        ms = {n: float(np.dot(c, x)) / 1e3 * (1.0 + noise * rng.uniform(-1, 1)) for n, c in coef.items()}
        pts.append(pt._replace(ms=ms))
    return pts


PREFILL_DIMS = [(16, 32, 8, 1024, 1024), (4, 32, 8, 4096, 4096), (1, 32, 8, 16384, 16384), (8, 16, 16, 2048, 2048),
                (32, 32, 32, 512, 512)]


def test_fit_recovers_known_coefficients():
    key = GroupKey("fwd", "causal", "plain", "bf16", 128)
    true = (12.0, 1e3 / 600.0, 0.0, 0.0)  # 12 us + 600 TFLOP/s
    pts = _synthetic_points(key, {"a": true}, PREFILL_DIMS)
    xs = [features(point_problem(key, pt), H200.sm_count) for pt in pts]
    f = fit(xs, [pt.ms["a"] * 1e3 for pt in pts])
    assert f.rms < 1e-9
    assert f.coef[0] == pytest.approx(12.0, rel=1e-6) and 1e3 / f.coef[1] == pytest.approx(600.0, rel=1e-6)
    assert "600 TFLOP/s" in f.describe()


def test_fit_with_noise_predicts_unmeasured_sizes_within_the_noise():
    key = GroupKey("fwd", "dense", "plain", "bf16", 128)
    true = (20.0, 1e3 / 500.0, 1e3 / 3000.0, 0.0)
    pts = _synthetic_points(key, {"a": true}, PREFILL_DIMS, noise=0.03, seed=1)
    g = Group(key, pts)
    g.refit(H200.sm_count)
    assert g.fits["a"].rms < 0.05
    unseen = problem_from_shape((3, 24, 8, 3000, 3000, 128))
    want = float(np.dot(true, features(unseen, H200.sm_count)))
    got = g.fits["a"].predict_us(features(unseen, H200.sm_count))
    assert got == pytest.approx(want, rel=0.06)


def test_one_point_is_a_throughput_and_falling_times_get_no_negative_slope():
    key = GroupKey("fwd", "dense", "plain", "bf16", 64)
    pts = _synthetic_points(key, {"a": (5.0, 2.0, 0.0, 0.0)}, PREFILL_DIMS[:1])
    g = Group(key, pts)
    g.refit(H200.sm_count)
    f = g.fits["a"]
    assert f.n == 1 and f.coef[0] == 0.0 and f.coef[1] > 0 and f.coef[2] == 0.0 and f.rms < 1e-12
    # times that fall as the work grows: an unconstrained least-squares line through them has a
    # negative slope (checked), the fit keeps only the non-negative work term, with a large error
    xs = [(1.0, w, w / 10, 0.0) for w in (1.0, 2.0, 4.0)]
    free, *_ = np.linalg.lstsq(np.array(xs)[:, :2] / np.array([[30.0], [20.0], [10.0]]), np.ones(3), rcond=None)
    assert free[1] < 0
    f = fit(xs, [30.0, 20.0, 10.0])
    assert f.coef[0] == 0.0 and f.coef[1] > 0 and f.rms > 0.3
    with pytest.raises(ValueError, match="times must be finite and > 0"):
        fit(xs, [1.0, 0.0, 2.0])


def test_points_that_cannot_tell_work_from_bytes_are_fitted_by_the_term_of_the_class():
    # decode points of one GQA ratio: the work and the bytes grow in one proportion, so a model of
    # either fits them; another ratio (MQA, or no GQA) tells them apart. A memory-bound class keeps
    # the bytes (the card reads K and V at 4 TB/s, whatever the heads), another the work.
    dims = [(1, 16, 4, 1, 8192), (32, 16, 4, 1, 4096), (1, 16, 4, 1, 131072)]
    truth = lambda x: 6.0 + 250.0 * x[2]  # 6 us + 4 TB/s
    for cls, term in (("decode", 2), ("dense", 1)):
        key = GroupKey("fwd", cls, "plain", "bf16", 64)
        pts = [Point(*d) for d in dims]
        xs = [features(point_problem(key, pt), H200.sm_count) for pt in pts]
        # a 1.5% wobble that makes the work term fit these points a hair better than the bytes
        ts = [truth(x) * (1.0 + e) for x, e in zip(xs, (0.015, -0.015, 0.0))]
        g = Group(key, [pt._replace(ms={"a": t / 1e3}) for pt, t in zip(pts, ts)])
        g.refit(H200.sm_count)
        f = g.fits["a"]
        assert f.coef[term] > 0 and f.coef[3 - term] == 0.0, (cls, f)
    # the decode model predicts an MQA problem from the bytes it reads
    mqa = point_problem(GroupKey("fwd", "decode", "plain", "bf16", 64), Point(16, 71, 1, 1, 2000))
    x = features(mqa, H200.sm_count)
    key = GroupKey("fwd", "decode", "plain", "bf16", 64)
    g = Group(key, [Point(*d)._replace(ms={"a": truth(features(point_problem(key, Point(*d)), H200.sm_count))
                                           * (1.0 + e) / 1e3}) for d, e in zip(dims, (0.015, -0.015, 0.0))])
    g.refit(H200.sm_count)
    assert g.fits["a"].predict_us(x) == pytest.approx(truth(x), rel=0.1)


# --- a synthetic measured profile: the known winner of each class is recovered --------------------

# per class, which implementation the synthetic card makes fastest and by how much
WINNERS = {"dense": "sdpa", "causal": "sdpa", "chunked": "triton", "speculative": "triton", "decode": "sdpa",
           "causal_tall": "triton"}
CLASS_DIMS = {
    "dense": PREFILL_DIMS,
    "causal": PREFILL_DIMS,
    "chunked": [(4, 32, 8, 512, 8192), (1, 32, 8, 2048, 32768), (8, 32, 32, 256, 4096), (2, 32, 8, 1024, 16384)],
    "speculative": [(1, 32, 8, 4, 8192), (8, 32, 8, 8, 4096), (32, 32, 8, 2, 16384), (4, 32, 32, 16, 32768)],
    "decode": [(1, 32, 8, 1, 8192), (8, 32, 8, 1, 4096), (64, 32, 8, 1, 2048), (1, 32, 32, 1, 32768)],
    "causal_tall": [(2, 16, 16, 1024, 512), (1, 32, 8, 4096, 2048), (8, 16, 16, 512, 256)],
}


def _synthetic_profile(dtype: str = "bf16", head_dims=(64, 128)) -> Profile:
    groups = []
    for d in head_dims:
        for cls, dims in CLASS_DIMS.items():
            for pass_ in ("fwd", "fwd_bwd") if cls in ("dense", "causal") else ("fwd",):
                key = GroupKey(pass_, cls, "plain", dtype, d)
                base = (8.0, 1e3 / 550.0, 1e3 / 3500.0, 0.0)
                fast = tuple(c / 1.3 for c in base)
                coef = {"sdpa": fast if WINNERS[cls] == "sdpa" else base,
                        "triton": fast if WINNERS[cls] == "triton" else base,
                        "sdpa:efficient": tuple(c * 3 for c in base)}
                g = Group(key, _synthetic_points(key, coef, dims, noise=0.01, seed=zlib.crc32(repr(key).encode())))
                g.refit(H200.sm_count)
                groups.append(g)
    return Profile("synthetic.yaml", "h200", True, {"key": "h200", "name": "NVIDIA H200", "arch": "sm_90"},
                   {"date": "2026-12-04", "card": "NVIDIA H200 (synthetic)", "tool": "test"}, groups)


@pytest.fixture
def synthetic_h200(tmp_path, monkeypatch):
    prof = _synthetic_profile()
    (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof, "synthetic measurements for the tests"))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    yield prof
    fd.refresh()


UNSEEN = {  # shapes in no group's points
    "dense": ((3, 24, 8, 3000, 3000, 128), False),
    "causal": ((5, 40, 8, 1500, 1500, 128), True),
    "chunked": ((3, 32, 8, 768, 12000, 128), True),
    "speculative": ((6, 32, 8, 5, 10000, 128), True),
    "decode": ((24, 32, 8, 1, 6000, 128), False),
    "causal_tall": ((3, 16, 16, 700, 300, 128), True),
}


@pytest.mark.parametrize("cls", sorted(UNSEEN))
def test_the_known_winner_of_each_class_is_recovered_on_unseen_shapes(synthetic_h200, cls):
    shape, causal = UNSEEN[cls]
    d = fd.explain(shape=shape, causal=causal, device="h200")
    assert shape_class(d.problem) == cls
    assert d.variant == WINNERS[cls], str(d)
    assert d.source.startswith("profile:") and f"fwd {cls} bf16 D=128" in d.source, d.source
    assert d.predicted[WINNERS[cls]] == min(d.predicted.values())
    assert any("nearest measured" in m for m in d.models)
    assert d.margin is not None and d.margin > 0.2


def test_explain_names_model_points_predictions_and_margin(synthetic_h200):
    d = fd.explain(shape=(3, 32, 8, 768, 12000, 128), causal=True, device="h200")
    text = str(d)
    for needle in ("class:    fwd chunked bf16 D=128", "predicted: triton=", "margin:", "model:    triton:",
                   "TFLOP/s", "fit error", "nearest measured: B="):
        assert needle in text, text


def test_a_model_of_one_point_is_unsure_for_that_reason_not_as_extrapolated(tmp_path, monkeypatch):
    """A group measured at one size cannot tell a fixed cost from a rate: the decision is unsure even
    at that very size, and says it was fitted to one point (not "extrapolated", which it is not there)."""
    key = GroupKey("fwd", "chunked", "plain", "bf16", 128)
    base = (8.0, 1e3 / 550.0, 1e3 / 3500.0, 0.0)
    g = Group(key, _synthetic_points(key, {"sdpa": base, "triton": tuple(c / 1.5 for c in base)},
                                     [(4, 32, 8, 512, 8192)]))
    g.refit(H200.sm_count)
    with _groups_profile(tmp_path, monkeypatch, g):
        d = fd.explain(shape=(4, 32, 8, 512, 8192, 128), causal=True, device="h200")
        assert d.variant == "triton", str(d)
        assert "triton: fitted to one point" in d.uncertain and "extrapolated" not in d.uncertain, d.uncertain


def test_borrowing_is_written_into_the_decision(synthetic_h200):
    d = fd.explain(shape=(3, 32, 8, 768, 12000, 96), causal=True, dtype="fp16", device="h200")
    assert d.variant == "triton"
    assert any("fp16 borrows bf16's measurements" in m and "D=96 borrows D=128" in m for m in d.models), d.models
    assert "borrows" in d.uncertain


def test_a_measured_profile_leaves_no_half_precision_decision_to_the_blind_default(synthetic_h200):
    rng = random.Random(3)
    for _ in range(150):
        hkv = rng.choice([1, 4, 8, 32])
        sq = rng.choice([1, 3, 16, 17, 200, 1000, 4096])
        sk = rng.choice([sq, sq + 1, 4 * sq + 7, 9000])
        shape = (rng.choice([1, 2, 16]), hkv * rng.choice([1, 4]), hkv, sq, sk, rng.choice([64, 80, 96, 128, 256]))
        d = fd.explain(shape=shape, dtype=rng.choice(["bf16", "fp16"]), causal=rng.random() < 0.6,
                       needs_grad=rng.random() < 0.3, device="h200")
        assert d.source.startswith("profile:"), str(d)


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_is_a_cost_in_the_model(synthetic_h200, causal):
    # sdpa serves a window through a boolean mask over every pair, run by the efficient kernel: it
    # is predicted by sdpa:efficient's plain model at the whole score matrix, the fused kernel by its
    # own at the visible band
    d = fd.explain(shape=(2, 32, 8, 8192, 8192, 128), causal=causal, window=(1024, 0 if causal else 1024),
                   device="h200")
    assert d.variant == "triton"
    assert d.predicted["sdpa"] > 4 * d.predicted["triton"], d.predicted
    assert any(m.startswith("sdpa:") and "runs as sdpa:efficient over the whole score matrix" in m for m in d.models)
    assert any(m.startswith("triton:") and "estimated from the plain model at the visible work" in m for m in d.models)


def test_a_window_model_that_would_extrapolate_gives_way_to_the_plain_model_at_the_visible_work(tmp_path, monkeypatch):
    # Two small windowed points whose times are nearly equal fit a launch cost and an absurd rate
    # (on the H200 profile: 12,000 TFLOP/s, predicting 0.27 ms for a 16k x 4096 window that ran
    # 2.17 ms); far beyond them the fused kernel's plain model, measured near the problem, decides
    prof = _synthetic_profile()
    key = GroupKey("fwd", "causal", "window", "bf16", 128)
    pts = [Point(4, 16, 16, 4096, 4096, 256, {"triton": 0.1976, "sdpa": 1.762}),
           Point(1, 16, 4, 8192, 8192, 1024, {"triton": 0.2001, "sdpa": 2.197})]
    g = Group(key, pts)
    g.refit(H200.sm_count)
    assert 1e3 / g.fits["triton"].coef[1] > 5000  # the absurd rate
    prof.groups.append(g)
    (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof, "synthetic"))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    try:
        big = fd.explain(shape=(1, 32, 8, 16384, 16384, 128), causal=True, window=(4095, 0), device="h200")
        model = next(m for m in big.models if m.startswith("triton:"))
        assert "estimated from the plain model at the visible work (its own model was measured at" in model, model
        plain = fd.explain(shape=(1, 32, 8, 16384, 16384, 128), causal=True, device="h200")
        frac = 4096 / (16384 / 2)  # about the visible share of the causal pairs
        assert 0.5 * frac * plain.predicted["triton"] < big.predicted["triton"] < 1.2 * plain.predicted["triton"]
        # near its own points the window group's model still decides
        small = fd.explain(shape=(2, 16, 8, 6000, 6000, 128), causal=True, window=(511, 0), device="h200")
        model = next(m for m in small.models if m.startswith("triton:"))
        assert "model fwd causal window bf16 D=128" in model and "estimated" not in model, model
    finally:
        fd.refresh()


@pytest.mark.parametrize("option", [{"softcap": 30.0}, {"sinks": True}])
@pytest.mark.parametrize("shape", [(2, 32, 8, 4096, 4096, 128), (1, 32, 8, 1, 8192, 128)])
def test_softcap_and_sinks_run_by_explicit_math_are_not_costed_as_the_fast_kernel(synthetic_h200, option, shape):
    # plain sdpa runs them as explicit math; no profile measures that on a GPU: sdpa has no
    # prediction and the fused kernel, predicted, runs
    d = fd.explain(shape=shape, device="h200", **option)
    assert d.variant == "triton", str(d)
    assert "sdpa" not in d.predicted
    assert any("no model for" in n and "sdpa" in n for n in d.notes), d.notes


def test_the_baseline_keeps_a_close_call(synthetic_h200, tmp_path):
    # triton made 1% faster than sdpa on causal: inside the margin, plain SDPA runs; 10%: triton
    p = (5, 40, 8, 1500, 1500, 128)
    for factor, want in ((0.99, "sdpa"), (0.90, "triton")):
        prof = _synthetic_profile()
        g = next(g for g in prof.groups if g.key == GroupKey("fwd", "causal", "plain", "bf16", 128))
        g.points = [pt._replace(ms={**pt.ms, "triton": pt.ms["sdpa"] * factor}) for pt in g.points]
        g.refit(H200.sm_count)
        (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof))
        fd.refresh()
        d = fd.explain(shape=p, causal=True, device="h200")
        assert d.predicted["triton"] < d.predicted["sdpa"]
        assert d.variant == want, str(d)
        assert any("plain SDPA, the baseline, runs" in n for n in d.notes) == (want == "sdpa")


# --- the file ------------------------------------------------------------------------------------


def test_schema_2_round_trips():
    prof = _synthetic_profile()
    text = profile_yaml_text(prof, "header line")
    again = parse_profile(text, "x.yaml")
    assert [g.key for g in again.groups] == [g.key for g in prof.groups]
    for a, b in zip(again.groups, prof.groups):
        assert [pt.dims() for pt in a.points] == [pt.dims() for pt in b.points]
        for name, f in b.fits.items():
            assert a.fits[name].coef == pytest.approx(f.coef, rel=1e-3)
    assert profile_yaml_text(again, "header line") == text  # stable: re-writing changes nothing


OLD = """\
schema: 1
device: {key: h200, name: "NVIDIA H200", arch: sm_90}
generated: {date: "2026-11-26", tool: "flashdispatch tune", card: "NVIDIA H200"}
measured: true
entries:
  - match: {dtype: bf16, head_dim: 128, causal: true, gqa: 1, pass: fwd, seqlen: 8192, seqlen_q: 512}
    shape: {B: 4, Hq: 32, Hkv: 32, Sq: 512, Sk: 8192, D: 128}
    ranking: [triton, sdpa]
    ms: {triton: 0.5233, sdpa: 0.7844}
    config:
      triton: {BLOCK_M: 128, BLOCK_N: 64, num_warps: 8, num_stages: 3}
  - match: {dtype: bf16, head_dim: 128, causal: false, gqa: 4, pass: decode, seqlen: 8192, seqlen_q: 1, batch: 1}
    shape: {B: 1, Hq: 32, Hkv: 8, Sq: 1, Sk: 8192, D: 128}
    ranking: [sdpa, triton]
    ms: {sdpa: 0.02275, triton: 0.06987}
"""


def test_an_old_schema_profile_still_loads_and_decides(tmp_path, monkeypatch):
    prof = parse_profile(OLD, "old.yaml")
    assert prof.schema == 1 and "schema 1, converted on load" in prof.provenance()
    assert {g.key.cls for g in prof.groups} == {"chunked", "decode"}
    (tmp_path / "h200.yaml").write_text(OLD)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    try:
        d = fd.explain(shape=(2, 32, 8, 1024, 16384, 128), causal=True, device="h200")
        assert d.variant == "triton" and d.source.startswith(f"profile:{tmp_path}")
        assert d.config["num_warps"] == 8  # the entry's config became the point's
        d = fd.explain(shape=(1, 32, 8, 1, 4096, 128), device="h200")
        assert d.variant == "sdpa"
    finally:
        fd.refresh()


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("schema: 2", "schema: 7"), "schema must be 2"),
    (lambda t: t.replace("class: chunked", "class: sideways"), "key.class must be one of"),
    (lambda t: t.replace("Sq: 512,", "Sq: -1,"), "Sq must be a positive int"),
    (lambda t: t.replace("triton: 0.5233", "triton: -1"), "must be a positive number"),
    (lambda t: t.replace("us_per_gflop: ", "us_per_gflop: -"), "must be finite and >= 0"),
    (lambda t: t.replace("us_per_gflop: ", "us_per_gflop_typo: "), "fit needs a number for each of"),
    (lambda t: t.replace("Sq: 512,", "Sq: 8192,"), "is class 'causal', not the group's 'chunked'"),
    (lambda t: t.replace("us_per_gflop_tail: ", "excluded: [7], us_per_gflop_tail: ", 1), "a stale fit"),
    (lambda t: t.replace("us_per_gflop_tail: ", "excluded: [true], us_per_gflop_tail: ", 1), "fit.excluded must be"),
])
def test_invalid_schema_2_names_path_line_and_reason(edit, words):
    text = profile_yaml_text(parse_profile(OLD, "old.yaml"))
    with pytest.raises(Exception) as ei:
        parse_profile(edit(text), "/x/bad.yaml")
    msg = str(ei.value)
    assert msg.startswith("invalid profile /x/bad.yaml") and words in msg, msg


@pytest.mark.parametrize("key", ["h100", "h200"])
def test_shipped_measured_profiles_decide_every_half_precision_problem_from_a_model(key):
    prof, _ = load_profile(key, "")
    assert prof is not None and prof.measured
    rng = random.Random(7)
    for _ in range(60):
        hkv = rng.choice([1, 8, 32])
        sq = rng.choice([1, 8, 100, 1024, 4096])
        sk = rng.choice([sq, 8 * sq + 3, 8192])
        shape = (rng.choice([1, 4]), hkv * rng.choice([1, 4]), hkv, sq, sk, rng.choice([64, 96, 128, 256]))
        d = fd.explain(shape=shape, dtype=rng.choice(["bf16", "fp16"]), causal=rng.random() < 0.5,
                       needs_grad=rng.random() < 0.3, device=key)
        assert d.source.startswith("profile:"), str(d)
        assert d.variant in d.predicted and math.isfinite(d.predicted[d.variant]), str(d)


@contextlib.contextmanager
def _groups_profile(tmp_path, monkeypatch, *groups: Group) -> Iterator[None]:
    """`groups` as the simulated H200's measured profile while the block runs."""
    prof = Profile("x.yaml", "h200", True, {"key": "h200", "name": "NVIDIA H200", "arch": "sm_90"},
                   {"date": "2026-12-05", "card": "NVIDIA H200 (synthetic)", "tool": "test"}, list(groups))
    (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    try:
        yield
    finally:
        fd.refresh()


@contextlib.contextmanager
def _one_group_profile(tmp_path, monkeypatch, key: GroupKey, coef: dict, dims, adjust=None) -> Iterator[Group]:
    """A group of `key` with exactly linear times (`coef` per implementation) at `dims`, `adjust(points)`
    applied before the fit, as the simulated H200's measured profile while the block runs."""
    pts = _synthetic_points(key, coef, dims)
    g = Group(key, adjust(pts) if adjust else pts)
    g.refit(H200.sm_count)
    with _groups_profile(tmp_path, monkeypatch, g):
        yield g


def _causal_group(**factors: dict) -> tuple[GroupKey, list, Group]:
    """A fitted causal bf16 D=128 group over PREFILL_DIMS: sdpa exactly linear, and each named
    implementation (keyword: name with ':' written '_') at sdpa's time times its factor per (B, S)."""
    key = GroupKey("fwd", "causal", "plain", "bf16", 128)
    pts = _synthetic_points(key, {"sdpa": (8.0, 1e3 / 550.0, 1e3 / 3500.0, 0.0)}, PREFILL_DIMS)
    pts = [pt._replace(ms={**pt.ms, **{n.replace("_", ":"): pt.ms["sdpa"] * f[(pt.batch, pt.seqlen_q)]
                                       for n, f in factors.items()}}) for pt in pts]
    g = Group(key, pts)
    g.refit(H200.sm_count)
    return key, pts, g


def test_a_lead_made_by_fitted_fixed_costs_far_below_the_measured_work_keeps_the_baseline(tmp_path, monkeypatch):
    # triton and plain sdpa run at one rate; their fits differ only in the fixed cost (30 vs 40 us)
    # fitted at >= 550 GFLOP. At 0.5 GFLOP (two heads of 1024 rows: not shorter rows than measured,
    # far less work) the fixed costs are most of the prediction (a 20% "lead"); compared inside the
    # measured work the two are within the margin, and sdpa runs.
    key = GroupKey("fwd", "dense", "plain", "bf16", 64)
    coef = {"sdpa": (40.0, 1e3 / 500.0, 0.0, 0.0), "triton": (30.0, 1e3 / 500.0, 0.0, 0.0)}
    dims = [(16, 32, 32, 2048, 2048), (4, 32, 32, 4096, 4096), (2, 32, 32, 8192, 8192), (1, 32, 32, 16384, 16384)]
    with _one_group_profile(tmp_path, monkeypatch, key, coef, dims):
        small = fd.explain(shape=(1, 2, 2, 1024, 1024, 64), device="h200")
        assert small.predicted["triton"] < 0.9 * small.predicted["sdpa"]  # the extrapolated "lead"
        assert small.variant == "sdpa", str(small)
        assert any("inside both models' measured work" in n for n in small.notes), small.notes
        inside = fd.explain(shape=(8, 32, 32, 2048, 2048, 64), device="h200")  # measured sizes: no clamp
        assert not any("inside both models' measured work" in n for n in inside.notes)


def test_rows_much_shorter_than_measured_compare_as_timed_at_the_shortest_point(tmp_path, monkeypatch):
    # triton's fit has the lower fixed cost and a slightly lower rate (the H100's D=64 fits: 5.5 us
    # and 445 TFLOP/s against 8.6 us and 488): at ViT's 197-token rows (work inside the measured
    # span, rows 5x shorter than the shortest measured) the fits put it ahead, and its anchors carry
    # that trend down; where it was measured it is slower. Below the shortest rows measured no trend
    # is carried: the two compare as timed there, and sdpa runs.
    key = GroupKey("fwd", "dense", "plain", "bf16", 64)
    dims = [(1, 16, 16, 2048, 2048), (1, 16, 2, 8192, 8192), (16, 32, 32, 1024, 1024), (4, 32, 32, 4096, 4096),
            (1, 32, 32, 16384, 16384)]
    coef = {"sdpa": (8.6, 1e3 / 488.0, 0.0, 0.0), "triton": (5.5, 1e3 / 445.0, 0.0, 0.0)}
    with _one_group_profile(tmp_path, monkeypatch, key, coef, dims):
        vit = fd.explain(shape=(64, 12, 12, 197, 197, 64), device="h200")
        assert vit.predicted["triton"] < 0.98 * vit.predicted["sdpa"], str(vit)  # the fits' "lead"
        assert vit.variant == "sdpa", str(vit)
        assert any("fewest query-key pairs per head" in n and "Sq=1024" in n for n in vit.notes), vit.notes
        assert "extrapolated" in vit.uncertain and any("197 x 197 query-key pairs" in m for m in vit.models), \
            (vit.uncertain, vit.models)
        # rows 4x shorter than the shortest measured (2x in each length) are no extrapolation
        near = fd.explain(shape=(64, 12, 12, 512, 512, 64), device="h200")
        assert not any("query-key pairs" in m for m in near.models), near.models
        # nor are a decode step's few keys (a memory-bound class), even from this group
        step = fd.explain(shape=(64, 12, 12, 1, 197, 64), device="h200")
        assert not any("query-key pairs" in m for m in step.models), step.models


def test_a_pinned_sdpa_kernel_runs_only_on_a_measured_lead(tmp_path, monkeypatch):
    # decode (memory-bound: only a measurement at the very shape anchors): sdpa:cudnn's fit carries
    # a lower fixed cost than plain SDPA's, 8% ahead at a batch-2 step, past PIN_MARGIN; beside the
    # measured shapes no measurement shows that lead, and plain SDPA runs; at the shape where
    # sdpa:cudnn measured 10% ahead it runs
    key = GroupKey("fwd", "decode", "plain", "bf16", 128)
    dims = [(1, 32, 8, 1, 8192), (8, 32, 8, 1, 4096), (64, 32, 8, 1, 2048), (4, 32, 8, 1, 32768),
            (32, 32, 8, 1, 1024)]
    coef = {"sdpa": (10.0, 0.0, 1e3 / 3100.0, 0.0), "sdpa:cudnn": (8.0, 0.0, 1e3 / 3100.0, 0.0)}
    def first(pts):  # sdpa:cudnn measured 10% ahead at the first point
        return [pts[0]._replace(ms={**pts[0].ms, "sdpa:cudnn": pts[0].ms["sdpa"] * 0.9})] + pts[1:]

    with _one_group_profile(tmp_path, monkeypatch, key, coef, dims, first) as g:
        beside = fd.explain(shape=(2, 32, 8, 1, 3000, 128), device="h200")
        assert beside.predicted["sdpa:cudnn"] < 0.95 * beside.predicted["sdpa"], str(beside)
        assert beside.variant == "sdpa", str(beside)
        assert any("runs instead only on a measured lead" in n for n in beside.notes), beside.notes
        at = fd.explain(shape=(*g.points[0].dims(), 128), device="h200")
        assert at.variant == "sdpa:cudnn" and any("at this very shape" in n for n in at.notes), str(at)


def test_one_slow_outlier_is_left_out_of_a_compute_class_fit_and_said():
    # five causal points on one line, the smallest timed 3x slow (a card at idle clocks after a
    # compile): the fit leaves it out, follows the other four exactly, records which point it left
    # out, and its worst error on its own points ignores it; the YAML keeps the record. The same
    # points in a memory-bound class keep every point (a long cache can be a real slow regime).
    from dataclasses import replace as dc_replace

    from flashdispatch.costmodel import OUTLIER_FACTOR, Fit, robust_fit

    dims = [(1, 16, 16, 2048, 2048), (16, 16, 16, 1024, 1024), (4, 16, 16, 4096, 4096),
            (1, 16, 16, 16384, 16384), (4, 32, 8, 4096, 4096)]
    truth = lambda x: 40.0 + 1.5 * x[1]  # 40 us + 667 TFLOP/s
    key = GroupKey("fwd", "causal", "plain", "bf16", 128)
    pts = [Point(*d) for d in dims]
    xs = [features(point_problem(key, pt), H200.sm_count) for pt in pts]
    ts = [truth(x) * (3.0 if i == 0 else 1.0) for i, x in enumerate(xs)]
    # a first point that "a" was not measured at: Fit.excluded counts "a"'s own points only
    other = Point(2, 16, 16, 3000, 3000)._replace(ms={"b": 1.0})
    g = Group(key, [other] + [pt._replace(ms={"a": t / 1e3}) for pt, t in zip(pts, ts)])
    g.refit(H200.sm_count)
    f = g.fits["a"]
    assert f.excluded == (0,) and f.n == 4 and f.rms < 1e-9, f
    assert (f.lo_gflop, f.hi_gflop) == (min(x[1] for x in xs), max(x[1] for x in xs))  # the measured span
    assert f.predict_us(xs[0]) == pytest.approx(truth(xs[0]), rel=1e-6)
    assert g.worst_error("a", H200.sm_count) < 1e-9
    assert "1 slow outlier left out" in f.describe()
    assert Fit.from_yaml(f.to_yaml()).excluded == (0,)
    with pytest.raises(ValueError, match="excluded"):
        Fit.from_yaml({**f.to_yaml(), "excluded": [-1]})
    # a memory-bound class keeps it; a point only a little slow (under OUTLIER_FACTOR) stays too
    mem = Group(GroupKey("fwd", "speculative", "plain", "bf16", 128),
                [Point(b, hq, hkv, 8, 4 * sk)._replace(ms={"a": t / 1e3}) for (b, hq, hkv, _, sk), t in zip(dims, ts)])
    mem.refit(H200.sm_count)
    assert mem.fits["a"].excluded == () and mem.fits["a"].n == 5
    mild = [truth(x) * (OUTLIER_FACTOR * 0.8 if i == 0 else 1.0) for i, x in enumerate(xs)]
    assert robust_fit(xs, mild).excluded == ()
    assert dc_replace(f, excluded=()).to_yaml().get("excluded") is None


def test_measurements_beside_the_problem_decide_a_lead_the_fits_errors_hide(tmp_path, monkeypatch):
    # triton: 15% faster than sdpa at the two large points, 60-80% slower at the three small ones (a
    # kernel whose fixed cost the fits cannot follow). The fits' errors sum past any such lead, so the
    # fits alone keep plain SDPA everywhere; the measured ratios beside each problem decide instead.
    key, pts, g = _causal_group(triton={(16, 1024): 1.6, (4, 4096): 0.85, (1, 16384): 0.85, (8, 2048): 1.7,
                                        (32, 512): 1.8})
    need = g.fits["triton"].rms + g.fits["sdpa"].rms  # the margin the fits' errors set
    with _groups_profile(tmp_path, monkeypatch, g):
        near_fast = fd.explain(shape=(3, 32, 8, 5000, 5000, 128), causal=True, device="h200")
        assert near_fast.predicted["triton"] > near_fast.predicted["sdpa"] * (1.0 - need)  # fits alone: sdpa
        assert near_fast.variant == "triton", str(near_fast)
        assert any("anchored at the 2 nearest points" in n for n in near_fast.notes), near_fast.notes
        assert "inside their fit errors" not in near_fast.uncertain  # the measurements vouch for the lead
        near_slow = fd.explain(shape=(24, 32, 32, 600, 600, 128), causal=True, device="h200")
        assert near_slow.variant == "sdpa", str(near_slow)
        # another head dim's group stands in, as for the prediction: its measurements still decide
        other_d = fd.explain(shape=(3, 32, 8, 5000, 5000, 256), causal=True, device="h200")
        assert other_d.variant == "triton" and any("anchored" in n for n in other_d.notes), str(other_d)
        # another class's does not: a chunk borrowing the causal group keeps the fits' margin
        chunk = fd.explain(shape=(3, 32, 8, 1024, 8192, 128), causal=True, device="h200")
        assert not any("anchored" in n for n in chunk.notes), str(chunk)
        # at a measured point its own measurement decides
        at = point_problem(key, pts[1])
        ratio, k = g.anchored_ratio(at, "triton", "sdpa", H200.sm_count)
        assert k == 1 and ratio == pytest.approx(0.85, rel=1e-9)


def test_a_window_reads_only_the_keys_some_query_sees():
    from flashdispatch.problem import window_visible_keys

    assert window_visible_keys(1, 32768, (4095, 0)) == 4096  # decode: the last 4096 keys
    assert window_visible_keys(8, 32768, (4095, 0)) == 4103  # 8 drafted rows: their windows' union
    assert window_visible_keys(16384, 16384, (4095, 0)) == 16384  # a prompt: every key
    assert window_visible_keys(4, 100, (-1, 0)) == 100 and window_visible_keys(4, 100, (10, -1)) == 14
    assert window_visible_keys(300, 100, (10, 0)) == 100  # Sq > Sk: the first rows see nothing
    decode = _p(1, 32768, b=8, hq=32, hkv=8)
    windowed = _p(1, 32768, b=8, hq=32, hkv=8, window=(4095, 0))
    full, win = features(decode, H200.sm_count), features(windowed, H200.sm_count)
    kv_bytes = lambda sk: 8 * 8 * sk * 256 * 2  # noqa: E731  (B x Hkv x keys x (D + Dv) x bf16)
    assert full[2] * 1e9 == pytest.approx(kv_bytes(32768) + 8 * 32 * 256 * 2)
    assert win[2] * 1e9 == pytest.approx(kv_bytes(4096) + 8 * 32 * 256 * 2)
    # a kernel that masks instead of skipping reads every key (and the mask)
    assert features(windowed, H200.sm_count, dense=True)[2] > full[2]


def test_a_kernel_the_measurements_promote_past_a_held_back_model_runs_and_the_decision_says_so(tmp_path, monkeypatch):
    # triton:gluon's model misses its own points 8x (unreliable) and predicts it fastest: plain SDPA
    # stays ahead of it. triton, predicted behind SDPA by its fits, measured 0.85x of SDPA beside the
    # problem, is promoted: it runs, and neither the source nor a note may say the baseline runs.
    _, _, g = _causal_group(
        triton={(16, 1024): 3.5, (4, 4096): 0.85, (1, 16384): 0.85, (8, 2048): 3.5, (32, 512): 3.5},
        triton_gluon={(16, 1024): 3.0, (4, 4096): 0.3, (1, 16384): 0.3, (8, 2048): 0.3, (32, 512): 3.0})
    with _groups_profile(tmp_path, monkeypatch, g):
        d = fd.explain(shape=(3, 32, 8, 5000, 5000, 128), causal=True, device="h200")
        assert d.predicted["triton"] > d.predicted["sdpa"]  # the fits place it behind
        assert d.variant == "triton", str(d)
        assert "baseline margin" not in d.source and not any("the baseline, runs" in n for n in d.notes), str(d)


@pytest.mark.parametrize("key", ["h100", "h200"])
def test_memory_bound_steps_are_never_judged_by_anchors(key):
    # anchors are the nearest points in work and bytes; a decode step with a batch-64 point's bytes
    # but 32 programs took a trend made of the fits' wave-tail term alone (Triton read 16% ahead of
    # SDPA where the two tie): decode and speculative leads keep the fits' own margin
    for shape in [(1, 32, 8, 1, 131072, 128), (64, 32, 8, 1, 2000, 128), (1, 32, 8, 8, 131072, 128),
                  (16, 32, 8, 2, 2000, 128), (16, 71, 1, 1, 2000, 64)]:
        d = fd.explain(shape=shape, causal=True, device=key)
        assert not any("anchored" in n or "this very shape" in n for n in d.notes), (shape, str(d))


def test_a_memory_bound_step_at_a_measured_shape_takes_that_measurement(tmp_path, monkeypatch):
    # decode: triton measured 0.5% ahead of sdpa at one point (inside the noise), and its fit puts
    # it well ahead there (the fit follows the other points, where it leads by 10%): at that very
    # shape the measurement decides, beside it the fits' margin does
    key = GroupKey("fwd", "decode", "plain", "bf16", 128)
    dims = [(1, 32, 8, 1, 8192), (8, 32, 8, 1, 4096), (64, 32, 8, 1, 2048), (4, 32, 8, 1, 32768),
            (16, 32, 8, 1, 16384), (2, 32, 8, 1, 65536), (32, 32, 8, 1, 1024), (1, 32, 8, 1, 2048),
            (128, 32, 8, 1, 4096)]
    def with_triton(pts):
        return [pt._replace(ms={**pt.ms, "triton": pt.ms["sdpa"] * (0.995 if i == 0 else 0.9)})
                for i, pt in enumerate(pts)]

    # sdpa: 8 us + 3 TB/s
    with _one_group_profile(tmp_path, monkeypatch, key, {"sdpa": (8.0, 0.0, 1e6 / 3000.0, 0.0)}, dims,
                            with_triton) as g:
        at = g.points[0]
        need = max(0.02, g.fits["triton"].rms + g.fits["sdpa"].rms)  # the margin the fits alone would ask
        fitted = g.fits["triton"].predict_us(features(point_problem(key, at), H200.sm_count))
        assert fitted < (1.0 - need) * g.fits["sdpa"].predict_us(features(point_problem(key, at), H200.sm_count))
        d = fd.explain(shape=(*at.dims(), 128), device="h200")
        assert d.variant == "sdpa", str(d)
        assert any("at this very shape" in n for n in d.notes), d.notes
        beside = fd.explain(shape=(2, 32, 8, 1, 8192, 128), device="h200")
        assert beside.variant == "triton" and not any("this very shape" in n for n in beside.notes), str(beside)
        # another head dim's group stands in: its measurement at the same dims does not decide
        other_d = fd.explain(shape=(*at.dims(), 64), device="h200")
        assert not any("this very shape" in n for n in other_d.notes), str(other_d)


def test_a_gqa_ratio_beyond_the_measured_ones_makes_the_decision_unsure(synthetic_h200):
    # the synthetic decode points hold 32 query heads on 8 or 32 K/V heads: ratios 1..4
    d = fd.explain(shape=(16, 71, 1, 1, 2000, 128), device="h200")
    assert "GQA ratio 71 lies beyond the 1..4 measured" in d.uncertain, str(d)
    near = fd.explain(shape=(16, 64, 8, 1, 2000, 128), device="h200")  # 8: within 2x of the measured 4
    assert "GQA ratio" not in near.uncertain, str(near)


def _decode_group(triton_factor: float) -> Group:
    """A fitted decode bf16 D=128 group measured at 4 query heads per K/V head (32/8): sdpa exactly
    linear in the bytes, triton at `triton_factor` times sdpa's time."""
    key = GroupKey("fwd", "decode", "plain", "bf16", 128)
    dims = [(1, 32, 8, 1, 8192), (8, 32, 8, 1, 4096), (64, 32, 8, 1, 2048), (4, 32, 8, 1, 32768)]
    pts = _synthetic_points(key, {"sdpa": (8.0, 0.0, 1e3 / 3000.0, 0.0)}, dims)
    pts = [pt._replace(ms={**pt.ms, "triton": pt.ms["sdpa"] * triton_factor}) for pt in pts]
    g = Group(key, pts)
    g.refit(H200.sm_count)
    return g


@pytest.mark.parametrize("factor, shares", [(1.04, True), (1.2, False)])
def test_far_more_query_heads_per_kv_head_than_measured_go_to_the_kernel_that_reads_kv_once_per_group(
        tmp_path, monkeypatch, factor, shares):
    # measured at 4 query heads per K/V head; 71 on one: plain SDPA's prediction there is only a lower
    # bound (it does not declare decode_shares_kv), triton's a model (it does). Within
    # GQA_SHARED_MARGIN triton runs and the decision says why; a larger predicted lead keeps SDPA,
    # unsure. The split-KV Triton kernel declares it; SDPA does not.
    from flashdispatch import selection
    from flashdispatch.registry import REGISTRY

    dev = simulated_device("h200")
    assert REGISTRY.get("triton").capabilities(dev).decode_shares_kv
    assert not REGISTRY.get("sdpa").capabilities(dev).decode_shares_kv
    assert (factor - 1.0 <= selection.GQA_SHARED_MARGIN) == shares
    with _groups_profile(tmp_path, monkeypatch, _decode_group(factor)):
        d = fd.explain(shape=(16, 71, 1, 1, 2000, 128), device="h200")
        assert d.predicted["sdpa"] < d.predicted["triton"], str(d)
        if shares:
            assert d.variant == "triton", str(d)
            assert any("does not declare that a decode step reads K/V once per query group" in n for n in d.notes)
            assert "GQA ratio" not in d.uncertain, str(d)
        else:
            assert d.variant == "sdpa", str(d)
            assert "GQA ratio 71 lies beyond the 4..4 measured for sdpa" in d.uncertain, str(d)
        # fewer query heads per K/V head than measured (1): no reason to doubt SDPA's bytes model
        mha = fd.explain(shape=(16, 8, 8, 1, 2000, 128), device="h200")
        assert mha.variant == "sdpa" and not any("once per query group" in n for n in mha.notes), str(mha)
        # within GQA_STRETCH of the measured ratio: the models decide as they are
        near = fd.explain(shape=(16, 64, 8, 1, 2000, 128), device="h200")
        assert near.variant == "sdpa", str(near)


def test_between_two_kernels_that_both_beat_the_baseline_the_measurements_beside_the_problem_rank_them(
        tmp_path, monkeypatch):
    # gluon measured 6% ahead of triton at every point; triton's smallest points are slow, which sets
    # its fit's fixed cost high and its rate low, so that the fits alone put triton ahead at large work
    slow_small = {(16, 1024): 0.9, (4, 4096): 0.5, (1, 16384): 0.5, (8, 2048): 1.2, (32, 512): 1.5}
    key, pts, g = _causal_group(triton=slow_small,
                                triton_gluon={d: 0.94 * min(f, 0.5) for d, f in slow_small.items()})
    with _groups_profile(tmp_path, monkeypatch, g):
        for shape, words in (((1, 32, 8, 15000, 15000, 128), "anchored at the 2 nearest points"),
                             ((1, 32, 8, 65536, 65536, 128), "at the end of the work they were timed over")):
            d = fd.explain(shape=shape, causal=True, device="h200", backend="triton")  # both of the family
            assert d.predicted["triton"] < d.predicted["triton:gluon"], str(d)  # the fits alone: triton
            assert d.variant == "triton:gluon", str(d)
            assert any(words in n and "triton:gluon runs" in n for n in d.notes), d.notes
            assert d.margin is not None and d.margin < 0 and "the notes say which rule chose" in str(d), str(d)
        # against plain SDPA too: past the span (inside 4x of it, so not extrapolated) the end's ratio
        past = fd.explain(shape=(1, 32, 8, 24000, 24000, 128), causal=True, device="h200")
        assert past.variant == "triton:gluon", str(past)
        end_sdpa = f"takes {0.94 * 0.5:.3g} of plain SDPA's time, as measured for both at the end of the work"
        assert any(n.startswith(f"triton:gluon {end_sdpa}") for n in past.notes), past.notes
        # beyond the span, the ratio is the one measured at its end
        far = fd.explain(shape=(1, 32, 8, 65536, 65536, 128), causal=True, device="h200").problem
        ratio, k = g.anchored_ratio(far, "triton:gluon", "triton", H200.sm_count)
        assert k == 0 and ratio == pytest.approx(0.94, rel=1e-9)
        # the measurements favour triton instead: the fits' order stands
        key, pts, g2 = _causal_group(triton=slow_small,
                                     triton_gluon={d: 1.06 * min(f, 0.5) for d, f in slow_small.items()})
        with _groups_profile(tmp_path, monkeypatch, g2):
            d = fd.explain(shape=(1, 32, 8, 65536, 65536, 128), causal=True, device="h200", backend="triton")
            assert d.variant == "triton" and not any("runs" in n and "triton:gluon" in n for n in d.notes), str(d)
