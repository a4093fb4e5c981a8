"""Varlen and KV-cache calls in the profiles and the selection model: their classes, the work the
model counts, ranking by predicted time (the baseline margin, variants, borrowing), the built-in
order with its reason where no model says, the profile's checks, and the tuner's serving points
(checked before they are timed: a wrong family is rejected, not measured)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import flashdispatch as fd
from flashdispatch import serving
from flashdispatch.costmodel import (
    CAUSAL_CLASSES, SERVING_CLASSES, Group, GroupKey, Point, features, point_problem, serving_class,
)
from flashdispatch.problem import DECODE_MAX_SEQLEN_Q
from flashdispatch.profile_store import Profile, ProfileError, parse_profile, profile_yaml_text
from flashdispatch.tools import shapes, tune, tune_serving

SMS = 132
CPU = torch.device("cpu")


def _varlen_sp(lengths, *, hq=32, hkv=8, d=128, causal=True, window=None, grad=False, dtype=torch.bfloat16):
    total = sum(lengths)
    q = torch.empty(total, hq, d, device="meta", dtype=dtype, requires_grad=grad)
    k = torch.empty(total, hkv, d, device="meta", dtype=dtype)
    cu = torch.empty(len(lengths) + 1, dtype=torch.int32)
    return serving.varlen_problem(q, k, k, cu, max(lengths), max(lengths), causal, d ** -0.5, window, None, None,
                                  False)


def _kvcache_sp(b, sq, capacity, *, hq=32, hkv=8, d=128, page=16):
    q = torch.empty(b, sq, hq, d, device="meta", dtype=torch.bfloat16)
    kc = torch.empty(b * capacity // page, page, hkv, d, device="meta", dtype=torch.bfloat16)
    return serving.kvcache_problem(q, kc, kc, torch.empty(b, capacity // page), True, d ** -0.5, None, None, None,
                                   False)


# --- classes and work ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind, sq, cls", [("varlen", 1, "varlen"), ("varlen", 4096, "varlen"),
                                           ("kvcache", 1, "kvcache"), ("kvcache", DECODE_MAX_SEQLEN_Q, "kvcache"),
                                           ("kvcache", DECODE_MAX_SEQLEN_Q + 1, "kvcache_chunked")])
def test_serving_class_at_its_boundary(kind, sq, cls):
    assert serving_class(kind, sq) == cls
    assert cls in SERVING_CLASSES and cls in CAUSAL_CLASSES
    with pytest.raises(ValueError, match="serving kind"):
        serving_class("dense", 1)


def test_a_varlen_call_counts_its_packed_rows_not_its_longest_sequence():
    sp = _varlen_sp([256, 1024, 8192, 2048])
    w = sp.work()
    assert (w.batch, w.seqlen_q, w.seqlen_k) == (4, round(11520 / 4), round(11520 / 4))
    assert sp.model_key() == GroupKey("fwd", "varlen", "plain", "bf16", 128)
    # the same lengths in another packing: the same work, the same group
    assert _varlen_sp([8192, 2048, 1024, 256]).work() == w
    assert _varlen_sp([256, 1024], grad=True).model_key().pass_ == "fwd_bwd"
    assert _varlen_sp([256, 1024], window=(127, 0)).model_key().variant == "window"
    assert "total_q=11520" in sp.describe()


def test_a_kvcache_call_counts_its_capacity_and_its_rows():
    sp = _kvcache_sp(8, 1, 4096)
    w = sp.work()
    assert (w.batch, w.seqlen_q, w.seqlen_k, w.causal) == (8, 1, 4096, True)
    assert sp.model_key().cls == "kvcache"
    assert _kvcache_sp(2, 512, 4096).model_key().cls == "kvcache_chunked"


# --- ranking by the model -----------------------------------------------------------------------


def _group(key: GroupKey, dims, rates: dict[str, tuple[float, float]]) -> Group:
    """Points whose times follow overhead_us + gflop x us_per_gflop per implementation."""
    pts = []
    for b, hkv, sq, sk in dims:
        pt = Point(b, 32, hkv, sq, sk)
        x = features(point_problem(key, pt), SMS)
        pts.append(pt._replace(ms={n: (o + x[1] * g) / 1e3 for n, (o, g) in rates.items()}))
    g = Group(key, pts)
    g.refit(SMS)
    return g


VARLEN = GroupKey("fwd", "varlen", "plain", "bf16", 128)
KVCACHE = GroupKey("fwd", "kvcache", "plain", "bf16", 128)
VARLEN_DIMS = [(8, 8, 1024, 1024), (16, 8, 4096, 4096), (4, 4, 2048, 2048)]
KV_DIMS = [(1, 8, 1, 8192), (64, 8, 1, 2048), (8, 8, 8, 16384)]


def _profile(*groups: Group) -> Profile:
    return Profile("serving.yaml", "h200", True, {"key": "h200", "name": "NVIDIA H200", "arch": "sm_90", "sm_count": SMS},
                   {"date": "2026-12-05", "card": "NVIDIA H200 (synthetic)", "tool": "test"}, list(groups))


def _rank(sp, prof, ok=("triton", "sdpa")):
    return serving._rank(sp, list(ok), prof, ("triton", "sdpa", "cupy"), serving.serving_backends())


def test_the_faster_family_by_the_model_wins_and_explain_says_why():
    prof = _profile(_group(VARLEN, VARLEN_DIMS, {"triton": (20.0, 2.0), "sdpa": (40.0, 3.0)}))
    rk = _rank(_varlen_sp([300, 5000, 1200, 700, 2222]), prof)
    assert rk.ordered == ["triton", "sdpa"]
    assert rk.source == "profile:serving.yaml#fwd varlen bf16 D=128"
    assert rk.predicted["triton"] < rk.predicted["sdpa"] and rk.margin > 0.3
    assert not rk.uncertain
    # the other way round
    prof = _profile(_group(VARLEN, VARLEN_DIMS, {"triton": (20.0, 4.0), "sdpa": (40.0, 2.0)}))
    assert _rank(_varlen_sp([300, 5000, 1200]), prof).ordered == ["sdpa", "triton"]


def test_the_fallback_is_kept_when_the_lead_is_inside_the_margin():
    prof = _profile(_group(KVCACHE, KV_DIMS, {"triton": (10.0, 99.0), "sdpa": (10.0, 100.0)}))
    rk = _rank(_kvcache_sp(16, 1, 8192), prof)
    assert rk.ordered[0] == "sdpa" and rk.kept_baseline
    assert any("the sdpa fallback, the baseline, runs" in n for n in rk.notes), rk.notes


def test_a_window_is_fused_by_triton_and_masked_by_the_fallback():
    prof = _profile(_group(VARLEN, VARLEN_DIMS, {"triton": (20.0, 3.0), "sdpa": (20.0, 2.5)}))
    plain = _rank(_varlen_sp([8192] * 4), prof)
    assert plain.ordered[0] == "sdpa"
    windowed = _rank(_varlen_sp([8192] * 4, window=(511, 0)), prof)
    assert windowed.ordered[0] == "triton", windowed.predicted
    by = {pr.name: pr for pr in windowed.predictions}
    assert "visible work" in by["triton"].estimated and "whole score matrix" in by["sdpa"].estimated


def test_a_chunk_against_the_cache_borrows_the_decode_model_and_says_so():
    prof = _profile(_group(KVCACHE, KV_DIMS, {"triton": (10.0, 50.0), "sdpa": (30.0, 120.0)}))
    rk = _rank(_kvcache_sp(2, 512, 8192), prof)
    assert rk.ordered[0] == "triton"
    assert "class kvcache_chunked borrows class kvcache" in rk.uncertain


def test_serving_never_borrows_a_dense_model():
    dense = _group(GroupKey("fwd", "causal", "plain", "bf16", 128), [(1, 8, 2048, 2048), (4, 8, 4096, 4096)],
                   {"triton": (10.0, 1.0), "sdpa": (10.0, 2.0)})
    assert _rank(_varlen_sp([1024, 2048]), _profile(dense)) is None


def test_without_a_model_the_built_in_order_decides_and_says_why(tmp_path, monkeypatch):
    q = torch.randn(40, 4, 16)
    k = torch.randn(40, 2, 16)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    d = fd.explain_varlen(q, k, k, cu, cu, 25, 25, causal=True)
    assert d.variant == "sdpa" and d.source == "default"
    assert any("no measured profile for this device" in n for n in d.notes)
    # a measured CPU profile without serving groups: the reason names the class
    (tmp_path / "cpu.yaml").write_text(profile_yaml_text(Profile(
        "cpu.yaml", "cpu", True, {"key": "cpu", "name": "CPU"}, {"date": "2026-12-05", "card": "CPU", "tool": "test"},
        [_group(GroupKey("fwd", "causal", "plain", "fp32", 16), [(1, 2, 64, 64), (2, 2, 128, 128)],
                {"sdpa": (10.0, 1e5)})])))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    d = fd.explain_varlen(q, k, k, cu, cu, 25, 25, causal=True)
    assert any("the profile has no model for fwd varlen fp32 D=16" in n for n in d.notes), d.notes
    assert d.uncertain == "no model for this problem"
    assert "class:    fwd varlen fp32 D=16" in str(d)


# --- the profile file ---------------------------------------------------------------------------


def test_serving_groups_round_trip_through_the_file():
    prof = _profile(_group(VARLEN, VARLEN_DIMS, {"triton": (20.0, 2.0), "sdpa": (40.0, 3.0)}),
                    _group(KVCACHE, KV_DIMS, {"triton": (10.0, 50.0), "sdpa": (30.0, 120.0)}))
    back = parse_profile(profile_yaml_text(prof), "x.yaml")
    assert [g.key for g in back.groups] == [VARLEN, KVCACHE]
    assert back.groups[1].fits["triton"].coef == pytest.approx(prof.groups[1].fits["triton"].coef, rel=1e-3)


def test_a_point_outside_its_serving_class_is_an_error_with_its_line():
    text = profile_yaml_text(_profile(_group(KVCACHE, KV_DIMS, {"sdpa": (30.0, 120.0)})))
    bad = text.replace("Sq: 8,", "Sq: 32,")
    with pytest.raises(ProfileError, match="Sq=32, Sk=16384 is class 'kvcache_chunked', not the group's 'kvcache'"):
        parse_profile(bad, "bad.yaml")


# --- the tuner's serving points -----------------------------------------------------------------


def test_varlen_lengths_mix_short_and_long_and_sum_to_the_mean():
    for b, mean in [(1, 100), (2, 7), (16, 4096), (32, 512), (5, 3)]:
        ls = shapes.varlen_lengths(b, mean)
        assert len(ls) == b and sum(ls) == b * mean and min(ls) >= 1
        if b > 2 and mean >= 64:
            assert min(ls) <= mean // 2 and max(ls) >= mean * 3 // 2
        assert ls == shapes.varlen_lengths(b, mean)  # the same batch every run


@pytest.mark.parametrize("bad, match", [
    (dict(serving="paged"), "serving expected"),
    (dict(causal=False), "causal, without a window"),
    (dict(seqlen_k=128), "Sq = Sk"),
    (dict(serving="kvcache", seqlen_q=1, pass_="fwd"), "pass 'decode'"),
    (dict(serving="kvcache", seqlen_q=64, pass_="decode"), "pass 'fwd'"),
])
def test_a_malformed_serving_shape_is_refused(bad, match):
    s = shapes.Shape("x", "fp32", 2, 4, 2, 64, 64, 16, True, "fwd", serving="varlen")._replace(**bad)
    with pytest.raises(ValueError, match=match):
        shapes.check_shape(s)


OPTS = tune.TuneOptions(warmup_ms=0.0, rep_ms=0.0)
SMALL = {
    "varlen": shapes.Shape("v", "fp32", 3, 4, 2, 40, 40, 16, True, "fwd", serving="varlen"),
    "varlen-bwd": shapes.Shape("vb", "fp32", 3, 4, 2, 40, 40, 16, True, "fwd_bwd", serving="varlen"),
    "kvcache": shapes.Shape("k", "fp32", 2, 4, 2, 1, 70, 16, True, "decode", serving="kvcache"),
    "kvcache-chunk": shapes.Shape("kc", "fp32", 2, 4, 2, 20, 70, 16, True, "fwd", serving="kvcache"),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_serving_point_is_checked_then_timed(name):
    s = shapes.check_shape(SMALL[name])
    r = tune_serving.measure_serving_bucket(s, ["sdpa", "cupy"], CPU, OPTS, torch.Generator().manual_seed(0),
                                            host_calls=2)
    (t,) = r.trials
    assert t.name == "sdpa" and t.status == "ok" and t.ms > 0, t
    assert "max err" in t.note
    assert (t.host_us is not None) == (s.group.cls == "kvcache")
    assert "cupy" in r.skipped
    assert r.point().ms.keys() == {"sdpa"}


def test_a_wrong_family_is_rejected_before_it_is_timed(monkeypatch):
    real = serving.run_varlen

    def off_by_a_little(name, *args, **kw):
        out, lse = real(name, *args, **kw)
        return out + 0.01, lse

    monkeypatch.setattr(serving, "run_varlen", off_by_a_little)
    r = tune_serving.measure_serving_bucket(SMALL["varlen"], ["sdpa"], CPU, OPTS, torch.Generator().manual_seed(0))
    (t,) = r.trials
    assert t.status == "wrong" and "allowed" in t.note and t.ms is None


def test_a_family_with_wrong_gradients_is_rejected(monkeypatch):
    real = serving.run_varlen

    def no_grad_through_v(name, q, k, v, *args, **kw):
        return real(name, q, k, v.detach(), *args, **kw)

    monkeypatch.setattr(serving, "run_varlen", no_grad_through_v)
    r = tune_serving.measure_serving_bucket(SMALL["varlen-bwd"], ["sdpa"], CPU, OPTS,
                                            torch.Generator().manual_seed(0))
    (t,) = r.trials
    assert t.status == "wrong" and "dv: no gradient" in t.note and t.ms is None, t


def test_a_cpu_tune_writes_serving_models_that_selection_then_uses(tmp_path, monkeypatch):
    plan = shapes.cpu_serving_shapes()
    out = tmp_path / "cpu.yaml"
    state = tmp_path / "state.json"
    argv = ["--shapes", "cpu", "--device", "cpu", "--backends", "sdpa", "--out", str(out), "--state", str(state),
            "--warmup-ms", "0", "--rep-ms", "0", "--seed", "3"]
    monkeypatch.setattr(shapes, "cpu_shapes", lambda dtype="fp32": [])  # the serving calls only
    assert tune.main(argv) == 0
    prof = parse_profile(out.read_text(), str(out))
    assert {g.key.cls for g in prof.groups} == {s.group.cls for s in plan} == {"varlen", "kvcache"}
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    q = torch.randn(40, 4, 16)
    k = torch.randn(40, 2, 16)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    d = fd.explain_varlen(q, k, k, cu, cu, 25, 25, causal=True)
    assert d.source == f"profile:{out}#fwd varlen fp32 D=64", d.source  # the group that predicted
    assert d.predicted.keys() == {"sdpa"} and "borrows D=64" in str(d)


# --- the serving bench's report (the measuring needs a GPU; the table and plot do not) ----------


def _bench_result():
    from flashdispatch.tools import bench_serving

    rows = [
        {"bar": "varlen causal 16 seqs 256..8192", "case": "63744 tokens", "pass": "fwd", "anchor": "sdpa padded",
         "ours_ms": 2.0, "anchor_ms": 3.6, "speedup": 1.8, "need": 1.5},
        {"bar": "paged decode", "case": "B=8 Sq=1 ctx 512..32768", "pass": "graph replay", "anchor": "gather-then-sdpa",
         "ours_ms": 0.1, "anchor_ms": 0.15, "speedup": 1.5, "need": 2.0, "host_us_ours": 30.0},
        {"bar": "spec B=8 Sq=4", "error": "RuntimeError: out of memory"},
    ]
    return bench_serving, {"card": "NVIDIA H200 (synthetic)", "torch": "2.11", "triton": "3.6.0", "rows": rows}


def test_the_serving_table_says_which_bars_pass_and_names_the_card(capsys):
    bench_serving, result = _bench_result()
    bench_serving.print_table(result)
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.count("FAIL") == 1
    assert "1/2 bars pass on NVIDIA H200 (synthetic); 1 sections failed" in out
    assert "ERROR RuntimeError: out of memory" in out


def test_the_serving_plot_is_written_and_rerendered_from_its_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench_serving, result = _bench_result()
    bench_serving.write_outputs(result, str(tmp_path))
    assert (tmp_path / "bench_serving.json").is_file() and (tmp_path / "bench_serving.png").stat().st_size > 1000
    (tmp_path / "bench_serving.png").unlink()
    from flashdispatch.tools import bench

    assert bench_serving.main(["--plot-from", str(tmp_path / "bench_serving.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_serving.png").is_file() and "1/2 bars pass" in capsys.readouterr().out
    if not torch.cuda.is_available():  # `bench --serving` runs the serving bench, which needs a GPU
        assert bench.main(["--serving", "--out", str(tmp_path)]) == 2
    # ... but re-rendering a run needs none, into a folder that does not exist yet
    again = tmp_path / "again"
    assert bench.main(["--serving", "--plot-from", str(tmp_path / "bench_serving.json"), "--out", str(again)]) == 0
    assert (again / "bench_serving.png").is_file()


# --- on a simulated GPU: what a serving call would run there, and why ----------------------------


def _meta_varlen(lengths=(300, 5000, 1200), hq=32, hkv=8, d=128):
    total = sum(lengths)
    q = torch.empty(total, hq, d, device="meta", dtype=torch.bfloat16)
    k = torch.empty(total, hkv, d, device="meta", dtype=torch.bfloat16)
    cu = torch.empty(len(lengths) + 1, dtype=torch.int32, device="meta")  # explain reads no values
    return q, k, cu, max(lengths)


def test_a_simulated_gpu_without_a_serving_model_takes_the_built_in_order_and_says_so(tmp_path, monkeypatch):
    dense = GroupKey("fwd", "causal", "plain", "bf16", 128)  # a measured profile with no serving group
    prof = _profile(_group(dense, [(1, 8, 2048, 2048), (4, 8, 4096, 4096)], {"triton": (20.0, 4.0), "sdpa": (30.0, 3.0)}))
    (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    q, k, cu, smax = _meta_varlen()
    d = fd.explain_varlen(q, k, k, cu, cu, smax, smax, causal=True, device="h200")
    assert d.variant == "triton" and d.source == "default" and d.device.kind == "cuda"
    assert any("has no model for fwd varlen bf16 D=128" in n for n in d.notes), d.notes
    with pytest.raises(ValueError, match="device: expected one of"):
        fd.explain_varlen(q, k, k, cu, cu, smax, smax, causal=True, device="h300")


def test_a_simulated_gpu_with_serving_models_decides_by_them(tmp_path, monkeypatch):
    prof = _profile(_group(VARLEN, VARLEN_DIMS, {"triton": (20.0, 4.0), "sdpa": (40.0, 2.0)}),
                    _group(KVCACHE, KV_DIMS, {"triton": (10.0, 50.0), "sdpa": (30.0, 120.0)}))
    (tmp_path / "h200.yaml").write_text(profile_yaml_text(prof))
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    q, k, cu, smax = _meta_varlen()
    d = fd.explain_varlen(q, k, k, cu, cu, smax, smax, causal=True, device="h200")
    assert d.variant == "sdpa" and d.source.endswith("#fwd varlen bf16 D=128"), str(d)
    assert "predicted: sdpa=" in str(d) and "margin:" in str(d)
    qd = torch.empty(64, 1, 32, 128, device="meta", dtype=torch.bfloat16)
    kc = torch.empty(64 * 128, 16, 8, 128, device="meta", dtype=torch.bfloat16)
    table = torch.empty(64, 128, dtype=torch.int32, device="meta")
    lens = torch.empty(64, dtype=torch.int32, device="meta")
    d = fd.explain_kvcache(qd, kc, kc, cache_seqlens=lens, block_table=table, device="h200")
    assert d.variant == "triton" and d.source.endswith("#fwd kvcache bf16 D=128") and not d.uncertain, str(d)
    # forcing still wins over the model
    d = fd.explain_kvcache(qd, kc, kc, cache_seqlens=lens, block_table=table, device="h200", backend="sdpa")
    assert d.variant == "sdpa" and d.source == "argument"


def test_the_cli_explains_serving_calls(capsys):
    from flashdispatch import cli

    assert cli.main(["explain", "--varlen", "--shape", "16,32,8,4096,4096,128", "--causal", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "varlen B=16 total_q=65536" in out and "class:    fwd varlen bf16 D=128" in out and "NVIDIA H200" in out
    assert cli.main(["explain", "--kvcache", "16", "--shape", "64,32,8,1,32768,128", "--causal", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "paged cache block_size=16" in out and "class:    fwd kvcache bf16 D=128" in out
    assert cli.main(["explain", "--kvcache", "0", "--shape", "2,32,8,512,8192,128", "--causal", "--device", "h100"]) == 0
    assert "contiguous cache" in capsys.readouterr().out
    # a forced family that cannot serve: the reasons, exit 1; usage errors: exit 2 and one line
    assert cli.main(["explain", "--kvcache", "12", "--shape", "4,32,8,1,8196,128", "--device", "h200",
                     "--backend", "triton"]) == 1
    assert "block_size=12 (the paged kernel needs a multiple of 16)" in capsys.readouterr().out
    assert cli.main(["explain", "--kvcache", "16", "--shape", "4,32,8,1,8192,128", "--grad"]) == 2
    assert cli.main(["explain", "--varlen", "--kvcache", "16", "--shape", "4,32,8,1,8192,128"]) == 2
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        cli.main(["explain", "--kvcache", "-16", "--shape", "4,32,8,1,8192,128"])
    assert exit_.value.code == 2
    assert cli.main(["explain", "--kvcache", "16", "--shape", "4,32,8,1,50,128"]) == 2
    err = capsys.readouterr().err
    assert "forward only" in err and "at most one" in err and "Traceback" not in err
    assert "page size >= 0" in err and "expected Sk a multiple of --kvcache 16, got Sk=50" in err


def test_a_family_that_broke_the_context_is_left_out_on_resume_without_its_dense_namesake():
    backends = ["sdpa", "sdpa", "triton", "triton", "cupy"]
    assert tune_serving.families(backends) == ["sdpa", "triton", "cupy"]  # the registry's order
    assert tune_serving.families(backends, ("serving:triton",)) == ["sdpa", "cupy"]
    assert tune_serving.families(backends, ("triton",)) == ["sdpa", "triton", "cupy"]  # a dense exclusion


def test_the_plan_counts_only_the_families_that_can_serve():
    from flashdispatch.device import simulated_device

    dev = simulated_device("h200")
    s = shapes.check_shape(shapes.Shape("k", "bf16", 8, 16, 4, 1, 8192, 128, True, "decode", serving="kvcache"))
    assert [f for f in ("triton", "sdpa", "cupy") if tune_serving.can_serve(s, f, dev)] == ["triton", "sdpa"]
    assert s.group == GroupKey("fwd", "kvcache", "plain", "bf16", 128)  # written out: Shape.group derives it
    impls = {n: i for n, i in tune.default_candidates(dev).items() if n in ("sdpa", "triton", "cupy")}
    est = tune.estimate_plan([s], dev, tune.TuneOptions.preset(True), impls)
    assert est.trials == 2


def test_evolve_stores_what_a_new_call_would():
    sp = _varlen_sp([100, 200])
    assert sp.evolve(window=sp.window, softcap=sp.softcap) == sp
    assert sp.evolve(window=None).model_key().variant == "plain"
    w = sp.evolve(window=(3, 7))  # causal: right folds to 0, as attention_varlen stores it
    assert w.window == (3, 0) and w == _varlen_sp([100, 200], window=(3, 7))
    assert sp.evolve(window=(-1, 5)).window is None  # a causal window that hides nothing more
    assert sp.evolve(causal=False, window=(-1, 5)).window == (-1, 5)
    assert sp.evolve(softcap=30.0).softcap == 30.0 and sp.evolve(softcap=None).problem.softcap == 0.0
    assert sp.evolve(needs_grad=True).needs_grad and sp.evolve(block_size=16).block_size == 16


def test_a_serving_family_that_breaks_the_context_is_left_out_on_resume_alone(tmp_path, monkeypatch):
    from flashdispatch.tools import timing

    alive = {"ok": True}
    real = serving.run_varlen

    def break_sdpa(name, *args, **kw):
        if name == "sdpa" and not alive.get("resumed"):
            alive["ok"] = False  # as after an illegal memory access in the fallback's kernel
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(name, *args, **kw)

    monkeypatch.setattr(serving, "run_varlen", break_sdpa)
    monkeypatch.setattr(timing, "context_alive", lambda device: alive["ok"])
    monkeypatch.setattr(shapes, "cpu_shapes", lambda dtype="fp32": [shapes.Shape(
        "dense", dtype, 1, 2, 2, 33, 33, 16, False, "fwd")])
    monkeypatch.setattr(shapes, "cpu_serving_shapes", lambda dtype="fp32": [shapes.Shape(
        "v", dtype, 3, 4, 2, 40, 40, 16, True, "fwd", serving="varlen")])
    out = tmp_path / "cpu.yaml"
    argv = ["--shapes", "cpu", "--device", "cpu", "--backends", "sdpa", "--out", str(out), "--warmup-ms", "0",
            "--rep-ms", "0", "--seed", "1"]
    assert tune.main(argv) == tune.EXIT_RESUME
    state = json.loads((tmp_path / "cpu.yaml.state.json").read_text())
    assert state["meta"]["excluded"] == ["serving:sdpa"]
    alive.update(ok=True, resumed=True)  # a fresh process
    assert tune.main(argv + ["--resume"]) == 0
    prof = parse_profile(out.read_text(), str(out))
    dense = [pt for g in prof.groups if g.key.cls not in SERVING_CLASSES for pt in g.points]
    assert dense and all("sdpa" in pt.ms for pt in dense)  # plain sdpa was not dropped with its family
    assert not any(g.key.cls == "varlen" for g in prof.groups)  # the family stayed out: no point


def test_a_serving_timing_after_a_long_host_pause_starts_from_warm_clocks(monkeypatch):
    # the serving tuner warms the clocks, as the dense one does, when its checks and compile kept the
    # host busy past IDLE_PAUSE_S; a quick family's timing is not preceded by it
    from flashdispatch.tools import timing

    warmed: list[str] = []
    monkeypatch.setattr(timing, "warm_clocks", lambda device, ms=timing.CLOCK_WARMUP_MS: warmed.append(device.type))
    monkeypatch.setattr(timing, "IDLE_PAUSE_S", 1e9)
    r = tune_serving.measure_serving_bucket(SMALL["varlen"], ["sdpa"], CPU, OPTS, torch.Generator().manual_seed(0))
    assert [t.status for t in r.trials] == ["ok"] and warmed == []
    monkeypatch.setattr(timing, "IDLE_PAUSE_S", 0.0)
    r = tune_serving.measure_serving_bucket(SMALL["varlen"], ["sdpa"], CPU, OPTS, torch.Generator().manual_seed(0))
    assert [t.status for t in r.trials] == ["ok"] and warmed == ["cpu"]


@pytest.mark.parametrize("key,d,causal,descriptors", [("h200", 128, True, True), ("a100", 128, True, False),
                                                    ("h200", 64, True, False), ("h200", 128, False, False)])
def test_explain_varlen_names_the_descriptor_kernel_where_it_runs(key: str, d: int, causal: bool,
                                                                 descriptors: bool) -> None:
    """Where the forward's default tiles are a TMA config (Hopper, D=128 causal; not D=64 nor short
    non-causal calls, which run the pointer kernel), and nowhere else."""
    cu = torch.tensor([0, 100, 400], dtype=torch.int32, device="meta")
    q = torch.empty(400, 32, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(400, 8, d, dtype=torch.bfloat16, device="meta")
    notes = fd.explain_varlen(q, k, k, cu, cu, 300, 300, causal=causal, device=key).notes
    assert any("tensor descriptors" in n for n in notes) == descriptors, notes


def test_a_plugin_family_with_only_the_two_calls_serves_packed_batches() -> None:
    """A family registered by a plug-in joins the serving calls through its implementation's
    serving_module(): the two calls are the whole required contract (reasons, notes and the
    variant data are optional)."""
    from types import SimpleNamespace
    from typing import ClassVar

    from flashdispatch.backend import Capabilities, Implementation
    from flashdispatch.registry import REGISTRY

    calls = []

    def varlen_forward(q, k, v, cu_q, cu_k, sp, sinks):  # type: ignore[no-untyped-def]
        calls.append(sp.kind)
        return q.new_zeros(q.shape), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)

    module = SimpleNamespace(varlen_forward=varlen_forward, kvcache_forward=None)

    class Plugin(Implementation):
        name: ClassVar[str] = "plugfam"
        backend: ClassVar[str] = "plugfam"

        def capabilities(self, dev):  # type: ignore[no-untyped-def]
            return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

        def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def serving_module(self):  # type: ignore[no-untyped-def]
            return module

    REGISTRY.register(Plugin())
    try:
        q = torch.randn(7, 2, 16)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        d = fd.explain_varlen(q, q, q, cu, cu, 4, 4, backend="plugfam")
        assert d.variant == "plugfam"
        out = fd.attention_varlen(q, q, q, cu, cu, 4, 4, backend="plugfam")
        assert calls == ["varlen"] and torch.equal(out, torch.zeros_like(q))
        assert "plugfam" in serving.serving_backends()
    finally:
        REGISTRY.unregister("plugfam")
    assert "plugfam" not in serving.serving_backends()
