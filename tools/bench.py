"""`flashdispatch bench`: plain SDPA, every backend variant, and the dispatcher, side by side.

Shapes: the FlashAttention-2 sweep and the special shapes where plain SDPA has no fast path
(tools/shapes.py); on a CPU, CPU-sized shapes of every kind of call. Providers:
- "SDPA": what a user writes today, F.scaled_dot_product_attention (enable_gqa for GQA, the
  lower-right CausalBias for chunked prefill), no flashdispatch involved;
- every registered implementation that can serve the shape, through
  flashdispatch.attention(backend=<name>) (so with the profile's config for it);
- "dispatch": flashdispatch.attention() choosing on its own.
Each output is checked against the float64 reference (tools/verify.py) before it is timed; a
wrong provider is reported and left out of the comparison. Rates: TFLOP/s (FlashAttention-paper
count) or GB/s for decode. Ratios: plain-SDPA time / dispatcher time, and best-provider time /
dispatcher time (the oracle ratio); 1.0 means as fast. Writes bench.json, bench.md and bench.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import flashdispatch
from flashdispatch.cliargs import ArgumentParser, user_error
from flashdispatch.problem import DTYPES_BY_NAME, Problem
from flashdispatch.registry import REGISTRY
from flashdispatch.selection import select, state

from . import shapes as shape_lists
from . import timing, tune, verify
from .shapes import Shape

log = logging.getLogger("flashdispatch.tools.bench")

PLAIN = "SDPA"
DISPATCH = "dispatch"
# The performance bar of the project on a GPU, checked in the summary (not on a CPU, where our
# kernels do not run).
MIN_RATIO_VS_SDPA = 0.97
MIN_GEOMEAN_VS_SDPA = 1.0
MIN_GEOMEAN_ORACLE = 0.97
MIN_ORACLE = 0.90
FULL_TIMING = {"warmup_ms": 25.0, "rep_ms": 100.0}
QUICK_TIMING = {"warmup_ms": 10.0, "rep_ms": 40.0}
HOST_CALLS = 200


def plain_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The call a PyTorch user makes for bhsd q, k, v (bottom-right causal where Sq < Sk)."""
    hq, sq, hkv, sk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kw: dict[str, Any] = {}
    if hq != hkv:
        kw["enable_gqa"] = True
    if causal and sq > 1:
        if sq == sk:
            kw["is_causal"] = True
        elif sq < sk:
            kw["attn_mask"] = causal_lower_right(sq, sk)
        else:
            raise ValueError(f"plain SDPA: no bottom-right causal mask for Sq={sq} > Sk={sk}")
    return F.scaled_dot_product_attention(q, k, v, **kw)


@dataclass
class Measurement:
    ms: float | None = None
    rate: float | None = None
    status: str = "ok"  # "ok" | "wrong" | "error"
    note: str = ""
    host_us: float | None = None
    lo: float | None = None  # interquartile range of the repetitions (ms)
    hi: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _providers(causal: bool, names: Sequence[str]) -> dict[str, Provider]:
    out: dict[str, Provider] = {PLAIN: lambda q, k, v: plain_sdpa(q, k, v, causal)}
    for n in names:
        out[n] = lambda q, k, v, n=n: flashdispatch.attention(q, k, v, causal=causal, backend=n)  # type: ignore[misc]
    out[DISPATCH] = lambda q, k, v: flashdispatch.attention(q, k, v, causal=causal)  # type: ignore[return-value]
    return out


def bench_shape(s: Shape, names: Sequence[str], device: torch.device, opts: tune.TuneOptions,
                gen: torch.Generator, grad_cache: tune.GradCache) -> dict[str, Any]:
    q, k, v, do, p = tune.make_inputs(s, device, gen)
    blocks = verify.reference_blocks(q, k, v, p)
    dev = tune.device_info(device)
    eligible = [n for n in names if REGISTRY.availability(n) is None and not REGISTRY.get(n).not_supported_reasons(p, dev)]
    decision = select(p)
    row: dict[str, Any] = {
        "label": s.label, "shape": s._asdict(), "pass": s.pass_,
        "unit": "GB/s" if s.pass_ == "decode" else "TFLOP/s",
        "choice": {"variant": decision.variant, "config": decision.config, "source": decision.source},
        "providers": {},
    }
    out_bytes = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v * q.element_size()
    measurements: dict[str, Measurement] = {}
    timed: dict[str, tuple[Callable[[], None], list[torch.Tensor] | None]] = {}
    for name, f in _providers(s.causal, eligible).items():
        m = measurements[name] = Measurement()
        try:
            verify.poison_allocator(out_bytes, device)
            # grad mode as in the timed call, so that the dispatcher answers for the same pass
            with torch.set_grad_enabled(p.needs_grad):
                out = f(q, k, v).detach()
            verdict = verify.check_output(out, p, blocks)
            del out
            if verdict.ok and p.needs_grad:
                verdict = grad_cache.check_fn(name, lambda q_, k_, v_, _p, f=f: f(q_, k_, v_), p, device, gen)
            if not verdict.ok:
                m.status, m.note = "wrong", verdict.reason
                continue
            if p.needs_grad:
                assert do is not None

                def fn(f: Callable[..., torch.Tensor] = f) -> None:
                    f(q, k, v).backward(do)

                grads: list[torch.Tensor] | None = [q, k, v]
            else:

                def fn(f: Callable[..., torch.Tensor] = f) -> None:
                    with torch.no_grad():
                        f(q, k, v)

                grads = None
            fn()
            timing.reset_grads(grads)
            timed[name] = (fn, grads)
        except Exception as e:  # a provider that fails is a result of the benchmark
            _failed(m, e, device, (q, k, v), name)
    # Repetitions interleaved across providers (timing.interleaved_median_ms): clock and power
    # drift over a shape's seconds of back-to-back kernels then hits every provider alike.
    def failed(name: str, e: Exception) -> None:
        _failed(measurements[name], e, device, (q, k, v), name)
        timed.pop(name, None)

    samples = timing.interleaved_samples_ms(timed, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                                            failed=failed)
    for name, (fn, grads) in timed.items():
        m = measurements[name]
        spread = timing.Spread.of(samples[name])
        m.ms, m.lo, m.hi = spread.median, spread.lo, spread.hi
        m.rate = timing.rate(p, s.pass_, m.ms)[0]
        if s.pass_ == "decode" and name in (PLAIN, DISPATCH):
            m.host_us = timing.host_us_per_call(fn, device, HOST_CALLS)
    row["providers"] = {name: m.to_json() for name, m in measurements.items()}
    _ratios(row)
    return row


def _failed(m: Measurement, e: Exception, device: torch.device, inputs: Sequence[torch.Tensor], name: str) -> None:
    m.status, m.note = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if not timing.context_alive(device):
        raise tune.ContextLost(name, m.note) from e
    for t in inputs:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratios(row: dict[str, Any]) -> None:
    ok = {n: m["ms"] for n, m in row["providers"].items() if m.get("status") == "ok" and m.get("ms")}
    disp = ok.get(DISPATCH)
    others = {n: t for n, t in ok.items() if n != DISPATCH}
    row["best"] = min(others, key=others.__getitem__) if others else None
    row["vs_sdpa"] = ok[PLAIN] / disp if disp and PLAIN in ok else None
    row["oracle"] = others[row["best"]] / disp if disp and others else None
    # whether dispatch differs from SDPA (and from the best) beyond the spread of their repetitions
    row["vs_sdpa_clear"] = _clear(row, PLAIN) if row["vs_sdpa"] else None
    row["oracle_clear"] = _clear(row, row["best"]) if row["oracle"] else None


def _clear(row: dict[str, Any], other: str) -> bool:
    """Whether `other` and the dispatcher differ beyond their interquartile ranges (True when the
    ranges were not recorded: older results)."""
    a, b = row["providers"][other], row["providers"][DISPATCH]
    if any(m.get(x) is None for m in (a, b) for x in ("lo", "hi")):
        return True
    return timing.speedup(timing.Spread(a["ms"], a["lo"], a["hi"], 0),
                          timing.Spread(b["ms"], b["lo"], b["hi"], 0)) is not None


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(rows: Sequence[dict[str, Any]], judge: bool = True) -> dict[str, Any]:
    """Geomeans and minima; with judge (a GPU run) the project's performance bar as checks."""
    # on a GPU every shape counts toward the bar; elsewhere only differences beyond the spread
    vs = [(r["vs_sdpa"], r["label"]) for r in rows if r.get("vs_sdpa") and (judge or r.get("vs_sdpa_clear", True))]
    orc = [(r["oracle"], r["label"]) for r in rows if r.get("oracle") and (judge or r.get("oracle_clear", True))]
    wrong = sorted({f"{n} on {r['label']}" for r in rows for n, m in r["providers"].items() if m.get("status") == "wrong"})
    s: dict[str, Any] = {
        "shapes": len(rows),
        "geomean_vs_sdpa": _geomean([x for x, _ in vs]),
        "min_vs_sdpa": min(vs) if vs else None,
        "geomean_oracle": _geomean([x for x, _ in orc]),
        "min_oracle": min(orc) if orc else None,
        "wrong": wrong,
        "counted": f"all {len(rows)} shapes" if judge else
                   f"{len(vs)} of {len(rows)} shapes (the others are inside the spread)",
    }
    s["checks"] = {} if not judge else {
        f"dispatch >= {MIN_RATIO_VS_SDPA} x SDPA on every shape": bool(vs) and min(vs)[0] >= MIN_RATIO_VS_SDPA,
        f"geomean dispatch/SDPA >= {MIN_GEOMEAN_VS_SDPA}": bool(vs) and s["geomean_vs_sdpa"] >= MIN_GEOMEAN_VS_SDPA,
        f"geomean oracle ratio >= {MIN_GEOMEAN_ORACLE}": bool(orc) and s["geomean_oracle"] >= MIN_GEOMEAN_ORACLE,
        f"oracle ratio >= {MIN_ORACLE} on every shape": bool(orc) and min(orc)[0] >= MIN_ORACLE,
    }
    return s


# --- output: table, markdown, plot ----------------------------------------------------------------


def _fmt(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    if m.get("status") != "ok":
        return m.get("status", "?").upper()
    return f"{m['rate']:.0f}" if m["rate"] >= 10 else f"{m['rate']:.3g}"


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


def markdown(result: dict[str, Any]) -> str:
    rows, meta, summ = result["rows"], result["meta"], result["summary"]
    names = provider_names(rows)
    lines = [
        f"# flashdispatch bench on {meta['card']}",
        "",
        f"{meta['date']}; {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; timing: {meta['timing']}.",
        f"Command: `{meta['command']}`",
        "",
        "Rates: TFLOP/s (FlashAttention-paper FLOPs; fwd_bwd = 3.5 x fwd) or GB/s for decode (q, k, v read once, "
        "out written once). `dispatch` is flashdispatch.attention() choosing on its own (its choice in the last "
        "column); vs SDPA = SDPA time / dispatch time; oracle = best provider time / dispatch time. "
        "WRONG/ERROR: failed the float64 check / raised.",
        "",
        "| shape | unit | " + " | ".join(names) + " | vs SDPA | oracle | dispatch chose |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {_short(r['shape'])} | {r['unit']} | " + " | ".join(_fmt(r["providers"].get(n)) for n in names)
            + f" | {_vs_sdpa(r)} | {_oracle(r)} | {r['choice']['variant']} |"
        )
    lines += ["", "## Summary", ""]
    lines.append(f"- shapes: {summ['shapes']}")
    lines.append(f"- dispatch vs SDPA: geomean {summ['geomean_vs_sdpa']:.3f}, min {_minfmt(summ['min_vs_sdpa'])}"
                 f" over {summ.get('counted', 'all shapes')}")
    lines.append(f"- oracle ratio: geomean {summ['geomean_oracle']:.3f}, min {_minfmt(summ['min_oracle'])}")
    for k, ok in summ["checks"].items():
        lines.append(f"- {k}: {'yes' if ok else 'NO'}")
    if not summ["checks"]:
        lines.append(f"- {CPU_NOTE}")
    lines.append("- vs SDPA reads \"same\" where the two timings' interquartile ranges overlap.")
    if summ["wrong"]:
        lines.append("- failed the float64 check: " + "; ".join(summ["wrong"]))
    host = [(r["label"], r["providers"].get(PLAIN, {}).get("host_us"), r["providers"].get(DISPATCH, {}).get("host_us"))
            for r in rows if r["pass"] == "decode"]
    if any(h[1] for h in host):
        lines += ["", "Host cost of back-to-back decode calls (us/call, includes the GPU time when that is longer):", "",
                  "| shape | SDPA | dispatch |", "|---|---|---|"]
        lines += [f"| {lbl} | {a:.1f} | {b:.1f} |" for lbl, a, b in host if a and b]
    return "\n".join(lines) + "\n"


def _vs_sdpa(r: dict[str, Any]) -> str:
    """The dispatcher's speed ratio to plain SDPA, or "same" when the two are inside each other's
    spread (the difference is noise)."""
    if not r.get("vs_sdpa"):
        return "-"
    return f"{r['vs_sdpa']:.3f}" if r.get("vs_sdpa_clear", True) else "same"


def _oracle(r: dict[str, Any]) -> str:
    if not r.get("oracle"):
        return "-"
    return f"{r['oracle']:.3f}" if r.get("oracle_clear", True) else "same"


CPU_NOTE = ("On a CPU these numbers compare torch's CPU attention kernels (and the dispatcher's own cost) on this "
            "machine; flashdispatch's kernels and its performance targets are for GPUs, where they are judged.")


def _minfmt(x: Any) -> str:
    return f"{x[0]:.3f} ({x[1]})" if x else "-"


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print(f"{'shape':44s} {'unit':7s} {'SDPA':>6s} {'best':>22s} {'dispatch':>22s} {'vsSDPA':>7s} {'oracle':>7s}"
          f"  ({result['meta']['card']})")
    for r in rows:
        best = r.get("best")
        bm = r["providers"].get(best) if best else None
        dm = r["providers"].get(DISPATCH)
        print(f"{_short(r['shape']):44s} {r['unit']:7s} {_fmt(r['providers'].get(PLAIN)):>6s} "
              f"{(best or '-')[:14] + ' ' + _fmt(bm):>22s} {r['choice']['variant'][:14] + ' ' + _fmt(dm):>22s} "
              f"{_vs_sdpa(r):>7s} {_oracle(r):>7s}")
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
    print('vsSDPA: plain-SDPA time / dispatch time; oracle: best provider time / dispatch time; "same" where the '
          'two interquartile ranges overlap (noise).')
    if not s["checks"]:
        print(CPU_NOTE)
    if s["wrong"]:
        print("  failed the float64 check: " + "; ".join(s["wrong"]))


def plot(result: dict[str, Any], path: str) -> bool:
    """TFLOP/s against S for each sweep group, and speed relative to SDPA for the special shapes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8)
    fig.suptitle(f"flashdispatch bench, {result['meta']['card']} ({result['meta']['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="flashdispatch bench",
        description="Time plain SDPA, every backend that can run here and the dispatcher's own choice, side by "
        "side (repetitions interleaved), after checking each against a float64 reference; writes bench.json, "
        "bench.md, bench.png. On a GPU: the FlashAttention-2 sweep and the shapes where plain SDPA has no fast "
        "path. On a CPU: CPU-sized shapes (about a minute on 2 cores).",
    )
    ap.add_argument("--quick", action="store_true",
                    help="GPU: S in {1024, 4096, 16384} and shorter timing; CPU: shorter timing")
    ap.add_argument("--out", default="bench-out", help="output directory (default: ./bench-out)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    ap.add_argument("--dtypes", type=tune.csv_list, default=["bf16"], help="comma-separated, e.g. bf16,fp16 (default bf16)")
    ap.add_argument("--head-dims", type=tune.csv_ints("--head-dims"), default=None)
    ap.add_argument("--seqlens", type=tune.csv_ints("--seqlens"), default=None)
    ap.add_argument("--passes", type=tune.csv_list, default=None, help="subset of fwd,fwd_bwd,decode")
    ap.add_argument("--causal", choices=("true", "false", "both"), default="both")
    ap.add_argument("--no-special", action="store_true", help="leave out the special shapes (GQA, chunked prefill, decode)")
    ap.add_argument("--only-special", action="store_true", help="only the special shapes")
    ap.add_argument("--shapes", choices=("bench", "cpu", "tiny"), default=None,
                    help="bench: GPU-sized (default on a GPU); cpu: CPU-sized (default on a CPU); tiny: for tests")
    ap.add_argument("--backends", type=tune.csv_list, default=None,
                    help="variants or families to run beside SDPA and dispatch (default: all available)")
    ap.add_argument("--exclude", type=tune.csv_list, default=[], help="backends to leave out (the dispatcher may still choose them)")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop starting shapes after this long; the output holds what finished")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="re-render bench.md and bench.png from an earlier bench.json, measure nothing")
    return ap


def _shapes(args: argparse.Namespace) -> list[Shape]:
    for dt in args.dtypes:
        if dt not in DTYPES_BY_NAME:
            raise ValueError(f"--dtypes: expected some of {sorted(DTYPES_BY_NAME)}, got {dt!r}")
    if args.shapes == "tiny":
        base = shape_lists.tiny_shapes(args.dtypes[0])
    elif args.shapes == "cpu":
        base = shape_lists.cpu_shapes(args.dtypes[0])
    else:
        seqlens = (1024, 4096, 16384) if args.quick else shape_lists.FA2_SEQLENS
        base = [] if args.only_special else shape_lists.fa2_sweep(args.dtypes, seqlens=seqlens)
        if not args.no_special:
            base += shape_lists.special_shapes(args.dtypes)
    causal = None if args.causal == "both" else args.causal == "true"
    return shape_lists.filter_shapes(base, head_dims=args.head_dims, passes=args.passes, causal=causal,
                                     seqlens=args.seqlens)


def write_outputs(result: dict[str, Any], out_dir: str, *, with_plot: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("bench.json", json.dumps(result, indent=1, default=str)), ("bench.md", markdown(result))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
    if with_plot:
        plot(result, os.path.join(out_dir, "bench.png"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.plot_from:
        with open(args.plot_from, encoding="utf-8") as f:
            result = json.load(f)
        write_outputs(result, args.out)
        print_table(result)
        return 0
    try:
        device = tune.parse_device(args.device)
        if args.shapes is None:
            args.shapes = "bench" if device.type == "cuda" else "cpu"
        if args.shapes == "cpu" and args.dtypes == ["bf16"]:
            args.dtypes = ["fp32"]  # the CPU's own precision; bf16 attention there is emulated
        plan = _shapes(args)
        impls = tune.select_implementations(args.backends, args.exclude, device)
    except ValueError as e:
        return user_error("flashdispatch bench", e)
    if not plan:
        print("flashdispatch bench: error: no shape left after the filters", file=sys.stderr)
        return 2
    t = QUICK_TIMING if args.quick else FULL_TIMING
    opts = tune.TuneOptions(warmup_ms=args.warmup_ms if args.warmup_ms is not None else t["warmup_ms"],
                            rep_ms=args.rep_ms if args.rep_ms is not None else t["rep_ms"])
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dev = tune.device_info(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else dev.name
    command = "flashdispatch bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    flashdispatch.refresh()
    profile, _ = state().profile(dev.profile_key)
    meta = {
        "card": card, "device": dev.describe(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "versions": tune.versions(), "seed": seed,
        "profile": profile.provenance() if profile else f"none for {dev.profile_key!r} (built-in default order)",
        "timing": (f"median of CUDA-event times, repetitions interleaved across providers, "
                   f"warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms per provider, L2 flushed before each call"
                   if device.type == "cuda" else
                   f"perf_counter median, repetitions interleaved across providers, warm-up {opts.warmup_ms:g} ms, "
                   f"repetitions {opts.rep_ms:g} ms per provider"),
    }
    log.info("bench: %d shapes on %s; providers: %s, %s, %s; profile: %s", len(plan), dev.describe(), PLAIN,
             ", ".join(impls), DISPATCH, meta["profile"])
    if device.type != "cuda":
        log.info("%s", CPU_NOTE)
    rows: list[dict[str, Any]] = []
    judge = device.type == "cuda"  # the performance bar is a GPU's
    grad_cache = tune.GradCache()
    t0 = time.perf_counter()
    complete = True
    try:
        for i, s in enumerate(plan):
            if i and args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                log.warning("time budget of %.0f s spent: %d shapes not run", args.time_budget, len(plan) - i)
                complete = False
                break
            row = bench_shape(s, list(impls), device, opts, gen, grad_cache)
            rows.append(row)
            # table and JSON after every shape: a run cut short still leaves its numbers
            write_outputs({"meta": {**meta, "complete": False}, "rows": rows, "summary": summarize(rows, judge)}, args.out,
                          with_plot=False)
            left = (time.perf_counter() - t0) / (i + 1) * (len(plan) - i - 1)
            d = row["providers"].get(DISPATCH, {})
            log.info("[%d/%d] %s: dispatch=%s %s %s, vs SDPA %s, oracle %s (about %.0f s left)", i + 1, len(plan),
                     s.describe(), row["choice"]["variant"], _fmt(d), row["unit"],
                     _vs_sdpa(row), _oracle(row), left)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        log.warning("interrupted: writing the %d shapes measured so far", len(rows))
        complete = False
    except tune.ContextLost as e:
        log.error("%s: writing the %d shapes measured so far; rerun with --exclude %s", e, len(rows), e.backend)
        complete = False
        meta["context_lost"] = str(e)
    meta["complete"] = complete
    result = {"meta": meta, "rows": rows, "summary": summarize(rows, judge)}
    write_outputs(result, args.out)
    print_table(result)
    log.info("wrote %s/bench.json, bench.md, bench.png", args.out)
    return tune.EXIT_RESUME if "context_lost" in meta else 0


if __name__ == "__main__":
    sys.exit(main())
