"""`flashdispatch tune`: measure what the cost model needs and write a device profile (schema 2).

The plan is the model grid of tools/shapes.py: for every group of the cost model (pass x shape
class x variant x dtype x head dim, dispatch/costmodel.py) a few work sizes, breadth first across
the groups (every group's first point, then every group's second, ...) so that a run cut short by
--time-budget still leaves a model in as many groups as possible. At each shape, every
implementation of the registry that can serve it runs each of its configs once on fresh random
inputs and is checked against the float64 reference (tools/verify.py) before it is timed, so that a
fast wrong kernel never wins. Prefill and training shapes are timed with tools/timing.py's median
(warm-up, L2 flushed), then again with the candidates' repetitions interleaved once every compile of
the shape is behind them (the times the profile records); decode and speculative steps as serving
runs them, a CUDA-graph replay of
calls on input sets larger than L2 together (timing.graph_replay_ms), with the eager host time per
call beside it. The result is profiles/<key>.yaml: every shape one point of its group, each group's
models fitted to its points (tools/profile_writer.py).

Before measuring, the plan's duration is estimated (`estimate_plan`, printed; --dry-run prints the
plan and the estimate and exits). Finished shapes go to a state file (JSON) as soon as each one
ends, so a run can be interrupted (Ctrl-C, --time-budget) and continued with --resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from flashdispatch import envs
from flashdispatch import cliargs
from flashdispatch.cliargs import ArgumentParser, user_error
from flashdispatch.backend import Implementation
from flashdispatch.device import DeviceInfo, real_device
from flashdispatch.device import simulated_device
from flashdispatch.problem import DTYPES_BY_NAME, Problem, problem_from_tensors
from flashdispatch.profile_store import ProfileError, parse_profile, timing_pass
from flashdispatch.registry import REGISTRY

from . import shapes as shape_lists
from . import timing, tune_serving, verify
from .timing import ContextLost  # also tools/bench.py's (tune.ContextLost)
from .decode_timing import captured_in_serving
from .profile_writer import (  # noqa: F401  (re-exported: the tuner's public names)
    TOOL, BucketResult, ProfileMeta, Trial, bucket_id, bucket_match, flow, groups_of, profile_yaml, summary,
    unmeasured_profile, versions,
)
from .shapes import Shape

log = logging.getLogger("flashdispatch.tools.tune")

STATE_SCHEMA = 1
# A config whose first (warm) call is this many times slower than the best median so far is not
# timed further: it cannot win, and timing it would dominate the sweep.
ABANDON_FACTOR = 3.0
# Plain-math SDPA materialises the full score matrix (gigabytes at the sweep's sizes) and is never
# the fastest on a GPU; it stays a fallback the dispatcher can use, but is tuned only on request.
GPU_DEFAULT_EXCLUDE: tuple[str, ...] = ("sdpa:math",)
# Timing settings: the full grid, and --quick (under 10 minutes on an H100/H200, estimate_plan).
FULL_TIMING = {"warmup_ms": 10.0, "rep_ms": 30.0}
QUICK_TIMING = {"warmup_ms": 5.0, "rep_ms": 25.0}
QUICK_MAX_CONFIGS = 2
QUICK_MAX_CONFIGS_BWD = 1  # --quick: the default config only for forward+backward (the full tune searches)
FULL_MAX_CONFIGS = 3
FULL_MAX_CONFIGS_BWD = 2
# Eager calls per host-time measurement of a graph-timed shape (timing.host_us_per_call).
HOST_CALLS = 100
HOST_CALLS_CPU = 10


# Exit status asking for a rerun with --resume (sysexits' EX_TEMPFAIL): a backend broke the CUDA
# context; the rerun leaves it out.
EXIT_RESUME = 75


# --- measuring one bucket ---------------------------------------------------------------------


@dataclass
class TuneOptions:
    warmup_ms: float = FULL_TIMING["warmup_ms"]
    rep_ms: float = FULL_TIMING["rep_ms"]
    max_configs: int | None = None
    abandon_factor: float = ABANDON_FACTOR
    seed: int | None = None
    max_configs_bwd: int | None = None  # fwd_bwd shapes (None: max_configs)
    # what an earlier run of this state file left out because it broke the CUDA context: dense
    # implementations are dropped from the candidates; serving families are named "serving:<family>"
    excluded: tuple[str, ...] = ()

    def cap(self, needs_grad: bool) -> int | None:
        """Configs per implementation at a shape of this pass."""
        return self.max_configs_bwd if needs_grad and self.max_configs_bwd is not None else self.max_configs

    @staticmethod
    def preset(quick: bool, **overrides: Any) -> "TuneOptions":
        """The timing and config caps of --quick or of the full tune (None overrides are ignored)."""
        t = QUICK_TIMING if quick else FULL_TIMING
        base = dict(warmup_ms=t["warmup_ms"], rep_ms=t["rep_ms"],
                    max_configs=QUICK_MAX_CONFIGS if quick else FULL_MAX_CONFIGS,
                    max_configs_bwd=QUICK_MAX_CONFIGS_BWD if quick else FULL_MAX_CONFIGS_BWD)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return TuneOptions(**base)  # type: ignore[arg-type]


def _dedupe(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for c in configs:
        key = json.dumps(c, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(dict(c))
    return out or [{}]


def candidate_configs(impl: Implementation, p: Problem, dev: DeviceInfo, max_configs: int | None) -> list[dict[str, Any]]:
    """config_space() (already pruned by the implementation for the device), deduplicated, with
    the implementation's default first so that a capped sweep always includes it."""
    space = list(impl.config_space(p, dev) or [{}])
    try:
        default = impl.default_config(p, dev)
    except Exception:  # a default that fails is reported when its run fails; keep the space
        default = None
    if default is not None:  # what runs without a profile is always a candidate
        if default in space:
            space.remove(default)
        space.insert(0, default)
    configs = _dedupe(space)
    if max_configs is not None and len(configs) > max_configs:
        # the default, then an even spread over the rest: spaces are built as products, so a
        # prefix would vary only the innermost parameter
        rest = configs[1:]
        n = max(0, max_configs - 1)
        configs = configs[:1] + [rest[(i * len(rest)) // n] for i in range(n)] if n else configs[:1]
    return configs


def make_inputs(s: Shape, device: torch.device, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Problem]:
    """Fresh random bhsd q, k, v (and dout for fwd_bwd) and the Problem attention() would build."""
    dtype = DTYPES_BY_NAME[s.dtype]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q = rnd(s.batch, s.heads_q, s.seqlen_q, s.head_dim)
    k = rnd(s.batch, s.heads_kv, s.seqlen_k, s.head_dim)
    v = rnd(s.batch, s.heads_kv, s.seqlen_k, s.head_dim)
    do = None
    if s.needs_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        do = rnd(s.batch, s.heads_q, s.seqlen_q, s.head_dim)
    window = (s.window, 0) if s.window >= 0 else None
    with torch.set_grad_enabled(s.needs_grad):
        p = problem_from_tensors(q, k, v, causal=s.causal, scale=None, layout="bhsd", return_lse=False, window=window)
    if timing_pass(p) != s.pass_:
        raise ValueError(f"shape {s.label!r}: pass {s.pass_!r} but attention() would time it as {timing_pass(p)!r}")
    return q, k, v, do, p


def rotation_inputs(s: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device: torch.device,
                    gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Input sets for a graph-timed shape: (q, k, v) first, then fresh random sets until their
    bytes exceed L2 (timing.rotation_sets), so that each replayed call reads its cache from HBM,
    as one layer of a many-layer decode step does."""
    per_set = sum(t.numel() * t.element_size() for t in (q, k, v))
    sets = [(q, k, v)]
    for _ in range(timing.rotation_sets(per_set, device) - 1):
        sets.append(tuple(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32).to(t.dtype)
                          for t in (q, k, v)))  # type: ignore[arg-type]
    return sets


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        return real_device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    return real_device("cpu", 0)


class GradCache:
    """Gradient verdicts per (implementation, config, proxy problem): one proxy serves many buckets."""

    def __init__(self) -> None:
        self.verdicts: dict[str, verify.Verdict] = {}

    def check(self, impl: Implementation, cfg: dict[str, Any], p: Problem, device: torch.device,
              gen: torch.Generator) -> verify.Verdict:
        key = json.dumps([impl.name, cfg], sort_keys=True, default=str)
        return self.check_fn(key, lambda q, k, v, pp: impl.run(q, k, v, pp, cfg)[0], p, device, gen)

    def check_fn(self, key: str, run: verify.RunFn, p: Problem, device: torch.device,
                 gen: torch.Generator) -> verify.Verdict:
        proxy = verify.proxy_problem(p)
        full = f"{key}|{proxy}"
        if full not in self.verdicts:
            self.verdicts[full] = verify.check_grads(run, p, device, gen)
        return self.verdicts[full]


def measure_bucket(
    s: Shape,
    impls: dict[str, Implementation],
    device: torch.device,
    opts: TuneOptions,
    gen: torch.Generator,
    grad_cache: GradCache | None = None,
) -> BucketResult:
    """Check, then time, every (implementation, config) that can serve shape s (a serving shape:
    every serving family of the implementations' backends, tools/tune_serving.py)."""
    if s.serving:
        return tune_serving.measure_serving_bucket(
            s, tune_serving.families([impl.backend for impl in impls.values()], opts.excluded), device, opts, gen,
            (grad_cache or GradCache()).verdicts, host_calls=HOST_CALLS if device.type == "cuda" else HOST_CALLS_CPU)
    t_start = time.perf_counter()
    dev = device_info(device)
    q, k, v, do, p = make_inputs(s, device, gen)
    res = BucketResult(bucket_id(s), s, bucket_match(s))
    blocks = verify.reference_blocks(q, k, v, p)
    out_bytes = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v * q.element_size()
    grad_cache = grad_cache or GradCache()
    rotation = rotation_inputs(s, q, k, v, device, gen) if captured_in_serving(s) and device.type == "cuda" else None
    best_ms = math.inf
    for name, impl in impls.items():
        why = REGISTRY.availability(name) if name in REGISTRY.all() else impl.availability()
        reasons = [f"unavailable: {why}"] if why else impl.not_supported_reasons(p, dev)
        if reasons:
            res.skipped[name] = "; ".join(reasons)
            continue
        try:
            configs = candidate_configs(impl, p, dev, opts.cap(p.needs_grad))
        except Exception as e:
            res.trials.append(Trial(name, {}, "error", note=f"config_space failed: {type(e).__name__}: {e}"))
            continue
        for cfg in configs:
            trial = _try_config(impl, cfg, p, q, k, v, do, blocks, out_bytes, device, opts, best_ms, grad_cache, gen,
                                graph=captured_in_serving(s), rotation=rotation)
            res.trials.append(trial)
            if trial.status == "ok" and trial.ms is not None:
                best_ms = min(best_ms, trial.ms)
    if rotation is None:  # graph-timed steps (a GPU's decode and speculative) keep their replay times
        _retime_interleaved(res, impls, p, q, k, v, do, device, opts)
    res.seconds = time.perf_counter() - t_start
    return res


def _timed_call(impl: Implementation, cfg: dict[str, Any], p: Problem, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, do: torch.Tensor | None) -> tuple[Callable[[], None], list[torch.Tensor] | None]:
    """(the call that is timed, the tensors whose .grad is reset before each call): the forward, or
    forward and backward where the shape needs a gradient."""
    if p.needs_grad:
        assert do is not None

        def fwd_bwd() -> None:
            o, _ = impl.run(q, k, v, p, cfg)
            o.backward(do)

        return fwd_bwd, [q, k, v]

    def fwd() -> None:
        with torch.no_grad():
            impl.run(q, k, v, p, cfg)

    return fwd, None


def _retime_interleaved(res: BucketResult, impls: dict[str, Implementation], p: Problem, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, do: torch.Tensor | None, device: torch.device,
                        opts: TuneOptions) -> None:
    """Time the shape's timed trials again, every compile behind them, with their repetitions
    interleaved (the median of each; on a GPU the L2 flushed and the host given slack before each
    call, as the bench times), replacing the one-after-another medians. One after another, each
    candidate was timed right after its own checks and compiles: a CPU shared with other work drifts
    by factors within seconds, and on the H100 each group's first shape, timed seconds after its
    kernels compiled, read our kernels 3-4x slower than plain SDPA (B1 H16 S2048 causal D=128: 183
    and 238 us against 56) where the bench reads them 1.2-1.5x at such sizes. Interleaved, drift
    and clocks hit every candidate alike, so the profile records a ranking, not the order in which
    the candidates happened to run."""
    timed = [(i, t) for i, t in enumerate(res.trials) if t.status == "ok" and t.ms is not None]
    if len(timed) < 2:
        return
    fns = {str(i): _timed_call(impls[t.name], t.config, p, q, k, v, do) for i, t in timed}
    failed: dict[str, str] = {}
    timing.warm_clocks(device)  # the last candidate's compile left the GPU idle (no-op off CUDA)
    samples = timing.interleaved_samples_ms(fns, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                                            flush=device.type == "cuda",
                                            failed=lambda n, e: failed.__setitem__(n, f"{type(e).__name__}: {e}"))
    for i, t in timed:
        got = samples.get(str(i))
        if got:
            t.ms = statistics.median(got)
            t.note = (t.note + "; " if t.note else "") + f"interleaved median of {len(got)}"
        elif str(i) in failed:
            t.status, t.ms, t.note = "error", None, failed[str(i)]
    timing.reset_grads((q, k, v))


def _try_config(
    impl: Implementation, cfg: dict[str, Any], p: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    do: torch.Tensor | None, blocks: list[verify.RowBlock], out_bytes: int, device: torch.device,
    opts: TuneOptions, best_ms: float, grad_cache: GradCache, gen: torch.Generator, *,
    graph: bool = False, rotation: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> Trial:
    """Check one config, then time it. graph: a decode or speculative step, timed as a CUDA-graph
    replay over the `rotation` input sets (on a GPU) with its eager host time per call beside it;
    a call that cannot be captured is timed eagerly, with a note."""
    name = impl.name
    t_host = time.perf_counter()  # from here to the timing: checks and compiles, the GPU mostly idle
    try:
        verify.poison_allocator(out_bytes, device)
        with torch.no_grad():
            out, _ = impl.run(q, k, v, p, cfg)
        verdict = verify.check_output(out, p, blocks)
        del out
        if not verdict.ok:
            return Trial(name, cfg, "wrong", note=verdict.reason)
        if p.needs_grad:
            gv = grad_cache.check(impl, cfg, p, device, gen)
            if not gv.ok:
                return Trial(name, cfg, "wrong", note=gv.reason)
        fn, grads = _timed_call(impl, cfg, p, q, k, v, do)
        fn()  # compiles what the check did not (backward kernels at this size)
        timing.reset_grads(grads)
        timing.warm_after_pause(device, t_host)
        checked = f"max err {verdict.error:.3g} (allowed {verdict.allowed:.3g})"
        if graph:
            return _time_graph_step(impl, cfg, p, fn, device, opts, rotation, checked)
        est = timing.estimate_ms(fn, device)
        timing.reset_grads(grads)
        if est > opts.abandon_factor * best_ms:
            return Trial(name, cfg, "abandoned", est,
                         f"a call took {est:.3g} ms > {opts.abandon_factor:g} x best {best_ms:.3g} ms")
        ms = timing.median_ms(fn, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, grad_to_none=grads)
        timing.reset_grads(grads)
        return Trial(name, cfg, "ok", ms, checked)
    except Exception as e:  # a config that fails to compile or launch is a result, not a crash
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if not timing.context_alive(device):
            raise ContextLost(name, f"{type(e).__name__}: {msg}") from e
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for t in (q, k, v):
            t.grad = None
        return Trial(name, cfg, "error", note=f"{type(e).__name__}: {msg}")


def _time_graph_step(impl: Implementation, cfg: dict[str, Any], p: Problem, fn: Callable[[], None],
                     device: torch.device, opts: TuneOptions,
                     rotation: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None, checked: str) -> Trial:
    """A decode or speculative step: GPU time per call of a CUDA-graph replay over the rotation's
    input sets, else (no GPU, or the call cannot be captured) the eager median, with a note; the
    eager host time per call either way."""
    note = checked
    ms: float | None = None
    if rotation is not None:
        def call(qi: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor) -> Callable[[], None]:
            def one() -> None:
                impl.run(qi, ki, vi, p, cfg)
            return one

        fns = [call(*qkv) for qkv in rotation]
        try:
            with torch.no_grad():
                ms = timing.checked_replay_ms(fns, device, p, rep_ms=opts.rep_ms)
            note += f"; CUDA-graph replay over {len(fns)} input sets"
        except timing.CaptureError as e:
            if not timing.context_alive(device):
                raise
            note += f"; eager median: the call cannot be captured in a CUDA graph ({e})"
            log.info("%s at %s: %s", impl.name, p.describe(), note)
    if ms is None:
        ms = timing.median_ms(fn, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms)
        if rotation is None:
            note += "; eager median (no CUDA device: no graph)"
    host = timing.host_us_per_call(fn, device, HOST_CALLS if device.type == "cuda" else HOST_CALLS_CPU)
    return Trial(impl.name, cfg, "ok", ms, note, host_us=host)


# --- the plan's duration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRates:
    """What `estimate_plan` assumes of the GPU and the host: conservative for an H100 or an H200
    (each figure is slower than what those cards measured, docs/profiles.md), so that a plan
    estimated under a limit finishes under it.

    tflops      work rate of every timed call: the H200's measured profile reads 220-680 TFLOP/s
                for every candidate but sdpa:efficient (105-170), and a candidate 3x slower than
                the best is abandoned after an estimate (ABANDON_FACTOR)
    tbps        memory rate of a timed call (decode measured 1.6-4 TB/s)
    call_ms     per call on top: the L2 flush before it and the launch
    shape_s     per shape: random inputs, float64 reference rows, the state and profile files
    trial_s     per (implementation, config) at a shape: the checked call, NaN poisoning, events,
                Python, a cuDNN plan
    extra_calls untimed calls of a trial (checked call, compile call, estimates, warm-up floor)
    compile_s   per kernel build (Triton JIT or NVRTC, about 1-1.5 s each on an H100 host) of an
                implementation x config x kernel (the group's pass, mask kind, dtype, head dim)
    backward_compile_s  the same for a forward+backward build (three or four kernels); less
                compile_s where the plan built that forward already (the same implementation,
                config and kernel in the forward pass: the compiler's cache returns it)
    grad_check_s        per gradient check of an implementation x config on a proxy problem
    graph_s     per graph-timed trial: capture, replays and the host-time calls
    """

    tflops: float = 120.0
    tbps: float = 1.0
    call_ms: float = 0.1
    shape_s: float = 1.0
    trial_s: float = 0.25
    extra_calls: int = 12
    compile_s: float = 1.75
    backward_compile_s: float = 6.0
    grad_check_s: float = 0.5
    graph_s: float = 0.5


RATES = PlanRates()
# The limits the quick and the full plan are chosen to fit (tests/test_tune.py checks them).
QUICK_LIMIT_S = 10 * 60
FULL_LIMIT_S = 45 * 60


@dataclass
class PlanEstimate:
    seconds: float  # the whole plan
    per_shape: list[float]  # measuring each shape (its first compiles included), plan order
    compiles: int  # kernel builds
    trials: int  # (implementation, config, shape) triples
    groups: int

    def describe(self) -> str:
        return (f"{len(self.per_shape)} shapes in {self.groups} model groups, {self.trials} (implementation, "
                f"config) trials, {self.compiles} kernel builds: estimated {_fmt_seconds(self.seconds)}")


def default_candidates(dev: DeviceInfo) -> dict[str, Implementation]:
    """What a tune on `dev` measures by default, whatever this machine has installed: every
    implementation whose capabilities cover the device (GPU_DEFAULT_EXCLUDE left out on GPUs)."""
    out = {}
    for n, impl in REGISTRY.all().items():
        if dev.kind != "cpu" and n in GPU_DEFAULT_EXCLUDE:
            continue
        try:
            if dev.kind in impl.capabilities(dev).device_kinds:
                out[n] = impl
        except Exception:
            continue
    return out


def _kernel_kind(s: Shape) -> str:
    k = s.group
    return "decode" if k.cls in ("decode", "speculative") else "dense" if k.cls == "dense" else "causal"


def estimate_plan(plan: Sequence[Shape], dev: DeviceInfo, opts: TuneOptions,
                  impls: dict[str, Implementation] | None = None, *, rates: PlanRates = RATES) -> PlanEstimate:
    """How long measuring `plan` on `dev` takes, by the work of every shape (tools/timing.py's
    counts) at the conservative rates of `rates`, times the candidates and configs that would run,
    plus one build per implementation x config x kernel and one gradient check per proxy."""
    impls = impls if impls is not None else default_candidates(dev)
    built: set[str] = set()
    checked: set[str] = set()
    per_shape: list[float] = []
    trials = 0
    for s in plan:
        p = s.problem(dev.kind)
        timed = "decode" if s.pass_ == "decode" else s.pass_
        call = (timing.pass_flops(p, timed) / (rates.tflops * 1e12) + timing.min_bytes(p, timed) / (rates.tbps * 1e12)) * 1e3
        call += rates.call_ms
        secs = rates.shape_s

        def trial(backend: str, unit: list[Any], proxy: list[Any]) -> float:
            t = rates.trial_s + (rates.extra_calls * call + max(opts.warmup_ms, call) + max(opts.rep_ms, call)) / 1e3
            if captured_in_serving(s):
                t += rates.graph_s + HOST_CALLS * max(call, 0.05) / 1e3
            else:  # timed again, interleaved with the shape's other candidates (_retime_interleaved)
                t += (max(opts.warmup_ms, call) + max(opts.rep_ms, call)) / 1e3
            if backend != "sdpa":
                u = json.dumps(unit, sort_keys=True, default=str)
                if u not in built:
                    built.add(u)
                    if not s.needs_grad:
                        t += rates.compile_s
                    else:  # the forward of a forward+backward build may be built already (unit[2]: the pass)
                        fwd = json.dumps([*unit[:2], "fwd", *unit[3:]], sort_keys=True, default=str)
                        t += rates.backward_compile_s - (rates.compile_s if fwd in built else 0.0)
            if s.needs_grad:
                pk = json.dumps(proxy, sort_keys=True, default=str)
                if pk not in checked:
                    checked.add(pk)
                    t += rates.grad_check_s
            return t

        if s.serving:  # one call per serving family that declares it can (tools/tune_serving.py)
            for fam in tune_serving.families([impl.backend for impl in impls.values()], opts.excluded):
                if not tune_serving.can_serve(s, fam, dev):
                    continue
                trials += 1
                secs += trial(fam, [fam, s.serving, s.pass_, s.group.cls, s.dtype, s.head_dim],
                              [fam, s.dtype, s.head_dim, s.heads_q // s.heads_kv])
            per_shape.append(secs)
            continue
        for name, impl in impls.items():
            try:
                if impl.not_supported_reasons(p, dev):
                    continue
                cfgs = candidate_configs(impl, p, dev, opts.cap(s.needs_grad))
            except Exception:
                continue
            for cfg in cfgs:
                trials += 1
                secs += trial(impl.backend, [name, cfg, s.pass_, _kernel_kind(s), s.group.variant, s.dtype, s.head_dim],
                              [name, cfg, verify.proxy_problem(p)])
        per_shape.append(secs)
    return PlanEstimate(sum(per_shape), per_shape, len(built), trials, len({s.group for s in plan}))


# --- the sweep ---------------------------------------------------------------------------------


class State:
    """Finished shapes on disk, rewritten atomically after each one."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.results: dict[str, BucketResult] = {}

    @staticmethod
    def load(path: str, option: str = "--state") -> "State":
        """The state file at `path` (given as `option`); a ValueError naming both if it is not one."""
        raw = cliargs.read_json(path, option, "tune", ("schema",))
        if raw.get("schema") != STATE_SCHEMA:
            raise ValueError(f"{option} {path}: state schema {raw.get('schema')!r}, expected {STATE_SCHEMA}")
        st = State(path, raw.get("meta", {}))
        try:
            st.results = {d["id"]: BucketResult.from_json(d) for d in raw.get("results", [])}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{option} {path}: a result flashdispatch tune cannot read "
                             f"({type(e).__name__}: {e})") from None
        return st

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"schema": STATE_SCHEMA, "meta": self.meta,
                       "results": [r.to_json() for r in self.results.values()]}, f, indent=1, default=str)
        os.replace(tmp, self.path)


class _Progress:
    """rich progress bar on a terminal; a log line per shape with the time left, always.

    The time left is the estimate of the shapes not yet measured (estimate_plan), scaled by how
    the shapes measured so far compared with their estimates; without estimates, the mean time
    of a shape so far."""

    def __init__(self, total: int, done: int, estimates: Sequence[float] = ()) -> None:
        self.total, self.done = total, done
        self.t0 = time.perf_counter()
        self.measured = 0
        self.estimates = list(estimates)
        self._bar: Any = None
        self._task: Any = None
        if sys.stderr.isatty():
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn)

                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[left]}"), transient=False)
                self._task = self._bar.add_task("tune", total=total, completed=done, left="")
            except ImportError:
                self._bar = None

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _scale(self) -> float:
        """Measured seconds per estimated second so far (1 before any shape)."""
        est = sum(self.estimates[:self.measured])
        if self.measured == 0 or est <= 0:
            return 1.0
        return (time.perf_counter() - self.t0) / est

    def expected(self, i: int) -> float:
        """Expected seconds of the i-th shape of this run (0 without estimates)."""
        return self.estimates[i] * self._scale() if i < len(self.estimates) else 0.0

    def left(self) -> float:
        if self.estimates and sum(self.estimates) > 0:
            return sum(self.estimates[self.measured:]) * self._scale()
        elapsed = time.perf_counter() - self.t0
        return elapsed / max(1, self.measured) * (self.total - self.done)

    def start(self, s: Shape) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=s.label[:40])

    def finish(self, r: BucketResult) -> str:
        self.done += 1
        self.measured += 1
        left = self.left()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, left=f"about {_fmt_seconds(left)} left")
        best = r.best()
        top = ", ".join(f"{n} {best[n].ms:.3g}" for n in r.ranking()[:3]) or "nothing passed"
        return (f"[{self.done}/{self.total}] {r.shape.describe()}: {top} ms ({r.seconds:.1f} s; "
                f"about {_fmt_seconds(left)} left)")


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def parse_device(name: str | None) -> torch.device:
    """--device: a torch device this machine has (default: cuda if present, else cpu)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device this machine has, got {name!r} (no CUDA or ROCm GPU)")
    return device


def select_implementations(backends: Sequence[str] | None, exclude: Sequence[str], device: torch.device,
                           logger: logging.Logger | None = None) -> dict[str, Implementation]:
    """Registry implementations named by --backends (families or variants; default: all that can
    run on this device), minus --exclude, minus GPU_DEFAULT_EXCLUDE on a GPU unless named
    explicitly. What is left out is said on `logger` (the calling tool's; default tune's)."""
    all_impls = REGISTRY.all()
    fams = REGISTRY.families()
    valid = sorted(set(all_impls) | set(fams))
    chosen: list[str] = []
    if backends:
        for b in backends:
            if b not in valid:
                raise ValueError(f"--backends: unknown backend {b!r}; expected some of: {', '.join(valid)}")
            for n in fams.get(b, [b]):
                if n not in chosen:
                    chosen.append(n)
    else:
        dev = device_info(device)
        usable = {st.name for st in REGISTRY.status(dev) if st.available}
        left_out = [n for n in all_impls if n not in usable]
        if left_out:
            (logger or log).info("left out (cannot run on this %s): %s", dev.kind, ", ".join(left_out))
        chosen = [n for n in all_impls if n in usable]
        if device.type == "cuda":
            chosen = [n for n in chosen if n not in GPU_DEFAULT_EXCLUDE]
    for b in exclude:
        if b not in valid:
            raise ValueError(f"--exclude: unknown backend {b!r}; expected some of: {', '.join(valid)}")
        drop = set(fams.get(b, [b]))
        chosen = [n for n in chosen if n not in drop]
    return {n: all_impls[n] for n in chosen}


def run_tune(
    plan: Sequence[Shape],
    impls: dict[str, Implementation],
    device: torch.device,
    opts: TuneOptions,
    state: State,
    *,
    time_budget_s: float | None = None,
    on_bucket: Callable[[list[BucketResult]], None] | None = None,
    estimates: Sequence[float] | None = None,
) -> tuple[list[BucketResult], bool]:
    """Measure the shapes of `plan` not yet in `state`; returns (results in plan order, complete).

    `estimates` (seconds per shape, estimate_plan's, in plan order) drive the time left and the
    budget: a shape is not started when the time it is expected to take, scaled by how the
    estimates compared with the clock so far, would end past `time_budget_s` (the first shape of
    a run always starts, so that a resumed run always makes progress)."""
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "little")
    log.info("random seed %d (pass --seed %d to repeat)", seed, seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    grad_cache = GradCache()
    est = {bucket_id(s): e for s, e in zip(plan, estimates)} if estimates is not None else {}
    todo = [s for s in plan if bucket_id(s) not in state.results]
    if len(todo) < len(plan):
        log.info("resuming: %d of %d shapes already measured in %s", len(plan) - len(todo), len(plan), state.path)
    t0 = time.perf_counter()
    complete = True
    with _Progress(len(plan), len(plan) - len(todo), [est.get(bucket_id(s), 0.0) for s in todo]) as prog:
        for i, s in enumerate(todo):
            if i and time_budget_s is not None:
                spent = time.perf_counter() - t0
                if spent + prog.expected(i) > time_budget_s:
                    log.warning("time budget of %.0f s: %.0f s spent, the next shape is expected to take %.0f s; "
                                "%d shapes left for --resume", time_budget_s, spent, prog.expected(i),
                                len(plan) - len(state.results))
                    complete = False
                    break
            prog.start(s)
            try:
                r = measure_bucket(s, impls, device, opts, gen, grad_cache)
            except ContextLost as e:
                excluded = state.meta.setdefault("excluded", [])
                if e.backend not in excluded:
                    excluded.append(e.backend)
                state.meta.setdefault("excluded_why", {})[e.backend] = f"{s.label}: {e}"
                state.save()
                raise
            state.results[r.id] = r
            state.save()
            log.info("%s", prog.finish(r))
            if on_bucket is not None:
                on_bucket([state.results[bucket_id(x)] for x in plan if bucket_id(x) in state.results])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    done = [state.results[bucket_id(s)] for s in plan if bucket_id(s) in state.results]
    return done, complete


# --- command line -------------------------------------------------------------------------------


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def csv_ints(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers (head dims, sequence lengths)."""
    one = cliargs.positive_int
    try:
        return [one(t) for t in csv_list(text)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="flashdispatch tune",
        description="Measure every available backend (and configs of our kernels) over the cost model's "
        "grid of shapes, check each against a float64 reference, fit each implementation's time model, "
        "and write <key>.yaml (schema 2).",
    )
    ap.add_argument("--quick", action="store_true",
                    help="GPU: the quick grid (bf16, D 64/128, 2-3 sizes per shape class), shorter timing, at "
                         f"most {QUICK_MAX_CONFIGS} configs per backend (under 10 minutes on an H100/H200, "
                         "see --dry-run); CPU: the CPU-sized shapes (seconds on 2 cores)")
    ap.add_argument("--shapes", choices=sorted(shape_lists.NAMED), default=None,
                    help="named shape list: " + "; ".join(f"{k}: {v}" for k, v in shape_lists.NAMED.items())
                    + " (default on a GPU: quick with --quick, else full; on a CPU: cpu)")
    ap.add_argument("--device", default=None, help="torch device to measure on (default: cuda if present, else cpu)")
    ap.add_argument("--profile-key", default=None,
                    help="device key written into the profile (default: detected, e.g. h100)")
    ap.add_argument("--out", default=None,
                    help="profile file or directory (default: $FLASHDISPATCH_PROFILE_DIR or the current "
                         "directory, as <key>.yaml)")
    ap.add_argument("--state", default=None, help="state file (default: <out>.state.json)")
    ap.add_argument("--resume", action="store_true", help="keep the shapes already in the state file")
    ap.add_argument("--backends", type=csv_list, default=None,
                    help="comma-separated families or variants to measure (default: all available; "
                         f"on GPUs without {', '.join(GPU_DEFAULT_EXCLUDE)})")
    ap.add_argument("--exclude", type=csv_list, default=[], help="comma-separated backends to leave out")
    ap.add_argument("--dtypes", type=csv_list, default=None, help="e.g. bf16,fp16")
    ap.add_argument("--head-dims", type=csv_ints, default=None, help="e.g. 64,128")
    ap.add_argument("--passes", type=csv_list, default=None, help="subset of fwd,fwd_bwd,decode")
    ap.add_argument("--seqlens", type=csv_ints, default=None, help="keep shapes with these Sk")
    ap.add_argument("--causal", choices=("true", "false", "both"), default="both")
    ap.add_argument("--max-configs", type=cliargs.positive_int, default=None,
                    help=f"configs per backend per shape (default: {FULL_MAX_CONFIGS}, {FULL_MAX_CONFIGS_BWD} for "
                         f"fwd_bwd; --quick {QUICK_MAX_CONFIGS}, {QUICK_MAX_CONFIGS_BWD} for fwd_bwd)")
    ap.add_argument("--warmup-ms", type=cliargs.milliseconds, default=None)
    ap.add_argument("--rep-ms", type=cliargs.milliseconds, default=None)
    ap.add_argument("--time-budget", type=cliargs.seconds, default=None, metavar="SECONDS",
                    help="do not start a shape expected to end after this long; the profile holds what "
                         "finished (continue with --resume)")
    ap.add_argument("--seed", type=cliargs.seed, default=None, help="seed of the random inputs (default: fresh)")
    ap.add_argument("--list", action="store_true", help="print the shapes and candidates, measure nothing")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan (shapes per model group) and its estimated duration, measure "
                         "nothing; with --profile-key of a GPU (h100, h200, ...) on any machine, for that GPU")
    return ap


def _simulates_gpu(profile_key: str | None) -> bool:
    """Whether --profile-key names a known GPU (an unknown key is reported by --dry-run itself)."""
    if not profile_key:
        return False
    try:
        return simulated_device(profile_key).kind != "cpu"
    except (KeyError, ValueError):
        return False


def _plan(args: argparse.Namespace, device: torch.device) -> list[Shape]:
    # --dry-run --profile-key h200 on any machine plans that GPU's grid, as its estimate is for that GPU
    gpu = device.type == "cuda" or (args.dry_run and _simulates_gpu(args.profile_key))
    name = args.shapes or ("cpu" if not gpu else "quick" if args.quick else "full")
    for dt in args.dtypes or []:
        if dt not in DTYPES_BY_NAME:
            raise ValueError(f"--dtypes: expected some of {sorted(DTYPES_BY_NAME)}, got {dt!r}")
    for ps in args.passes or []:
        if ps not in ("fwd", "fwd_bwd", "decode"):
            raise ValueError(f"--passes: expected some of fwd, fwd_bwd, decode; got {ps!r}")
    base = shape_lists.named(name, args.dtypes, args.head_dims)
    causal = None if args.causal == "both" else args.causal == "true"
    return shape_lists.filter_shapes(base, dtypes=args.dtypes, head_dims=args.head_dims, passes=args.passes,
                                     causal=causal, seqlens=args.seqlens)


def _out_path(args: argparse.Namespace, key: str) -> str:
    """Where the profile goes: --out (a directory, or a file name), else <key>.yaml in
    FLASHDISPATCH_PROFILE_DIR (created if missing: the dispatcher reads it from there), else here."""
    out = args.out
    from_env = out is None and bool(envs.FLASHDISPATCH_PROFILE_DIR.read())
    if out is None:
        out = envs.FLASHDISPATCH_PROFILE_DIR.read() or "."
    if from_env or os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        return os.path.join(out, f"{key}.yaml")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return out


def _use_note(out_path: str, key: str) -> str:
    """How the dispatcher comes to read the profile just written (it reads <key>.yaml in
    FLASHDISPATCH_PROFILE_DIR, else the shipped profiles)."""
    where = os.path.dirname(os.path.abspath(out_path))
    env_dir = envs.FLASHDISPATCH_PROFILE_DIR.read()
    if os.path.basename(out_path) != f"{key}.yaml":
        return f"the dispatcher reads {key}.yaml in FLASHDISPATCH_PROFILE_DIR: copy it there under that name"
    if env_dir and os.path.abspath(env_dir) == where:
        return "the dispatcher reads it from there (FLASHDISPATCH_PROFILE_DIR)"
    return f"to use it: export FLASHDISPATCH_PROFILE_DIR={shlex.quote(where)}"


def _print_list(plan: Sequence[Shape], impls: dict[str, Implementation], device: torch.device,
                opts: TuneOptions) -> None:
    dev = device_info(device)
    for s in plan:
        p = s.problem(dev.kind)  # meta tensors: no memory, and the same Problem attention() would build
        cands = []
        for n, impl in impls.items():
            if impl.availability() is None and not impl.not_supported_reasons(p, dev):
                cands.append(f"{n} x{len(candidate_configs(impl, p, dev, opts.cap(s.needs_grad)))}")
        print(f"{s.label:56s} {s.group.label():32s} {', '.join(cands) or '(none)'}")


def _dry_run(plan: Sequence[Shape], args: argparse.Namespace, device: torch.device, opts: TuneOptions) -> int:
    """--dry-run: the plan per group and its estimated duration, for this device or --profile-key's."""
    if args.profile_key:
        try:
            dev = simulated_device(args.profile_key)
        except (KeyError, ValueError) as e:
            return user_error("flashdispatch tune", ValueError(f"--profile-key: {e}"))
        impls = default_candidates(dev)
        if args.backends or args.exclude:
            picked = select_implementations(args.backends, args.exclude, torch.device("cpu")) if args.backends else impls
            impls = {n: i for n, i in impls.items() if n in picked and n not in set(args.exclude)}
    else:
        dev = device_info(device)
        impls = select_implementations(args.backends, args.exclude, device)
    est = estimate_plan(plan, dev, opts, impls)
    groups: dict[Any, list[tuple[Shape, float]]] = {}
    for s, e in zip(plan, est.per_shape):
        groups.setdefault(s.group, []).append((s, e))
    print(f"plan on {dev.describe()} over {', '.join(impls)}")
    print(f"timing: warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms; configs per backend: "
          f"{opts.max_configs} ({opts.cap(True)} for fwd_bwd)")
    for g, items in groups.items():
        print(f"{g.label():36s} {len(items):2d} points {_fmt_seconds(sum(e for _, e in items)):>7s}: "
              + "; ".join(f"B={s.batch} Hkv={s.heads_kv} "
                          + (f"mean S={s.seqlen_q}" if s.serving == "varlen" else f"Sq={s.seqlen_q} Sk={s.seqlen_k}")
                          + (f" w={s.window}" if s.window >= 0 else "") for s, _ in items))
    print(f"estimated: {est.describe()} (rates: {RATES})")
    return 0


@contextlib.contextmanager
def _interrupt_note(state_path: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        log.warning("interrupted: finished shapes are saved in %s; continue with --resume", state_path)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cliargs.show_logs(logging.INFO)
    try:
        device = parse_device(args.device)
        plan = _plan(args, device)
        impls = select_implementations(args.backends, args.exclude, device)
    except ValueError as e:
        return user_error("flashdispatch tune", e)
    if not plan:
        print("flashdispatch tune: error: no shape left after the filters", file=sys.stderr)
        return 2
    opts = TuneOptions.preset(args.quick, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, max_configs=args.max_configs,
                              max_configs_bwd=args.max_configs, seed=args.seed)
    if args.list:
        _print_list(plan, impls, device, opts)
        return 0
    if args.dry_run:
        return _dry_run(plan, args, device, opts)
    if device.index is not None and device.type == "cuda":  # events, streams, syncs act on the current device
        torch.cuda.set_device(device)
    dev = device_info(device)
    key = args.profile_key or dev.profile_key or dev.arch
    out_path = _out_path(args, key)
    state_path = args.state or out_path + ".state.json"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else dev.name
    command = "flashdispatch tune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"key": key, "card": card, "arch": dev.arch, "command": command}
    if args.resume and os.path.exists(state_path):
        try:
            state = State.load(state_path, "--state" if args.state else "--resume")
        except ValueError as e:
            return user_error("flashdispatch tune", e)
        if state.meta.get("card") != card:
            print(f"flashdispatch tune: error: --resume: {state_path} was measured on {state.meta.get('card')!r}, "
                  f"this is {card!r}; start afresh without --resume", file=sys.stderr)
            return 2
    else:
        if args.resume:
            log.info("--resume: no state file at %s; starting afresh", state_path)
        state = State(state_path, meta)
    for name in state.meta.get("excluded", []):
        if impls.pop(name, None) is not None or name.startswith(tune_serving.SERVING_PREFIX):
            log.warning("leaving out %s: %s", name, state.meta.get("excluded_why", {}).get(name, "broke the CUDA context"))
    opts = dataclasses.replace(opts, excluded=tuple(state.meta.get("excluded", [])))
    estimate = estimate_plan(plan, dev, opts, impls) if device.type == "cuda" else None
    log.info("tuning %d shapes (%d model groups) on %s over %s -> %s", len(plan), len({s.group for s in plan}),
             dev.describe(), ", ".join(impls), out_path)
    if estimate is not None:
        left = sum(e for s, e in zip(plan, estimate.per_shape) if bucket_id(s) not in state.results)
        log.info("plan: %s; left to measure: about %s", estimate.describe(), _fmt_seconds(left))
    if device.type != "cuda":
        log.info("on a CPU this ranks torch's CPU attention kernels for this machine (%s.yaml); profiles for GPUs "
                 "come from running tune on the GPU", key)
    pm = ProfileMeta(
        key=key, name=dev.name if dev.kind != "cpu" else "CPU", arch=dev.arch, card=card, command=command,
        timing=(f"median of repetitions interleaved across a shape's candidates after all their compiles, warm-up "
                f"{opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms per candidate, "
                "L2 flushed before each; decode and speculative steps: median CUDA-graph replay over input "
                "sets larger than L2 together, eager host time per call beside it" if device.type == "cuda" else
                f"perf_counter median, warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms"),
        sm_count=dev.sm_count or 1,
    )

    def write(results: list[BucketResult], complete: bool) -> bool:
        note = "" if complete else f"partial: {len(results)} of {len(plan)} shapes measured (continue with --resume)"
        text = profile_yaml(results, pm, note=note)
        try:
            parse_profile(text, out_path)  # never write a file the dispatcher would reject
        except ProfileError as e:  # a bug of the writer: keep measuring, the state file has it all
            log.error("not writing %s: %s", out_path, e)
            return False
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out_path)
        return True

    try:
        with _interrupt_note(state_path):
            # the profile is rewritten after every shape: a killed run still leaves a usable file
            results, complete = run_tune(plan, impls, device, opts, state, time_budget_s=args.time_budget,
                                         on_bucket=lambda rs: write(rs, len(rs) == len(plan)),
                                         estimates=estimate.per_shape if estimate is not None else None)
    except KeyboardInterrupt:
        return 130
    except ContextLost as e:
        done = [state.results[bucket_id(x)] for x in plan if bucket_id(x) in state.results]
        write(done, False)
        log.error("%s; %d shapes are saved: rerun with --resume to go on without it", e, len(done))
        return EXIT_RESUME
    if not write(results, complete):
        return 1
    if device.type == "cuda" and results:
        print(summary(parse_profile(profile_yaml(results, pm), out_path)))
    log.info("wrote %s (%d points in %d groups%s)", out_path, sum(1 for r in results if r.ranking()),
             len({r.shape.group for r in results if r.ranking()}), "" if complete else ", partial")
    log.info("%s", _use_note(out_path, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
