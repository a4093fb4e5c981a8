"""Autotune on first use: measure a problem the cost model is unsure of, once, on the call's own inputs.

Opt-in, like torch.backends.cudnn.benchmark: FLASHDISPATCH_AUTOTUNE=1 (dispatch/envs.py). Then the
first eager call of a forward problem whose decision is unsure (`Decision.uncertain`: a borrowed,
estimated or extrapolated model, a close call, a faster prediction from a model that misses its own
points, no model; or no profile at all on a GPU) does this,
once per problem and process, before its plan is cached:

1. Times every eligible implementation on the call's inputs (each call makes its own output; the
   inputs are never replaced by zeros), interleaved, median per implementation, within BUDGET_S
   (200 ms) for the whole problem, warm-up and checks included. An implementation whose predicted
   time or first call exceeds its share of the budget (BUDGET_S / candidates) is skipped; a call is
   started only while its last duration still fits before the deadline, so the bound is exceeded
   by at most one call.
2. Checks every output before it may count: flash-attention's budget (dispatch/tolerances.py) on a
   sample of rows against a float64 reference (the last rows of the first batch entry and kv
   group), and the whole output against plain SDPA's within that budget plus SDPA's own error. An
   implementation that fails is logged and never recorded.
3. Records the measured point (every passing implementation's median ms, and its config) in
   `<profile dir>/<device key>.autotune.yaml` (schema 2; FLASHDISPATCH_PROFILE_DIR, else the per-user
   cache directory: `envs.Settings.autotune_dir`): read, merge and write under an fcntl lock, the
   write atomic (a temporary file and os.replace), so processes that autotune at once all keep
   their points. Then the in-memory profile takes the point (its group refitted), the cached
   decisions and plans of that group are dropped, and the call is decided again.

With autotune on, the overlay is merged into the device's profile when the profile loads (same
group: points added and the group refitted; a new group: added). A problem measured exactly is
decided from its measured times (`measured_ranking`, called by selection), the source reading
`autotune:<file>#<group> <point>`; every other problem of the group from the refitted model.
A corrupt overlay is logged and ignored. Never during torch.compile tracing, CUDA-graph capture
or with a forced backend: there the model's decision stands.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import yaml

from . import envs
from .costmodel import Group, GroupKey, Point, group_key, point_problem
from .device import ARCH_FAMILY, DEVICE_TABLE, DeviceInfo
from .problem import Problem
from .profile_store import Profile, flow, load_profile, parse_profile, profile_yaml_text
from .reference import attention_math
from .registry import REGISTRY
from .tolerances import budget as error_budget, max_abs_err

if TYPE_CHECKING:
    from .selection import Decision, _Ranking

log = logging.getLogger("flashdispatch")

# All the time autotune may take for one problem: warm-up calls, timed calls and output checks.
BUDGET_S = 0.2
# Timed calls per implementation at most (small problems stop here, long before the budget).
MAX_REPS = 15
# Rows of the float64 reference sample (the last rows of batch entry 0, kv head 0's query heads).
SAMPLE_ROWS = 32
OVERLAY_SUFFIX = ".autotune.yaml"
# Autotune runs of this process, oldest first (explain and tests read them), at most this many.
HISTORY_MAX = 256
history: list["Report"] = []
# Problems this process has autotuned or decided not to (never twice, even after a failure).
_attempted: set[tuple[Any, ...]] = set()
_attempted_lock = threading.Lock()
# One measurement at a time in a process: two threads timing at once on one GPU would each count
# the other's kernels. A thread that finds it taken keeps the model's decision.
_measure_lock = threading.Lock()
# Classes that serving runs inside CUDA graphs: their time is a graph replay's (the tuner's),
# which an eager measurement on the first call would misstate.
GRAPH_TIMED_CLASSES: frozenset[str] = frozenset({"decode", "speculative"})
# Seconds to wait between reading and writing the overlay inside the lock (tests widen the window
# in which two processes that did not lock would lose a point).
_merge_delay_s = 0.0


def overlay_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}{OVERLAY_SUFFIX}")


# --- the identity of a measured problem ---------------------------------------------------------

Ident = tuple[GroupKey, tuple[int, int, int, int, int], int]


def ident(p: Problem) -> Ident | None:
    """(group, B Hq Hkv Sq Sk, window) of `p` as a profile point holds it; None when a point cannot
    describe it (a window that a point's single `window` number does not give back, or a value
    head dim other than the head dim: a group is keyed by one)."""
    if p.head_dim_v != p.head_dim:
        return None
    k = group_key(p)
    w = p.window[0] if p.has_window else -1
    pt = Point(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, w)
    if p.has_window and point_problem(k, pt).window != p.window:
        return None
    return k, pt.dims(), w


def _point_ident(k: GroupKey, pt: Point) -> Ident:
    return k, pt.dims(), pt.window


@dataclass
class Overlay:
    """The autotuned points merged into a profile, and the file they came from (or go to)."""

    path: str
    points: dict[Ident, Point] = field(default_factory=dict)
    # implementations the accuracy check refused on a problem: name -> why (never a winner there)
    rejected: dict[Ident, dict[str, str]] = field(default_factory=dict)


def overlay_of(prof: Profile | None) -> Overlay | None:
    return None if prof is None else prof.overlay


def _attach(prof: Profile, path: str) -> Overlay:
    if prof.overlay is None:
        prof.overlay = Overlay(path)
    return prof.overlay


def _merge_points(prof: Profile, items: list[tuple[GroupKey, Point]], path: str,
                  rejected: Mapping[Ident, Mapping[str, str]] | None = None) -> None:
    """Add autotuned points to `prof` (a point with the same dims takes the new times over the
    old ones) and refit the groups they land in; `rejected`: the accuracy check's refusals."""
    ov = _attach(prof, path)
    for i, names in (rejected or {}).items():
        ov.rejected[i] = {**ov.rejected.get(i, {}), **names}
    changed: dict[GroupKey, Group] = {}
    for k, pt in items:
        g = prof.group(k)
        if g is None:
            g = Group(k, [])
            prof.groups.append(g)
        g.add(pt)
        i = _point_ident(k, pt)
        old_pt = ov.points.get(i)
        ov.points[i] = pt if old_pt is None else old_pt.updated_by(pt)
        for name in pt.ms:  # measured and passing now: no longer refused
            ov.rejected.get(i, {}).pop(name, None)
        changed[k] = g
    for g in changed.values():
        g.refit(prof.sm_count)
    prof.models_changed()


REJECTED_FIELDS: tuple[str, ...] = ("pass", "class", "variant", "dtype", "head_dim", "B", "Hq", "Hkv", "Sq", "Sk",
                                    "window", "name", "why")


def _read_overlay(path: str, key: str) -> tuple[Profile, dict[Ident, dict[str, str]]] | None:
    """The overlay file's profile and its `rejected` list, or None (no file; or corrupt: logged,
    never raised)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ov = parse_profile(text, path)
        if ov.key != key:
            raise ValueError(f"device.key is {ov.key!r}, expected {key!r}")
        rejected: dict[Ident, dict[str, str]] = {}
        for j, r in enumerate(yaml.safe_load(text).get("rejected") or []):
            if not isinstance(r, dict) or sorted(r) != sorted(REJECTED_FIELDS):
                raise ValueError(f"rejected[{j}] must be a mapping of exactly {list(REJECTED_FIELDS)}, got {r!r}")
            gk = GroupKey(r["pass"], r["class"], r["variant"], r["dtype"], int(r["head_dim"]))
            dims = tuple(int(r[d]) for d in ("B", "Hq", "Hkv", "Sq", "Sk"))
            rejected.setdefault((gk, dims, int(r["window"])), {})[str(r["name"])] = str(r["why"])  # type: ignore[index]
        return ov, rejected
    except Exception as e:  # a corrupt overlay never breaks attention()
        log.warning("autotune overlay %s is not valid (%s); ignoring it", path, e)
        return None


def _rejected_yaml(rejected: Mapping[Ident, Mapping[str, str]]) -> list[str]:
    rows = []
    for (gk, dims, w), names in rejected.items():
        for name, why in names.items():
            rows.append("  - " + flow({"pass": gk.pass_, "class": gk.cls, "variant": gk.variant, "dtype": gk.dtype,
                                       "head_dim": gk.head_dim, **dict(zip(("B", "Hq", "Hkv", "Sq", "Sk"), dims)),
                                       "window": w, "name": name, "why": why}))
    if not rows:
        return []
    return ["# implementations autotune's accuracy check refused on a problem (never recorded as winners)",
            "rejected:"] + rows


def with_overlay(key: str | None, prof: Profile | None, problems: list[str],
                 settings: envs.Settings) -> tuple[Profile | None, list[str]]:
    """The profile for `key` with this device's autotune overlay merged in (selection calls it
    when a profile loads with autotune on). Without a profile of its own, the overlay joins the
    profile of the device's architecture family, else stands alone."""
    if key is None:
        return prof, problems
    path = overlay_path(settings.autotune_dir, key)
    read = _read_overlay(path, key)
    if read is None:
        if os.path.isfile(path):
            problems = problems + [f"autotune overlay {path} is not valid: ignored (see the warning logged)"]
        return prof, problems
    ov, rejected = read
    if prof is None:
        arch = next((d.arch for d in DEVICE_TABLE if d.key == key), None)
        family = ARCH_FAMILY.get(arch or "")
        if family is not None and family != key:
            prof, more = load_profile(family, settings.profile_dir)
            problems = problems + more
            if prof is not None:
                problems.append(f"no profile for {key!r}: using {family!r} (same architecture {arch}) "
                                f"with the autotuned points of {path}")
        if prof is None:
            ov.groups, items = [], [(g.key, pt) for g in ov.groups for pt in g.points]
            _merge_points(ov, items, path, rejected)
            return ov, problems
    _merge_points(prof, [(g.key, pt) for g in ov.groups for pt in g.points], path, rejected)
    return prof, problems


# --- deciding from a measured point (selection's hook) -----------------------------------------


def measured_ranking(p: Problem, dev: DeviceInfo, eligible: list[str], prof: Profile,
                     model_rank: "_Ranking") -> "_Ranking | None":
    """The eligible implementations ordered by the times autotune measured on exactly this problem,
    or None when it has not measured it. Plain SDPA keeps its place unless beaten by the
    selection's baseline margin; implementations it did not measure follow in the model's order."""
    ov = overlay_of(prof)
    if ov is None or not ov.points:
        return None
    i = ident(p)
    pt = ov.points.get(i) if i is not None else None
    if pt is None:
        return None
    measured = sorted((n for n in eligible if n in pt.ms), key=lambda n: (pt.ms[n], n))
    if not measured:
        return None
    from .selection import BASELINE, _Ranking, baseline_margin

    refused = ov.rejected.get(i, {}) if i is not None else {}
    rest = [n for n in model_rank.ordered if n not in measured and n not in refused]
    r = _Ranking(measured + rest + [n for n in model_rank.ordered if n in refused and n not in measured])
    top = measured[0]
    need = baseline_margin(name=top)  # measured on this very problem: no fit error to add
    if top != BASELINE and BASELINE in pt.ms and BASELINE in measured and pt.ms[top] > pt.ms[BASELINE] * (1.0 - need):
        r.notes.append(f"{top} measured {pt.ms[top]:.4g} ms and plain sdpa {pt.ms[BASELINE]:.4g} ms, less than "
                       f"{need:.0%} apart: plain SDPA, the baseline, runs")
        r.ordered.remove(BASELINE)
        r.ordered.insert(0, BASELINE)
    chosen = r.ordered[0]
    k = group_key(p)
    r.group = prof.group(k)
    r.source = f"autotune:{ov.path}#{k.label()} {pt.describe()}"
    r.predicted = {n: pt.ms[n] for n in measured}
    r.predictions = list(model_rank.predictions)
    others = [pt.ms[n] for n in measured if n != chosen]
    if chosen in pt.ms and others:
        r.margin = min(others) / pt.ms[chosen] - 1.0
    r.notes.insert(0, "autotuned: measured on this problem on its first call (FLASHDISPATCH_AUTOTUNE=1): "
                   + ", ".join(f"{n}={pt.ms[n]:.4g} ms" for n in measured))
    for n, why in refused.items():
        if n in eligible:
            r.notes.append(f"{n} failed autotune's accuracy check on this problem ({why}): last")
    if model_rank.uncertain:
        r.notes.append(f"the cost model alone chose {model_rank.ordered[0]} and was unsure: {model_rank.uncertain}")
    # an implementation autotune could not time (over its share of the budget: a compile, say)
    # that the model predicts faster than the measured choice leaves the decision unsure: the next
    # process measures again (warm by then, as a rule)
    best = pt.ms.get(chosen)
    promising = [n for n in rest if best is not None and model_rank.predicted.get(n, math.inf) < best]
    if promising:
        r.uncertain = (f"autotune did not time {', '.join(promising)}, predicted faster than the measured "
                       f"{chosen} ({best:.4g} ms)")
    return r


# --- the first call of an unsure problem (the plan cache's hook) ------------------------------


@dataclass
class Report:
    """What one autotune run did."""

    key: str
    group: GroupKey
    dims: tuple[int, ...]
    elapsed_s: float = 0.0
    measured: dict[str, float] = field(default_factory=dict)  # median ms of each passing implementation
    reps: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    longest_step_s: float = 0.0  # the longest single call, check or reference (the bound may be exceeded by one)
    path: str | None = None  # the overlay written, None when nothing was recorded
    reason: str = ""  # why nothing was recorded

    def describe(self) -> str:
        parts = [f"autotune {self.group.label()} B,Hq,Hkv,Sq,Sk={self.dims}: {self.elapsed_s * 1e3:.1f} ms"]
        if self.measured:
            parts.append("measured " + ", ".join(f"{n}={ms:.4g} ms ({self.reps[n]}x)" for n, ms in self.measured.items()))
        for n, why in self.skipped.items():
            parts.append(f"{n} skipped: {why}")
        for n, why in self.failed.items():
            parts.append(f"{n} FAILED the accuracy check: {why}")
        parts.append(f"recorded in {self.path}" if self.path else f"nothing recorded: {self.reason}")
        return "; ".join(parts)


def unsure(d: "Decision") -> str:
    """Why autotune should measure this decision's problem ("" when it should not)."""
    if d.uncertain:
        return d.uncertain
    if d.profile is None and d.device.kind != "cpu":
        return "no profile for this device"
    return ""


def after_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, d: "Decision",
                 backend: str | None, sinks: torch.Tensor | None) -> "Decision":
    """The decision for the first call of `p` (plans.py calls it on a plan-cache miss): `d` itself,
    unless autotune is on, `d` is unsure and the problem may be measured here; then the decision
    after measuring."""
    from . import selection

    st = selection.state()
    if not st.settings.autotune:
        return d
    why = unsure(d)
    if not why or p.needs_grad or p.is_empty or group_key(p).cls in GRAPH_TIMED_CLASSES:
        return d
    if selection.current_forced(backend, st.settings)[0] is not None:
        return d
    # looked up at call time (tests replace them): the traced or captured call keeps the model's choice
    if torch.compiler.is_compiling():
        return d
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return d
    key = d.device.profile_key
    i = ident(p)
    if key is None or i is None or type(q) is not torch.Tensor:
        return d
    tag = (key, i, d.device.index)
    with _attempted_lock:
        if tag in _attempted:
            return d
        _attempted.add(tag)
    if not _measure_lock.acquire(blocking=False):
        return d
    try:
        rep = Report(key, i[0], i[1])
        try:
            pt = _measure(q, k, v, p, d, sinks, rep)
        except Exception as e:  # autotune must never break the call: the model's decision stands
            rep.reason = f"{type(e).__name__}: {e}"
            log.warning("autotune of %s failed (%s); the model's decision stands", p.describe(), rep.reason)
            pt = None
    finally:
        _measure_lock.release()
    if pt is not None:
        try:
            rep.path = write_point(st.settings.autotune_dir, d.device, key, i[0], pt, rep.failed)
        except Exception as e:  # an unwritable directory: keep the measurement for this process only
            rep.reason = f"could not write the overlay: {type(e).__name__}: {e}"
            log.warning("autotune: %s", rep.reason)
        _merge_in_memory(st, d.device, key, i[0], pt, rep.failed, rep.path is not None)
    history.append(rep)
    del history[:-HISTORY_MAX]
    log.info("%s (unsure: %s)", rep.describe(), why)
    if pt is None:
        return d
    return selection.select(p, backend)


def _bhsd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> tuple[torch.Tensor, ...]:
    """The tensors as attention() hands them to an implementation."""
    if not p.contiguous:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if p.layout == "bshd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


def _config(name: str, p: Problem, d: "Decision") -> dict[str, Any]:
    if name == d.variant:
        return dict(d.config)
    from .selection import implementation_config

    return implementation_config(p, name, d.device)


class _Checker:
    """flash-attention's error budget on a sample of rows (float64 reference, plain torch in the
    input dtype), then the whole output against the trusted one's (plain SDPA) within that budget
    plus the trusted one's own error on the sample."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem,
                 sinks: torch.Tensor | None) -> None:
        g = p.heads_q // p.heads_kv
        self.rows = min(SAMPLE_ROWS, p.seqlen_q)
        self.g = g
        qs, ks, vs = q[:1, :g, p.seqlen_q - self.rows:], k[:1, :1], v[:1, :1]
        # the last rows keep their bottom-right positions (i + Sk - Sq) in a problem of Sq = rows
        kw: dict[str, Any] = dict(causal=p.causal, scale=p.scale, window=p.window if p.has_window else None,
                                  softcap=p.softcap or None, sinks=None if sinks is None else sinks[:g])
        self.ref = attention_math(qs, ks, vs, upcast=True, **kw)[0]
        plain = attention_math(qs, ks, vs, upcast=False, **kw)[0]
        self.dtype = q.dtype
        self.allowed = error_budget(plain, self.ref, q.dtype)
        self.trusted: torch.Tensor | None = None
        self.trusted_err = 0.0

    def sample(self, out: torch.Tensor) -> torch.Tensor:
        return out[:1, :self.g, out.shape[2] - self.rows:]

    def check(self, name: str, out: torch.Tensor) -> str:
        """"" when `out` passes, else why not."""
        err = max_abs_err(self.sample(out), self.ref)
        if not err <= self.allowed:
            return f"sampled rows off the float64 reference by {err:.3g} (allowed {self.allowed:.3g})"
        if self.trusted is None:
            return ""
        t = self.trusted
        if not bool((torch.isfinite(out) | ~torch.isfinite(t)).all()):
            return "non-finite values where plain SDPA's output is finite"
        both = torch.isfinite(out) & torch.isfinite(t)
        diff = float((out.float() - t.float()).abs().masked_fill(~both, 0.0).max()) if out.numel() else 0.0
        limit = self.allowed + self.trusted_err
        if not diff <= limit:
            return f"off plain SDPA's output by {diff:.3g} (allowed {limit:.3g})"
        return ""

    def trust(self, out: torch.Tensor) -> None:
        self.trusted = out
        self.trusted_err = max_abs_err(self.sample(out), self.ref)


def _measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, d: "Decision",
             sinks: torch.Tensor | None, rep: Report) -> Point | None:
    """Time the eligible implementations (module docstring, steps 1 and 2); the point to record."""
    t0 = time.perf_counter()
    deadline = t0 + BUDGET_S
    cuda = q.is_cuda
    # q's device, not the current one: on cuda:1 with cuda:0 current, a sync and events of the
    # current device timed none of the calls
    sync = (lambda: torch.cuda.synchronize(q.device)) if cuda else (lambda: None)

    def finish(reason: str = "") -> None:
        rep.elapsed_s = time.perf_counter() - t0
        rep.reason = rep.reason or reason

    with torch.no_grad():
        q, k, v = _bhsd(q, k, v, p)
        if not (bool(q.any()) and bool(k.any()) and bool(v.any())):
            finish("an input is all zeros: nothing to time on (the next process measures it)")
            return None
        extras: Mapping[str, torch.Tensor] = {} if sinks is None else {"sinks": sinks}
        from .selection import BASELINE

        names = list(d.candidates)
        if BASELINE in names:  # the trusted output first
            names.remove(BASELINE)
            names.insert(0, BASELINE)
        share = BUDGET_S / max(1, len(names))
        t = time.perf_counter()
        checker = _Checker(q, k, v, p, sinks)
        rep.longest_step_s = time.perf_counter() - t
        active: dict[str, tuple[Any, dict[str, Any], float]] = {}  # name -> (impl, config, last call s)
        for name in names:
            if time.perf_counter() >= deadline:
                rep.skipped[name] = "the budget was spent before its first call"
                continue
            pred = d.predicted.get(name)
            if pred is not None and pred / 1e3 > share:
                rep.skipped[name] = f"predicted {pred:.4g} ms, over its share of the budget ({share * 1e3:.3g} ms)"
                continue
            impl = REGISTRY.get(name)
            cfg = _config(name, p, d)
            t = time.perf_counter()
            try:
                out = impl.run(q, k, v, p, cfg, extras)[0]
                sync()
            except Exception as e:
                rep.failed[name] = f"raised {type(e).__name__}: {e}"
                log.warning("autotune: %s raised on %s: %s: %s", name, p.describe(), type(e).__name__, e)
                continue
            first = time.perf_counter() - t
            rep.longest_step_s = max(rep.longest_step_s, first)
            if time.perf_counter() >= deadline:
                rep.skipped[name] = f"the budget ran out during its first call ({first * 1e3:.3g} ms)"
                continue
            t = time.perf_counter()
            bad = checker.check(name, out)
            rep.longest_step_s = max(rep.longest_step_s, time.perf_counter() - t)
            if bad:
                rep.failed[name] = bad
                log.warning("autotune: %s fails the accuracy check on %s: %s; it is not recorded",
                            name, p.describe(), bad)
                continue
            if name == BASELINE:
                checker.trust(out)
            del out
            if first > share:
                rep.skipped[name] = (f"its first call took {first * 1e3:.3g} ms, over its share of the budget "
                                     f"({share * 1e3:.3g} ms; a compile? a later process measures it warm)")
                continue
            active[name] = (impl, cfg, first)
        times: dict[str, list[float]] = {n: [] for n in active}
        order = list(active)
        if cuda:
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(q.device)
        stop = not order
        for r in range(MAX_REPS if order else 0):  # interleaved: one call of each per round, rotating
            for name in order[r % len(order):] + order[:r % len(order)]:
                impl, cfg, last = active[name]
                if time.perf_counter() + last > deadline:
                    stop = True
                    break
                t = time.perf_counter()
                if cuda:
                    ev0.record(stream)
                    impl.run(q, k, v, p, cfg, extras)
                    ev1.record(stream)
                    ev1.synchronize()
                    ms = ev0.elapsed_time(ev1)
                else:
                    impl.run(q, k, v, p, cfg, extras)
                    ms = (time.perf_counter() - t) * 1e3
                took = time.perf_counter() - t
                rep.longest_step_s = max(rep.longest_step_s, took)
                active[name] = (impl, cfg, took)
                times[name].append(ms)
            if stop:
                break
        for name in order:
            if times[name]:
                rep.measured[name] = statistics.median(times[name])
                rep.reps[name] = len(times[name])
            else:
                rep.skipped[name] = "no timed call fitted in the budget"
    finish()
    ms = {n: v for n, v in rep.measured.items() if v > 0 and math.isfinite(v)}
    if not ms:
        finish("no implementation was measured within the budget")
        return None
    # no config: each ran with what the decision would give it (a neighbour's tuned tiles or the
    # defaults), which was not searched here and must not pass for this point's best
    w = p.window[0] if p.has_window else -1
    return Point(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, w, ms, {}, ())


# --- recording --------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock across processes (fcntl); on Windows none (the write stays atomic)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


HEADER = ("Autotune on first use (FLASHDISPATCH_AUTOTUNE=1): one point per problem, measured on the\n"
          "call's own inputs; merged into this device's profile while autotune is on. Delete this file\n"
          "to forget the measurements.")


def write_point(directory: str, dev: DeviceInfo, key: str, gkey: GroupKey, pt: Point,
                failed: Mapping[str, str] | None = None) -> str:
    """Add `pt` (and the implementations that `failed` the accuracy check there) to the overlay file
    of `key`: read, merge and write under the lock; the write is atomic."""
    os.makedirs(directory, exist_ok=True)
    path = overlay_path(directory, key)
    with _file_lock(path + ".lock"):
        groups: list[Group] = []
        rejected: dict[Ident, dict[str, str]] = {}
        if os.path.isfile(path):
            old = _read_overlay(path, key)
            if old is None:
                with contextlib.suppress(OSError):
                    os.replace(path, path + ".corrupt")
                log.warning("autotune: the invalid overlay %s is kept as %s.corrupt and started afresh", path, path)
            else:
                groups, rejected = old[0].groups, old[1]
        if _merge_delay_s:
            time.sleep(_merge_delay_s)
        g = next((g for g in groups if g.key == gkey), None)
        if g is None:
            g = Group(gkey, [])
            groups.append(g)
        pt = g.add(pt)  # measured again: the new times win, the others stay
        i = _point_ident(gkey, pt)
        rejected[i] = {n: why for n, why in {**rejected.get(i, {}), **(failed or {})}.items() if n not in pt.ms}
        if not rejected[i]:
            del rejected[i]
        for grp in groups:  # points only: the models are fitted where the overlay is merged
            grp.fits = {}
        device = {"key": key, "name": dev.name, "arch": dev.arch}
        if dev.sm_count:
            device["sm_count"] = dev.sm_count
        generated = {"card": dev.name, "date": datetime.date.today().isoformat(),
                     "tool": "flashdispatch autotune", "torch": torch.__version__}
        text = profile_yaml_text(Profile(path, key, True, device, generated, groups), HEADER)
        text += "".join(line + "\n" for line in _rejected_yaml(rejected))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.autotune.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


def _merge_in_memory(st: Any, dev: DeviceInfo, key: str, gkey: GroupKey, pt: Point, failed: Mapping[str, str],
                     written: bool) -> None:
    """This process's profile takes the point; the decisions and plans of its group are dropped."""
    from .plans import PLANS

    path = overlay_path(st.settings.autotune_dir, key)
    with st.lock:
        prof, problems = st.profile(key)
        merged = False
        if prof is None and written:  # the overlay just written, on the family's profile if any
            prof, problems = with_overlay(key, None, problems, st.settings)
            merged = prof is not None
        if prof is None:
            prof = Profile(path, key, True, {"key": key, "name": dev.name},
                           {"card": dev.name, "date": datetime.date.today().isoformat()}, [])
        st.profiles[key] = (prof, problems)
        if not merged:
            _merge_points(prof, [(gkey, pt)], path, {_point_ident(gkey, pt): dict(failed)} if failed else None)
        # every decision may have borrowed from the refitted group: all are dropped (autotune is rare)
        st.cache.clear()
    PLANS.invalidate()


def describe_overlay(settings: envs.Settings, key: str | None) -> str:
    """One line for `flashdispatch info`: whether autotune is on and which overlay file it uses."""
    if key is None:
        return "autotune: no profile key for this device (nothing to record under)"
    path = overlay_path(settings.autotune_dir, key)
    if not settings.autotune:
        exists = " (exists, not read)" if os.path.isfile(path) else ""
        return f"autotune: off (FLASHDISPATCH_AUTOTUNE=1 turns it on; overlay {path}{exists})"
    if not os.path.isfile(path):
        return f"autotune: on, overlay {path} (not written yet)"
    read = _read_overlay(path, key)
    if read is None:
        return f"autotune: on, overlay {path} is NOT VALID (ignored)"
    ov = read[0]
    n = sum(len(g.points) for g in ov.groups)
    return f"autotune: on, overlay {path} ({n} autotuned points in {len(ov.groups)} groups)"
