"""Selection: from a Problem to a Decision (which implementation, which config, and why).

Decisions are cached on (Problem, forced name, source); after the first call for a key, selection is
one dict lookup. Environment, profiles and device properties are read once into a `_State` snapshot,
which `flashdispatch.refresh()` rebuilds (through `reset()`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import envs
from .device import ARCH_FAMILY, DeviceInfo, current_device, real_device
from .errors import NoBackendError
from .costmodel import (
    COMPUTE_BOUND_CLASSES, MEMORY_BOUND_CLASSES, CostModel, GroupKey, Prediction, compared_where_measured, group_key,
)
from .profile_store import Group, Profile, load_profile
from .problem import Problem
from .registry import REGISTRY

log = logging.getLogger("flashdispatch")

# Plain SDPA is what the user runs today. Another implementation is chosen over it only when
# predicted at least this fraction faster: closer than that is inside the models' error and the
# timing noise (the tune's medians and the bench's interleaved medians disagreed by 1-3% on one
# cuDNN kernel reached two ways, docs/bench.md), and a tie goes to the baseline.
BASELINE = "sdpa"
BASELINE_MARGIN = 0.02
# A pinned kernel of plain SDPA's own family (sdpa:cudnn, sdpa:flash, ...) is often the very kernel
# plain SDPA runs, reached through torch's kernel switches, which cost host time (20-25 us per eager
# call on the H100 through sdpa_kernel; backends/sdpa.OnlyKernel costs less). The measured profiles
# time sdpa:cudnn at 0.96-1.05x plain SDPA at most points where both run cuDNN (h100.yaml, h200.yaml;
# one tune, interleaved medians): a lead inside that is the timer's, so such a pin must lead plain
# SDPA by this fraction to run instead.
PIN_MARGIN = 0.05
# A model that misses one of its own measured points by more than a factor of 1 + this, either way
# (its form cannot follow the implementation: a kernel without split-KV on few rows against a long
# cache, whose time is one program's walk over the keys), never puts its implementation ahead of
# one whose model follows its points; the decision says it is unsure (autotune, when on, measures
# such a problem, except decode and speculative steps, which it does not time).
UNRELIABLE_FIT = 1.0
# A problem whose query heads per K/V head lie more than this factor outside the ratios its decision's
# group measured is predicted from measurements that cannot tell a kernel that reads K/V once per query
# head from one that reads it once per group: the decision says it is unsure (on the H100, Falcon 7B's
# 71 query heads on one K/V head decoded 1.7x slower through cuDNN than through the split-KV Triton
# kernel, which the grid's ratios of 1 to 8 had ranked alike).
GQA_STRETCH = 2.0
# In the memory-bound classes, past that stretch upwards, an implementation that declares it reads
# K/V once per query group in a decode step (Capabilities.decode_shares_kv: its bytes model holds at
# any ratio) runs instead of one predicted ahead that does not declare it, when predicted at most
# this fraction slower: the other's prediction is then a lower bound (a grid sized by the query
# heads, or one program walking all the keys, is slower, never faster), and the runner-up's is a model.
GQA_SHARED_MARGIN = 0.10


def is_pin(name: str) -> bool:
    """Whether `name` is a pinned kernel of plain SDPA's own family (sdpa:cudnn, sdpa:flash, ...)."""
    impls = REGISTRY.all()
    return name != BASELINE and name in impls and BASELINE in impls and impls[name].backend == impls[BASELINE].backend


def lead_needed(name: str) -> float:
    """The least lead over plain SDPA that lets `name` run instead, measured or predicted:
    PIN_MARGIN for a pinned kernel of the baseline's own family, BASELINE_MARGIN otherwise."""
    return PIN_MARGIN if is_pin(name) else BASELINE_MARGIN


def baseline_margin(*fit_errors: float, name: str = "") -> float:
    """How much faster than plain SDPA another implementation (`name`) must be predicted (or
    measured) to run instead: lead_needed(name), or the sum of the two models' fit errors where that
    is larger (a lead inside the models' own error is no lead; plain SDPA and a pinned SDPA kernel
    that is the same kernel differ only by their fits' noise)."""
    return max(lead_needed(name), sum(fit_errors))


def anchored_comparison(p: Problem, a: Prediction, base: Prediction, sm_count: int, *,
                        alike: bool = False) -> tuple[float, int] | None:
    """`a`'s time over the baseline's at `p` and the number of measured points it rests on: a
    measurement at the problem's very shape and head dim (Group.measured_ratio), in any class, where
    both predictions come from one group's measurements; else, where both come from that group's own
    fits (nothing estimated or extrapolated; with `alike`, also both reached the same way:
    anchored_between) of the problem's own class, a compute-bound one, the ratio anchored at the
    nearest points where both were measured (Group.anchored_ratio); None elsewhere. The group may be
    the other half dtype's or the nearest head dim's, as for the predictions themselves (the same
    kernels; on the H100 Gemma 7B's D=256 prefill and Phi-3's D=96
    chunk, both borrowed from D=128, ran SDPA 11% slower than the kernel the measurements favoured).
    Only there: the anchors are the nearest in work and bytes, and the fits carry the trend from
    them to the problem; a memory-bound class's fits also weigh how many programs fill the SMs (the
    wave tail), and a decode problem with the bytes of a batch-64 point but 32 programs took a trend
    made only of that term (a 128k-context decode anchored at batch 64, 2k keys).

    Two fits of a few points each miss by several per cent (a kernel's slow smallest shape sets its
    fixed cost), and summed, their errors hid 10-20% leads measured right beside the problem; the
    measurements near the problem carry no fit error: both timed interleaved on the same inputs."""
    def own_class(x: Prediction) -> bool:
        return not x.estimated and not x.extrapolated and not any(w.startswith("class ") for w in x.borrowed)

    if not (a.group is not None and a.group is base.group and a.model_name == a.name
            and base.model_name == base.name):
        return None
    # a problem at a measured shape takes that measurement, in every class and however its fits
    # were reached (a fit to one point is one): decode B=1 H32/8 8k keys on the H100 had sdpa:cudnn
    # measured 0.7% ahead of plain SDPA, the same cuDNN kernel, and the fits put it 3.5% ahead
    ratio = a.group.measured_ratio(p, a.name, base.name)
    if ratio is not None:
        return ratio, 1
    reached_alike = alike and a.borrowed == base.borrowed and bool(a.estimated) == bool(base.estimated)
    if not (reached_alike or (own_class(a) and own_class(base))) or a.key.cls not in COMPUTE_BOUND_CLASSES:
        return None  # elsewhere the fits' trend is not carried from anchors
    return a.group.anchored_ratio(p, a.name, base.name, sm_count)


def anchor_words(k: int) -> str:
    """Where a ratio of anchored_comparison / anchored_between came from, by its anchor count."""
    if k == 0:
        return "as measured for both at the end of the work they were timed over (the problem lies beyond it)"
    if k == 1:
        return "as measured for both at this very shape"
    return f"anchored at the {k} nearest points measured for both"


def anchored_between(p: Problem, a: Prediction, b: Prediction, sm_count: int) -> tuple[float, int] | None:
    """`a`'s time over `b`'s at `p` from the measurements beside the problem, for two implementations
    that would both run instead of the baseline: as anchored_comparison, and also where both
    predictions were reached the same way from one group (a window estimated from the plain model at
    its visible work, a dtype or head dim borrowed alike): the trend that estimate carries is then
    the same for both, and the points where both were timed interleaved rank them better than two
    fits of a few points each. On the H100, a 4096-key window's forward+backward at 16k tokens: the
    plain causal fits put the Triton forward's 9% ahead of the Gluon forward's (one slow smallest
    point set the Triton fit's fixed cost), while the Gluon forward was ahead at every measured point
    and measured 8% faster there."""
    return anchored_comparison(p, a, b, sm_count, alike=True)


@dataclass(frozen=True)
class Decision:
    backend: str  # family: "sdpa", "triton", "cupy"
    variant: str  # implementation name: "sdpa:cudnn", "triton"
    config: dict[str, Any]
    source: str  # "argument" | "context" | "env" | "profile:<file>#<group>" | "default"
    rejected: dict[str, list[str]]
    problem: Problem
    device: DeviceInfo
    candidates: tuple[str, ...] = ()  # eligible implementations, best first
    notes: tuple[str, ...] = ()
    profile: str | None = None  # provenance line of the profile in use
    predicted: dict[str, float] = field(default_factory=dict)  # predicted ms of each eligible implementation
    # the predictions behind `predicted`, best first (their words are built only when asked: models)
    predictions: tuple[Prediction, ...] = field(default=(), compare=False, repr=False)
    margin: float | None = None  # predicted time of the runner-up / the chosen one's, minus 1
    uncertain: str = ""  # why the model is unsure of this decision ("" when it is not)

    @property
    def models(self) -> tuple[str, ...]:
        """How each prediction was made: the model, its fit, any borrowing, the nearest measured points."""
        return tuple(pr.describe() for pr in self.predictions)

    def __str__(self) -> str:
        lines = [
            f"flashdispatch decision: {self.variant}  (source: {self.source})",
            f"  problem:  {self.problem.describe()}",
            f"  device:   {self.device.describe()}",
        ]
        # a dense Problem's group, or a serving call's (its ServingProblem knows it)
        key = group_key(self.problem) if isinstance(self.problem, Problem) else self.problem.model_key()
        lines.insert(2, f"  class:    {key.label()}")
        if self.profile:
            lines.append(f"  profile:  {self.profile}")
        if self.config:
            lines.append(f"  config:   {self.config}")
        if self.predicted:
            lines.append("  predicted: " + ", ".join(f"{k}={v:.4g} ms" for k, v in self.predicted.items()))
        if self.margin is not None:
            why = ("runner-up's predicted time over the chosen one's" if self.margin >= 0 else
                   "the runner-up is predicted faster; the notes say which rule chose")
            lines.append(f"  margin:   {self.margin:+.1%} ({why})")
        for m in self.models:
            lines.append(f"  model:    {m}")
        if self.uncertain:
            lines.append(f"  unsure:   {self.uncertain}")
        lines.append(f"  eligible: {', '.join(self.candidates) if self.candidates else '(none)'}")
        for n in self.notes:
            lines.append(f"  note:     {n}")
        if self.rejected:
            lines.append("  rejected:")
            for name, reasons in self.rejected.items():
                lines.append(f"    {name}: " + "; ".join(reasons))
        return "\n".join(lines)


# --- forcing: argument > use_backend() context > environment ------------------------------------

# The forced backends of use_backend() blocks, innermost last. A ContextVar, not a thread-local:
# asyncio tasks sharing a thread each see their own blocks (a task's context is copied when it is
# created), and a new thread starts with none.
_forced_blocks: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("flashdispatch_forced", default=())
forced_blocks = _forced_blocks.get  # the hot path calls it on every call


def validate_backend_name(name: str, arg: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{arg}: expected a backend name (str), got {type(name).__name__}")
    n = name.strip().lower()
    valid = set(envs.backend_choices())
    if n not in valid:
        raise ValueError(f"{arg}: unknown backend {name!r}; expected one of: {', '.join(sorted(valid))}")
    return n


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for calls in this thread inside the block (nestable; innermost wins).

    `use_backend("auto")` inside an outer block restores automatic selection for the inner block.
    """
    n = validate_backend_name(name)
    token = _forced_blocks.set(_forced_blocks.get() + (n,))
    try:
        yield
    finally:
        _forced_blocks.reset(token)


def current_forced(arg: str | None, settings: envs.Settings) -> tuple[str | None, str]:
    if arg is not None:
        n = validate_backend_name(arg)
        if n != "auto":
            return n, "argument"
        return None, "default"
    st = _forced_blocks.get()
    if st:
        n = st[-1]
        return (None, "default") if n == "auto" else (n, "context")
    if settings.backend != "auto":
        return settings.backend, "env"
    return None, "default"


# --- the snapshot -----------------------------------------------------------------------------


class _NamedFormatter(logging.Formatter):
    """"flashdispatch: <message>", unless the message already starts with the logger's name (a
    decision's first line does: "flashdispatch decision: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if msg.startswith(record.name) else f"{record.name}: {msg}"


def _show_decisions() -> None:
    """FLASHDISPATCH_LOG=decisions: make the decisions visible on stderr even when the program set
    up no logging (a handler of its own otherwise, or of an ancestor logger, keeps them)."""
    if not log.hasHandlers():
        handler = logging.StreamHandler()  # stderr
        handler.setFormatter(_NamedFormatter())
        log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)


class _State:
    def __init__(self) -> None:
        self.settings = envs.read_settings()
        if self.settings.log == "decisions":
            _show_decisions()
        self.profiles: dict[str | None, tuple[Profile | None, list[str]]] = {}
        self.cache: dict[tuple[Any, ...], Decision] = {}
        # the serving calls' decisions and settings (dispatch/serving.py), dropped with this snapshot
        self.serving: dict[Any, Any] = {}
        self.lock = threading.Lock()

    def profile(self, key: str | None) -> tuple[Profile | None, list[str]]:
        if key not in self.profiles:
            self.profiles[key] = read_profile(key, self.settings)
        return self.profiles[key]


def read_profile(key: str | None, settings: envs.Settings) -> tuple[Profile | None, list[str]]:
    """The profile of device key `key` under `settings` (the user directory's, else the shipped
    one; with autotune's overlay merged when it is on), and the problems met on the way."""
    profile, problems = load_profile(key, settings.profile_dir)
    if settings.autotune:  # hook: merge the points of autotune on first use (dispatch/autotune.py)
        from . import autotune

        return autotune.with_overlay(key, profile, problems, settings)
    return profile, problems


_state: _State | None = None


# Entries of the decision cache before it is emptied (and of each plan cache, dispatch/plans.py):
# a decode loop whose KV cache grows by one key per step makes a new problem every step.
MAX_CACHED = 4096


def state() -> _State:
    global _state
    if _state is None:
        _state = _State()
    return _state


def reset() -> None:
    """Drop the snapshot (environment, profiles, decisions); the next call reads them again.
    `flashdispatch.refresh()` (dispatch/plans.py) calls it and empties the plans with it."""
    global _state
    _state = None


def device_for(p: Problem) -> DeviceInfo:
    """The real device that holds the problem's tensors."""
    if p.device_kind == "cpu":
        return real_device("cpu", 0)
    if p.device_kind in ("cuda", "rocm"):
        import torch

        if torch.cuda.is_available():
            return real_device("cuda", p.device_index)
    return current_device()


def simulated_or_none(key: str | None) -> DeviceInfo | None:
    """explain()'s device: an explicit key, else FLASHDISPATCH_DEVICE, else None (real device)."""
    if key is None:
        key = state().settings.device
    return None if key in (None, "auto") else current_device(key)


def _eligible(p: Problem, dev: DeviceInfo, names: list[str], rejected: dict[str, list[str]]) -> list[str]:
    ok = []
    for name in names:
        why = REGISTRY.availability(name)
        if why is not None:
            rejected[name] = [f"unavailable: {why}"]
            continue
        try:
            reasons = REGISTRY.get(name).not_supported_reasons(p, dev)
        except Exception as e:  # a buggy capability check must not hide the other backends
            reasons = [f"capability check failed: {type(e).__name__}: {e}"]
        if reasons:
            rejected[name] = reasons
        else:
            ok.append(name)
    return ok


@dataclass
class _Ranking:
    """What ordered the eligible implementations, for the Decision."""

    ordered: list[str]
    source: str = "default"
    group: Group | None = None  # the group whose config the chosen implementation takes
    predicted: dict[str, float] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    margin: float | None = None
    uncertain: str = ""
    kept_baseline: bool = False


def _default_order(p: Problem, dev: DeviceInfo, names: list[str]) -> list[str]:
    """The built-in order, from the implementations' own data: emulated ones (Triton on a CPU)
    last; for a sliding window, softcap or sinks, the kernels that fuse them (and skip the blocks a
    window hides) before those that mask every pair or run explicit math; then `default_rank`
    (plain SDPA, the user's baseline, first; unranked implementations after the ranked ones)."""

    def key(n: str) -> tuple[int, int, int, str]:
        impl = REGISTRY.get(n)
        caps = impl.capabilities(dev)
        rank = impl.default_rank if impl.default_rank is not None else 10_000
        return (int(caps.emulated), int(p.is_variant and not caps.fuses_variants), rank, n)

    return sorted(names, key=key)


def _variant_path(name: str, dev: DeviceInfo, variant: str) -> tuple[bool, str]:
    """(fuses the variant, the implementation whose kernel runs it otherwise)."""
    caps = REGISTRY.get(name).capabilities(dev)
    return caps.fuses_variants, dict(caps.variants_run_as).get(variant, "")


def _rank_by_model(p: Problem, dev: DeviceInfo, eligible: list[str], profile: Profile) -> _Ranking | None:
    """Eligible implementations by predicted time (those the profile has no model of after them,
    in the default order), with plain SDPA kept unless the winner is predicted BASELINE_MARGIN faster."""
    key = group_key(p)
    return rank_by_model(p, key, eligible, profile,
                         variant_path=lambda n: _variant_path(n, dev, key.variant) if p.is_variant else (True, ""),
                         default_order=lambda names: _default_order(p, dev, names),
                         shares_kv=lambda n: REGISTRY.get(n).capabilities(dev).decode_shares_kv)


def rank_by_model(p: Problem, key: GroupKey, eligible: list[str], profile: Profile, *,
                  variant_path: Callable[[str], tuple[bool, str]],
                  default_order: Callable[[list[str]], list[str]], baseline: str = "plain SDPA",
                  shares_kv: Callable[[str], bool] = lambda n: False) -> _Ranking | None:
    """`eligible` by the time `profile`'s model predicts for `p` in group `key` (a dense call's
    own group, or a serving call's: dispatch/serving.py), the baseline kept within its margin;
    `variant_path(name)` says whether `name` fuses the problem's variant and what runs it if not;
    `default_order` orders the names the model cannot predict; `baseline` names BASELINE in the
    decision's words; `shares_kv(name)`: whether `name` declares Capabilities.decode_shares_kv.
    None: no model predicts any."""
    model = profile.model
    if not model:
        return None
    preds: dict[str, Prediction] = {}
    for n in eligible:
        fuses, runs_as = variant_path(n)
        pr = model.predict(p, n, fuses_variants=fuses, runs_as=runs_as, key=key)
        if pr is not None:
            preds[n] = pr
    if not preds:
        return None
    by_time = sorted(preds, key=lambda n: (preds[n].ms, n))
    rest = default_order([n for n in eligible if n not in preds])
    r = _Ranking(by_time + rest)
    if rest:
        r.notes.append(f"no model for {', '.join(rest)}: placed after the predicted ones, in the built-in order")

    def words(n: str) -> str:
        return baseline if n == BASELINE else n

    # A model that misses one of its own measured points by more than a factor of two predicts
    # nothing it can be trusted for: an implementation it puts ahead of the fastest trusted one
    # follows that one instead (with or without the baseline among the eligible).
    unreliable = {n for n in by_time if preds[n].worst_error > UNRELIABLE_FIT}
    trusted = [n for n in by_time if n not in unreliable]
    order = list(by_time)
    held: list[str] = []
    if trusted and by_time[0] != trusted[0]:
        first = trusted[0]
        held = by_time[:by_time.index(first)]
        for n in held:
            r.notes.append(f"{n}'s model misses one of its own measured points by a factor of "
                           f"{1.0 + preds[n].worst_error:.3g}: its prediction ({preds[n].ms:.4g} ms) is not "
                           f"preferred to {words(first)}'s")
        order = [first] + held + [n for n in by_time if n != first and n not in held]
    anchored_lead: dict[str, float] = {}  # cleared by the measurements beside the problem: time over the baseline's
    if BASELINE in preds:
        # Each implementation must clear its own margin against the baseline to run instead: where
        # the group measured both near the problem, a lead of BASELINE_MARGIN anchored at each of
        # the nearest such points (anchored_comparison: this can also put ahead one the fits place
        # behind); elsewhere a predicted lead beyond the fits' errors. The fastest that clears runs;
        # those predicted ahead that do not (a lead inside a poor fit) fall in behind the baseline, so
        # that one poorly fitted model cannot hold back a well fitted one that is slower than it but
        # well ahead of the baseline.
        ahead = order[:order.index(BASELINE)]
        cleared: list[str] = []
        margin_held: list[str] = []
        lead: dict[str, float] = {}  # time over the baseline's, as the clearing rule saw it
        for n in order:
            if n == BASELINE:
                continue
            if n in unreliable:
                if n in ahead:
                    margin_held.append(n)  # said above
                continue
            anchored = anchored_comparison(p, preds[n], preds[BASELINE], model.sm_count)
            if anchored is not None:
                ratio, k = anchored
                where = anchor_words(k)
                need = lead_needed(n)
                if ratio <= 1.0 - need:
                    r.notes.append(f"{n} takes {ratio:.3g} of {words(BASELINE)}'s time, {where}")
                    cleared.append(n)
                    lead[n] = anchored_lead[n] = ratio
                elif n in ahead:
                    r.notes.append(f"{n} is predicted at {preds[n].ms:.4g} ms and {baseline} at "
                                   f"{preds[BASELINE].ms:.4g} ms, but it takes {ratio:.3g} of {words(BASELINE)}'s "
                                   f"time {where}, not {1.0 - need:.3g} or less: not preferred to {baseline}")
                    margin_held.append(n)
                continue
            if n not in ahead:
                continue
            if is_pin(n):
                # no measurement at or beside the problem vouches for the pin: two fits of what is
                # often one kernel reached two ways differ by their noise, and more where they
                # extrapolate (on the H100, StarCoder's 48 query heads on one K/V head: sdpa:cudnn's
                # fit 9% ahead of plain SDPA's, the same cuDNN kernel, measured alike)
                r.notes.append(f"{n} is predicted at {preds[n].ms:.4g} ms and {baseline} at {preds[BASELINE].ms:.4g} "
                               f"ms, but no measurement at or around this shape shows the lead: a pinned kernel of "
                               f"{baseline}'s own family runs instead only on a measured lead")
                margin_held.append(n)
                continue
            need = baseline_margin(preds[n].fit.rms, preds[BASELINE].fit.rms, name=n)
            t_ms, b_ms, where = compared_where_measured(preds[n], preds[BASELINE])
            if t_ms > b_ms * (1.0 - need) * (1.0 + 1e-9):  # 1e-9: float noise at the edge
                at = f" ({where}: {t_ms:.4g} and {b_ms:.4g} ms)" if where else ""
                apart = (f"less than {need * 100:.3g}% apart (the larger of {lead_needed(n):.0%} and the two fit "
                         f"errors)" if t_ms < b_ms else "not faster there")
                r.notes.append(f"{n} is predicted at {preds[n].ms:.4g} ms and {baseline} at "
                               f"{preds[BASELINE].ms:.4g} ms{at}, {apart}: not preferred to {baseline}")
                margin_held.append(n)
            else:
                cleared.append(n)
                lead[n] = t_ms / b_ms
        if cleared or margin_held:
            cleared.sort(key=lambda n: (lead[n], preds[n].ms, n))
            order = cleared + [BASELINE] + [n for n in order if n not in cleared and n != BASELINE]
            held = held + [n for n in margin_held if n not in held]
    order = _anchored_leader(p, order, preds, model.sm_count, set(held) | unreliable, r.notes)
    order = _shared_kv_first(p, key, order, preds, model, shares_kv, held + sorted(unreliable), r.notes, words)
    if order[0] == BASELINE and by_time[0] != BASELINE:
        # something was predicted faster, and the baseline runs all the same (said once, after both steps)
        r.notes.append(f"{baseline}, the baseline, runs")
        r.kept_baseline = True
    r.ordered = order + rest
    chosen = r.ordered[0]
    win = preds[chosen]
    r.group = model.groups[win.key]
    r.source = f"profile:{profile.path}#{win.key.label()}" + (" (baseline margin)" if r.kept_baseline else "")
    r.predicted = {n: preds[n].ms for n in by_time}
    r.predictions = [preds[n] for n in by_time]
    # the margin to the runner-up among those not held back (a held one may be predicted faster)
    others = [preds[n].ms for n in by_time if n != chosen and n not in held]
    if others:
        r.margin = min(others) / win.ms - 1.0
    # unsure: the winner's or the runner-up's model is borrowed, estimated, extrapolated or fitted to
    # one point (which cannot tell a fixed cost from a rate), or the two are closer than their fit
    # errors, or a model that misses its own points predicts something faster than the choice
    doubts = []
    contenders = [n for n in by_time if n != chosen and n not in held]
    for n in [chosen] + contenders[:1]:
        pr = preds[n]
        if not pr.exact:
            why = "; ".join(pr.borrowed + ((pr.estimated,) if pr.estimated else ())
                            + ((("fitted to one point" if pr.fit.n < 2 else "extrapolated"),)
                               if pr.extrapolated else ()))
            doubts.append(f"{n}: {why}")
    if chosen in unreliable:
        doubts.append(f"{chosen}: its model misses one of its own measured points by a factor of "
                      f"{1.0 + win.worst_error:.3g}")
    if r.margin is not None and contenders and chosen != BASELINE:  # a close call to keep the baseline is safe
        runner = min(contenders, key=lambda n: preds[n].ms)
        err = win.fit.rms + preds[runner].fit.rms
        # a lead over the baseline that measurements beside the problem vouch for is no close call
        vouched = runner == BASELINE and chosen in anchored_lead
        if abs(r.margin) < err and not vouched:
            doubts.append(f"{chosen} and {runner} are {abs(r.margin):.1%} apart, inside their fit errors ({err:.1%})")
    for n in held:
        if n in unreliable and preds[n].ms < win.ms:
            doubts.append(f"{n} is predicted faster by a model that misses one of its own measured points by a "
                          f"factor of {1.0 + preds[n].worst_error:.3g}")
    span = r.group.gqa_span(chosen)
    shared = key.cls in MEMORY_BOUND_CLASSES and shares_kv(chosen)  # its bytes model holds at any ratio
    if span is not None and not shared and not _within_gqa_span(p, span):
        # work and bytes part ways with the query heads per K/V head; a kernel that reads K/V once
        # per query head and one that reads it once per group rank alike inside the measured ratios
        doubts.append(f"GQA ratio {p.gqa_ratio} lies beyond the {span[0]}..{span[1]} measured for {chosen} "
                      f"({r.group.key.label()})")
    r.uncertain = "; ".join(doubts)
    return r


def _within_gqa_span(p: Problem, span: tuple[int, int]) -> bool:
    return span[0] / GQA_STRETCH <= p.gqa_ratio <= span[1] * GQA_STRETCH


def _anchored_leader(p: Problem, order: list[str], preds: dict[str, Prediction], sm_count: int, held: set[str],
                     notes: list[str]) -> list[str]:
    """`order`, with the first of the implementations ahead of the baseline (all of them where it is
    not eligible) replaced by another of them that the measurements beside the problem show faster
    (anchored_between: a ratio under 1); the rest keep their order. The baseline's own margin was
    settled before: this only ranks the ones that run instead of it."""
    first = order[0] if order else ""
    if first == BASELINE or first not in preds:
        return order
    ahead = order[:order.index(BASELINE)] if BASELINE in order else order
    lead = first
    for n in ahead[1:]:
        if n not in preds or n in held:
            continue
        anchored = anchored_between(p, preds[n], preds[lead], sm_count)
        if anchored is not None and anchored[0] < 1.0:
            ratio, k = anchored
            where = anchor_words(k)
            notes.append(f"{n} is predicted at {preds[n].ms:.4g} ms and {lead} at {preds[lead].ms:.4g} ms, but "
                         f"{n} takes {ratio:.3g} of {lead}'s time {where}: {n} runs")
            lead = n
    if lead == first:
        return order
    return [lead] + [n for n in order if n != lead]


def _shared_kv_first(p: Problem, key: GroupKey, order: list[str], preds: dict[str, Prediction], model: CostModel,
                     shares_kv: Callable[[str], bool], held: list[str], notes: list[str],
                     words: Callable[[str], str]) -> list[str]:
    """`order`, with an implementation that reads K/V once per query group moved to the front where
    the problem has more query heads per K/V head than the first one's group measured (by more than
    GQA_STRETCH) and the first does not declare as much (memory-bound classes only; GQA_SHARED_MARGIN)."""
    first = order[0]
    if key.cls not in MEMORY_BOUND_CLASSES or first not in preds or shares_kv(first):
        return order
    span = model.groups[preds[first].key].gqa_span(first)
    if span is None or p.gqa_ratio <= span[1] * GQA_STRETCH:  # more query heads per K/V head only
        return order
    limit = preds[first].ms * (1.0 + GQA_SHARED_MARGIN)
    for n in order[1:]:
        if n in preds and n not in held and shares_kv(n) and preds[n].ms <= limit * (1.0 + 1e-9):
            notes.append(f"GQA ratio {p.gqa_ratio} lies beyond the {span[0]}..{span[1]} measured for {words(first)}, "
                         f"which does not declare that a decode step reads K/V once per query group: {n}, which "
                         f"does (its time follows the K/V bytes at any ratio), runs, predicted at {preds[n].ms:.4g} ms "
                         f"against {preds[first].ms:.4g} ms (within {GQA_SHARED_MARGIN:.0%})")
            return [n] + [m for m in order if m != n]
    return order


def _rank_by_argued_order(p: Problem, dev: DeviceInfo, eligible: list[str], profile: Profile) -> _Ranking | None:
    """An unmeasured profile: the argued ranking of the nearest point, then the default order."""
    found = profile.argued_ranking(p)
    if found is None:
        return None
    ranking, g, pt, why = found
    rank = {n: i for i, n in enumerate(ranking)}
    if not any(n in rank for n in eligible):
        return None
    default = _default_order(p, dev, eligible)
    ordered = sorted(eligible, key=lambda n: (rank.get(n, len(rank) + default.index(n)), n))
    r = _Ranking(ordered, f"profile:{profile.path}#{g.key.label()} {pt.describe()}", g)
    if why:
        r.notes.append("the argued order of another group: " + ", ".join(why))
    r.uncertain = "the profile is not measured"
    return r


def _config_applies(g: Group, p: Problem) -> bool:
    """A group's tuned configs serve problems of its own key (either half dtype: same tiles); a
    borrowed group's tiles may not fit another head dim or path, so those take the default."""
    k, mine = g.key, group_key(p)
    return k._replace(dtype=mine.dtype) == mine and {k.dtype, mine.dtype} <= {"fp16", "bf16"} | {mine.dtype}


def _order(p: Problem, dev: DeviceInfo, eligible: list[str], profile: Profile | None) -> _Ranking:
    """Eligible implementations best first, and what ordered them."""
    if profile is not None:
        r = _rank_by_model(p, dev, eligible, profile) if profile.measured else _rank_by_argued_order(p, dev, eligible, profile)
        if r is not None:
            return r
    r = _Ranking(_default_order(p, dev, eligible))
    if profile is not None and profile.measured:
        r.notes.append(f"the profile has no model for {group_key(p).label()} (nor a group to borrow from): "
                       "the built-in order decided")
        r.uncertain = "no model for this problem"
    return r


def select(p: Problem, backend: str | None = None, *, device: DeviceInfo | None = None) -> Decision:
    """Choose the implementation for `p`; raises NoBackendError if nothing (or the forced one) can.

    `device` answers for another (simulated) device; None means the device holding the tensors.
    """
    st = state()
    forced, source = current_forced(backend, st.settings)
    key = (p, forced, source, device)
    d = st.cache.get(key)
    if d is not None:
        return d
    with st.lock:
        d = st.cache.get(key)  # another thread may have decided while this one waited
        if d is None:
            d = _select_uncached(p, forced, source, device)
            if len(st.cache) >= MAX_CACHED:
                st.cache.clear()
            st.cache[key] = d
            if st.settings.log == "decisions":  # each decision is made, so logged, once
                log.info("%s", d)
    return d


def profile_for(dev: DeviceInfo) -> tuple[Profile | None, list[str]]:
    """The profile that decides on `dev` (its own, else its architecture's), and what went wrong
    finding it (notes for the decision)."""
    st = state()
    profile, problems = st.profile(dev.profile_key)
    family = ARCH_FAMILY.get(dev.arch)
    if profile is None and family is not None and family != dev.profile_key:
        # e.g. an H200 with no h200.yaml: the same architecture's profile beats no profile at all
        profile, more = st.profile(family)
        problems = problems + more
        if profile is not None:
            problems.append(f"no profile for {dev.profile_key!r}: using {family!r} (same architecture {dev.arch})")
    return profile, problems


def implementation_config(p: Problem, name: str, dev: DeviceInfo | None = None) -> dict[str, Any]:
    """The config implementation `name` runs `p` with when it is chosen: its default, with the tuned
    config of the nearest measured point of `p`'s own group merged over it (as a decision has)."""
    dev = dev if dev is not None else device_for(p)
    profile, _ = profile_for(dev)
    config = dict(REGISTRY.get(name).default_config(p, dev))
    g = profile.group(group_key(p)) if profile is not None else None
    if g is not None and profile is not None and _config_applies(g, p):
        config.update(g.config_for(p, name, profile.sm_count))
    return config


def _select_uncached(p: Problem, forced: str | None, source: str, device: DeviceInfo | None) -> Decision:
    st = state()
    dev = device if device is not None else device_for(p)
    profile, problems = profile_for(dev)
    rejected: dict[str, list[str]] = {}
    names = list(REGISTRY.all())
    if forced is not None:
        pool = REGISTRY.forced_pool(forced)
        for n in names:
            if n not in pool:
                rejected[n] = [f"not the forced backend {forced!r} (set by {source})"]
    else:
        pool = names
    eligible = _eligible(p, dev, pool, rejected)
    if not eligible:
        raise NoBackendError(p, dev, {n: rejected[n] for n in pool if n in rejected} if forced else rejected,
                             forced=forced, source=source)
    rk = _order(p, dev, eligible, profile)
    if forced is None and profile is not None and st.settings.autotune:  # hook: a problem autotune measured
        from . import autotune

        rk = autotune.measured_ranking(p, dev, eligible, profile, rk) or rk
    chosen = rk.ordered[0]
    impl = REGISTRY.get(chosen)
    config = dict(impl.default_config(p, dev))
    cfg_group = rk.group or (profile.group(group_key(p)) if profile else None)  # forced, or no model
    if cfg_group is not None and profile is not None and _config_applies(cfg_group, p):
        config.update(cfg_group.config_for(p, chosen, profile.sm_count))
    src = rk.source if forced is None else source
    notes = list(problems) + rk.notes
    if not p.contiguous:
        notes.append("an input has a non-unit last stride: attention() copies it to contiguous memory first")
    try:
        notes += impl.plan_notes(p, dev, config)
    except Exception as e:
        notes.append(f"plan notes failed: {e}")
    return Decision(
        backend=impl.backend,
        variant=chosen,
        config=config,
        source=src,
        rejected=rejected,
        problem=p,
        device=dev,
        candidates=tuple(rk.ordered),
        notes=tuple(notes),
        profile=profile.provenance() if profile else None,
        predicted=rk.predicted,
        predictions=tuple(rk.predictions),
        margin=rk.margin,
        uncertain=rk.uncertain if forced is None else "",
    )
