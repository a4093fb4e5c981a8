"""The tuner and the benchmark on the CPU: the model grid and its estimated duration, sweep logic,
checking before timing, config pruning, the schema-2 profile it writes (read back by the
dispatcher's cost model), interruption and resume.

Times are made deterministic where the test is about ranking: `timing.median_ms` and
`timing.estimate_ms` are replaced by the config's declared cost, so no test asserts on a clock.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import pytest
import torch

import flashdispatch
from flashdispatch.backend import Capabilities, Implementation
from flashdispatch.device import DeviceInfo
from flashdispatch.costmodel import SERVING_CLASSES, GroupKey, group_key, shape_class
from flashdispatch.device import simulated_device
from flashdispatch.problem import Problem, problem_from_shape
from flashdispatch.profile_store import SCHEMA_VERSION, Profile, parse_profile, timing_pass
from flashdispatch.reference import attention_math
from flashdispatch.registry import REGISTRY
from flashdispatch.tools import bench, bench_report, shapes, timing, tune, verify
from flashdispatch.tools.decode_timing import captured_in_serving

TINY = shapes.tiny_shapes("fp32")
CPU = torch.device("cpu")


class FakeKernel(Implementation):
    """A tunable backend whose configs declare their cost ("ms") and may be wrong on purpose."""

    backend: ClassVar[str] = "fake"

    def __init__(self, name: str = "fake", configs: list[dict[str, Any]] | None = None) -> None:
        self._name = name
        self.configs = configs if configs is not None else [{"BLOCK": 16, "ms": 2.0}]
        self.runs: list[dict[str, Any]] = []

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        return dict(self.configs[0])

    def config_space(self, p: Problem, dev: DeviceInfo) -> list[dict[str, Any]]:
        return [dict(c) for c in self.configs]

    def run(self, q, k, v, p, config):  # type: ignore[no-untyped-def]
        self.runs.append(dict(config))
        if config.get("raise"):
            raise RuntimeError("out of shared memory (simulated)")
        out, _ = attention_math(q, k, v, causal=p.causal, scale=p.scale, upcast=False)
        if config.get("wrong"):
            out = out + 0.25  # a fast kernel with an indexing bug
        if config.get("nan_row"):
            out = out.clone()
            out[..., -1, :] = float("nan")  # an unwritten tail row
        return out.to(q.dtype), None


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch):
    """Time = the config's declared "ms" (sdpa variants: 5 ms); records what got timed."""
    timed: list[tuple[str, float]] = []
    current: dict[str, float] = {"ms": 5.0}

    orig_try = tune._try_config

    def try_config(impl, cfg, *a, **kw):  # type: ignore[no-untyped-def]
        current["ms"] = float(cfg.get("ms", 5.0))
        current["name"] = impl.name  # type: ignore[assignment]
        return orig_try(impl, cfg, *a, **kw)

    def median_ms(fn, device, **kw):  # type: ignore[no-untyped-def]
        fn()
        timed.append((str(current.get("name")), current["ms"]))
        return current["ms"]

    def estimate_ms(fn, device):  # type: ignore[no-untyped-def]
        fn()
        return current["ms"]

    monkeypatch.setattr(tune, "_try_config", try_config)
    monkeypatch.setattr(timing, "median_ms", median_ms)
    monkeypatch.setattr(timing, "estimate_ms", estimate_ms)
    # the declared times stand: no interleaved re-timing on top (its own test is below)
    monkeypatch.setattr(tune, "_retime_interleaved", lambda *a, **kw: None)
    return timed


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --- shapes and buckets -------------------------------------------------------------------------


def _points(prof: Profile) -> list[Any]:
    return [pt for g in prof.groups for pt in g.points]


@pytest.mark.parametrize("name", ["quick", "full", "tiny", "cpu"])
def test_every_shape_is_timed_and_grouped_as_the_dispatcher_builds_it(name: str) -> None:
    for s in shapes.named(name):
        if s.serving:
            _check_serving_shape(s)
            continue
        window = (s.window, 0) if s.window >= 0 else None
        p = problem_from_shape(s.dims, dtype=s.dtype, causal=s.causal, needs_grad=s.needs_grad, window=window)
        assert timing_pass(p) == s.pass_, s
        m = tune.bucket_match(s)
        key = group_key(p)
        assert s.group == key and m == {"pass": key.pass_, "class": key.cls, "variant": key.variant,
                                        "dtype": key.dtype, "head_dim": key.head_dim}, s
        assert m["class"] == shape_class(p) and (m["variant"] == "window") == (s.window >= 0), s
        assert captured_in_serving(s) == (key.cls in ("decode", "speculative")), s


def _check_serving_shape(s: shapes.Shape) -> None:
    """A serving shape's group is the one attention_varlen / attention_kvcache builds for its call."""
    if s.serving == "varlen":
        lengths = shapes.varlen_lengths(s.batch, s.seqlen_q)
        assert sum(lengths) == s.batch * s.seqlen_q and min(lengths) >= 1, s
    sp = s.serving_problem()
    assert sp.kind == s.serving and sp.batch == s.batch and sp.needs_grad == s.needs_grad, s
    cls = "varlen" if s.serving == "varlen" else "kvcache" if s.seqlen_q <= 16 else "kvcache_chunked"
    want = GroupKey("fwd_bwd" if s.needs_grad else "fwd", cls, "plain", s.dtype, s.head_dim)  # written out
    assert s.group == want == sp.model_key() and cls in SERVING_CLASSES, s
    assert tune.bucket_match(s)["class"] == s.group.cls, s
    assert captured_in_serving(s) == (s.group.cls == "kvcache"), s


def test_grids_hold_the_benchmark_shapes() -> None:
    """The tuned-shape bench measures shapes the tune measured: quick holds the quick bench, full
    every bench shape."""
    def ids(plan: list[shapes.Shape]) -> set[str]:
        return {tune.bucket_id(s) for s in plan}

    assert ids(shapes.bench_shapes(("bf16",), quick=True)) <= ids(shapes.tune_shapes(quick=True))
    assert ids(shapes.bench_shapes(("bf16",))) <= ids(shapes.tune_shapes(quick=False))


def _round(n: int) -> bool:
    """A power of two or 1.5x one."""
    return n & (n - 1) == 0 or (n % 3 == 0 and (n // 3) & (n // 3 - 1) == 0 and n // 3 * 2 & (n // 3 * 2 - 1) == 0)


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_the_grid_is_generic_round_sizes(quick: bool) -> None:
    """The grid's own points (real models' shapes are the held-out set): 16 query heads, lengths
    and batches powers of two or their 1.5x, GQA 1/4/8; the benchmark shapes (FA2 sweep, special
    shapes) are the only others."""
    bench = {tune.bucket_id(s) for s in shapes.bench_shapes(("bf16",), quick=quick)}
    own = [s for s in shapes.tune_shapes(quick=quick) if tune.bucket_id(s) not in bench]
    assert own
    for s in own:
        assert s.label.startswith("grid-") and s.heads_q == shapes.GRID_HEADS_Q, s
        assert s.heads_q // s.heads_kv in (1, 4, 8), s
        for n in (s.batch, s.seqlen_q, s.seqlen_k) + ((s.window,) if s.window >= 0 else ()):
            assert _round(n), (n, s)
    assert _round(6144) and _round(1536) and not _round(6000) and not _round(1000)


@pytest.mark.parametrize("quick,least", [(True, 2), (False, 3)], ids=["quick", "full"])
def test_every_group_has_points_enough_for_a_model_and_comes_breadth_first(quick: bool, least: int) -> None:
    plan = shapes.tune_shapes(quick=quick)
    groups: dict[Any, list[shapes.Shape]] = {}
    for s in plan:
        groups.setdefault(s.group, []).append(s)
    thin = {g.label(): len(v) for g, v in groups.items() if len(v) < least}
    assert not thin, thin
    # a run cut short still has every group: the first len(groups) shapes are one per group, the
    # next len(groups) a second point of each
    n = len(groups)
    assert {s.group for s in plan[:n]} == set(groups)
    assert {s.group for s in plan[n:2 * n]} == set(groups)
    # both dtypes and every head dim in the full grid, the window variant in both
    keys = set(groups)
    assert {k.variant for k in keys} == {"plain", "window"}
    assert {k.pass_ for k in keys if k.variant == "window"} == {"fwd", "fwd_bwd"}
    assert {k.cls for k in keys} == {"dense", "causal", "chunked", "speculative", "decode", "causal_tall",
                                     "varlen", "kvcache", "kvcache_chunked"}
    # the serving calls: packed training too, and decode timed as serving runs it
    assert {(k.pass_, k.cls) for k in keys if k.cls in SERVING_CLASSES} == {
        ("fwd", "varlen"), ("fwd_bwd", "varlen"), ("fwd", "kvcache"), ("fwd", "kvcache_chunked")}
    if not quick:
        assert {k.dtype for k in keys} == {"bf16", "fp16"}
        assert {k.head_dim for k in keys} == {64, 80, 96, 128, 192, 256}
        gqa = {s.heads_q // s.heads_kv for s in plan}
        assert {1, 4, 8} <= gqa


@pytest.mark.parametrize("key", ["h100", "h200"])
@pytest.mark.parametrize("quick,limit_s", [(True, tune.QUICK_LIMIT_S), (False, tune.FULL_LIMIT_S)],
                         ids=["quick", "full"])
def test_plans_fit_their_time_limits_at_conservative_rates(key: str, quick: bool, limit_s: float) -> None:
    """estimate_plan at tune.RATES (documented there as slower than the cards measured): quick
    under 10 minutes, full under 45, on an H100 and an H200, with every backend that can run there."""
    dev = simulated_device(key)
    plan = shapes.tune_shapes(quick=quick)
    est = tune.estimate_plan(plan, dev, tune.TuneOptions.preset(quick))
    assert {"sdpa", "triton", "cupy"} <= set(tune.default_candidates(dev))
    assert est.compiles > 0 and est.trials > len(plan) * 4, est.describe()
    assert est.seconds < limit_s, est.describe()
    assert len(est.per_shape) == len(plan) and all(e > 0 for e in est.per_shape)


def test_the_estimate_grows_with_the_work_and_the_configs() -> None:
    dev = simulated_device("h200")
    small = shapes.Shape("a", "bf16", 1, 16, 16, 1024, 1024, 128, True, "fwd")
    big = small._replace(batch=64)
    quick = tune.TuneOptions.preset(True)
    e = tune.estimate_plan([small, big], dev, quick)
    assert e.per_shape[0] > e.per_shape[1] > 0  # the first shape pays the kernel builds
    assert tune.estimate_plan([big], dev, quick).seconds > tune.estimate_plan([small], dev, quick).seconds
    wide = tune.estimate_plan([small, big], dev, tune.TuneOptions.preset(True, max_configs=6))
    assert wide.seconds > e.seconds and wide.trials > e.trials and wide.compiles > e.compiles


def test_shape_with_the_wrong_pass_is_rejected_with_its_name() -> None:
    with pytest.raises(ValueError, match="bad.*as 'decode'"):
        shapes.check_shape(shapes.Shape("bad", "bf16", 1, 8, 8, 1, 128, 64, False, "fwd"))


def test_fa2_sweep_follows_the_paper() -> None:
    sweep = shapes.fa2_sweep(("fp16",), passes=("fwd",))
    assert len(sweep) == 2 * 2 * 6
    for s in sweep:
        assert s.batch * s.seqlen_k == 16384 and s.heads_q * s.head_dim == 2048


# --- checking before timing -----------------------------------------------------------------------


@pytest.mark.parametrize("s", TINY, ids=lambda s: s.label)
def test_reference_blocks_accept_the_truth_and_reject_a_wrong_answer(s: shapes.Shape) -> None:
    q, k, v, _, p = tune.make_inputs(s, CPU, _gen())
    blocks = verify.reference_blocks(q, k, v, p)
    good, _ = attention_math(q.detach(), k.detach(), v.detach(), causal=s.causal, upcast=False)
    assert verify.check_output(good, p, blocks).ok
    bad = good.clone()
    bad[-1, -1, -1, 0] += 1.0  # one element of the last (batch, head, row)
    assert not verify.check_output(bad, p, blocks).ok
    nan = good.clone()
    nan[0, 0, p.seqlen_q // 2, 0] = float("nan")  # anywhere, even outside the checked rows
    assert "NaN" in verify.check_output(nan, p, blocks).reason


def test_row_blocks_of_a_long_bottom_right_causal_problem_match_the_full_reference() -> None:
    # Sq > ALL_ROWS_UP_TO so that blocks are used; Sk > Sq exercises the key truncation.
    s = shapes.Shape("long", "fp64", 2, 4, 2, 300, 333, 8, True, "fwd")
    q, k, v, _, p = tune.make_inputs(s, CPU, _gen(1))
    full, _ = attention_math(q, k, v, causal=True, upcast=True)
    blocks = verify.reference_blocks(q, k, v, p)
    assert len(blocks) == 6
    g = p.gqa_ratio
    for b in blocks:
        r0, r1 = b.rows
        want = full[b.batch:b.batch + 1, b.kv_head * g:(b.kv_head + 1) * g, r0:r1]
        torch.testing.assert_close(b.ref, want)


def test_gradient_check_catches_a_wrong_backward() -> None:
    p = problem_from_shape((1, 4, 2, 29, 29, 16), dtype="fp32", device_kind="cpu", causal=True, needs_grad=True)

    def good(q, k, v, pp):  # type: ignore[no-untyped-def]
        return attention_math(q, k, v, causal=pp.causal, scale=pp.scale, upcast=False)[0]

    def bad_dv(q, k, v, pp):  # type: ignore[no-untyped-def]
        return attention_math(q, k, v * 1.01, causal=pp.causal, scale=pp.scale, upcast=False)[0]

    assert verify.check_grads(good, p, CPU, _gen()).ok
    assert not verify.check_grads(bad_dv, p, CPU, _gen()).ok


# --- the sweep ----------------------------------------------------------------------------------


def test_fast_wrong_kernel_never_wins_and_the_fastest_correct_config_does(fake_clock) -> None:
    fake = FakeKernel(configs=[
        {"BLOCK": 16, "ms": 3.0},
        {"BLOCK": 32, "ms": 0.1, "wrong": True},
        {"BLOCK": 64, "ms": 1.0},
        {"BLOCK": 128, "ms": 0.2, "nan_row": True},
        {"BLOCK": 256, "ms": 9.0, "raise": True},
    ])
    impls = {"sdpa": REGISTRY.get("sdpa"), "fake": fake}
    r = tune.measure_bucket(TINY[0], impls, CPU, tune.TuneOptions(), _gen())
    assert r.ranking() == ["fake", "sdpa"]
    assert r.best()["fake"].config == {"BLOCK": 64, "ms": 1.0}
    status = {t.config.get("BLOCK"): t.status for t in r.trials if t.name == "fake"}
    assert status == {16: "ok", 32: "wrong", 64: "ok", 128: "wrong", 256: "error"}
    assert ("fake", 0.1) not in fake_clock and ("fake", 0.2) not in fake_clock  # never timed


def test_every_config_of_the_space_is_tried_once_default_first_and_capped(fake_clock) -> None:
    space = [{"BLOCK": b, "ms": 1.0 + b / 100} for b in (16, 32, 64, 32)]  # one duplicate
    fake = FakeKernel(configs=space)
    r = tune.measure_bucket(TINY[0], {"fake": fake}, CPU, tune.TuneOptions(), _gen())
    assert [t.config["BLOCK"] for t in r.trials] == [16, 32, 64]
    capped = tune.measure_bucket(TINY[0], {"fake": fake}, CPU, tune.TuneOptions(max_configs=2), _gen())
    assert [t.config["BLOCK"] for t in capped.trials] == [16, 32]
    wide = FakeKernel(configs=[{"BLOCK": b, "ms": 1.0} for b in range(16, 16 + 10)])
    picked = [c["BLOCK"] for c in tune.candidate_configs(wide, None, None, 4)]  # type: ignore[arg-type]
    assert picked == [16, 17, 20, 23]  # the default, then spread over the rest


def test_hopeless_configs_are_abandoned_after_an_estimate(fake_clock) -> None:
    fake = FakeKernel(configs=[{"BLOCK": 16, "ms": 1.0}, {"BLOCK": 32, "ms": 50.0}])
    r = tune.measure_bucket(TINY[0], {"fake": fake}, CPU, tune.TuneOptions(), _gen())
    assert [t.status for t in r.trials] == ["ok", "abandoned"]
    assert [ms for n, ms in fake_clock] == [1.0]
    assert r.ranking() == ["fake"]


def test_backends_that_cannot_serve_are_skipped_with_their_reasons(fake_clock) -> None:
    s = shapes.tiny_shapes("fp64")[0]
    r = tune.measure_bucket(s, {"fake": FakeKernel(), "sdpa": REGISTRY.get("sdpa")}, CPU, tune.TuneOptions(), _gen())
    assert "dtype=fp64" in r.skipped["fake"]
    assert r.ranking() == ["sdpa"]


def test_on_a_cpu_the_candidates_are_timed_again_interleaved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU shared with other work drifts within seconds: the one-after-another medians are
    replaced by the medians of interleaved repetitions of every timed candidate of the shape."""
    calls: list[list[str]] = []

    def interleaved(fns, device, **kw):  # type: ignore[no-untyped-def]
        calls.append(sorted(fns))
        for fn, _grads in fns.values():
            fn()  # each is a callable timing would call
        # drift made the first-timed look slow: interleaved, the second is the slower one
        return {name: [1.0 + int(name), 1.0 + int(name), 9.0] for name in fns}

    monkeypatch.setattr(timing, "interleaved_samples_ms", interleaved)
    monkeypatch.setattr(timing, "estimate_ms", lambda fn, device: 1.0)  # nothing abandoned
    monkeypatch.setattr(timing, "median_ms", lambda fn, device, **kw: 3.0)  # the one-after-another reading
    impls = {"sdpa": REGISTRY.get("sdpa"), "sdpa:math": REGISTRY.get("sdpa:math")}
    r = tune.measure_bucket(TINY[0], impls, CPU, tune.TuneOptions(warmup_ms=1, rep_ms=2), _gen())
    assert calls == [["0", "1"]]
    assert [(t.name, t.ms) for t in r.trials] == [("sdpa", 1.0), ("sdpa:math", 2.0)]
    assert all("interleaved median of 3" in t.note for t in r.trials)
    assert r.ranking() == ["sdpa", "sdpa:math"]


def test_select_implementations_by_family_variant_and_exclusion() -> None:
    got = tune.select_implementations(["sdpa"], ["sdpa:math"], CPU)
    assert "sdpa:flash" in got and "sdpa:math" not in got and "triton" not in got
    assert list(tune.select_implementations(["sdpa:flash"], [], CPU)) == ["sdpa:flash"]
    with pytest.raises(ValueError, match="--backends: unknown backend 'nope'"):
        tune.select_implementations(["nope"], [], CPU)


# --- the profile it writes --------------------------------------------------------------------


def _meta() -> tune.ProfileMeta:
    return tune.ProfileMeta(key="cpu", name="CPU", arch="cpu", card="test CPU", command="flashdispatch tune --test")


def test_written_profile_parses_and_the_dispatcher_picks_the_fastest_measured(
    fake_clock, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeKernel(configs=[{"BLOCK": 16, "ms": 1.0}, {"BLOCK": 64, "ms": 0.5}])
    impls = {"sdpa": REGISTRY.get("sdpa"), "sdpa:math": REGISTRY.get("sdpa:math"), "fake": fake}
    fp32 = [s for s in TINY if s.pass_ != "fwd_bwd"]  # FakeKernel has no backward
    results = [tune.measure_bucket(s, impls, CPU, tune.TuneOptions(), _gen(i)) for i, s in enumerate(fp32)]
    text = tune.profile_yaml(results, _meta())
    prof = parse_profile(text, "cpu.yaml")
    assert prof.measured and prof.schema == SCHEMA_VERSION and len(_points(prof)) == len(fp32)
    assert prof.device["sm_count"] >= 1
    for s in fp32:
        g = prof.group(s.group)  # each shape is a point of its own group
        assert g is not None and {"fake", "sdpa", "sdpa:math"} <= set(g.fits), s
        (pt,) = [pt for pt in g.points if pt.dims() == s.dims[:5]]
        assert pt.ms["fake"] == 0.5 and pt.ms["sdpa"] == 5.0 and min(pt.ms, key=pt.ms.get) == "fake"
        assert pt.config["fake"] == {"BLOCK": 64, "ms": 0.5} and g.config["fake"] == {"BLOCK": 64, "ms": 0.5}
        assert "sdpa" not in pt.config  # only tuned implementations carry configs
        p = problem_from_shape(s.dims, dtype=s.dtype, device_kind="cpu", causal=s.causal)
        assert g.nearest_points(p, "fake", prof.sm_count, 1) == [pt]  # its own point is the nearest
        pred = prof.model.predict(p, "fake")
        assert pred is not None and not pred.borrowed and pred.ms == pytest.approx(0.5, rel=0.05)

    (tmp_path / "cpu.yaml").write_text(text)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    REGISTRY.register(fake)
    try:
        flashdispatch.refresh()
        s = fp32[0]
        d = flashdispatch.explain(shape=s.dims, dtype=s.dtype, causal=s.causal)
        assert d.variant == "fake" and d.config["BLOCK"] == 64 and d.source.startswith("profile:")
        assert d.predicted["fake"] == pytest.approx(0.5, rel=0.05)
    finally:
        REGISTRY.unregister("fake")
        flashdispatch.refresh()


def test_yaml_writer_quotes_what_yaml_would_misread() -> None:
    import yaml

    obj = {"sdpa:cudnn": 0.5, "on": "yes", "date": "2026-11-25", "n": 3, "x": 1e-7, "ok": True, "none": None}
    assert yaml.safe_load(tune.flow(obj)) == {**obj, "x": 1e-7}


def test_unmeasured_profile_has_rankings_and_no_numbers() -> None:
    r = tune.BucketResult("id", TINY[0], tune.bucket_match(TINY[0]),
                          [tune.Trial("sdpa:math", {"X": 1}, "ok", 2.0), tune.Trial("sdpa", {}, "ok", 1.0)])
    meta = _meta()
    meta.measured = False
    text = tune.profile_yaml([r], meta)
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "ms:" not in body and "fits:" not in body and "config" not in body and "NOT MEASURED" in text
    prof = parse_profile(text, "x.yaml")
    (g,) = prof.groups
    assert g.points[0].ranking == ("sdpa", "sdpa:math") and not g.fits


# --- the command: output, resume, interruption ------------------------------------------------


def test_main_writes_a_valid_profile_and_resume_measures_nothing_twice(tmp_path, monkeypatch) -> None:
    out = tmp_path / "prof.yaml"
    argv = ["--shapes", "tiny", "--backends", "sdpa,sdpa:math", "--out", str(out), "--warmup-ms", "0",
            "--rep-ms", "0", "--seed", "3", "--passes", "fwd,decode"]
    assert tune.main(argv) == 0
    prof = parse_profile(out.read_text(), str(out))
    assert len(_points(prof)) == 3 and prof.generated["card"] == "CPU" and prof.schema == SCHEMA_VERSION
    assert all(g.fits for g in prof.groups)
    assert prof.generated["command"].startswith("flashdispatch tune --shapes tiny")
    state = json.loads((tmp_path / "prof.yaml.state.json").read_text())
    assert len(state["results"]) == 3

    calls: list[str] = []
    orig = tune.measure_bucket
    monkeypatch.setattr(tune, "measure_bucket", lambda s, *a, **k: calls.append(s.label) or orig(s, *a, **k))
    assert tune.main(argv + ["--resume"]) == 0
    assert calls == []
    assert _points(parse_profile(out.read_text(), str(out))) == _points(prof)


def test_time_budget_and_interruption_keep_finished_buckets_for_resume(tmp_path, monkeypatch) -> None:
    out = tmp_path / "p.yaml"
    argv = ["--shapes", "tiny", "--backends", "sdpa", "--out", str(out), "--warmup-ms", "0", "--rep-ms", "0",
            "--passes", "fwd,decode"]
    assert tune.main(argv + ["--time-budget", "0"]) == 0  # one bucket, then the budget is spent
    prof = parse_profile(out.read_text(), str(out))
    assert len(_points(prof)) == 1 and "partial" in prof.note

    orig = tune.measure_bucket
    seen: list[str] = []

    def interrupt_second(s, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(s.label)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return orig(s, *a, **k)

    monkeypatch.setattr(tune, "measure_bucket", interrupt_second)
    assert tune.main(argv + ["--resume"]) == 130
    assert len(json.loads((tmp_path / "p.yaml.state.json").read_text())["results"]) == 2

    monkeypatch.setattr(tune, "measure_bucket", orig)
    assert tune.main(argv + ["--resume"]) == 0
    assert len(_points(parse_profile(out.read_text(), str(out)))) == 3


def test_resume_refuses_a_state_from_another_card(tmp_path) -> None:
    out = tmp_path / "p.yaml"
    (tmp_path / "p.yaml.state.json").write_text(json.dumps({"schema": 1, "meta": {"card": "Other GPU"}, "results": []}))
    assert tune.main(["--shapes", "tiny", "--backends", "sdpa", "--out", str(out), "--resume"]) == 2


def test_bad_arguments_name_the_option(capsys) -> None:
    assert tune.main(["--shapes", "tiny", "--dtypes", "fp8"]) == 2
    assert "--dtypes" in capsys.readouterr().err


def test_list_measures_nothing(capsys, monkeypatch) -> None:
    monkeypatch.setattr(tune, "measure_bucket", lambda *a, **k: pytest.fail("--list must not measure"))
    assert tune.main(["--quick", "--shapes", "quick", "--list", "--backends", "sdpa"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(shapes.tune_shapes(quick=True))


def test_dry_run_prints_the_plan_and_its_estimate_for_a_named_gpu(capsys, monkeypatch) -> None:
    monkeypatch.setattr(tune, "measure_bucket", lambda *a, **k: pytest.fail("--dry-run must not measure"))
    assert tune.main(["--quick", "--shapes", "quick", "--dry-run", "--profile-key", "h200"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "estimated:" in out and "fwd decode bf16 D=128" in out
    est = tune.estimate_plan(shapes.tune_shapes(quick=True), simulated_device("h200"), tune.TuneOptions.preset(True))
    assert tune._fmt_seconds(est.seconds) in out
    # without --shapes, as the docs write it: that GPU's quick grid, not this CPU's shapes
    assert tune.main(["--quick", "--dry-run", "--profile-key", "h200"]) == 0
    assert tune._fmt_seconds(est.seconds) in capsys.readouterr().out


# --- the benchmark on the CPU ----------------------------------------------------------------


@pytest.mark.slow
def test_bench_writes_table_json_and_plot(tmp_path, capsys) -> None:
    rc = bench.main(["--shapes", "tiny", "--dtypes", "fp32", "--backends", "sdpa,sdpa:math", "--out",
                     str(tmp_path), "--warmup-ms", "0", "--rep-ms", "0", "--seed", "1"])
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert len(result["rows"]) == len(TINY)
    for row in result["rows"]:
        assert {bench.PLAIN, bench.DISPATCH, "sdpa"} <= set(row["providers"])
        assert all(m["status"] == "ok" for m in row["providers"].values()), row
        assert row["vs_sdpa"] > 0 and row["oracle"] > 0
    # a CPU run counts only shapes that differ beyond the spread (maybe none)
    assert math.isfinite(result["summary"]["geomean_vs_sdpa"]) or result["summary"]["min_vs_sdpa"] is None
    assert (tmp_path / "bench.md").read_text().count("\n| ") >= len(TINY) + 1
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "oracle ratio" in capsys.readouterr().out


def test_bench_flags_a_wrong_backend_and_leaves_it_out_of_the_oracle(tmp_path) -> None:
    wrong = FakeKernel("fake", [{"wrong": True}])
    REGISTRY.register(wrong)
    try:
        rc = bench.main(["--shapes", "tiny", "--dtypes", "fp32", "--backends", "sdpa,fake", "--passes", "fwd",
                         "--out", str(tmp_path), "--warmup-ms", "0", "--rep-ms", "0"])
    finally:
        REGISTRY.unregister("fake")
    assert rc == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    for row in result["rows"]:
        assert row["providers"]["fake"]["status"] == "wrong"
        assert row["best"] != "fake"
    assert result["summary"]["wrong"]


def test_bench_plain_sdpa_is_bottom_right_for_chunked_prefill() -> None:
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for n in (5, 9, 9))
    ref, _ = attention_math(q, k, v, causal=True)
    torch.testing.assert_close(bench.plain_sdpa(q, k, v, causal=True), ref)


def test_a_backend_that_breaks_the_context_is_left_out_on_resume(tmp_path, monkeypatch) -> None:
    broken = FakeKernel("fake", [{"raise": True}])
    alive = {"ok": True}

    def run_and_break(q, k, v, p, config):  # type: ignore[no-untyped-def]
        alive["ok"] = False  # as after an illegal memory access
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(broken, "run", run_and_break)
    monkeypatch.setattr(timing, "context_alive", lambda device: alive["ok"])
    out = tmp_path / "p.yaml"
    argv = ["--shapes", "tiny", "--backends", "sdpa,fake", "--out", str(out), "--warmup-ms", "0", "--rep-ms", "0",
            "--passes", "fwd"]
    REGISTRY.register(broken)
    try:
        assert tune.main(argv) == tune.EXIT_RESUME
        state = json.loads((tmp_path / "p.yaml.state.json").read_text())
        assert state["meta"]["excluded"] == ["fake"] and state["results"] == []
        alive["ok"] = True  # a fresh process
        assert tune.main(argv + ["--resume"]) == 0
    finally:
        REGISTRY.unregister("fake")
    prof = parse_profile(out.read_text(), str(out))
    assert len(_points(prof)) == 2 and all("fake" not in pt.ms for pt in _points(prof))


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_grid_shape_is_its_own_nearest_point(quick: bool) -> None:
    """Each shape of the grid (the benchmark's included) is a distinct point of its group, and the
    nearest point to it there is its own: its measured times and config are what decide it."""
    plan = shapes.tune_shapes(quick=quick)
    ids = [tune.bucket_id(s) for s in plan]
    assert len(set(ids)) == len(ids)
    results = [tune.BucketResult(tune.bucket_id(s), s, tune.bucket_match(s),
                                 [tune.Trial("sdpa", {}, "ok", 1.0 + i / 1000)]) for i, s in enumerate(plan)]
    meta = _meta()
    meta.key, meta.sm_count = "h100", 132
    prof = parse_profile(tune.profile_yaml(results, meta), "h100.yaml")
    assert len(_points(prof)) == len(plan)
    for s in plan:
        g = prof.group(s.group)
        assert g is not None, s.label
        (near,) = g.nearest_points(s.problem(), "sdpa", prof.sm_count, 1)
        assert near.dims() == s.dims[:5] and near.window == s.window, s.label


def test_flop_and_byte_counts_follow_the_fa_paper() -> None:
    p = problem_from_shape((4, 16, 16, 4096, 4096, 128), dtype="bf16", causal=False)
    assert timing.pass_flops(p, "fwd") == 4 * 4 * 16 * 4096 * 4096 * 128
    assert timing.pass_flops(p, "fwd_bwd") == 3.5 * timing.pass_flops(p, "fwd")
    causal = p._replace(causal=True)
    assert timing.pass_flops(causal, "fwd") == pytest.approx(timing.pass_flops(p, "fwd") / 2, rel=1e-3)
    d = problem_from_shape((1, 32, 8, 1, 8192, 128), dtype="bf16")
    kv = 2 * 1 * 8 * 8192 * 128 * 2  # K and V, bf16: 32 MiB, the decode row of the special shapes
    assert timing.min_bytes(d, "decode") == kv + 2 * 32 * 128 * 2
    assert timing.rate(d, "decode", 0.0272)[1] == "GB/s"
    assert timing.rate(d, "decode", 0.0272)[0] == pytest.approx(timing.min_bytes(d, "decode") / 27.2e-6 / 1e9)


def test_bench_summary_applies_the_bar() -> None:
    def row(label: str, sdpa: float, best: float, disp: float) -> dict[str, Any]:
        r = {"label": label, "providers": {bench.PLAIN: {"status": "ok", "ms": sdpa},
                                           "triton": {"status": "ok", "ms": best},
                                           "cupy": {"status": "wrong", "ms": best / 10},
                                           bench.DISPATCH: {"status": "ok", "ms": disp}}}
        bench_report.add_ratios(r)
        return r

    good = [row("a", 1.0, 0.8, 0.8), row("b", 1.0, 1.0, 1.0)]
    s = bench_report.summarize(good)
    assert all(s["checks"].values()), s
    assert good[0]["best"] == "triton" and good[0]["vs_sdpa"] == pytest.approx(1.25)
    assert s["wrong"] == ["cupy on a", "cupy on b"]  # a wrong provider never counts as the best
    bad = bench_report.summarize(good + [row("c", 1.0, 0.5, 1.05)])
    failed = {k for k, ok in bad["checks"].items() if not ok}
    assert any("every shape" in k for k in failed) and bad["min_oracle"][1] == "c"


def test_estimate_is_per_call_over_a_few_calls_on_cpu(virtual_clock) -> None:
    virtual_clock.drive(timing)  # each call takes 2 ms of virtual time, whatever the machine's load
    calls = []
    est = timing.estimate_ms(lambda: calls.append(virtual_clock.sleep(0.002)), CPU, calls=3)
    assert len(calls) == 3 and est == pytest.approx(2.0, abs=1e-2)


def test_interleaved_timing_reports_and_drops_a_failing_provider() -> None:
    def boom() -> None:
        raise RuntimeError("kernel exploded")

    failures: list[tuple[str, str]] = []
    got = timing.interleaved_median_ms({"ok": (lambda: None, None), "bad": (boom, None)}, torch.device("cpu"),
                                       warmup_ms=0.1, rep_ms=0.5, failed=lambda n, e: failures.append((n, str(e))))
    assert set(got) == {"ok"} and got["ok"] >= 0.0
    assert failures == [("bad", "kernel exploded")]


def test_interleaved_timing_schedule_on_the_cuda_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch with fake events: a fake clock advances by each provider's duration."""
    clock = [0.0]

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = float("nan")

        def record(self) -> None:
            self.t = clock[0]

        def elapsed_time(self, end: "Event") -> float:
            return end.t - self.t

    calls: list[str] = []

    def provider(name: str, ms: float, fail_on: int | None = None) -> Any:
        count = [0]

        def fn() -> None:
            count[0] += 1
            if fail_on is not None and count[0] >= fail_on:
                raise RuntimeError(f"{name} broke on call {count[0]}")
            calls.append(name)
            clock[0] += ms

        return fn

    def estimate(fn: Any, device: torch.device, calls: int = 3) -> float:
        t0 = clock[0]
        for _ in range(calls):
            fn()
        return (clock[0] - t0) / calls

    monkeypatch.setattr(timing.torch.cuda, "Event", Event)
    monkeypatch.setattr(timing.torch.cuda, "_sleep", lambda cycles: None, raising=False)
    monkeypatch.setattr(timing, "_flush_buffer", lambda device: torch.empty(4))
    monkeypatch.setattr(timing, "estimate_ms", estimate)
    monkeypatch.setattr(timing, "synchronize", lambda device: None)
    warmed: list[str] = []
    monkeypatch.setattr(timing, "warm_clocks", lambda device, ms=timing.CLOCK_WARMUP_MS: warmed.append(device.type))
    failures: list[str] = []
    fns = {"a": (provider("a", 1.0), None), "b": (provider("b", 2.0), None), "c": (provider("c", 3.0), None),
           # fails inside estimate_ms (its third call): dropped, reported once, no KeyError
           "late": (provider("late", 1.0, fail_on=3), None)}
    got = timing.interleaved_median_ms(fns, torch.device("cuda"), warmup_ms=2.0, rep_ms=40.0,
                                       failed=lambda n, e: failures.append(n))
    assert failures == ["late"] and set(got) == {"a", "b", "c"}
    assert got == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert warmed == ["cuda"]  # once, after the first (compiling) calls and before the warm-up
    # the timed part: every repetition runs each provider once, in orders that vary, so that no
    # provider always follows the same one
    n = len(calls)
    reps = [tuple(calls[n - 3 * (i + 1):n - 3 * i]) for i in range(8)]  # the last 8 repetitions
    assert all(sorted(r) == ["a", "b", "c"] for r in reps)
    assert len(set(reps)) > 1


# --- the model: a tiny tune decides explain(), old profiles convert ---------------------------


def test_a_tiny_cpu_tune_writes_schema_2_and_explain_decides_from_its_model(tmp_path, monkeypatch) -> None:
    out = tmp_path / "cpu.yaml"
    argv = ["--shapes", "tiny", "--backends", "sdpa,sdpa:math", "--out", str(out), "--warmup-ms", "0",
            "--rep-ms", "0", "--seed", "5", "--profile-key", "cpu"]
    assert tune.main(argv) == 0
    text = out.read_text()
    prof = parse_profile(text, str(out))
    assert prof.schema == SCHEMA_VERSION and prof.measured and text.count("fits:") == len(prof.groups)
    assert {g.key.cls for g in prof.groups} == {"dense", "chunked", "causal", "decode"}
    for g in prof.groups:
        assert set(g.fits) == set(g.implementations()) >= {"sdpa", "sdpa:math"}, g.key
    decode = [pt for g in prof.groups if g.key.cls == "decode" for pt in g.points]
    assert decode and all(set(pt.host_us) == set(pt.ms) for pt in decode)  # host time beside
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    flashdispatch.refresh()
    try:
        for s in TINY:
            d = flashdispatch.explain(shape=s.dims, dtype=s.dtype, causal=s.causal, needs_grad=s.needs_grad)
            assert d.source.startswith("profile:") and str(out) in d.source, (s.label, d.source)
            assert set(d.predicted) >= {"sdpa"} and d.models, s.label
    finally:
        flashdispatch.refresh()


def test_graph_timed_shapes_record_host_time_and_how_they_were_timed(fake_clock) -> None:
    s = TINY[3]
    assert captured_in_serving(s)
    r = tune.measure_bucket(s, {"sdpa": REGISTRY.get("sdpa")}, CPU, tune.TuneOptions(), _gen())
    (t,) = r.trials
    assert t.status == "ok" and t.host_us is not None and t.host_us > 0
    assert "no CUDA device" in t.note
    pt = r.point()
    assert pt.host_us == {"sdpa": t.host_us} and pt.ms == {"sdpa": t.ms}
    assert not tune.measure_bucket(TINY[0], {"sdpa": REGISTRY.get("sdpa")}, CPU, tune.TuneOptions(),
                                   _gen()).trials[0].host_us  # prefill: no host time


def test_graph_replay_needs_a_cuda_device_and_rotation_sets_exceed_l2() -> None:
    with pytest.raises(timing.CaptureError, match="CUDA device"):
        timing.graph_replay_ms([lambda: None], CPU)
    l2 = 50 * 2**20
    assert timing.rotation_sets(2**20, CPU, l2=l2) == timing.GRAPH_MAX_SETS  # 1 MB sets: capped
    n = timing.rotation_sets(30 * 2**20, CPU, l2=l2)
    assert n * 30 * 2**20 >= timing.GRAPH_L2_MULTIPLE * l2 and (n - 1) * 30 * 2**20 < timing.GRAPH_L2_MULTIPLE * l2
    assert timing.rotation_sets(2**30, CPU, l2=l2) == 2  # always two sets: no set is replayed from L2
    assert timing.rotation_sets(3 * 2**30, CPU, l2=l2) == 1  # one set already over the memory cap


def test_a_failed_capture_leaves_the_current_stream_as_it_was(monkeypatch) -> None:
    """torch.cuda.graph's __exit__ raises from capture_end before it leaves its stream context, so a
    call that cannot be captured left the side stream current for the rest of the process. Torch's
    own context manager here; the CUDA calls under it are fakes (no GPU on CI)."""
    from flashdispatch.tools import decode_timing

    class FakeStream:
        def wait_stream(self, other: object) -> None:
            pass

    default = FakeStream()
    current = [default]

    class StreamContext:
        def __init__(self, s: object) -> None:
            self.s, self.prev = s, None

        def __enter__(self) -> None:
            self.prev, current[0] = current[0], self.s

        def __exit__(self, *exc: object) -> None:
            current[0] = self.prev

    class FakeGraph:
        def capture_begin(self, *a: object, **k: object) -> None:
            pass

        def capture_end(self) -> None:
            raise RuntimeError("operation failed due to a previous error during capture")

    def set_stream(s: object) -> None:
        current[0] = s

    for name, value in (("Stream", FakeStream), ("stream", StreamContext), ("current_stream", lambda *a: current[0]),
                        ("set_stream", set_stream), ("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                        ("CUDAGraph", FakeGraph)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
    with pytest.raises(RuntimeError, match="during capture"):
        decode_timing.graph_replay(lambda: None)
    assert current[0] is default


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name,expect", [("cuda:1", [1]), ("cuda", [])])
def test_tune_and_bench_make_the_device_they_measure_on_current(monkeypatch, name, expect) -> None:
    """Events, streams and syncs without a device act on the current one: --device cuda:1 is made
    current, and plain cuda (the current device) is left alone (set_device refuses an index-less
    device). Fakes stand for the GPU; each main stops right after the switch."""
    set_to: list[int] = []
    monkeypatch.setattr(tune, "parse_device", lambda _: torch.device(name))
    monkeypatch.setattr(tune, "select_implementations", lambda *a: {"sdpa": REGISTRY.get("sdpa")})
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.device(d).index))

    def stop(*a: Any, **k: Any) -> Any:
        raise _Stop

    monkeypatch.setattr(tune, "device_info", stop)
    with pytest.raises(_Stop):
        tune.main(["--shapes", "tiny"])
    monkeypatch.setattr(bench, "_heldout_plan", stop)
    with pytest.raises(_Stop):
        bench.main(["--heldout"])
    assert set_to == expect * 2


def test_a_shape_expected_past_the_budget_is_not_started(tmp_path) -> None:
    plan = TINY[:3]
    state = tune.State(str(tmp_path / "s.json"), {"card": "CPU"})
    seen: list[str] = []
    orig = tune.measure_bucket

    def measure(s, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(s.label)
        return orig(s, *a, **k)

    import unittest.mock

    with unittest.mock.patch.object(tune, "measure_bucket", measure):
        done, complete = tune.run_tune(plan, {"sdpa": REGISTRY.get("sdpa")}, CPU, tune.TuneOptions(warmup_ms=0, rep_ms=0),
                                       state, time_budget_s=600.0, estimates=[0.01, 1e6, 0.01])
    assert seen == [TINY[0].label] and not complete and len(done) == 1


def test_a_causal_window_is_checked_against_its_own_reference() -> None:
    s = shapes.Shape("win", "fp64", 2, 4, 2, 300, 300, 8, True, "fwd", 37)
    q, k, v, _, p = tune.make_inputs(s, CPU, _gen(2))
    assert p.has_window and s.group.variant == "window"
    full, _ = attention_math(q, k, v, causal=True, upcast=True, window=(37, 0))
    blocks = verify.reference_blocks(q, k, v, p)
    g = p.gqa_ratio
    for b in blocks:
        r0, r1 = b.rows
        torch.testing.assert_close(b.ref, full[b.batch:b.batch + 1, b.kv_head * g:(b.kv_head + 1) * g, r0:r1])
    plain, _ = attention_math(q, k, v, causal=True, upcast=False)
    assert not verify.check_output(plain, p, blocks).ok  # a kernel that ignores the window fails


def test_the_gradient_check_holds_a_window_kernel_to_the_window() -> None:
    p = problem_from_shape((1, 4, 2, 300, 300, 16), dtype="fp32", device_kind="cpu", causal=True, needs_grad=True,
                           window=(64, 0))
    assert verify.proxy_problem(p)[-1] == min(64, verify.GRAD_PROXY_SEQLEN // 4)

    def good(q, k, v, pp):  # type: ignore[no-untyped-def]
        return attention_math(q, k, v, causal=pp.causal, scale=pp.scale, upcast=False, window=pp.window)[0]

    def no_window(q, k, v, pp):  # type: ignore[no-untyped-def]
        return attention_math(q, k, v, causal=pp.causal, scale=pp.scale, upcast=False)[0]

    assert verify.check_grads(good, p, CPU, _gen()).ok
    assert not verify.check_grads(no_window, p, CPU, _gen()).ok


def test_window_shapes_need_causal() -> None:
    with pytest.raises(ValueError, match="window=8 needs causal=True"):
        shapes.check_shape(shapes.Shape("w", "bf16", 1, 8, 8, 64, 64, 64, False, "fwd", 8))


SCHEMA1 = """\
schema: 1
device: {key: h100, name: "NVIDIA H100 80GB HBM3", arch: sm_90}
generated: {date: "2026-11-26", tool: "flashdispatch tune", card: "NVIDIA H100 80GB HBM3", command: "flashdispatch tune --quick", torch: "2.11.0", triton: "3.6.0"}
measured: true
entries:
  - match: {dtype: bf16, head_dim: 128, causal: true, gqa: 1, pass: fwd, seqlen: 4096}
    shape: {B: 4, Hq: 16, Hkv: 16, Sq: 4096, Sk: 4096, D: 128}
    ranking: [triton, sdpa]
    ms: {triton: 0.48, sdpa: 0.53}
    config:
      triton: {BLOCK_M: 128, BLOCK_N: 64, num_warps: 8, num_stages: 3}
  - match: {dtype: bf16, head_dim: 128, causal: true, gqa: 1, pass: fwd, seqlen: 1024}
    shape: {B: 16, Hq: 16, Hkv: 16, Sq: 1024, Sk: 1024, D: 128}
    ranking: [sdpa, triton]
    ms: {triton: 0.21, sdpa: 0.2}
"""


def test_a_schema_1_profile_converts_to_schema_2_keeping_its_measurements() -> None:
    from flashdispatch.tools import profile_writer

    text = profile_writer.convert_profile(SCHEMA1, "old.yaml", today="2026-12-04")
    prof = parse_profile(text, "new.yaml")
    assert prof.schema == SCHEMA_VERSION and prof.measured
    assert "converted from\n# schema 1" in text and "not re-measured" in text
    assert prof.generated["date"] == "2026-11-26" and prof.generated["converted"] == "from schema 1 on 2026-12-04"
    (g,) = prof.groups
    assert g.key.label() == "fwd causal bf16 D=128" and set(g.fits) == {"triton", "sdpa"}
    assert [pt.ms for pt in g.points] == [{"triton": 0.48, "sdpa": 0.53}, {"triton": 0.21, "sdpa": 0.2}]
    assert g.points[0].config["triton"]["BLOCK_M"] == 128
    assert profile_writer.convert_profile(text, "new.yaml") .split("schema: 2", 1)[1] == text.split("schema: 2", 1)[1]


@pytest.mark.parametrize("graph,expect", [
    (0.02, "CUDA-graph replay over 1 input sets"),
    (1e-9, "the call was not captured"),  # an empty replay (a launch on another stream) is not a time
    (0.0, "the call was not captured"),  # events of an empty replay can read exactly 0
    (timing.CaptureError("RuntimeError: capture refused"), "cannot be captured in a CUDA graph (RuntimeError"),
], ids=["replayed", "empty-replay", "zero-replay", "refused"])
def test_graph_timing_falls_back_to_the_eager_median_with_a_note(fake_clock, monkeypatch, graph, expect) -> None:
    def replay(fns, device, **kw):  # type: ignore[no-untyped-def]
        for fn in fns:
            fn()
        if isinstance(graph, Exception):
            raise graph
        return graph

    monkeypatch.setattr(timing, "graph_replay_ms", replay)
    s = shapes.Shape("d", "fp32", 2, 4, 2, 1, 4096, 16, False, "decode")
    q, k, v, _, p = tune.make_inputs(s, CPU, _gen())
    impl = REGISTRY.get("sdpa")

    def fn() -> None:
        impl.run(q, k, v, p, {})

    t = tune._time_graph_step(impl, {}, p, fn, CPU, tune.TuneOptions(), [(q, k, v)], "checked")
    assert expect in t.note and t.host_us is not None and t.host_us > 0
    assert t.ms == (0.02 if expect.startswith("CUDA-graph") else 5.0)  # else fake_clock's eager median


def test_a_timing_after_a_long_host_pause_starts_from_warm_clocks(fake_clock, virtual_clock, monkeypatch) -> None:
    # a config whose check and compile kept the host busy past IDLE_PAUSE_S (the GPU idle meanwhile)
    # gets warm_clocks before its timing; a quick one does not (the pause on a virtual clock: a
    # loaded machine cannot make the quick one look slow)
    from flashdispatch.tools import timing

    virtual_clock.drive(tune, timing)
    warmed: list[str] = []
    monkeypatch.setattr(timing, "warm_clocks", lambda device, ms=timing.CLOCK_WARMUP_MS: warmed.append(device.type))

    class SlowFirstCall(FakeKernel):
        def run(self, q, k, v, p, config):  # type: ignore[no-untyped-def]
            if config.get("compile_s") and not any(c == config for c in self.runs):
                virtual_clock.sleep(config["compile_s"])  # the first call of a config compiles
            return super().run(q, k, v, p, config)

    fake = SlowFirstCall(configs=[{"BLOCK": 16, "ms": 1.0, "compile_s": timing.IDLE_PAUSE_S + 0.05},
                                  {"BLOCK": 32, "ms": 1.0}])
    r = tune.measure_bucket(TINY[0], {"fake": fake}, CPU, tune.TuneOptions(), _gen())
    assert [t.status for t in r.trials] == ["ok", "ok"]
    assert warmed == ["cpu"]
