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
import datetime as _dt
import importlib.metadata
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from flashdispatch import envs
from flashdispatch.backend import Implementation
from flashdispatch.device import DeviceInfo, real_device, simulated_device
from flashdispatch.problem import DTYPES_BY_NAME, Problem, problem_from_shape, problem_from_tensors
from flashdispatch.profile_store import SCHEMA_VERSION, parse_profile, problem_pass
from flashdispatch.registry import REGISTRY

from . import shapes as shape_lists
from . import timing, verify
from .shapes import Shape

log = logging.getLogger("flashdispatch.tools.tune")

TOOL = "flashdispatch tune"
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


# --- results ----------------------------------------------------------------------------------


@dataclass
class Trial:
    """One (implementation, config) on one bucket."""

    name: str
    config: dict[str, Any]
    status: str  # "ok" | "abandoned" | "wrong" | "error"
    ms: float | None = None
    note: str = ""


@dataclass
class BucketResult:
    id: str
    shape: Shape
    match: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it cannot serve
    seconds: float = 0.0

    def best(self) -> dict[str, Trial]:
        """Fastest timed config per implementation."""
        out: dict[str, Trial] = {}
        for t in self.trials:
            if t.ms is None or t.status not in ("ok", "abandoned"):
                continue
            if t.name not in out or t.ms < out[t.name].ms:  # type: ignore[operator]
                out[t.name] = t
        return out

    def ranking(self) -> list[str]:
        """Fastest measured first: the dispatcher's rule."""
        return [n for n, _ in sorted(self.best().items(), key=lambda kv: (kv[1].ms, kv[0]))]

    def rejected(self) -> dict[str, str]:
        """Implementations with no config that passed the check, and why."""
        best = self.best()
        out: dict[str, str] = {}
        for t in self.trials:
            if t.name not in best and t.status in ("wrong", "error"):
                out.setdefault(t.name, f"{t.status}: {t.note}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = self.shape._asdict()
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "BucketResult":
        return BucketResult(
            id=d["id"], shape=Shape(**d["shape"]), match=d["match"],
            trials=[Trial(**t) for t in d.get("trials", [])], skipped=dict(d.get("skipped", {})),
            seconds=float(d.get("seconds", 0.0)),
        )


def bucket_match(s: Shape) -> dict[str, Any]:
    """The profile match keys of a shape, as the dispatcher's lookup reads them."""
    causal = s.causal and s.seqlen_q > 1  # Problem.effective_causal
    m: dict[str, Any] = {
        "dtype": s.dtype, "head_dim": s.head_dim, "causal": causal,
        "gqa": s.heads_q // s.heads_kv, "pass": s.pass_, "seqlen": s.seqlen_k,
    }
    if s.seqlen_q != s.seqlen_k:
        m["seqlen_q"] = s.seqlen_q
    if s.pass_ == "decode":
        m["batch"] = s.batch  # split-KV vs not depends on how many sequences fill the GPU
    return m


def bucket_id(s: Shape) -> str:
    return f"{s.label}|" + ",".join(str(x) for x in s.dims) + f"|{s.dtype}|{int(s.causal)}|{s.pass_}"


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


class _GradCache:
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
    grad_cache: _GradCache | None = None,
) -> BucketResult:
    """Check, then time, every (implementation, config) that can serve shape s."""
    t_start = time.perf_counter()
    dev = device_info(device)
    q, k, v, do, p = make_inputs(s, device, gen)
    res = BucketResult(bucket_id(s), s, bucket_match(s))
    blocks = verify.reference_blocks(q, k, v, p)
    out_bytes = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v * q.element_size()
    grad_cache = grad_cache or _GradCache()
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
    opts: TuneOptions, best_ms: float, grad_cache: _GradCache, gen: torch.Generator,
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
        timing._reset_grads(grads)
        est = timing.single_ms(fn, device)
        timing._reset_grads(grads)
        if est > opts.abandon_factor * best_ms:
            return Trial(name, cfg, "abandoned", est,
                         f"one call took {est:.3g} ms > {opts.abandon_factor:g} x best {best_ms:.3g} ms")
        ms = timing.median_ms(fn, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, grad_to_none=grads)
        timing._reset_grads(grads)
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


# --- provenance and the profile file ------------------------------------------------------------


def versions() -> dict[str, str]:
    out: dict[str, str] = {"torch": torch.__version__.split("+")[0]}
    for label, dists in (("triton", ("triton",)), ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy"))):
        out[label] = "not installed"
        for dist in dists:
            try:
                out[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    if torch.version.hip:
        out["hip"] = str(torch.version.hip)
    return out


@dataclass
class ProfileMeta:
    key: str
    name: str
    arch: str
    card: str
    command: str
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())
    measured: bool = True
    timing: str = ""
    versions: dict[str, str] = field(default_factory=versions)
    header: str = ""  # comment lines for the top of the file (without '# ')
    tool: str = TOOL


_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if x is None:
        return "null"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return json.dumps(str(x))
        text = repr(float(f"{x:.4g}"))
        mant, e, exp = text.partition("e")
        # YAML 1.1 (PyYAML) reads 1e-07 as a string: the mantissa needs a dot
        return f"{mant if '.' in mant else mant + '.0'}{e}{exp}"
    s = str(x)
    if _BARE.match(s) and s.lower() not in _YAML_WORDS:
        return s
    return json.dumps(s)


def _flow(x: Any) -> str:
    """One-line YAML (a subset of JSON plus bare words) that yaml.safe_load reads back."""
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in x) + "]"
    return _scalar(x)


def profile_yaml(results: Sequence[BucketResult], meta: ProfileMeta, *, note: str = "") -> str:
    lines = [f"# {ln}".rstrip() for ln in meta.header.splitlines()] if meta.header else []
    if not lines:
        lines = [
            f"# flashdispatch profile for {meta.card} ({meta.key}), written by `{TOOL}` on {meta.date}.",
            f"# command: {meta.command}",
            "# Per entry: the bucket the dispatcher matches on (same dtype, head_dim, causal, pass; nearest",
            "# gqa, then nearest seqlen/seqlen_q/batch on a log scale), the shape measured, every candidate",
            "# that passed the float64 check ranked fastest first with its median ms, the best config of",
            "# each tuned backend, and why the others were rejected. Regenerate: flashdispatch tune --help.",
        ]
    gen = {"date": meta.date, "tool": meta.tool, "card": meta.card, "command": meta.command, **meta.versions}
    if meta.timing:
        gen["timing"] = meta.timing
    lines += [
        f"schema: {SCHEMA_VERSION}",
        "device: " + _flow({"key": meta.key, "name": meta.name, "arch": meta.arch}),
        "generated: " + _flow(gen),
        f"measured: {_scalar(meta.measured)}",
    ]
    if note:
        lines.append("note: " + _scalar(note))
    lines.append("entries:" if results else "entries: []")
    for r in results:
        ranking = r.ranking()
        if not ranking:
            lines.append(f"  # {r.shape.describe()}: no candidate passed; " + _flow(r.rejected()))
            continue
        best = r.best()
        s = r.shape
        lines.append("  - match: " + _flow(r.match))
        lines.append("    shape: " + _flow({"B": s.batch, "Hq": s.heads_q, "Hkv": s.heads_kv,
                                            "Sq": s.seqlen_q, "Sk": s.seqlen_k, "D": s.head_dim}))
        lines.append("    ranking: " + _flow(ranking))
        if meta.measured:
            lines.append("    ms: " + _flow({n: best[n].ms for n in ranking}))
        cfgs = {n: best[n].config for n in ranking if best[n].config}
        if cfgs:
            lines.append("    config:")
            lines += [f"      {_scalar(n)}: {_flow(c)}" for n, c in cfgs.items()]
        rej = r.rejected()
        if rej:
            lines.append("    rejected: " + _flow(rej))
    return "\n".join(lines) + "\n"


def unmeasured_profile(key: str, header: str, rank: Callable[[Shape], Sequence[str]], plan: Sequence[Shape],
                       command: str) -> str:
    """A profile for a device we cannot measure: rankings from an argued rule, no ms.

    Each entry ranks the implementations `rank(shape)` names that can serve the shape on the
    (simulated) device, with each one's default config for that device, so that what the file
    can select is what the compile checks (tools/aot_triton.py, tools/nvcc_check.py) verify.
    """
    dev = simulated_device(key)
    impls = REGISTRY.all()
    results = []
    for s in plan:
        p = problem_from_shape(s.dims, dtype=s.dtype, device_kind=dev.kind, causal=s.causal, needs_grad=s.needs_grad)
        trials = []
        for i, name in enumerate(rank(s)):
            impl = impls.get(name)
            if impl is None or impl.not_supported_reasons(p, dev):
                continue
            trials.append(Trial(name, dict(impl.default_config(p, dev)), "ok", float(i)))  # ms: order only
        results.append(BucketResult(bucket_id(s), s, bucket_match(s), trials))
    meta = ProfileMeta(key=key, name=dev.name, arch=dev.arch, card=f"{dev.name} (not measured)", command=command,
                       measured=False, header=header, versions={}, tool="flashdispatch.tools.figures")
    return profile_yaml(results, meta)


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


def select_implementations(backends: Sequence[str] | None, exclude: Sequence[str], device: torch.device
                           ) -> dict[str, Implementation]:
    """Registry implementations named by --backends (families or variants; default: all), minus
    --exclude, minus GPU_DEFAULT_EXCLUDE on a GPU unless named explicitly."""
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
        chosen = list(all_impls)
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
    grad_cache = _GradCache()
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


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _csv_ints(arg: str) -> Any:
    def parse(text: str) -> list[int]:
        try:
            return [int(t) for t in _csv(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{arg}: expected comma-separated integers, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flashdispatch tune",
        description="Measure every available backend (and each config of our kernels) on problem "
        "buckets, check each against a float64 reference, and write <key>.yaml.",
    )
    ap.add_argument("--quick", action="store_true",
                    help="the bf16 benchmark shapes only, shorter timing, at most "
                         f"{QUICK_MAX_CONFIGS} configs per backend (minutes on an H100)")
    ap.add_argument("--shapes", choices=sorted(shape_lists.NAMED), default=None,
                    help="named bucket list (default: quick with --quick, else full)")
    ap.add_argument("--device", default=None, help="torch device to measure on (default: cuda if present, else cpu)")
    ap.add_argument("--profile-key", default=None,
                    help="device key written into the profile (default: detected, e.g. h100)")
    ap.add_argument("--out", default=None,
                    help="profile file or directory (default: $FLASHDISPATCH_PROFILE_DIR or the current "
                         "directory, as <key>.yaml)")
    ap.add_argument("--state", default=None, help="state file (default: <out>.state.json)")
    ap.add_argument("--resume", action="store_true", help="keep the buckets already in the state file")
    ap.add_argument("--backends", type=_csv, default=None,
                    help="comma-separated families or variants to measure (default: all available; "
                         f"on GPUs without {', '.join(GPU_DEFAULT_EXCLUDE)})")
    ap.add_argument("--exclude", type=_csv, default=[], help="comma-separated backends to leave out")
    ap.add_argument("--dtypes", type=_csv, default=None, help="e.g. bf16,fp16")
    ap.add_argument("--head-dims", type=_csv_ints("--head-dims"), default=None, help="e.g. 64,128")
    ap.add_argument("--passes", type=_csv, default=None, help="subset of fwd,fwd_bwd,decode")
    ap.add_argument("--seqlens", type=_csv_ints("--seqlens"), default=None, help="keep buckets with these Sk")
    ap.add_argument("--causal", choices=("true", "false", "both"), default="both")
    ap.add_argument("--max-configs", type=int, default=None, help="configs per backend per bucket (default: all)")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop starting buckets after this long; the profile holds what finished")
    ap.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
    ap.add_argument("--list", action="store_true", help="print the buckets and candidates, measure nothing")
    return ap


def _plan(args: argparse.Namespace) -> list[Shape]:
    name = args.shapes or ("quick" if args.quick else "full")
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
        print(f"{s.label:48s} {_flow(bucket_match(s)):90s} {', '.join(cands) or '(none)'}")


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
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device: expected a device this machine has, got {args.device!r} (no CUDA)")
        plan = _plan(args)
        impls = select_implementations(args.backends, args.exclude, device)
    except ValueError as e:
        print(f"flashdispatch tune: {e}", file=sys.stderr)
        return 2
    if not plan:
        print("flashdispatch tune: no bucket left after the filters", file=sys.stderr)
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
            print(f"flashdispatch tune: --resume: {state_path} was measured on {state.meta.get('card')!r}, "
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
    pm = ProfileMeta(
        key=key, name=dev.name if dev.kind != "cpu" else "CPU", arch=dev.arch, card=card, command=command,
        timing=(f"triton.testing.do_bench median, warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms, "
                "L2 flushed before each" if device.type == "cuda" else
                f"perf_counter median, warm-up {opts.warmup_ms:g} ms, repetitions {opts.rep_ms:g} ms"),
    )

    def write(results: list[BucketResult], complete: bool) -> None:
        note = "" if complete else f"partial: {len(results)} of {len(plan)} buckets measured (continue with --resume)"
        text = profile_yaml(results, pm, note=note)
        parse_profile(text, out_path)  # never write a file the dispatcher would reject
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out_path)

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
    write(results, complete)
    log.info("wrote %s (%d entries%s)", out_path, sum(1 for r in results if r.ranking()),
             "" if complete else ", partial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
