"""What `flashdispatch bench` writes and prints: ratios, summaries against the bars, tables, plots.

tools/bench.py measures and hands its rows here. A row is one shape: its providers' medians (ms),
interquartile ranges, status, host time per eager call for serving steps; this module adds the
ratios (add_ratios), judges a run against the project's bars (summarize for the tuned-shape bench,
heldout_summary for the held-out set) and renders bench.md / bench.png, heldout.md / heldout.png
and the JSON beside them. Every table and figure names the card.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

from . import timing

log = logging.getLogger("flashdispatch.tools.bench")

PLAIN = "SDPA"
DISPATCH = "dispatch"

# The performance bar of the project on a GPU, checked in the summary (not on a CPU, where our
# kernels do not run). Tuned-shape bench:
MIN_RATIO_VS_SDPA = 0.97
MIN_GEOMEAN_VS_SDPA = 1.0
MIN_GEOMEAN_ORACLE = 0.97
MIN_ORACLE = 0.90
# Held-out set (tools/heldout.py): shapes the tuner never measured.
HELDOUT_MIN_GEOMEAN_ORACLE = 0.98
HELDOUT_MIN_ORACLE = 0.93
HELDOUT_MIN_VS_SDPA = 0.98
# A shape whose per-shape ratio (vs SDPA, oracle) lies within CONFIRM_BAND of its bar, on either
# side, is timed a second time: the providers of those ratios alone (the dispatcher and plain SDPA,
# or the fastest other), CONFIRM_FACTOR times the repetitions, interleaved. The row is judged on
# that timing; the first stays in the row ("retimed"). Both sides of the bar, so that a ratio that
# passed by the timer's spread is looked at as closely as one that failed by it; narrow, so that the
# many rows where the dispatcher runs plain SDPA's own call (ratio 1.0) are not timed twice.
CONFIRM_BAND = 0.015
CONFIRM_FACTOR = 4
RETIMED_MARK = "†"

PROVIDERS_NOTE = (f"{PLAIN}: torch's scaled_dot_product_attention called directly, no flashdispatch; sdpa, sdpa:flash, "
                  f"triton, ...: flashdispatch.attention() with that backend forced; {DISPATCH}: flashdispatch.attention() "
                  "choosing on its own.")
CPU_NOTE = ("On a CPU these numbers compare torch's CPU attention kernels (and the dispatcher's own cost) on this "
            "machine; flashdispatch's kernels and its performance targets are for GPUs, where they are judged.")
GRAPH = "graph"  # a row's "timing" when its providers were timed as CUDA-graph replays
NA = "n/a"


# --- ratios and summaries ---------------------------------------------------------------------


def add_ratios(row: dict[str, Any]) -> None:
    """vs_sdpa = plain-SDPA time / dispatcher time; oracle = the fastest correct provider's time,
    the dispatcher's own included, / dispatcher time (at most 1.0: 1.0 when the dispatcher ran the
    fastest, or something no other provider ran); best = the fastest other provider."""
    ok = {n: m["ms"] for n, m in row["providers"].items() if m.get("status") == "ok" and m.get("ms")}
    disp = ok.get(DISPATCH)
    others = {n: t for n, t in ok.items() if n != DISPATCH}
    row["best"] = min(others, key=others.__getitem__) if others else None
    row["vs_sdpa"] = ok[PLAIN] / disp if disp and PLAIN in ok else None
    row["oracle"] = min(others[row["best"]], disp) / disp if disp and others else None
    # whether dispatch differs from SDPA (and from the best) beyond the spread of their repetitions
    row["vs_sdpa_clear"] = _clear(row, PLAIN) if row["vs_sdpa"] else None
    row["oracle_clear"] = _clear(row, row["best"]) if row["oracle"] else None


def per_shape_bars(heldout: bool) -> dict[str, float]:
    """The bars every shape is held to, by the row's ratio key: the held-out set's or the tuned grid's."""
    if heldout:
        return {"vs_sdpa": HELDOUT_MIN_VS_SDPA, "oracle": HELDOUT_MIN_ORACLE}
    return {"vs_sdpa": MIN_RATIO_VS_SDPA, "oracle": MIN_ORACLE}


def near_a_bar(row: dict[str, Any], bars: dict[str, float]) -> dict[str, str]:
    """The row's per-shape ratios within CONFIRM_BAND of their bar, either side, by key
    ({'vs_sdpa': 'vs_sdpa 0.969, bar 0.97'}); empty when none is."""
    return {key: f"{key} {row[key]:.3f}, bar {bar}" for key, bar in bars.items()
            if row.get(key) and abs(row[key] - bar) <= CONFIRM_BAND}


def confirm_providers(row: dict[str, Any], near: dict[str, str]) -> list[str]:
    """Who a second look times: the dispatcher and the provider each near ratio compares it with
    (add_ratios: plain SDPA for vs_sdpa, the fastest other for oracle)."""
    return list(dict.fromkeys([DISPATCH, *(PLAIN if key == "vs_sdpa" else row.get("best") for key in near)]))


def retimed_note(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The footnote for rows timed a second time (empty when none was)."""
    again = [r for r in rows if r.get("retimed")]
    if not again:
        return []
    return ["", f"{RETIMED_MARK} timed a second time ({len(again)} shape{'s' if len(again) > 1 else ''}): a per-shape "
            f"ratio lay within {CONFIRM_BAND} of its bar, so the dispatcher and the provider of that ratio (plain SDPA "
            f"or the fastest other) were timed again alone with {CONFIRM_FACTOR}x the repetitions, and the row shows "
            "and is judged on that timing (the first is in the JSON, `retimed`):", ""] + [
        f"- {r.get('model', '') + ': ' if r.get('model') else ''}{_short(r['shape'])}: "
        f"{'; '.join(r['retimed']['why'])} at first; now vs SDPA {vs_sdpa_cell(r)}, oracle {oracle_cell(r)}"
        for r in again]


def _clear(row: dict[str, Any], other: str) -> bool:
    """Whether `other` and the dispatcher differ beyond their interquartile ranges (True when the
    ranges were not recorded: older results)."""
    a, b = row["providers"][other], row["providers"][DISPATCH]
    if any(m.get(x) is None for m in (a, b) for x in ("lo", "hi")):
        return True
    return timing.speedup(timing.Spread(a["ms"], a["lo"], a["hi"], 0),
                          timing.Spread(b["ms"], b["lo"], b["hi"], 0)) is not None


def _unjudged_note(summary: dict[str, Any]) -> str | None:
    """Why a summary carries no verdict: a re-score (tools/bench_rescore.py) or a CPU run; None when
    it was judged or says itself why not (a partial run)."""
    if summary.get("rescored"):
        r = summary["rescored"]
        return f"Re-scored on {r['date']} for the {r['card']}: {r['note']}."
    if not summary["checks"] and not summary.get("partial"):
        return CPU_NOTE
    return None


def geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _wrong(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({f"{n} on {r['label']}" for r in rows for n, m in r["providers"].items() if m.get("status") == "wrong"})


def _errors(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Providers that raised (or whose timing failed) at a shape: left out of that shape's oracle."""
    return sorted({f"{n} on {r['label']}" for r in rows for n, m in r["providers"].items() if m.get("status") == "error"})


def summarize(rows: Sequence[dict[str, Any]], judge: bool = True, planned: int | None = None) -> dict[str, Any]:
    """Geomeans and minima; with judge (a GPU run) the project's performance bar as checks: every
    shape counts, so a shape where the dispatcher (or plain SDPA) has no time fails the bars, and
    so does a run that did not reach every planned shape."""
    # on a GPU every shape counts toward the bar; elsewhere only differences beyond the spread
    vs = [(r["vs_sdpa"], r["label"]) for r in rows if r.get("vs_sdpa") and (judge or r.get("vs_sdpa_clear", True))]
    orc = [(r["oracle"], r["label"]) for r in rows if r.get("oracle") and (judge or r.get("oracle_clear", True))]
    s: dict[str, Any] = {
        "shapes": len(rows),
        "geomean_vs_sdpa": geomean([x for x, _ in vs]),
        "min_vs_sdpa": min(vs) if vs else None,
        "geomean_oracle": geomean([x for x, _ in orc]),
        "min_oracle": min(orc) if orc else None,
        "wrong": _wrong(rows),
        "errors": _errors(rows),
        "not_judged": sorted(r["label"] for r in rows if not r.get("vs_sdpa") or not r.get("oracle")),
        "planned": len(rows) if planned is None else planned,
        "counted": f"all {len(rows)} shapes" if judge else
                   f"{len(vs)} of {len(rows)} shapes (the others are inside the spread)",
    }
    complete = bool(rows) and len(rows) == s["planned"] and not s["not_judged"]
    s["checks"] = {} if not judge else {
        f"dispatch >= {MIN_RATIO_VS_SDPA} x SDPA on every shape": complete and min(vs)[0] >= MIN_RATIO_VS_SDPA,
        f"geomean dispatch/SDPA >= {MIN_GEOMEAN_VS_SDPA}": complete and s["geomean_vs_sdpa"] >= MIN_GEOMEAN_VS_SDPA,
        f"geomean oracle ratio >= {MIN_GEOMEAN_ORACLE}": complete and s["geomean_oracle"] >= MIN_GEOMEAN_ORACLE,
        f"oracle ratio >= {MIN_ORACLE} on every shape": complete and min(orc)[0] >= MIN_ORACLE,
    }
    return s


def heldout_summary(rows: Sequence[dict[str, Any]], judge: bool = True, planned: int | None = None) -> dict[str, Any]:
    """The held-out bars: dispatcher/oracle >= 0.98 geomean and >= 0.93 on every shape,
    dispatcher/SDPA >= 0.98 on every shape. Every shape counts; a shape where the dispatcher (or
    plain SDPA) has no time fails its bar, and so does a run that did not reach every planned shape.
    Without judge (a CPU dry run) no bar is checked, and the geomeans and minima count only the
    shapes where the two timings differ beyond their spread, as summarize's do."""
    orc = [(r["oracle"], r["label"]) for r in rows if r.get("oracle") and (judge or r.get("oracle_clear", True))]
    vs = [(r["vs_sdpa"], r["label"]) for r in rows if r.get("vs_sdpa") and (judge or r.get("vs_sdpa_clear", True))]
    no_oracle = [r["label"] for r in rows if not r.get("oracle")]
    no_sdpa = [r["label"] for r in rows if not r.get("vs_sdpa")]
    planned = len(rows) if planned is None else planned
    s: dict[str, Any] = {
        "shapes": len(rows),
        "planned": planned,
        "geomean_oracle": geomean([x for x, _ in orc]),
        "min_oracle": min(orc) if orc else None,
        "min_vs_sdpa": min(vs) if vs else None,
        "geomean_vs_sdpa": geomean([x for x, _ in vs]),
        "not_judged": sorted(set(no_oracle) | set(no_sdpa)),
        "wrong": _wrong(rows),
        "errors": _errors(rows),
        "chosen": _count(r["choice"]["variant"] for r in rows),
        "counted": "all shapes" if judge else "the shapes that differ beyond the spread",
        "wall_s": round(sum(r.get("wall_s", 0.0) for r in rows), 1),  # the shapes' compiles, checks, timing
    }
    complete = bool(rows) and len(rows) == planned and not no_oracle
    s["checks"] = {} if not judge else {
        f"geomean dispatcher/oracle >= {HELDOUT_MIN_GEOMEAN_ORACLE}":
            complete and s["geomean_oracle"] >= HELDOUT_MIN_GEOMEAN_ORACLE,
        f"dispatcher/oracle >= {HELDOUT_MIN_ORACLE} on every shape":
            complete and min(orc)[0] >= HELDOUT_MIN_ORACLE,
        f"dispatcher/SDPA >= {HELDOUT_MIN_VS_SDPA} on every shape":
            len(rows) == planned and not no_sdpa and bool(vs) and min(vs)[0] >= HELDOUT_MIN_VS_SDPA,
    }
    return s


def _count(names: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --- cells --------------------------------------------------------------------------------------


def rate_cell(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    if m.get("status") != "ok":
        return m.get("status", "?").upper()
    return f"{m['rate']:.0f}" if m["rate"] >= 10 else f"{m['rate']:.3g}"


def _time(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3g} ms"


def _short(s: dict[str, Any]) -> str:
    q = f"{s['seqlen_q']}/{s['seqlen_k']}" if s["seqlen_q"] != s["seqlen_k"] else str(s["seqlen_k"])
    c = " causal" if s["causal"] and s["seqlen_q"] > 1 else ""
    return f"{s['pass_']} B{s['batch']} H{s['heads_q']}/{s['heads_kv']} S{q} D{s['head_dim']}{c}"


def provider_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for n in r["providers"]:
            if n not in names and n not in (PLAIN, DISPATCH):
                names.append(n)
    return [PLAIN] + names + [DISPATCH]


def vs_sdpa_cell(r: dict[str, Any]) -> str:
    """The dispatcher's speed ratio to plain SDPA, or "same" when the two are inside each other's
    spread (the difference is noise)."""
    if not r.get("vs_sdpa"):
        return "-"
    return f"{r['vs_sdpa']:.3f}" if r.get("vs_sdpa_clear", True) else "same"


def oracle_cell(r: dict[str, Any]) -> str:
    if not r.get("oracle"):
        return "-"
    return f"{r['oracle']:.3f}" if r.get("oracle_clear", True) else "same"


def _minfmt(x: Any) -> str:
    return f"{x[0]:.3f} ({x[1]})" if x else "-"


def _graph_us(r: dict[str, Any], name: str) -> str:
    """A provider's CUDA-graph replay time (us), n/a where the row was not timed in graphs."""
    m = r["providers"].get(name) or {}
    if r.get("timing") != GRAPH:
        return NA
    return f"{m['ms'] * 1e3:.1f}" if m.get("status") == "ok" and m.get("ms") else m.get("status", "-").upper()


def _host_us(r: dict[str, Any], name: str) -> str:
    h = (r["providers"].get(name) or {}).get("host_us")
    return f"{h:.1f}" if h else "-"


def _serving_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decode and speculative rows that have a graph or host time: a GPU's. On a CPU neither
    exists apart from the eager call's time, which the main table gives with its spread."""
    return [r for r in rows if r.get("serving") and (
        r.get("timing") == GRAPH or any(m.get("host_us") for m in r["providers"].values()))]


SERVING_CPU_NOTE = ("Decode and speculative steps: their CUDA-graph and host times are a GPU's; here their time is the "
                    "eager call's, in the table above.")


def serving_lines(rows: Sequence[dict[str, Any]], label: Any = None) -> list[str]:
    """The decode and speculative rows as serving runs them: GPU time of a CUDA-graph replay (n/a
    where they ran eagerly, --no-graphs) and host time per eager call, for plain SDPA, the
    dispatcher and the fastest; on a CPU only a line saying that these are a GPU's."""
    serving = _serving_rows(rows)
    if not serving:
        return ["", SERVING_CPU_NOTE] if any(r.get("serving") for r in rows) else []
    label = label or (lambda r: _short(r["shape"]))
    lines = ["", "Decode and speculative steps as serving runs them: GPU time of a CUDA-graph replay (us) and host "
             "time per eager call (us; back-to-back calls, includes the GPU time when that is longer):", "",
             "| shape | SDPA graph | SDPA host | dispatch graph | dispatch host | fastest | its graph | its host |",
             "|---|---|---|---|---|---|---|---|"]
    for r in serving:
        b = r.get("best") or "-"
        lines.append(f"| {label(r)} | {_graph_us(r, PLAIN)} | {_host_us(r, PLAIN)} | {_graph_us(r, DISPATCH)} | "
                     f"{_host_us(r, DISPATCH)} | {b} | {_graph_us(r, b) if b != '-' else '-'} | "
                     f"{_host_us(r, b) if b != '-' else '-'} |")
    return lines


# --- tuned-shape bench: markdown, console table, plot ------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    rows, meta, summ = result["rows"], result["meta"], result["summary"]
    names = provider_names(rows)
    lines = [
        f"# flashdispatch bench on {meta['card']}",
        "",
        f"{meta['date']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; timing: {meta['timing']}.",
        f"Command: `{meta['command']}`",
        "",
        "Rates: TFLOP/s (FlashAttention-paper FLOPs; fwd_bwd = 3.5 x fwd) or GB/s for decode and speculative steps "
        "(q, k, v read once, out written once). `SDPA` is torch's scaled_dot_product_attention called directly; "
        "`sdpa`, `sdpa:flash`, `triton`, ... are flashdispatch.attention() with that backend forced; "
        "`dispatch` is flashdispatch.attention() choosing on its own (its "
        "choice in the last column); vs SDPA = SDPA time / dispatch time; oracle = best provider time / dispatch "
        "time. WRONG/ERROR: failed the float64 check / raised.",
        "",
        "| shape | unit | " + " | ".join(names) + " | vs SDPA | oracle | dispatch chose |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {_short(r['shape'])}{RETIMED_MARK if r.get('retimed') else ''} | {r['unit']} | "
            + " | ".join(rate_cell(r["providers"].get(n)) for n in names)
            + f" | {vs_sdpa_cell(r)} | {oracle_cell(r)} | {r['choice']['variant']} |"
        )
    lines += retimed_note(rows)
    lines += ["", "## Summary", ""]
    lines.append(f"- shapes: {summ['shapes']}")
    lines.append(f"- dispatch vs SDPA: geomean {summ['geomean_vs_sdpa']:.3f}, min {_minfmt(summ['min_vs_sdpa'])}"
                 f" over {summ.get('counted', 'all shapes')}")
    lines.append(f"- oracle ratio: geomean {summ['geomean_oracle']:.3f}, min {_minfmt(summ['min_oracle'])}")
    for k, ok in summ["checks"].items():
        lines.append(f"- {k}: {'yes' if ok else 'NO'}")
    note = _unjudged_note(summ)
    if note:
        lines.append(f"- {note}")
    lines.append("- vs SDPA reads \"same\" where the two timings' interquartile ranges overlap.")
    if summ["wrong"]:
        lines.append("- failed the float64 check: " + "; ".join(summ["wrong"]))
    lines += [f"- {x}" for x in _incomplete_lines(summ)]
    if any(r.get("serving") for r in rows):
        lines += serving_lines(rows)
    else:  # results written before decode was timed in graphs
        host = [(r["label"], r["providers"].get(PLAIN, {}).get("host_us"), r["providers"].get(DISPATCH, {}).get("host_us"))
                for r in rows if r["pass"] == "decode"]
        if any(h[1] for h in host):
            lines += ["", "Host cost of back-to-back decode calls (us/call, includes the GPU time when that is longer):",
                      "", "| shape | SDPA | dispatch |", "|---|---|---|"]
            lines += [f"| {lbl} | {a:.1f} | {b:.1f} |" for lbl, a, b in host if a and b]
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"{'shape':44s} {'unit':7s} {'SDPA':>6s} {'best':>22s} {'dispatch':>22s} {'vsSDPA':>7s} {'oracle':>7s}"
          f"  ({result['meta']['card']})")
    for r in rows:
        best = r.get("best")
        bm = r["providers"].get(best) if best else None
        dm = r["providers"].get(DISPATCH)
        print(f"{_short(r['shape']):44s} {r['unit']:7s} {rate_cell(r['providers'].get(PLAIN)):>6s} "
              f"{(best or '-')[:14] + ' ' + rate_cell(bm):>22s} {r['choice']['variant'][:14] + ' ' + rate_cell(dm):>22s} "
              f"{vs_sdpa_cell(r):>7s} {oracle_cell(r):>7s}")
    _print_serving(rows, lambda r: _short(r["shape"]))
    s = result["summary"]
    if s["min_vs_sdpa"] is None:
        print("dispatch vs SDPA: no shape differs beyond the spread")
    else:
        print(f"dispatch vs SDPA: geomean {s['geomean_vs_sdpa']:.3f}, min {_minfmt(s['min_vs_sdpa'])}"
              f" over {s.get('counted', 'all shapes')}")
    if s["min_oracle"] is None:
        print("oracle ratio:     no shape differs from the best provider beyond the spread")
    else:
        print(f"oracle ratio:     geomean {s['geomean_oracle']:.3f}, min {_minfmt(s['min_oracle'])}")
    for k, ok in s["checks"].items():
        print(f"  {'ok ' if ok else 'NO '} {k}")
    print(PROVIDERS_NOTE)
    print('vsSDPA: plain-SDPA time / dispatch time; oracle: best provider time / dispatch time; "same" where the '
          'two interquartile ranges overlap (noise).')
    note = _unjudged_note(s)
    if note:
        print(note)
    if s["wrong"]:
        print("  failed the float64 check: " + "; ".join(s["wrong"]))
    for x in _incomplete_lines(s):
        print("  " + x)


def _print_serving(rows: Sequence[dict[str, Any]], label: Any) -> None:
    serving = _serving_rows(rows)
    if not serving:
        if any(r.get("serving") for r in rows):
            print(SERVING_CPU_NOTE)
        return
    print(f"\n{'serving step':44s} {'SDPA graph us':>13s} {'host us':>8s} {'dispatch graph us':>17s} {'host us':>8s}")
    for r in serving:
        print(f"{label(r)[:44]:44s} {_graph_us(r, PLAIN):>13s} {_host_us(r, PLAIN):>8s} "
              f"{_graph_us(r, DISPATCH):>17s} {_host_us(r, DISPATCH):>8s}")
    print()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(result: dict[str, Any], path: str) -> bool:
    """TFLOP/s against S for each sweep group, and speed relative to SDPA for the special shapes."""
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed: no plot (render later with --plot-from %s)", path)
        return False
    rows = result["rows"]
    names = provider_names(rows)
    sweep = [r for r in rows if r["label"].startswith("fa2-")]
    special = [r for r in rows if not r["label"].startswith("fa2-")]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sweep:
        s = r["shape"]
        key = f"{s['pass_']} {s['dtype']} D={s['head_dim']} {'causal' if s['causal'] else 'full'}"
        groups.setdefault(key, []).append(r)
    n_panels = len(groups) + (1 if special else 0)
    cols = min(4, max(1, n_panels))
    nrows = max(1, math.ceil(n_panels / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    # red and black are kept for the dispatcher and plain SDPA
    palette = [plt.cm.tab10(i) for i in (0, 1, 2, 4, 5, 6, 8, 9)]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(x for x in names if x not in (PLAIN, DISPATCH))}
    for ax, (key, rs) in zip(axes.flat, groups.items()):
        rs = sorted(rs, key=lambda r: r["shape"]["seqlen_k"])
        xs = [r["shape"]["seqlen_k"] for r in rs]
        for n in names:
            ys = [r["providers"].get(n, {}).get("rate") if r["providers"].get(n, {}).get("status") == "ok" else None for r in rs]
            if not any(ys):
                continue
            style = dict(lw=2.5, ls="--", marker="o", color="red") if n == DISPATCH else \
                dict(lw=2, color="black", marker="s") if n == PLAIN else dict(lw=1, marker=".", color=colors[n])
            ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], label=n, **style)
        ax.set_xscale("log", base=2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("S")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    if special:
        ax = axes.flat[len(groups)]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            ys = []
            for r in special:
                m, base = r["providers"].get(n, {}), r["providers"].get(PLAIN, {})
                ys.append(base["ms"] / m["ms"] if m.get("status") == "ok" and base.get("status") == "ok" else 0.0)
            ax.bar([j + i * width for j in range(len(special))], ys, width, label=n,
                   color="red" if n == DISPATCH else "black" if n == PLAIN else colors[n])
        ax.set_xticks([j + 0.4 for j in range(len(special))])
        ax.set_xticklabels([r["label"].rsplit("-", 2)[0][:18] + "\n" + "-".join(r["label"].rsplit("-", 2)[1:])
                            for r in special], fontsize=6, rotation=30)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title("special shapes: speed vs plain SDPA", fontsize=9)
    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if special:
        h2, l2 = axes.flat[len(groups)].get_legend_handles_labels()
        for h, lab in zip(h2, l2):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(8, max(1, len(labels))), fontsize=8)
    fig.suptitle(f"flashdispatch bench, {result['meta']['card']} ({result['meta']['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- held-out set: markdown, console table, plot -----------------------------------------------


def _heldout_label(r: dict[str, Any]) -> str:
    return f"{r.get('model', r['label'])} ({r.get('kind', '?')})"


def _pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def heldout_markdown(result: dict[str, Any]) -> str:
    rows, meta, summ = result["rows"], result["meta"], result["summary"]
    lines = [
        f"# flashdispatch held-out bench on {meta['card']}",
        "",
        f"{meta['date']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; timing: {meta['timing']}.",
        f"Command: `{meta['command']}`",
        f"Profile: {meta.get('profile', '?')}.",
        "",
        "Real model shapes that are not in the tune grid (tools/heldout.py). `dispatcher` is "
        "flashdispatch.attention() choosing on its own; the oracle is the fastest provider that passed the "
        "float64 check (plain SDPA and every eligible implementation forced). dispatcher/oracle = oracle time / "
        "dispatcher time, dispatcher/SDPA = plain-SDPA time / dispatcher time (1.0: as fast, above: faster); "
        "\"same\" where the two timings' interquartile ranges overlap (noise). "
        "Decode and speculative steps are timed as CUDA-graph replays on a GPU, their host time per eager call "
        "beside; on a CPU as eager calls, like the other shapes.",
        "",
        "| # | model | kind | shape | dtype | dispatcher chose | dispatcher | plain SDPA | oracle | "
        "dispatcher/oracle | dispatcher/SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        d, p = r["providers"].get(DISPATCH) or {}, r["providers"].get(PLAIN) or {}
        best = r.get("best")
        bm = r["providers"].get(best) or {} if best else {}
        lines.append(
            f"| {i} | {r.get('model', '-')} | {r.get('kind', '-')} | {_short(r['shape'])}"
            f"{RETIMED_MARK if r.get('retimed') else ''} | {r['shape']['dtype']} | "
            f"{r['choice']['variant']} | {_cell_time(d)} | {_cell_time(p)} | "
            f"{(best or '-')} {_cell_time(bm) if best else ''} | {oracle_cell(r)} | {vs_sdpa_cell(r)} |")
    lines += retimed_note(rows)
    lines += serving_lines(rows, _heldout_label)
    lines += ["", "## Summary", ""]
    lines += [f"- {x}" for x in _heldout_summary_lines(summ)]
    note = _unjudged_note(summ)
    if note:
        lines.append(f"- {note}")
    wrong = [(r["label"], n, m.get("note", "")) for r in rows for n, m in r["providers"].items()
             if m.get("status") in ("wrong", "error")]
    if wrong:
        lines += ["", "Providers left out (WRONG: failed the float64 check; ERROR: raised):", ""]
        lines += [f"- {lbl}: {n}: {note}" for lbl, n, note in wrong]
    return "\n".join(lines) + "\n"


def _cell_time(m: dict[str, Any]) -> str:
    if not m:
        return "-"
    if m.get("status") != "ok":
        return m.get("status", "?").upper()
    return _time(m.get("ms"))


def _no_ratio(s: dict[str, Any], other: str) -> str:
    """Why a summary has no ratio: every shape within the spread (a run not judged counts only
    shapes that differ beyond it), or no shape with both times (a judged run)."""
    if s.get("counted") == "all shapes":
        return "no shape with both times (see below)"
    return f"no shape differs from {other} beyond the spread"


def _heldout_summary_lines(s: dict[str, Any]) -> list[str]:
    over = f" over {s['counted']}" if s.get("counted") else ""
    out = [f"shapes: {s['shapes']} of {s['planned']} planned" + (f" in {s['wall_s']:.0f} s" if s.get("wall_s") else ""),
           f"dispatcher/oracle: geomean {s['geomean_oracle']:.3f}, min {_minfmt(s['min_oracle'])}{over}"
           if s["min_oracle"] else f"dispatcher/oracle: {_no_ratio(s, 'the oracle')}",
           f"dispatcher/SDPA: geomean {s['geomean_vs_sdpa']:.3f}, min {_minfmt(s['min_vs_sdpa'])}{over}"
           if s["min_vs_sdpa"] else f"dispatcher/SDPA: {_no_ratio(s, 'plain SDPA')}",
           "dispatcher chose: " + ", ".join(f"{n} x{c}" for n, c in s.get("chosen", {}).items())]
    out += [f"{_pass_fail(ok)}: {k}" for k, ok in s["checks"].items()]
    if s["shapes"] < s["planned"]:
        out.append(f"incomplete: {s['planned'] - s['shapes']} planned shapes were not run (time budget or "
                   "interrupt); the bars need every shape")
    if s["not_judged"]:
        out.append("no dispatcher, oracle or SDPA time (counts as a miss): " + ", ".join(s["not_judged"]))
    if s["wrong"]:
        out.append("failed the float64 check: " + "; ".join(s["wrong"]))
    if s.get("errors"):
        out.append("raised or could not be timed (left out of that shape's oracle): " + "; ".join(s["errors"]))
    if s.get("partial"):
        out.append(f"not judged: {s['partial']}")
    return out


def _incomplete_lines(s: dict[str, Any]) -> list[str]:
    """What a tuned-shape summary could not judge: missing shapes or times, providers that failed."""
    out = []
    if s.get("planned") is not None and s["shapes"] < s["planned"]:
        out.append(f"incomplete: {s['planned'] - s['shapes']} planned shapes were not run; the bars need every shape")
    if s.get("not_judged"):
        out.append("no dispatcher, oracle or SDPA time (counts as a miss): " + ", ".join(s["not_judged"]))
    if s.get("errors"):
        out.append("raised or could not be timed (left out of that shape's oracle): " + "; ".join(s["errors"]))
    if s.get("partial"):
        out.append(f"not judged: {s['partial']}")
    return out


def print_heldout_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"\nflashdispatch held-out bench on {result['meta']['card']}")
    print(f"{'#':>3s} {'model':38s} {'kind':11s} {'dtype':5s} {'chose':14s} {'dispatch':>10s} {'oracle':>24s} "
          f"{'d/oracle':>8s} {'d/SDPA':>7s}")
    for i, r in enumerate(rows, 1):
        best = r.get("best")
        bm = r["providers"].get(best) or {} if best else {}
        print(f"{i:>3d} {r.get('model', r['label'])[:38]:38s} {r.get('kind', '-'):11s} {r['shape']['dtype']:5s} "
              f"{r['choice']['variant'][:14]:14s} {_cell_time(r['providers'].get(DISPATCH) or {}):>10s} "
              f"{((best or '-')[:12] + ' ' + (_cell_time(bm) if best else '')):>24s} "
              f"{oracle_cell(r):>8s} {vs_sdpa_cell(r):>7s}")
    _print_serving(rows, _heldout_label)
    for line in _heldout_summary_lines(result["summary"]):
        print(line)
    print('d/oracle: oracle time / dispatcher time; d/SDPA: plain-SDPA time / dispatcher time; "same" where the '
          'two interquartile ranges overlap (noise).')
    note = _unjudged_note(result["summary"])
    if note:
        print(note)


def heldout_plot(result: dict[str, Any], path: str) -> bool:
    """Per shape, dispatcher/oracle and dispatcher/SDPA as bars (coloured by kind), the bars of the
    set drawn across."""
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed: no plot (render later with --plot-from %s)", path)
        return False
    rows = result["rows"]
    kinds = list(dict.fromkeys(r.get("kind", "?") for r in rows))
    colors = {k: plt.cm.tab10(i) for i, k in enumerate(kinds)}
    n = max(1, len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.32 * n + 2), 8.5), sharex=True)
    panels = (("oracle", "dispatcher / oracle", (HELDOUT_MIN_ORACLE, HELDOUT_MIN_GEOMEAN_ORACLE)),
              ("vs_sdpa", "dispatcher / plain SDPA", (HELDOUT_MIN_VS_SDPA,)))
    for ax, (key, title, bars) in zip(axes, panels):
        ys = [r.get(key) or 0.0 for r in rows]
        ax.bar(range(len(rows)), ys, color=[colors[r.get("kind", "?")] for r in rows])
        for b in bars:
            ax.axhline(b, color="red", lw=0.8, ls="--")
        ax.axhline(1.0, color="gray", lw=0.8)
        top = max([1.1] + [y for y in ys if y])
        ax.set_ylim(0.0, min(top * 1.05, 4.0))
        ax.set_ylabel(title)
        ax.grid(axis="y", alpha=0.3)
    g = result["summary"]["geomean_oracle"]
    axes[0].set_title(f"bars: geomean >= {HELDOUT_MIN_GEOMEAN_ORACLE}, every shape >= {HELDOUT_MIN_ORACLE} "
                      f"({f'geomean {g:.3f}' if math.isfinite(g) else 'no shape beyond the spread'})", fontsize=9)
    axes[1].set_title(f"bar: every shape >= {HELDOUT_MIN_VS_SDPA}", fontsize=9)
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels([r["label"] for r in rows], rotation=90, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    fig.legend(handles, kinds, loc="upper right", fontsize=8)
    fig.suptitle(f"flashdispatch held-out bench, {result['meta']['card']} ({result['meta']['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- files --------------------------------------------------------------------------------------


def is_heldout(result: dict[str, Any]) -> bool:
    return result.get("meta", {}).get("set") == "heldout"


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_outputs(result: dict[str, Any], out_dir: str, *, with_plot: bool = True) -> list[str]:
    """bench.json / .md / .png, or heldout.json / .md / .png for a held-out run; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stem, md, draw = ("heldout", heldout_markdown, heldout_plot) if is_heldout(result) else ("bench", markdown, plot)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.md")]
    _write_text(paths[0], json.dumps(result, indent=1, default=str))
    _write_text(paths[1], md(result))
    if with_plot and draw(result, os.path.join(out_dir, f"{stem}.png")):
        paths.append(os.path.join(out_dir, f"{stem}.png"))
    return paths


def print_result(result: dict[str, Any]) -> None:
    (print_heldout_table if is_heldout(result) else print_table)(result)
