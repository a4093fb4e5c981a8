"""`flashdispatch tune`: measure every backend on problem buckets and write a device profile.

For each bucket (a Shape of tools/shapes.py: dtype x head dim x causal x GQA x pass x sequence
length, and decode shapes) and each implementation of the registry that can serve it, every config
of `config_space()` runs once on fresh random inputs and is checked against the float64 reference
(tools/verify.py) before it is timed, so that a fast wrong kernel never wins. Timing is
tools/timing.py's median with warm-up and an L2 flush. The result is profiles/<key>.yaml in the
schema of dispatch/profile_store.py: per bucket, the candidates that passed ranked fastest first,
their median ms, and the best config per backend.

Finished buckets go to a state file (JSON) as soon as each one ends, so a run can be interrupted
(Ctrl-C, --time-budget) and continued with --resume without losing them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from flashdispatch import envs
from flashdispatch.cliargs import ArgumentParser, user_error
from flashdispatch.backend import Implementation
from flashdispatch.device import DeviceInfo, real_device
from flashdispatch.problem import DTYPES_BY_NAME, Problem, problem_from_tensors
from flashdispatch.profile_store import ProfileError, parse_profile, problem_pass
from flashdispatch.registry import REGISTRY

from . import shapes as shape_lists
from . import timing, verify
from .profile_writer import (  # noqa: F401  (re-exported: the tuner's public names)
    TOOL, BucketResult, ProfileMeta, Trial, bucket_id, bucket_match, flow, profile_yaml, unmeasured_profile,
    versions,
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
# Timing settings: the full sweep, and --quick (fits, with the benchmark, a few minutes on an H100).
FULL_TIMING = {"warmup_ms": 25.0, "rep_ms": 100.0}
QUICK_TIMING = {"warmup_ms": 5.0, "rep_ms": 25.0}
QUICK_MAX_CONFIGS = 2


# Exit status asking for a rerun with --resume (sysexits' EX_TEMPFAIL): a backend broke the CUDA
# context; the rerun leaves it out.
EXIT_RESUME = 75


class ContextLost(RuntimeError):
    """A candidate left the CUDA context unusable; nothing after it in this process can be measured."""

    def __init__(self, backend: str, cause: str) -> None:
        super().__init__(f"{backend} broke the CUDA context ({cause})")
        self.backend = backend


# --- measuring one bucket ---------------------------------------------------------------------


@dataclass
class TuneOptions:
    warmup_ms: float = FULL_TIMING["warmup_ms"]
    rep_ms: float = FULL_TIMING["rep_ms"]
    max_configs: int | None = None
    abandon_factor: float = ABANDON_FACTOR
    seed: int | None = None


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
    with torch.set_grad_enabled(s.needs_grad):
        p = problem_from_tensors(q, k, v, causal=s.causal, scale=None, layout="bhsd", return_lse=False)
    if problem_pass(p) != s.pass_:
        raise ValueError(f"shape {s.label!r}: pass {s.pass_!r} but the dispatcher would look up {problem_pass(p)!r}")
    return q, k, v, do, p


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
    """Check, then time, every (implementation, config) that can serve shape s."""
    t_start = time.perf_counter()
    dev = device_info(device)
    q, k, v, do, p = make_inputs(s, device, gen)
    res = BucketResult(bucket_id(s), s, bucket_match(s))
    blocks = verify.reference_blocks(q, k, v, p)
    out_bytes = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v * q.element_size()
    grad_cache = grad_cache or GradCache()
    best_ms = math.inf
    for name, impl in impls.items():
        why = REGISTRY.availability(name) if name in REGISTRY.all() else impl.availability()
        reasons = [f"unavailable: {why}"] if why else impl.not_supported_reasons(p, dev)
        if reasons:
            res.skipped[name] = "; ".join(reasons)
            continue
        try:
            configs = candidate_configs(impl, p, dev, opts.max_configs)
        except Exception as e:
            res.trials.append(Trial(name, {}, "error", note=f"config_space failed: {type(e).__name__}: {e}"))
            continue
        for cfg in configs:
            trial = _try_config(impl, cfg, p, q, k, v, do, blocks, out_bytes, device, opts, best_ms, grad_cache, gen)
            res.trials.append(trial)
            if trial.status == "ok" and trial.ms is not None:
                best_ms = min(best_ms, trial.ms)
    res.seconds = time.perf_counter() - t_start
    return res


def _try_config(
    impl: Implementation, cfg: dict[str, Any], p: Problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    do: torch.Tensor | None, blocks: list[verify.RowBlock], out_bytes: int, device: torch.device,
    opts: TuneOptions, best_ms: float, grad_cache: GradCache, gen: torch.Generator,
) -> Trial:
    name = impl.name
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
            assert do is not None

            def fn() -> None:
                o, _ = impl.run(q, k, v, p, cfg)
                o.backward(do)

            grads: list[torch.Tensor] | None = [q, k, v]
        else:

            def fn() -> None:
                with torch.no_grad():
                    impl.run(q, k, v, p, cfg)

            grads = None
        fn()  # compiles what the check did not (backward kernels at this size)
        timing.reset_grads(grads)
        est = timing.estimate_ms(fn, device)
        timing.reset_grads(grads)
        if est > opts.abandon_factor * best_ms:
            return Trial(name, cfg, "abandoned", est,
                         f"a call took {est:.3g} ms > {opts.abandon_factor:g} x best {best_ms:.3g} ms")
        ms = timing.median_ms(fn, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, grad_to_none=grads)
        timing.reset_grads(grads)
        return Trial(name, cfg, "ok", ms, f"max err {verdict.error:.3g} (allowed {verdict.allowed:.3g})")
    except Exception as e:  # a config that fails to compile or launch is a result, not a crash
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if not timing.context_alive(device):
            raise ContextLost(name, f"{type(e).__name__}: {msg}") from e
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for t in (q, k, v):
            t.grad = None
        return Trial(name, cfg, "error", note=f"{type(e).__name__}: {msg}")


# --- the sweep ---------------------------------------------------------------------------------


class State:
    """Finished buckets on disk, rewritten atomically after each one."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.results: dict[str, BucketResult] = {}

    @staticmethod
    def load(path: str) -> "State":
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.get("schema") != STATE_SCHEMA:
            raise ValueError(f"--resume: {path} has state schema {raw.get('schema')!r}, expected {STATE_SCHEMA}")
        st = State(path, raw.get("meta", {}))
        st.results = {d["id"]: BucketResult.from_json(d) for d in raw.get("results", [])}
        return st

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"schema": STATE_SCHEMA, "meta": self.meta,
                       "results": [r.to_json() for r in self.results.values()]}, f, indent=1, default=str)
        os.replace(tmp, self.path)


class _Progress:
    """rich progress bar on a terminal; a log line per bucket with the time left, always."""

    def __init__(self, total: int, done: int) -> None:
        self.total, self.done = total, done
        self.t0 = time.perf_counter()
        self.measured = 0
        self._bar: Any = None
        self._task: Any = None
        if sys.stderr.isatty():
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                     transient=False)
                self._task = self._bar.add_task("tune", total=total, completed=done)
            except ImportError:
                self._bar = None

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def start(self, s: Shape) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=s.label[:40])

    def finish(self, r: BucketResult) -> str:
        self.done += 1
        self.measured += 1
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.measured * (self.total - self.done)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
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


def select_implementations(backends: Sequence[str] | None, exclude: Sequence[str], device: torch.device
                           ) -> dict[str, Implementation]:
    """Registry implementations named by --backends (families or variants; default: all that can
    run on this device), minus --exclude, minus GPU_DEFAULT_EXCLUDE on a GPU unless named
    explicitly."""
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
            log.info("left out (cannot run on this %s): %s", dev.kind, ", ".join(left_out))
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
) -> tuple[list[BucketResult], bool]:
    """Measure the buckets of `plan` not yet in `state`; returns (results in plan order, complete)."""
    seed = opts.seed if opts.seed is not None else int.from_bytes(os.urandom(4), "little")
    log.info("random seed %d (pass --seed %d to repeat)", seed, seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    grad_cache = GradCache()
    todo = [s for s in plan if bucket_id(s) not in state.results]
    if len(todo) < len(plan):
        log.info("resuming: %d of %d buckets already measured in %s", len(plan) - len(todo), len(plan), state.path)
    t0 = time.perf_counter()
    complete = True
    with _Progress(len(plan), len(plan) - len(todo)) as prog:
        for i, s in enumerate(todo):
            # at least one bucket per run, so that a resumed run always makes progress
            if i and time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                log.warning("time budget of %.0f s spent: %d buckets left for --resume", time_budget_s,
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


def csv_ints(arg: str) -> Any:
    def parse(text: str) -> list[int]:
        try:
            return [int(t) for t in csv_list(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arg}: expected comma-separated integers, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="flashdispatch tune",
        description="Measure every available backend (and each config of our kernels) on problem "
        "buckets, check each against a float64 reference, and write <key>.yaml.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="GPU: the bf16 benchmark shapes only, shorter timing, at most "
                         f"{QUICK_MAX_CONFIGS} configs per backend (minutes on an H100); CPU: the CPU-sized "
                         "shapes (about a minute on 2 cores)")
    ap.add_argument("--shapes", choices=sorted(shape_lists.NAMED), default=None,
                    help="named bucket list: " + "; ".join(f"{k}: {v}" for k, v in shape_lists.NAMED.items())
                    + " (default on a GPU: quick with --quick, else full; on a CPU: cpu)")
    ap.add_argument("--device", default=None, help="torch device to measure on (default: cuda if present, else cpu)")
    ap.add_argument("--profile-key", default=None,
                    help="device key written into the profile (default: detected, e.g. h100)")
    ap.add_argument("--out", default=None,
                    help="profile file or directory (default: $FLASHDISPATCH_PROFILE_DIR or the current "
                         "directory, as <key>.yaml)")
    ap.add_argument("--state", default=None, help="state file (default: <out>.state.json)")
    ap.add_argument("--resume", action="store_true", help="keep the buckets already in the state file")
    ap.add_argument("--backends", type=csv_list, default=None,
                    help="comma-separated families or variants to measure (default: all available; "
                         f"on GPUs without {', '.join(GPU_DEFAULT_EXCLUDE)})")
    ap.add_argument("--exclude", type=csv_list, default=[], help="comma-separated backends to leave out")
    ap.add_argument("--dtypes", type=csv_list, default=None, help="e.g. bf16,fp16")
    ap.add_argument("--head-dims", type=csv_ints("--head-dims"), default=None, help="e.g. 64,128")
    ap.add_argument("--passes", type=csv_list, default=None, help="subset of fwd,fwd_bwd,decode")
    ap.add_argument("--seqlens", type=csv_ints("--seqlens"), default=None, help="keep buckets with these Sk")
    ap.add_argument("--causal", choices=("true", "false", "both"), default="both")
    ap.add_argument("--max-configs", type=int, default=None, help="configs per backend per bucket (default: all)")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop starting buckets after this long; the profile holds what finished")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
    ap.add_argument("--list", action="store_true", help="print the buckets and candidates, measure nothing")
    return ap


def _plan(args: argparse.Namespace, device: torch.device) -> list[Shape]:
    name = args.shapes or ("cpu" if device.type != "cuda" else "quick" if args.quick else "full")
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
    out = args.out
    if out is None:
        out = envs.FLASHDISPATCH_PROFILE_DIR.read() or "."
    if os.path.isdir(out) or out.endswith(os.sep):
        os.makedirs(out, exist_ok=True)
        return os.path.join(out, f"{key}.yaml")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    return out


def _print_list(plan: Sequence[Shape], impls: dict[str, Implementation], device: torch.device, max_configs: int | None) -> None:
    dev = device_info(device)
    for s in plan:
        # meta tensors: no memory, and the same Problem attention() would build
        dtype = DTYPES_BY_NAME[s.dtype]
        q = torch.empty(s.batch, s.heads_q, s.seqlen_q, s.head_dim, dtype=dtype, device="meta")
        k = torch.empty(s.batch, s.heads_kv, s.seqlen_k, s.head_dim, dtype=dtype, device="meta")
        p = problem_from_tensors(q, k, k, causal=s.causal, scale=None, layout="bhsd", return_lse=False)
        p = p._replace(device_kind=dev.kind, needs_grad=s.needs_grad)
        cands = []
        for n, impl in impls.items():
            if impl.availability() is None and not impl.not_supported_reasons(p, dev):
                cands.append(f"{n} x{len(candidate_configs(impl, p, dev, max_configs))}")
        print(f"{s.label:48s} {flow(bucket_match(s)):90s} {', '.join(cands) or '(none)'}")


@contextlib.contextmanager
def _interrupt_note(state_path: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        log.warning("interrupted: finished buckets are saved in %s; continue with --resume", state_path)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        device = parse_device(args.device)
        plan = _plan(args, device)
        impls = select_implementations(args.backends, args.exclude, device)
    except ValueError as e:
        return user_error("flashdispatch tune", e)
    if not plan:
        print("flashdispatch tune: error: no bucket left after the filters", file=sys.stderr)
        return 2
    max_configs = args.max_configs if args.max_configs is not None else (QUICK_MAX_CONFIGS if args.quick else None)
    if args.list:
        _print_list(plan, impls, device, max_configs)
        return 0
    timing_defaults = QUICK_TIMING if args.quick else FULL_TIMING
    opts = TuneOptions(
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else timing_defaults["warmup_ms"],
        rep_ms=args.rep_ms if args.rep_ms is not None else timing_defaults["rep_ms"],
        max_configs=max_configs, seed=args.seed,
    )
    dev = device_info(device)
    key = args.profile_key or dev.profile_key or dev.arch
    out_path = _out_path(args, key)
    state_path = args.state or out_path + ".state.json"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else dev.name
    command = "flashdispatch tune " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    meta = {"key": key, "card": card, "arch": dev.arch, "command": command}
    if args.resume and os.path.exists(state_path):
        state = State.load(state_path)
        if state.meta.get("card") != card:
            print(f"flashdispatch tune: error: --resume: {state_path} was measured on {state.meta.get('card')!r}, "
                  f"this is {card!r}; start afresh without --resume", file=sys.stderr)
            return 2
    else:
        if args.resume:
            log.info("--resume: no state file at %s; starting afresh", state_path)
        state = State(state_path, meta)
    for name in state.meta.get("excluded", []):
        if impls.pop(name, None) is not None:
            log.warning("leaving out %s: %s", name, state.meta.get("excluded_why", {}).get(name, "broke the CUDA context"))
    log.info("tuning %d buckets on %s over %s -> %s", len(plan), dev.describe(), ", ".join(impls), out_path)
    if device.type != "cuda":
        log.info("on a CPU this ranks torch's CPU attention kernels for this machine (%s.yaml); profiles for GPUs "
                 "come from running tune on the GPU", key)
    pm = ProfileMeta(
        key=key, name=dev.name if dev.kind != "cpu" else "CPU", arch=dev.arch, card=card, command=command,
        timing=(f"triton.testing.do_bench median, warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms, "
                "L2 flushed before each" if device.type == "cuda" else
                f"perf_counter median, warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms"),
    )

    def write(results: list[BucketResult], complete: bool) -> bool:
        note = "" if complete else f"partial: {len(results)} of {len(plan)} buckets measured (continue with --resume)"
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
            # the profile is rewritten after every bucket: a killed run still leaves a usable file
            results, complete = run_tune(plan, impls, device, opts, state, time_budget_s=args.time_budget,
                                         on_bucket=lambda rs: write(rs, len(rs) == len(plan)))
    except KeyboardInterrupt:
        return 130
    except ContextLost as e:
        done = [state.results[bucket_id(x)] for x in plan if bucket_id(x) in state.results]
        write(done, False)
        log.error("%s; %d buckets are saved: rerun with --resume to go on without it", e, len(done))
        return EXIT_RESUME
    if not write(results, complete):
        return 1
    log.info("wrote %s (%d entries%s)", out_path, sum(1 for r in results if r.ranking()),
             "" if complete else ", partial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
