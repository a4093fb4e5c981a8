"""`flashdispatch bench --heldout` on a CPU (the dry run CI runs: the held-out shapes shrunk with
--scale-for-cpu, through the same code path as on a GPU), the held-out bars, the serving-step
columns, and on a GPU the CUDA-graph replay that decode and speculative steps are timed with."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from flashdispatch.tools import bench, bench_report, decode_timing, heldout

PLAIN, DISPATCH = bench_report.PLAIN, bench_report.DISPATCH


def _dry_run(out: Any, *extra: str) -> int:
    return bench.main(["--heldout", "--scale-for-cpu", "--device", "cpu", "--backends", "sdpa", "--max-tokens", "64",
                       "--warmup-ms", "0", "--rep-ms", "0", "--seed", "1", "--out", str(out), *extra])


def test_cpu_dry_run_covers_every_kind_and_writes_json_table_and_plot(tmp_path, capsys) -> None:
    n = len(heldout.KINDS)
    assert _dry_run(tmp_path, "--limit", str(n)) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "heldout.json").read_text())
    rows, meta = result["rows"], result["meta"]
    assert meta["set"] == "heldout" and meta["planned"] == n and meta["complete"] and meta["scaled_for_cpu"]
    assert [r["kind"] for r in rows] == list(heldout.KINDS)
    for r in rows:
        assert r["model"] and r["label"].startswith(heldout._slug(r["model"]))
        assert {PLAIN, DISPATCH, "sdpa"} <= set(r["providers"])
        assert all(m["status"] == "ok" for m in r["providers"].values()), r["providers"]
        assert r["oracle"] and r["vs_sdpa"] and r["choice"]["variant"]
        serving = r["kind"] in ("decode", "speculative")
        assert r["serving"] == serving and r["unit"] == ("GB/s" if serving else "TFLOP/s")
        assert r["timing"] == "eager"  # no CUDA graphs on a CPU
        # nor a host time apart from the call's own, which the interleaved repetitions measure
        assert not any("host_us" in m for m in r["providers"].values())
    # a CPU run is not judged against the GPU bars
    assert result["summary"]["checks"] == {} and result["summary"]["shapes"] == n
    md = (tmp_path / "heldout.md").read_text()
    assert md.startswith(f"# flashdispatch held-out bench on {meta['card']}")
    assert "dispatcher/oracle" in md and bench_report.CPU_NOTE in md
    assert bench_report.SERVING_CPU_NOTE in md and bench_report.SERVING_CPU_NOTE in printed
    assert "host us" not in printed and "host |" not in md  # no host-time column of CPU noise
    assert (tmp_path / "heldout.png").stat().st_size > 1000
    assert meta["card"] in printed and "PASS" not in printed and "FAIL" not in printed


def test_heldout_needs_scaling_on_a_cpu_and_its_flags_need_heldout(tmp_path, capsys) -> None:
    assert bench.main(["--heldout", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--scale-for-cpu" in capsys.readouterr().err
    assert bench.main(["--limit", "3", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "only with --heldout" in capsys.readouterr().err
    assert _dry_run(tmp_path, "--kinds", "prefil") == 2
    assert "--kinds" in capsys.readouterr().err
    assert _dry_run(tmp_path, "--shapes", "tiny") == 2


def test_filters_and_plot_from(tmp_path) -> None:
    assert _dry_run(tmp_path, "--kinds", "speculative", "--dtypes", "fp16", "--limit", "1") == 0
    result = json.loads((tmp_path / "heldout.json").read_text())
    assert [(r["kind"], r["shape"]["dtype"]) for r in result["rows"]] == [("speculative", "fp16")]
    again = tmp_path / "again"
    assert bench.main(["--plot-from", str(tmp_path / "heldout.json"), "--out", str(again)]) == 0
    assert (again / "heldout.md").read_text() == (tmp_path / "heldout.md").read_text()


def _row(label: str, sdpa: float, best: float, disp: float, kind: str = "prefill") -> dict[str, Any]:
    r: dict[str, Any] = {"label": label, "model": label, "kind": kind, "choice": {"variant": "triton"},
                         "providers": {PLAIN: {"status": "ok", "ms": sdpa}, "triton": {"status": "ok", "ms": best},
                                       "cupy": {"status": "wrong", "ms": best / 10},
                                       DISPATCH: {"status": "ok", "ms": disp}}}
    bench_report.add_ratios(r)
    return r


def _failed(s: dict[str, Any]) -> set[str]:
    return {k for k, ok in s["checks"].items() if not ok}


def test_heldout_bars() -> None:
    good = [_row("a", 1.0, 0.8, 0.8), _row("b", 1.0, 1.0, 1.0), _row("c", 1.0, 0.95, 0.96)]
    good += [_row(f"b{i}", 1.0, 1.0, 1.0) for i in range(3)]
    s = bench_report.heldout_summary(good)
    assert len(s["checks"]) == 3 and not _failed(s), s
    assert s["wrong"][:3] == ["cupy on a", "cupy on b", "cupy on b0"]  # a wrong provider is never the oracle
    # one shape at 0.92 of the oracle: the every-shape bar fails, the geomean holds
    s = bench_report.heldout_summary(good + [_row("d", 1.0, 0.92, 1.0)])
    assert _failed(s) == {f"dispatcher/oracle >= {bench_report.HELDOUT_MIN_ORACLE} on every shape"}
    # slower than plain SDPA by 3% on one shape (and so below its oracle, SDPA)
    s = bench_report.heldout_summary(good + [_row("e", 1.0, 2.0, 1.03)])
    assert f"dispatcher/SDPA >= {bench_report.HELDOUT_MIN_VS_SDPA} on every shape" in _failed(s)
    # many shapes a little behind the oracle: only the geomean bar fails
    s = bench_report.heldout_summary([_row(str(i), 1.0, 0.95, 0.95 / 0.96) for i in range(10)] + good)
    assert _failed(s) == {f"geomean dispatcher/oracle >= {bench_report.HELDOUT_MIN_GEOMEAN_ORACLE}"}
    # a dispatcher that fails (no time) or a run cut short fails every bar
    broken = _row("f", 1.0, 1.0, 1.0)
    broken["providers"][DISPATCH] = {"status": "error", "note": "boom"}
    bench_report.add_ratios(broken)
    s = bench_report.heldout_summary(good + [broken])
    assert _failed(s) == set(s["checks"]) and s["not_judged"] == ["f"]
    assert _failed(bench_report.heldout_summary(good, planned=4)) == set(s["checks"])
    assert bench_report.heldout_summary(good, judge=False)["checks"] == {}


def test_serving_columns_show_graph_time_and_host_time() -> None:
    r = _row("llama decode", 0.030, 0.020, 0.021, kind="decode")
    r.update({"serving": True, "timing": bench_report.GRAPH, "shape": dict(
        heldout.HELDOUT[0].shape._asdict(), seqlen_q=1, seqlen_k=4000, pass_="decode", causal=False)})
    for name, us in ((PLAIN, 45.0), (DISPATCH, 30.5), ("triton", 29.0)):
        r["providers"][name]["host_us"] = us
    lines = bench_report.serving_lines([r])
    assert any("| 30.0 | 45.0 | 21.0 | 30.5 | triton | 20.0 | 29.0 |" in x for x in lines), lines
    r["timing"] = "eager"
    lines = bench_report.serving_lines([r])
    assert any("| n/a | 45.0 | n/a | 30.5 | triton | n/a | 29.0 |" in x for x in lines), lines


def _spread_row(label: str, kind: str, sdpa: tuple[float, float, float], disp: tuple[float, float, float]
                ) -> dict[str, Any]:
    """A held-out row whose SDPA and dispatcher timings have (median, lo, hi) spreads."""
    r: dict[str, Any] = {"label": label, "model": label, "kind": kind, "choice": {"variant": "sdpa"},
                         "shape": heldout.HELDOUT[0].shape._asdict(), "serving": False, "timing": "eager",
                         "providers": {PLAIN: dict(zip(("ms", "lo", "hi"), sdpa), status="ok"),
                                       DISPATCH: dict(zip(("ms", "lo", "hi"), disp), status="ok")}}
    bench_report.add_ratios(r)
    return r


def test_the_heldout_table_says_same_where_the_main_table_does(capsys) -> None:
    """The held-out table, its markdown and its summary on a CPU use the main bench's rule: a ratio
    whose two timings' interquartile ranges overlap reads "same" and counts for nothing there."""
    noise = _spread_row("noise", "prefill", (1.0, 0.9, 1.2), (1.079, 0.95, 1.3))  # 0.927, ranges overlap
    clear = _spread_row("clear", "decode", (2.0, 1.9, 2.1), (1.0, 0.95, 1.05))  # 2.000 beyond the spread
    assert round(noise["vs_sdpa"], 3) == 0.927 and bench_report.vs_sdpa_cell(noise) == "same"
    rows = [noise, clear]
    result = {"meta": {"card": "CPU", "date": "d", "versions": {}, "timing": "t", "command": "c", "set": "heldout"},
              "rows": rows, "summary": bench_report.heldout_summary(rows, judge=False)}
    md = bench_report.heldout_markdown(result)
    table = [ln for ln in md.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert table[0].endswith("| same | same |") and table[1].endswith("| 2.000 |"), table
    bench_report.print_heldout_table(result)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "noise" in ln)
    assert line.split()[-2:] == ["same", "same"] and "0.927" not in printed, printed
    # the summary of an unjudged run counts only the clear shape, as summarize does
    s = result["summary"]
    assert s["min_vs_sdpa"] == (2.0, "clear") and s["min_oracle"] == (1.0, "clear"), s
    assert "dispatcher/SDPA: geomean 2.000, min 2.000 (clear) over the shapes that differ beyond the spread" in md
    only_noise = bench_report.heldout_summary([noise], judge=False)
    assert "dispatcher/SDPA: no shape differs from plain SDPA beyond the spread" in \
        bench_report._heldout_summary_lines(only_noise)
    assert bench_report.heldout_summary(rows, judge=True)["min_vs_sdpa"][1] == "noise"  # a GPU's bars: every shape


def test_serving_steps_are_decode_and_speculative_forward_calls() -> None:
    by_kind: dict[str, set[bool]] = {}
    for h in heldout.HELDOUT:
        by_kind.setdefault(h.kind, set()).add(decode_timing.captured_in_serving(h.shape))
    assert by_kind == {"prefill": {False}, "train": {False}, "decode": {True}, "speculative": {True},
                       "chunked": {False}}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sq", [1, 8])
def test_dispatcher_replays_in_a_cuda_graph_as_it_runs_eagerly(sq: int) -> None:
    """What the bench times for a serving step: the dispatcher's call captured and replayed gives
    the eager call's output (plain SDPA's too), and the replay reads new inputs in place."""
    import flashdispatch

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 32, sq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(4, 8, 4000, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    for name, call in (("dispatch", lambda: flashdispatch.attention(q, k, v, causal=True)),
                       ("SDPA", lambda: bench.plain_sdpa(q, k, v, causal=True))):
        outs: list[torch.Tensor] = []
        replay = decode_timing.graph_replay(lambda: outs.append(call()))
        captured = outs[-1]
        q.copy_(torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=g))
        replay()
        torch.cuda.synchronize()
        fresh = call()  # the same plan, eagerly, on the new q
        assert not torch.equal(fresh, outs[0]), name  # the inputs did change
        torch.testing.assert_close(captured, fresh, msg=name)


# --- the bars cannot be met by missing numbers --------------------------------------------------


def _ratio_row(label: str, **ms: Any) -> dict[str, Any]:
    providers = {n: ({"status": "ok", "ms": t} if isinstance(t, float) else {"status": t}) for n, t in ms.items()}
    row = {"label": label, "providers": providers, "choice": {"variant": "sdpa"}}
    bench_report.add_ratios(row)
    return row


def test_the_oracle_counts_the_dispatchers_own_time_so_its_ratio_is_at_most_one() -> None:
    row = _ratio_row("a", **{PLAIN: 1.0, "triton": 0.9, DISPATCH: 0.8})
    assert row["oracle"] == 1.0 and row["best"] == "triton" and row["vs_sdpa"] == pytest.approx(1.25)
    assert _ratio_row("b", **{PLAIN: 1.0, "triton": 0.5, DISPATCH: 1.0})["oracle"] == 0.5


def test_a_tuned_run_with_a_failed_dispatcher_or_missing_shapes_fails_every_bar() -> None:
    good = [_ratio_row(f"s{i}", **{PLAIN: 1.0, DISPATCH: 0.9}) for i in range(3)]
    assert all(bench_report.summarize(good, judge=True, planned=3)["checks"].values())
    broken = good[:2] + [_ratio_row("s2", **{PLAIN: 1.0, DISPATCH: "error"})]
    s = bench_report.summarize(broken, judge=True, planned=3)
    assert not any(s["checks"].values()) and s["not_judged"] == ["s2"] and s["errors"] == ["dispatch on s2"]
    short = bench_report.summarize(good[:2], judge=True, planned=3)  # a run cut short by its time budget
    assert not any(short["checks"].values())


def test_a_provider_that_failed_is_named_in_the_heldout_summary() -> None:
    rows = [_ratio_row("s0", **{PLAIN: 1.0, "triton": "error", DISPATCH: 0.99})]
    s = bench_report.heldout_summary(rows, judge=True, planned=1)
    assert s["errors"] == ["triton on s0"]
    assert any("triton on s0" in line for line in bench_report._heldout_summary_lines(s))


def test_a_filtered_or_forced_run_is_not_judged(monkeypatch) -> None:
    args = bench.build_parser().parse_args(["--heldout"])
    assert bench._partial(args) == ""
    assert "--limit" in bench._partial(bench.build_parser().parse_args(["--heldout", "--limit", "5"]))
    assert "--exclude" in bench._partial(bench.build_parser().parse_args(["--exclude", "cupy"]))
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "triton")
    import flashdispatch

    flashdispatch.refresh()
    assert "FLASHDISPATCH_BACKEND=triton" in bench._partial(args)


def test_interleaved_timing_takes_at_least_the_repetitions_asked() -> None:
    from flashdispatch.tools import timing

    calls = {"n": 0}

    def fn() -> None:
        calls["n"] += 1

    got = timing.interleaved_samples_ms({"f": (fn, None)}, torch.device("cpu"), warmup_ms=0, rep_ms=0, min_reps=40)
    assert len(got["f"]) >= 40


def test_an_implementation_named_like_its_family_is_timed_alone(monkeypatch) -> None:
    """Forcing "sdpa" (or "triton") picks the family's best by the model; the bench must time the
    implementation of that name itself, with the config the dispatcher would give it."""
    from flashdispatch.registry import REGISTRY

    calls: list[str] = []
    for name in ("sdpa", "sdpa:flash", "sdpa:math"):
        impl = REGISTRY.get(name)
        real = impl.run
        monkeypatch.setattr(impl, "run", lambda *a, _n=name, _r=real, **kw: (calls.append(_n), _r(*a, **kw))[1])
    from flashdispatch import selection

    real_order = selection._default_order  # the family's own choice would now be another kernel
    monkeypatch.setattr(selection, "_default_order", lambda p, dev, names: real_order(p, dev, names)[::-1])
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    import flashdispatch

    flashdispatch.attention(q, k, v, causal=True, backend="sdpa")
    assert calls and calls[-1] != "sdpa"  # forcing the family name did not run plain sdpa
    calls.clear()
    providers = bench._providers(True, ["sdpa", "sdpa:math"])
    out = providers["sdpa"](q, k, v)
    assert calls == ["sdpa"] and out.shape == q.shape
    calls.clear()
    providers["sdpa"](q[:, :, :20], k, v)  # another shape (the gradient proxy): its own problem
    assert calls == ["sdpa"]
