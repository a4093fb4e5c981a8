"""tune and bench on a CPU: a CPU-sized shape set by default, only the backends that can run
there, timings side by side from interleaved repetitions with their spread, no GPU targets."""

from __future__ import annotations

import json

import pytest
import torch

from flashdispatch.tools import bench, bench_report, shapes, timing, tune

CPU = torch.device("cpu")


def test_quick_tune_on_a_cpu_plans_cpu_sized_shapes(capsys):
    assert tune.main(["--quick", "--list", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(shapes.named("cpu"))
    for s in shapes.named("cpu"):
        # a few MB of K/V and at most 256 query rows: each call takes milliseconds on a CPU core
        assert s.batch * s.heads_q * s.seqlen_q * s.seqlen_k <= 2**20, s
    kinds = {(s.pass_, s.causal, s.seqlen_q < s.seqlen_k) for s in shapes.cpu_shapes()}
    assert ("fwd_bwd", True, False) in kinds and ("decode", False, True) in kinds and ("fwd", True, True) in kinds


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only machine can run")
def test_only_backends_that_run_here_are_measured(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    impls = tune.select_implementations(None, [], CPU)
    assert set(impls) == {"sdpa", "sdpa:flash", "sdpa:math"}


def test_a_gpu_device_on_a_cpu_machine_is_a_user_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--device", "cuda"]) == 2
    assert tune.main(["--device", "cuda", "--list"]) == 2
    assert "no CUDA" in capsys.readouterr().err


def test_cpu_timing_interleaves_the_providers():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n), None) for n in ("a", "b", "c")}
    got = timing.interleaved_samples_ms(fns, CPU, warmup_ms=0.0, rep_ms=0.0)
    assert set(got) == {"a", "b", "c"} and all(len(xs) >= timing.INTERLEAVED_REPS[0] for xs in got.values())
    timed = calls[-3 * len(got["a"]):]
    for r in range(len(got["a"])):  # every repetition runs each provider once
        assert sorted(timed[3 * r: 3 * r + 3]) == ["a", "b", "c"]


def test_a_difference_inside_the_spread_is_not_a_speedup():
    a = timing.Spread.of([10.0, 11.0, 12.0, 13.0, 14.0])
    b = timing.Spread.of([11.5, 12.0, 12.5, 13.0, 13.5])
    c = timing.Spread.of([5.0, 5.1, 5.2, 5.3, 5.4])
    assert timing.speedup(a, b) is None
    assert timing.speedup(a, c) == pytest.approx(12.0 / 5.2)
    row = {"providers": {bench.PLAIN: {"status": "ok", "ms": a.median, "lo": a.lo, "hi": a.hi},
                         bench.DISPATCH: {"status": "ok", "ms": b.median, "lo": b.lo, "hi": b.hi}}}
    bench_report.add_ratios(row)
    assert bench_report.vs_sdpa_cell(row) == "same"
    row["providers"][bench.DISPATCH] = {"status": "ok", "ms": c.median, "lo": c.lo, "hi": c.hi}
    bench_report.add_ratios(row)
    assert bench_report.vs_sdpa_cell(row) == f"{12.0 / 5.2:.3f}"


def test_cpu_bench_judges_no_gpu_target(tmp_path, capsys):
    rc = bench.main(["--shapes", "tiny", "--passes", "decode", "--device", "cpu", "--backends", "sdpa", "--out", str(tmp_path),
                     "--warmup-ms", "0", "--rep-ms", "0", "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NO " not in out and "ok " not in out and bench_report.CPU_NOTE in out
    # "SDPA" (torch called directly) and "sdpa" (our backend forced) are told apart, in the table and the file
    assert bench_report.PROVIDERS_NOTE in out and "called directly" in (tmp_path / "bench.md").read_text()
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["summary"]["checks"] == {}
    for row in result["rows"]:
        for m in row["providers"].values():
            assert m["lo"] <= m["ms"] <= m["hi"]


def test_a_ratio_near_its_bar_is_timed_again_with_its_providers_and_judged_on_that(monkeypatch, tmp_path):
    """A shape whose per-shape ratio lies within CONFIRM_BAND of its bar (either side) is timed a
    second time, plain SDPA, the dispatcher and the fastest other alone, CONFIRM_FACTOR x the
    repetitions; the row keeps the first timing and is marked in the report. Without bars (a run
    not judged) or far from them, nothing is timed twice."""
    row = {"vs_sdpa": 0.969, "oracle": 0.94, "best": "triton"}
    near = bench_report.near_a_bar(row, bench_report.per_shape_bars(False))
    assert near == {"vs_sdpa": "vs_sdpa 0.969, bar 0.97"}
    assert bench_report.confirm_providers(row, near) == [bench.DISPATCH, bench.PLAIN]
    near = bench_report.near_a_bar(row, bench_report.per_shape_bars(True))
    assert near == {"vs_sdpa": "vs_sdpa 0.969, bar 0.98", "oracle": "oracle 0.940, bar 0.93"}
    assert bench_report.confirm_providers(row, near) == [bench.DISPATCH, bench.PLAIN, "triton"]
    # a ratio of 1.0 (the dispatcher running plain SDPA's own call) is no second look's business
    assert bench_report.near_a_bar({"vs_sdpa": 1.0, "oracle": 1.0}, bench_report.per_shape_bars(False)) == {}

    s = shapes.tiny_shapes()[0]
    opts = tune.TuneOptions(warmup_ms=0.0, rep_ms=1.0)
    calls: list[tuple[list[str], float]] = []
    real = timing.interleaved_samples_ms

    def spy(fns, device, *, rep_ms, **kw):
        calls.append((sorted(fns), rep_ms))
        return real(fns, device, rep_ms=rep_ms, **kw)

    monkeypatch.setattr(timing, "interleaved_samples_ms", spy)
    dev = torch.device("cpu")
    args = (s, ["sdpa", "sdpa:math"], dev, opts, torch.Generator().manual_seed(0), tune.GradCache())
    plain = bench.bench_shape(*args)
    assert "retimed" not in plain and len(calls) == 1
    calls.clear()
    monkeypatch.setattr(bench_report, "CONFIRM_BAND", 100.0)  # every ratio is near its bar
    row = bench.bench_shape(*args, bars=bench_report.per_shape_bars(False))
    assert len(calls) == 2 and calls[1][1] == opts.rep_ms * bench_report.CONFIRM_FACTOR
    # first every provider (SDPA, sdpa, sdpa:math, dispatch), then the dispatcher, SDPA and the fastest other
    assert calls[0][0] == sorted([bench.PLAIN, "sdpa", "sdpa:math", bench.DISPATCH])
    assert set(row["retimed"]["first"]) == set(calls[1][0]) >= {bench.PLAIN, bench.DISPATCH}
    assert len(calls[1][0]) in (2, 3)  # 2 where the fastest other was plain SDPA itself
    assert len(row["retimed"]["why"]) == 2
    assert row["retimed"]["why"] and row["retimed"]["rep_ms"] == opts.rep_ms * bench_report.CONFIRM_FACTOR
    text = bench_report.markdown({"meta": {"card": "cpu", "date": "d", "versions": {}, "timing": "t", "command": "c"},
                                  "rows": [row], "summary": bench_report.summarize([row], judge=False)})
    assert bench_report.RETIMED_MARK in text and "timed a second time (1 shape)" in text


def test_bench_triton_cases_are_the_shape_lists_problems() -> None:
    """bench_triton's cases carry the Problem of tools/shapes.py's shapes (one problem record),
    and their JSON row names every field of it."""
    from flashdispatch.problem import problem_from_shape
    from flashdispatch.tools import bench_triton

    cases = bench_triton.all_cases(["fa2", "chunked", "gqa", "decode", "d256"], "bf16")
    by_label = {c.label: c for c in cases}
    assert len(by_label) == len(cases)
    for s in shapes.special_shapes(("bf16",)):
        want = problem_from_shape(s.dims, dtype=s.dtype, causal=s.causal)
        assert want in {c.problem for c in cases}, s
    chunked = by_label["chunked-prefill"]
    cp = chunked.problem
    assert chunked.describe() == (f"bf16 B={cp.batch} H={cp.heads_q} Sq={cp.seqlen_q} Sk={cp.seqlen_k} "
                                  f"D={cp.head_dim} causal")
    assert bench_triton.flops(chunked) == chunked.problem.flops() > 0
    row = json.loads(json.dumps(chunked.as_dict()))
    assert row["dtype"] == "bf16" and row["seqlen_q"] == cp.seqlen_q and row["label"] == "chunked-prefill"


def test_tune_writes_into_a_profile_dir_that_does_not_exist_yet(tmp_path, monkeypatch):
    """FLASHDISPATCH_PROFILE_DIR names a directory, even before it exists: tune creates it and writes
    <key>.yaml inside, where the dispatcher reads it (not a file at the directory's path)."""
    new = tmp_path / "profiles" / "mine"
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(new))
    args = tune.build_parser().parse_args([])
    assert tune._out_path(args, "cpu") == str(new / "cpu.yaml") and new.is_dir()
    assert "from there" in tune._use_note(str(new / "cpu.yaml"), "cpu")
    args = tune.build_parser().parse_args(["--out", str(tmp_path / "elsewhere.yaml")])
    assert tune._out_path(args, "cpu") == str(tmp_path / "elsewhere.yaml")  # --out still names a file


def test_tune_says_how_to_use_the_profile_it_wrote(tmp_path, monkeypatch):
    monkeypatch.delenv("FLASHDISPATCH_PROFILE_DIR", raising=False)
    assert tune._use_note(str(tmp_path / "cpu.yaml"), "cpu") == f"to use it: export FLASHDISPATCH_PROFILE_DIR={tmp_path}"
    assert "copy it there under that name" in tune._use_note(str(tmp_path / "x.yaml"), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only machine leaves out")
def test_bench_says_what_it_leaves_out_under_its_own_name(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="flashdispatch"):
        assert bench.main(["--shapes", "tiny", "--passes", "decode", "--device", "cpu", "--out", str(tmp_path),
                           "--warmup-ms", "0", "--rep-ms", "0", "--seed", "1"]) == 0
    (rec,) = [r for r in caplog.records if r.getMessage().startswith("left out")]
    assert rec.name == "flashdispatch.tools.bench"


def test_a_measured_run_rescored_under_the_current_rules_reads_the_new_choices_measured_time(tmp_path, capsys):
    # two rows measured on an H200: a speculative step the run gave to plain SDPA (the current rules
    # pick the Triton split-KV kernel, timed in the same run) and a prefill whose choice stays; a
    # third whose new choice was not timed is left out of the ratios and listed
    import json

    from flashdispatch.tools import bench, bench_report, bench_rescore

    def ok(ms):
        return {"status": "ok", "ms": ms, "rate": 100.0 / ms, "lo": ms * 0.99, "hi": ms * 1.01}

    def row(label, dims, causal, choice, providers):
        b, hq, hkv, sq, sk, d = dims
        shape = {"label": label, "dtype": "bf16", "batch": b, "heads_q": hq, "heads_kv": hkv, "seqlen_q": sq,
                 "seqlen_k": sk, "head_dim": d, "causal": causal, "pass_": "fwd", "window": -1, "serving": ""}
        r = {"label": label, "shape": shape, "pass": "fwd", "unit": "TFLOP/s", "serving": False, "timing": "eager",
             "choice": {"variant": choice, "config": {}, "source": "profile"}, "providers": providers}
        bench_report.add_ratios(r)
        return r

    spec = row("spec", (4, 32, 8, 8, 16000, 128), True, "sdpa",
               {"SDPA": ok(0.30), "sdpa": ok(0.30), "triton": ok(0.10), "dispatch": ok(0.30)})
    dense = row("dense", (2, 32, 8, 4096, 4096, 128), True, "sdpa",
                {"SDPA": ok(1.00), "sdpa": ok(1.00), "triton": ok(1.20), "dispatch": ok(1.01)})
    untimed = row("untimed", (4, 32, 8, 8, 16000, 128), True, "sdpa",
                  {"SDPA": ok(0.30), "sdpa": ok(0.30), "dispatch": ok(0.30)})
    wrong = row("wrong", (4, 32, 8, 8, 16000, 128), True, "sdpa",
                {"SDPA": ok(0.30), "sdpa": ok(0.30), "dispatch": ok(0.30),
                 "triton": {"status": "wrong", "note": "max err 3 > 0.01"}})
    measured = {"meta": {"device": "NVIDIA H200 [cuda sm_90, 132 SMs/CUs, 140 GiB] profile=h200",
                         "card": "NVIDIA H200", "date": "2026-12-05", "versions": {"torch": "2.11.0"},
                         "profile": "h200.yaml", "command": "flashdispatch bench --quick", "timing": "interleaved",
                         "planned": 4},
                "rows": [spec, dense, untimed, wrong], "summary": {}}
    assert spec["vs_sdpa"] == pytest.approx(1.0)
    got = bench_rescore.rescore(measured)
    r_spec, r_dense, r_untimed, r_wrong = got["rows"]
    assert r_spec["choice"]["variant"] == "triton" and r_spec["choice"]["measured_choice"] == "sdpa"
    assert r_spec["providers"]["dispatch"]["ms"] == 0.10 and r_spec["vs_sdpa"] == pytest.approx(3.0)
    assert r_dense["choice"]["variant"] == "sdpa" and r_dense["providers"]["dispatch"]["ms"] == 1.01  # kept
    assert r_untimed["providers"]["dispatch"]["status"] == "missing" and r_untimed["vs_sdpa"] is None
    assert got["summary"]["checks"] == {} and got["meta"]["rescored"]["untimed"] == ["untimed"]
    assert got["meta"]["rescored"]["moved"] == ["spec: sdpa -> triton", "untimed: sdpa -> triton",
                                                "wrong: sdpa -> triton"]
    # a new choice that failed its check in the run stays failed, and is listed
    assert r_wrong["providers"]["dispatch"]["status"] == "wrong" and r_wrong["vs_sdpa"] is None
    assert got["meta"]["rescored"]["failed"] == ["wrong: triton (wrong)"]
    assert r_spec["choice"]["config"] is None and r_dense["choice"] == dense["choice"]  # config: as timed
    assert spec["providers"]["dispatch"]["ms"] == 0.30  # the measured run is not modified
    # through the CLI: outputs written, the verdict replaced by what a re-score is
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(measured))
    assert bench.main(["--rescore", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Re-scored on" in out and "not a measurement" in out and "NO " not in out
    assert "not a measurement" in (tmp_path / "out" / "bench.md").read_text()
    with pytest.raises(ValueError, match="profile="):
        bench_rescore.rescore({"meta": {"device": "cpu"}, "rows": []})


# --- the variants bench's report (the measuring needs a GPU; the table and plot do not) ----------


def _variants_run():
    import math

    from flashdispatch.tools import bench_variants as bv

    run = bv.Run("NVIDIA H200 (synthetic)", "2.11", "3.6.0", "0.1")
    run.bars = [
        bv.Bar("window fwd vs flex", "S=16384", "ours", "flex", 1.0, 1.5, min_speedup=1.3),  # 1.5x: pass
        bv.Bar("window fwd+bwd vs flex", "S=16384", "ours", "flex", 2.0, 1.8, min_speedup=1.2),  # 0.9x: fail
        bv.Bar("sinks overhead fwd", "S=8192", "ours", "ours without sinks", 1.02, 1.0, max_time_ratio=1.05),
        bv.Bar("sinks overhead decode", "B=8", "ours", "ours without sinks", 1.2, 1.0, max_time_ratio=1.05),
        bv.Bar("decode window vs whole cache", "B=8", "ours", "sdpa", math.nan, 0.5, min_speedup=2.0),  # not timed
    ]
    run.errors = {"decode-b8/ours": "RuntimeError: out of memory"}
    return bv, run


def test_the_variants_table_says_which_bars_pass_and_names_the_card(capsys):
    bv, run = _variants_run()
    bv.print_table(run)
    out = capsys.readouterr().out
    assert "flashdispatch variants on NVIDIA H200 (synthetic) (torch 2.11, triton 3.6.0)" in out
    rows = {line[:42].strip(): line.split() for line in out.splitlines() if line.endswith(("PASS", "FAIL"))}
    assert {name: r[-1] for name, r in rows.items()} == {
        "window fwd vs flex": "PASS", "window fwd+bwd vs flex": "FAIL", "sinks overhead fwd": "PASS",
        "sinks overhead decode": "FAIL", "decode window vs whole cache": "FAIL"}
    # the ratio column: anchor / ours for a speed-up bar, ours / anchor for a time bar
    assert rows["window fwd+bwd vs flex"][-4:-1] == ["0.900", ">=", "1.2x"]
    assert rows["sinks overhead decode"][-5:-1] == ["1.200", "time", "<=", "1.05x"]
    assert "error decode-b8/ours: RuntimeError: out of memory" in out
    assert out.rstrip().endswith("2/5 bars pass on NVIDIA H200 (synthetic)")


def test_the_variants_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    bv, run = _variants_run()
    bv.plot(run, str(tmp_path / "bench_variants.png"))
    assert (tmp_path / "bench_variants.png").stat().st_size > 1000


def test_the_backward_table_sorts_configs_and_sums_forward_and_backward(capsys):
    from flashdispatch.tools import bench_backward as bb

    # the window's visible pairs against a brute-force count (a query sees itself and window-1 before)
    for s, w in ((10, 4), (7, 7), (5, 9), (6, None)):
        brute = sum(1 for i in range(s) for j in range(s) if j <= i and (w is None or i - j < w))
        assert bb._visible_pairs(s, w) == brute
    row = {"S": 16384, "window": 4096, "visible_pairs": 1, "bwd_gflop": 2000.0, "errors": {"bwd 64x128 w8 s2": "x"},
           "kernels": {"16x64 w8 s1": {"_bwd_preprocess_kernel": 0.1, "_bwd_dkdv_kernel": 3.0, "_bwd_dq_kernel": 1.9}},
           "ms": {"bwd 32x128 w8 s2": 8.0, "bwd 16x64 w8 s1": 5.0, "bwd flex": 6.0, "fwd tl": 2.0,
                  "fwd gluon": 1.0, "fwd flex": 2.0}}
    text = bb.table([row], "NVIDIA H200 (synthetic)")
    lines = text.splitlines()
    assert "NVIDIA H200 (synthetic)" in lines[0]
    body = [line.split() for line in lines if line.startswith("  ") and "x" in line.split()[0]]
    assert [b[0] for b in body] == ["16x64", "flex", "32x128"]  # fastest first
    # 16x64: 2000 GFLOP in 5 ms = 400 TFLOP/s; flex bwd 6 / 5 = 1.2x; (2 + 6) / (gluon 1 + 5) = 1.33x
    assert body[0][3:] == ["5.000", "400.0", "1.20x", "1.33x"]
    assert "bwd 64x128 w8 s2: x" in text
    assert "kernels of 16x64 w8 s1 (ms per call): preprocess 0.100, dkdv 3.000, dq 1.900" in text
    if not torch.cuda.is_available():  # no GPU: a one-line error, exit code 2
        assert bb.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_backward_bench_reads_extra_tiles():
    import argparse

    from flashdispatch.tools import bench_backward as bb

    assert bb.parse_tiles("64,128,8,3;16,64,8,1")[1] == {
        "BWD_BLOCK_M": 16, "BWD_BLOCK_N": 64, "BWD_num_warps": 8, "BWD_num_stages": 1, "BWD_DQ_ATOMIC": False}
    assert bb.parse_tiles("") == []
    with pytest.raises(argparse.ArgumentTypeError, match="M,N,WARPS,STAGES"):
        bb.parse_tiles("64,128,8")
    # a dq tile after '/': the dq kernel's query tile, key tile, warps, stages
    own = bb.parse_tiles("64,128,8,3/128,32,4,2")[0]
    assert own["BWD_DQ_BLOCK_M"] == 128 and own["BWD_DQ_BLOCK_N"] == 32
    assert own["BWD_DQ_num_warps"] == 4 and own["BWD_DQ_num_stages"] == 2
    assert bb._label(own) == "64x128 w8 s3 / dq 128x32 w4 s2"
    # the swapped pair spelled out is the default, and labelled as one
    assert bb._label(bb.parse_tiles("64,128,8,3/128,64,8,3")[0]) == "64x128 w8 s3"
    for bad in ("64,128,8,3/128,32", "64,128,8,3/1,2,3,4/1,2,3,4"):
        with pytest.raises(argparse.ArgumentTypeError, match="M,N,WARPS,STAGES"):
            bb.parse_tiles(bad)
    assert len({bb._label(c) for c in bb.parse_tiles(bb.EXTRA)}) == len(bb.parse_tiles(bb.EXTRA))
