"""`flashdispatch bench`: plain SDPA, every backend variant, and the dispatcher, side by side.

Shapes: the FlashAttention-2 sweep and the special shapes where plain SDPA has no fast path
(tools/shapes.py); on a CPU, CPU-sized shapes of every kind of call. With --heldout: real model
shapes the tuner never measured (tools/heldout.py), judged against the held-out bars. Providers:
- "SDPA": what a user writes today, F.scaled_dot_product_attention (enable_gqa for GQA, the
  lower-right CausalBias for chunked prefill), no flashdispatch involved;
- every registered implementation that can serve the shape, through
  flashdispatch.attention(backend=<name>) (so with the profile's config for it);
- "dispatch": flashdispatch.attention() choosing on its own.
Each output is checked against the float64 reference (tools/verify.py) before it is timed; a
wrong provider is reported and left out of the comparison. Decode and speculative steps (at most
16 new rows against a longer cache) are timed as serving runs them, as CUDA-graph replays, with
each provider's host time per eager call beside on a GPU (tools/decode_timing.py). Rates: TFLOP/s
(FlashAttention-paper count) or GB/s for those steps. Ratios: plain-SDPA time / dispatcher time,
and best-provider time / dispatcher time (the oracle ratio); 1.0 means as fast. This module
measures; tools/bench_report.py writes bench.json, bench.md and bench.png (heldout.* for --heldout).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F

import flashdispatch
from flashdispatch.backends.sdpa import bottom_right_sdpa
from flashdispatch import cliargs
from flashdispatch.cliargs import ArgumentParser, user_error
from flashdispatch.problem import DTYPES_BY_NAME, Problem, problem_from_tensors
from flashdispatch.registry import REGISTRY
from flashdispatch.selection import implementation_config, select, state

from . import bench_report, decode_timing, heldout, timing, tune, verify
from . import shapes as shape_lists
from .bench_report import DISPATCH, PLAIN
from .shapes import Shape

log = logging.getLogger("flashdispatch.tools.bench")

FULL_TIMING = {"warmup_ms": 25.0, "rep_ms": 100.0}
QUICK_TIMING = {"warmup_ms": 10.0, "rep_ms": 40.0}
# The held-out set: 47 shapes, each compiled for and timed once per provider, in under 4 minutes
# of an H200 (most of it compiles and checks).
HELDOUT_TIMING = {"warmup_ms": 10.0, "rep_ms": 100.0}
# Repetitions per provider at least, for the held-out set's every-shape bars: with about 20 (a
# 5 ms training shape at 100 ms) the same kernel read 0.959x itself (docs/bench.md).
HELDOUT_MIN_REPS = 30
# Eager calls timed back to back for a serving step's host time on a GPU. On a CPU there is no
# host time apart from the call's own, which the interleaved repetitions already measure (with
# their spread); a block of back-to-back calls timed once there measured the scheduler (7.7 ms
# against 0.15 ms for the same call on a shared 2-core machine).
HOST_CALLS = 200
# --scale-for-cpu: the longest sequence of a held-out shape shrunk for a CPU.
CPU_MAX_TOKENS = 256


def plain_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The call a PyTorch user makes for bhsd q, k, v (bottom-right causal where Sq < Sk); the
    baseline refuses Sq > Sk, where SDPA has no causal mode and a user would write zeros by hand."""
    hq, sq, hkv, sk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if causal and sq > 1 and sq > sk:
        raise ValueError(f"plain SDPA: no bottom-right causal mask for Sq={sq} > Sk={sk}")
    return bottom_right_sdpa(q, k, v, causal=causal, **({"enable_gqa": True} if hq != hkv else {}))


@dataclass
class Measurement:
    ms: float | None = None  # median; a CUDA-graph replay's GPU time for a serving step
    rate: float | None = None
    status: str = "ok"  # "ok" | "wrong" | "error"
    note: str = ""
    host_us: float | None = None  # host time per eager call (serving steps)
    lo: float | None = None  # interquartile range of the repetitions (ms)
    hi: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pinned(name: str, causal: bool) -> Provider:
    """Implementation `name` run directly on bhsd q, k, v (its problem and config worked out once
    per shape and grad mode: the timed calls pay no selection)."""
    impl = REGISTRY.get(name)
    plans: dict[Any, tuple[Problem, dict[str, Any]]] = {}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, torch.is_grad_enabled() and q.requires_grad)
        if key not in plans:
            pp = problem_from_tensors(q, k, v, causal=causal, scale=None, layout="bhsd", return_lse=False)
            plans[key] = (pp, implementation_config(pp, name))
        pp, cfg = plans[key]
        return impl.run(q, k, v, pp, cfg)[0]

    return run


def _providers(causal: bool, names: Sequence[str]) -> dict[str, Provider]:
    """Plain SDPA, each implementation pinned, and the dispatcher. An implementation is forced by
    its name, except one whose name is also its family's (`triton`, `sdpa`): forcing that name
    picks the family's best by the model, so it runs directly, with the config the dispatcher
    would give it (selection.implementation_config), as the tuner runs it."""
    out: dict[str, Provider] = {PLAIN: lambda q, k, v: plain_sdpa(q, k, v, causal)}
    fams = REGISTRY.families()
    for n in names:
        if len(fams.get(n, ())) > 1:
            out[n] = pinned(n, causal)
        else:
            out[n] = lambda q, k, v, n=n: flashdispatch.attention(q, k, v, causal=causal, backend=n)  # type: ignore[misc]
    out[DISPATCH] = lambda q, k, v: flashdispatch.attention(q, k, v, causal=causal)  # type: ignore[return-value]
    return out


def bench_shape(s: Shape, names: Sequence[str], device: torch.device, opts: tune.TuneOptions,
                gen: torch.Generator, grad_cache: tune.GradCache, *, graphs: bool = True,
                min_reps: int = 0, bars: dict[str, float] | None = None) -> dict[str, Any]:
    """One shape: every provider checked against the float64 reference, then timed with the
    repetitions interleaved (at least `min_reps`). A serving step (decode, speculative) is timed
    on a GPU (graphs=True) as CUDA-graph replays of one call per input set of the tuner's rotation
    (the same sets for every provider; a provider that cannot be captured is timed eagerly, and
    its note says so; an empty replay is an error), and its host time per eager call recorded beside.
    bars (a GPU run judged against per-shape bars, bench_report.per_shape_bars): a ratio near one
    is confirmed by a second, longer timing of its providers (bench_report.CONFIRM_BAND)."""
    q, k, v, do, p = tune.make_inputs(s, device, gen)
    blocks = verify.reference_blocks(q, k, v, p)
    dev = tune.device_info(device)
    eligible = [n for n in names if REGISTRY.availability(n) is None and not REGISTRY.get(n).not_supported_reasons(p, dev)]
    decision = select(p)
    serving = decode_timing.captured_in_serving(s)
    in_graphs = serving and graphs and device.type == "cuda"
    row: dict[str, Any] = {
        "label": s.label, "shape": s._asdict(), "pass": s.pass_,
        "unit": "GB/s" if serving else "TFLOP/s",
        "choice": {"variant": decision.variant, "config": decision.config, "source": decision.source},
        "serving": serving,
        "timing": bench_report.GRAPH if in_graphs else "eager",
        "providers": {},
    }
    out_bytes = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v * q.element_size()
    measurements: dict[str, Measurement] = {}
    # graph-timed providers replay their calls over the same input sets, larger than L2 together
    # (the tuner's rotation): each call reads its cache from HBM, as a decode step's layers do
    sets = tune.rotation_inputs(s, q, k, v, device, gen) if in_graphs else []
    graphed: dict[str, tuple[Callable[[], None], list[torch.Tensor] | None]] = {}
    timed: dict[str, tuple[Callable[[], None], list[torch.Tensor] | None]] = {}
    eager: dict[str, Callable[[], None]] = {}
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
            eager[name] = fn
            if in_graphs:
                def every_set(f: Callable[..., torch.Tensor] = f) -> None:
                    with torch.no_grad():
                        for qi, ki, vi in sets:
                            f(qi, ki, vi)

                try:
                    graphed[name] = (decode_timing.graph_replay(every_set), None)
                except Exception as e:  # timed eagerly instead, and the row says so
                    if not timing.context_alive(device):
                        raise
                    m.note = (f"eager: the call cannot be captured in a CUDA graph ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})")
                    timed[name] = (fn, grads)
            else:
                timed[name] = (fn, grads)
        except Exception as e:  # a provider that fails is a result of the benchmark
            _failed(m, e, device, (q, k, v), name)

    # Repetitions interleaved across providers (timing.interleaved_median_ms): clock and power
    # drift over a shape's seconds of back-to-back kernels then hits every provider alike.
    def failed(name: str, e: Exception) -> None:
        _failed(measurements[name], e, device, (q, k, v), name)
        timed.pop(name, None)

    def failed_graph(name: str, e: Exception) -> None:
        _failed(measurements[name], e, device, (q, k, v), name)
        graphed.pop(name, None)

    def measure(names: Collection[str], rep_ms: float) -> None:
        """Times `names` (those still timed) with their repetitions interleaved; sets their measurements."""
        eager_set = {n: timed[n] for n in names if n in timed}
        graph_set = {n: graphed[n] for n in names if n in graphed}
        samples = timing.interleaved_samples_ms(eager_set, device, warmup_ms=opts.warmup_ms, rep_ms=rep_ms,
                                                failed=failed, min_reps=min_reps)
        # a replay of len(sets) calls, without the flush: the rotation itself keeps L2 from helping
        per_call = {n: [x / len(sets) for x in xs] for n, xs in timing.interleaved_samples_ms(
            graph_set, device, warmup_ms=opts.warmup_ms, rep_ms=rep_ms, failed=failed_graph, flush=False,
            min_reps=min_reps).items()} if graph_set else {}
        for name, xs in per_call.items():
            empty = timing.empty_replay(p, statistics.median(xs))
            if empty:
                measurements[name].status, measurements[name].note = "error", empty
                continue
            samples[name] = xs
        for name in samples:
            m = measurements[name]
            spread = timing.Spread.of(samples[name])
            m.ms, m.lo, m.hi = spread.median, spread.lo, spread.hi
            m.rate = timing.gbps(p, "fwd", m.ms) if serving else timing.rate(p, s.pass_, m.ms)[0]
            if serving and device.type == "cuda" and m.host_us is None:
                m.host_us = timing.host_us_per_call(eager[name], device, HOST_CALLS)
        row["providers"] = {name: m.to_json() for name, m in measurements.items()}
        bench_report.add_ratios(row)

    measure(list(timed) + list(graphed), opts.rep_ms)
    near = bench_report.near_a_bar(row, bars) if bars else {}
    if near:
        who = [n for n in bench_report.confirm_providers(row, near) if n in timed or n in graphed]
        first = {n: {k: row["providers"][n].get(k) for k in ("ms", "lo", "hi")} for n in who}
        measure(who, opts.rep_ms * bench_report.CONFIRM_FACTOR)
        row["retimed"] = {"why": list(near.values()), "rep_ms": opts.rep_ms * bench_report.CONFIRM_FACTOR,
                          "first": first}
        log.info("%s: %s: timed again, %dx the repetitions: vs SDPA %s, oracle %s", s.label, "; ".join(near.values()),
                 bench_report.CONFIRM_FACTOR, bench_report.vs_sdpa_cell(row), bench_report.oracle_cell(row))
    return row


def _failed(m: Measurement, e: Exception, device: torch.device, inputs: Sequence[torch.Tensor], name: str) -> None:
    m.status, m.note = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if not timing.context_alive(device):
        raise tune.ContextLost(name, m.note) from e
    for t in inputs:
        t.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="flashdispatch bench",
        description="Time plain SDPA, every backend that can run here and the dispatcher's own choice, side by "
        "side (repetitions interleaved), after checking each against a float64 reference; writes bench.json, "
        "bench.md, bench.png. On a GPU: the FlashAttention-2 sweep and the shapes where plain SDPA has no fast "
        "path. On a CPU: CPU-sized shapes (seconds on 2 cores). --heldout: real model shapes the tuner "
        "never measured, judged against the held-out bars; writes heldout.json, heldout.md, heldout.png.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="GPU: S in {1024, 4096, 16384} and shorter timing; CPU: shorter timing")
    ap.add_argument("--out", default="bench-out", help="output directory (default: ./bench-out)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    ap.add_argument("--dtypes", type=tune.csv_list, default=None,
                    help="comma-separated, e.g. bf16,fp16 (default bf16; with --heldout: every shape's own)")
    ap.add_argument("--head-dims", type=tune.csv_ints, default=None)
    ap.add_argument("--seqlens", type=tune.csv_ints, default=None)
    ap.add_argument("--passes", type=tune.csv_list, default=None, help="subset of fwd,fwd_bwd,decode")
    ap.add_argument("--causal", choices=("true", "false", "both"), default="both")
    ap.add_argument("--no-special", action="store_true", help="leave out the special shapes (GQA, chunked prefill, decode)")
    ap.add_argument("--only-special", action="store_true", help="only the special shapes")
    ap.add_argument("--shapes", choices=("bench", "cpu", "tiny"), default=None,
                    help="bench: GPU-sized (default on a GPU); cpu: CPU-sized (default on a CPU); tiny: for tests")
    ap.add_argument("--heldout", action="store_true",
                    help="the held-out set (tools/heldout.py): real model shapes not in the tune grid, with the bars "
                         "dispatcher/oracle >= 0.98 geomean and >= 0.93 each, dispatcher/SDPA >= 0.98 each")
    ap.add_argument("--kinds", type=tune.csv_list, default=None,
                    help=f"--heldout: only these kinds (some of {','.join(heldout.KINDS)})")
    ap.add_argument("--scale-for-cpu", action="store_true",
                    help="--heldout: every shape shrunk to CPU size (batch, heads, lengths; kind, dtype, head dim "
                         "and mask kept), the same code path: a dry run (needed on a CPU)")
    ap.add_argument("--max-tokens", default=CPU_MAX_TOKENS,
                    type=cliargs.int_at_least(heldout.CPU_MIN_TOKENS, f"at least {heldout.CPU_MIN_TOKENS} tokens"),
                    help=f"--scale-for-cpu: longest sequence after shrinking (default {CPU_MAX_TOKENS})")
    ap.add_argument("--limit", type=cliargs.positive_int, default=None, metavar="N",
                    help="--heldout: the first N shapes (kinds interleaved, so N >= 5 covers every kind)")
    ap.add_argument("--no-graphs", action="store_true",
                    help="time decode and speculative steps eagerly instead of as CUDA-graph replays")
    ap.add_argument("--backends", type=tune.csv_list, default=None,
                    help="variants or families to run beside SDPA and dispatch (default: all available)")
    ap.add_argument("--exclude", type=tune.csv_list, default=[], help="backends to leave out (the dispatcher may still choose them)")
    ap.add_argument("--warmup-ms", type=cliargs.milliseconds, default=None)
    ap.add_argument("--rep-ms", type=cliargs.milliseconds, default=None)
    ap.add_argument("--time-budget", type=cliargs.seconds, default=None, metavar="SECONDS",
                    help="stop starting shapes after this long; the output holds what finished")
    ap.add_argument("--seed", type=cliargs.seed, default=None)
    ap.add_argument("--variants", action="store_true",
                    help="the variants section instead: sliding window, softcap, sinks and windowed decode against "
                         "their anchors (FlexAttention, SDPA with a mask, cuDNN); tools/bench_variants.py")
    ap.add_argument("--serving", action="store_true",
                    help="the serving section instead: packed varlen batches, paged decode and speculative "
                         "verification against their anchors (padded SDPA, torch's varlen_attn, gather-then-SDPA); "
                         "tools/bench_serving.py")
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="re-render the table and plot from an earlier bench.json or heldout.json, measure nothing")
    ap.add_argument("--rescore", default=None, metavar="JSON",
                    help="an earlier bench.json or heldout.json re-scored under the current selection rules: the "
                         "dispatcher's column becomes the measured time of what select() now picks on that card; "
                         "measures nothing, judges no bar (tools/bench_rescore.py)")
    return ap


def _check_dtypes(dtypes: Sequence[str]) -> None:
    for dt in dtypes:
        if dt not in DTYPES_BY_NAME:
            raise ValueError(f"--dtypes: expected some of {sorted(DTYPES_BY_NAME)}, got {dt!r}")


def _shapes(args: argparse.Namespace) -> list[Shape]:
    dtypes = args.dtypes or ["bf16"]
    _check_dtypes(dtypes)
    if args.shapes == "tiny":
        base = shape_lists.tiny_shapes(dtypes[0])
    elif args.shapes == "cpu":
        base = shape_lists.cpu_shapes(dtypes[0])
    else:
        seqlens = (1024, 4096, 16384) if args.quick else shape_lists.FA2_SEQLENS
        base = [] if args.only_special else shape_lists.fa2_sweep(dtypes, seqlens=seqlens)
        if not args.no_special:
            base += shape_lists.special_shapes(dtypes)
    causal = None if args.causal == "both" else args.causal == "true"
    return shape_lists.filter_shapes(base, head_dims=args.head_dims, passes=args.passes, causal=causal,
                                     seqlens=args.seqlens)


def _partial(args: argparse.Namespace) -> str:
    """Why this run is not the one the bars are judged on ("" when it is): a filtered shape set,
    fewer or more providers than the defaults, or a dispatcher that is forced or autotunes."""
    flags = [("--dtypes", args.dtypes), ("--head-dims", args.head_dims), ("--seqlens", args.seqlens),
             ("--passes", args.passes), ("--causal", args.causal != "both"), ("--no-special", args.no_special),
             ("--only-special", args.only_special), ("--kinds", args.kinds), ("--limit", args.limit is not None),
             ("--backends", args.backends), ("--exclude", args.exclude), ("--no-graphs", args.no_graphs)]
    why = [f for f, given in flags if given]
    st = state().settings
    if st.backend not in ("", "auto"):
        why.append(f"FLASHDISPATCH_BACKEND={st.backend} (the dispatcher is forced)")
    if st.autotune:
        why.append("FLASHDISPATCH_AUTOTUNE=1 (the dispatcher measures as it goes)")
    return ("a partial run (" + ", ".join(why) + ")") if why else ""


def _heldout_plan(args: argparse.Namespace, device: torch.device) -> list[heldout.HeldOut]:
    """The held-out calls to run: filtered, shrunk for a CPU if asked, at most --limit."""
    for flag, given in (("--shapes", args.shapes), ("--quick", args.quick), ("--only-special", args.only_special),
                        ("--no-special", args.no_special)):
        if given:
            raise ValueError(f"{flag}: not with --heldout, which runs its own shapes (filter them with --kinds, "
                             "--dtypes, --head-dims, --passes, --causal, --limit)")
    if device.type != "cuda" and not args.scale_for_cpu:
        raise ValueError(f"--heldout: its shapes are GPU-sized; on {device.type} add --scale-for-cpu (a dry run)")
    if args.dtypes:
        _check_dtypes(args.dtypes)
    causal = None if args.causal == "both" else args.causal == "true"
    keep = {s.label for s in shape_lists.filter_shapes(
        [h.shape for h in heldout.HELDOUT], dtypes=args.dtypes, head_dims=args.head_dims, passes=args.passes,
        causal=causal, seqlens=args.seqlens)}
    plan = [h for h in heldout.heldout(args.kinds) if h.label in keep][:args.limit]
    if args.scale_for_cpu:
        plan = [heldout.scale_for_cpu(h, args.max_tokens) for h in plan]
    return plan


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cliargs.show_logs(logging.INFO)
    if args.variants:
        from . import bench_variants

        return bench_variants.main(["--out", args.out] + (["--quick"] if args.quick else [])
                                   + (["--rep-ms", str(args.rep_ms)] if args.rep_ms is not None else []),
                                   prog="flashdispatch bench")
    if args.serving:
        from . import bench_serving

        return bench_serving.main(["--out", args.out] + (["--rep-ms", str(args.rep_ms)] if args.rep_ms is not None
                                                          else [])
                                  + (["--plot-from", args.plot_from] if args.plot_from else []),
                                  prog="flashdispatch bench")
    if args.plot_from or args.rescore:
        option = "--plot-from" if args.plot_from else "--rescore"
        try:
            result = cliargs.read_json(args.plot_from or args.rescore, option, "bench", ("meta", "rows", "summary"))
        except ValueError as e:
            return user_error("flashdispatch bench", e)
        if args.rescore:
            from . import bench_rescore

            result = bench_rescore.rescore(result)
            for line in result["meta"]["rescored"]["moved"]:
                log.info("choice changed: %s", line)
        bench_report.write_outputs(result, args.out)
        bench_report.print_result(result)
        return 0
    try:
        if not args.heldout:
            for flag, given in (("--kinds", args.kinds), ("--scale-for-cpu", args.scale_for_cpu),
                                ("--limit", args.limit is not None)):
                if given:
                    raise ValueError(f"{flag}: only with --heldout")
        device = tune.parse_device(args.device)
        if device.index is not None and device.type == "cuda":  # events, streams, syncs act on the current device
            torch.cuda.set_device(device)
        extras: list[dict[str, Any]]
        if args.heldout:
            calls = _heldout_plan(args, device)
            plan = [h.shape for h in calls]
            extras = [{"model": h.model, "kind": h.kind} for h in calls]
        else:
            if args.shapes is None:
                args.shapes = "bench" if device.type == "cuda" else "cpu"
            if args.shapes == "cpu" and not args.dtypes:
                args.dtypes = ["fp32"]  # the CPU's own precision; bf16 attention there is emulated
            plan = _shapes(args)
            extras = [{} for _ in plan]
        impls = tune.select_implementations(args.backends, args.exclude, device, log)
    except ValueError as e:
        return user_error("flashdispatch bench", e)
    if not plan:
        print("flashdispatch bench: error: no shape left after the filters", file=sys.stderr)
        return 2
    t = HELDOUT_TIMING if args.heldout else QUICK_TIMING if args.quick else FULL_TIMING
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
    graphs = device.type == "cuda" and not args.no_graphs
    meta: dict[str, Any] = {
        "card": card, "device": dev.describe(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "versions": tune.versions(), "seed": seed,
        "profile": profile.provenance() if profile else f"none for {dev.profile_key!r} (built-in default order)",
        "timing": (f"median of CUDA-event times, repetitions interleaved across providers, "
                   f"warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms per provider, L2 flushed before each call"
                   if device.type == "cuda" else
                   f"perf_counter median, repetitions interleaved across providers, warm-up {opts.warmup_ms:g} ms, "
                   f"repetitions {opts.rep_ms:g} ms per provider")
                  + ("; decode and speculative steps as CUDA-graph replays, host time per eager call beside" if graphs
                     else "; decode and speculative steps eagerly (CUDA graphs n/a), host time per call beside"),
    }
    if args.heldout:
        meta.update({"set": "heldout", "planned": len(plan), "scaled_for_cpu": args.scale_for_cpu})
    log.info("bench: %d shapes on %s; providers: %s, %s, %s; profile: %s", len(plan), dev.describe(), PLAIN,
             ", ".join(impls), DISPATCH, meta["profile"])
    if device.type != "cuda":
        log.info("%s", bench_report.CPU_NOTE)
    rows: list[dict[str, Any]] = []
    partial = _partial(args)
    meta["settings"] = {"backend": state().settings.backend, "autotune": state().settings.autotune}
    # the performance bar is a GPU's, at full size, over the whole set with the default providers
    judge = device.type == "cuda" and not args.scale_for_cpu and not partial
    if partial and device.type == "cuda":
        log.warning("not judged against the bars: %s", partial)

    def summary() -> dict[str, Any]:
        if args.heldout:
            s = bench_report.heldout_summary(rows, judge, planned=len(plan))
        else:
            s = bench_report.summarize(rows, judge, planned=len(plan))
        if partial and device.type == "cuda":
            s["partial"] = partial
        return s

    grad_cache = tune.GradCache()
    t0 = time.perf_counter()
    complete = True
    try:
        for i, (s, extra) in enumerate(zip(plan, extras)):
            if i and args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                log.warning("time budget of %.0f s spent: %d shapes not run", args.time_budget, len(plan) - i)
                complete = False
                break
            t_shape = time.perf_counter()
            row = {**extra, **bench_shape(s, list(impls), device, opts, gen, grad_cache, graphs=graphs,
                                          min_reps=HELDOUT_MIN_REPS if args.heldout and device.type == "cuda" else 0,
                                          bars=bench_report.per_shape_bars(args.heldout) if judge else None)}
            row["wall_s"] = round(time.perf_counter() - t_shape, 2)  # compiles, checks and timing
            rows.append(row)
            # table and JSON after every shape: a run cut short still leaves its numbers
            bench_report.write_outputs({"meta": {**meta, "complete": False}, "rows": rows, "summary": summary()},
                                       args.out, with_plot=False)
            left = (time.perf_counter() - t0) / (i + 1) * (len(plan) - i - 1)
            d = row["providers"].get(DISPATCH, {})
            log.info("[%d/%d] %s%s: dispatch=%s %s %s, vs SDPA %s, oracle %s (about %.0f s left)", i + 1, len(plan),
                     f"{extra['model']}: " if extra else "", s.describe(), row["choice"]["variant"],
                     bench_report.rate_cell(d), row["unit"], bench_report.vs_sdpa_cell(row), bench_report.oracle_cell(row),
                     left)
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
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    result = {"meta": meta, "rows": rows, "summary": summary()}
    paths = bench_report.write_outputs(result, args.out)
    bench_report.print_result(result)
    log.info("wrote %s", ", ".join(paths))
    return tune.EXIT_RESUME if "context_lost" in meta else 0


if __name__ == "__main__":
    sys.exit(main())
