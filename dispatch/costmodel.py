"""The cost model: each implementation's predicted time for a problem, fitted to measurements.

A profile (dispatch/profile_store.py) holds, per *group* — pass x shape class x variant x dtype x
head dim — the shapes the tuner measured (the raw points, every implementation's median time at
each) and, per implementation, the parameters of a small linear model fitted to those points:

    time_us = overhead_us + gflop * us_per_gflop + gb * us_per_gb + gflop * tail * us_per_gflop_tail

  gflop  the floating-point work of the visible (query, key) pairs (4 * B * Hq * pairs * D for the
         forward; 2.5 times more for the backward on top)
  gb     the bytes every implementation must move at least: Q, K, V and O (and dO, dQ, dK, dV)
  tail   the wave quantisation of the grid: with one program per (batch, head, 128 query rows)
         on `sm_count` SMs, the fraction of the last wave left idle (0 when the grid fills whole
         waves, large when a handful of programs run on a big GPU)

The four coefficients are non-negative (a model in which more work takes less time cannot be
trusted outside its points) and are fitted to minimise the *relative* error over the group's
points, because a decision compares ratios: a 5% error at 20 us matters as much as at 20 ms.
Reading them back: 1 / us_per_gflop is the TFLOP/s the implementation sustains on big problems,
1 / us_per_gb its TB/s when memory-bound (decode), overhead_us its fixed cost per call.

A problem is predicted from its own group when the profile measured it, else from the nearest
group that did (the other half-precision dtype, the nearest head dim, a neighbouring class),
and every such borrowing is written into the decision. Sliding window, softcap and sinks are
predicted from a group measured with that variant where there is one; otherwise an
implementation that fuses the variant (it skips the hidden blocks) is predicted from its plain
model at the visible work, and one that does not (plain SDPA: a materialised boolean mask, or
explicit math) from its plain model at the *whole* score matrix plus the mask it reads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from .problem import (
    DECODE_MAX_SEQLEN_Q,
    DTYPES_BY_NAME,
    NO_WINDOW,
    Problem,
    causal_visible_pairs,
    window_visible_keys,
    window_visible_pairs,
)

# --- shape classes ------------------------------------------------------------------------------

# What the tuner measures separately because kernels behave differently on them, not only by size:
#   dense        no mask (any Sq, Sk that is not decode)
#   causal       causal, Sq == Sk: half the score matrix is hidden
#   chunked      causal, DECODE_MAX_SEQLEN_Q < Sq < Sk (bottom-right): a prompt chunk against a
#                cache, nearly every row sees nearly every key
#   speculative  causal, 2 <= Sq <= DECODE_MAX_SEQLEN_Q and Sq < Sk: a few draft tokens verified
#                against a cache (bottom-right mask on a handful of rows)
#   causal_tall  causal, Sq > Sk: the first Sq - Sk rows see no key
#   decode       Sq <= DECODE_MAX_SEQLEN_Q and Sq < Sk, no mask (Sq = 1, or causal=False): every
#                row sees the whole cache; memory-bound
SHAPE_CLASSES: tuple[str, ...] = ("dense", "causal", "chunked", "speculative", "causal_tall", "decode")
# The classes of the serving calls (dispatch/serving.py), whose implementations are the serving
# families ("triton", "sdpa"), not the dense registry's:
#   varlen           a packed batch (cu_seqlens) of B sequences; a point is B sequences of the mean
#                    length (Sq, Sk), causal within each
#   kvcache          Sq <= DECODE_MAX_SEQLEN_Q rows per sequence against its (paged) cache: decode,
#                    speculative verification; a point's Sk is every sequence's cache length
#   kvcache_chunked  a prompt chunk of more rows against the cache
# They never borrow from the dense classes nor lend to them: the kernels and fallbacks differ.
SERVING_CLASSES: tuple[str, ...] = ("varlen", "kvcache", "kvcache_chunked")
# The serving call (attention_varlen: "varlen"; attention_kvcache: "kvcache") of each serving class.
SERVING_KIND: dict[str, str] = {"varlen": "varlen", "kvcache": "kvcache", "kvcache_chunked": "kvcache"}
ALL_CLASSES: tuple[str, ...] = SHAPE_CLASSES + SERVING_CLASSES
# The classes whose problems are causal (a serving class's points are measured causal).
CAUSAL_CLASSES: tuple[str, ...] = ("causal", "chunked", "speculative", "causal_tall") + SERVING_CLASSES
# The variants a problem may add; "plain" is none. A problem with several is grouped under the
# first of window, sinks, softcap that it uses (the window changes the work most).
VARIANTS: tuple[str, ...] = ("plain", "window", "sinks", "softcap")
MODEL_PASSES: tuple[str, ...] = ("fwd", "fwd_bwd")  # decode is a class, not a pass, here
# The backward's work relative to the forward's (the FlashAttention paper's count: 2.5x).
BWD_FLOP_FACTOR = 2.5
# Query rows per program in the wave-quantisation feature (the common forward tile).
TAIL_BLOCK_M = 128

# Where a class without a measured model borrows from, nearest first.
CLASS_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "dense": ("causal", "chunked"),
    "causal": ("dense", "chunked"),
    "chunked": ("causal", "dense"),
    "speculative": ("chunked", "decode", "causal"),
    "causal_tall": ("causal", "dense"),
    "decode": ("speculative", "dense"),
    "varlen": (),
    "kvcache": ("kvcache_chunked",),
    "kvcache_chunked": ("kvcache",),
}
HALF_DTYPE_TWIN: dict[str, str] = {"fp16": "bf16", "bf16": "fp16"}


def shape_class(p: Problem) -> str:
    """The shape class of a problem (SHAPE_CLASSES); the window does not change it."""
    sq, sk = p.seqlen_q, p.seqlen_k
    if p.effective_causal:
        if sq == sk:
            return "causal"
        if sq > sk:
            return "causal_tall"
        return "speculative" if sq <= DECODE_MAX_SEQLEN_Q else "chunked"
    if sq <= DECODE_MAX_SEQLEN_Q and sk > sq:
        return "decode"
    return "dense"


def serving_class(kind: str, seqlen_q: int) -> str:
    """The class of a serving call: kind "varlen" or "kvcache" (SERVING_CLASSES), by its rows."""
    if kind == "varlen":
        return "varlen"
    if kind != "kvcache":
        raise ValueError(f"serving kind: expected 'varlen' or 'kvcache', got {kind!r}")
    return "kvcache" if seqlen_q <= DECODE_MAX_SEQLEN_Q else "kvcache_chunked"


def variant_kind(p: Problem) -> str:
    if p.has_window:
        return "window"
    if p.sinks:
        return "sinks"
    if p.softcap:
        return "softcap"
    return "plain"


def problem_pass(p: Problem) -> str:
    return "fwd_bwd" if p.needs_grad else "fwd"


class GroupKey(NamedTuple):
    """What a group of measurements was measured on; a model is valid for problems of its key."""

    pass_: str
    cls: str
    variant: str
    dtype: str
    head_dim: int

    def label(self) -> str:
        v = "" if self.variant == "plain" else f" {self.variant}"
        return f"{self.pass_} {self.cls}{v} {self.dtype} D={self.head_dim}"


def group_key(p: Problem) -> GroupKey:
    return GroupKey(problem_pass(p), shape_class(p), variant_kind(p), p.dtype_name, p.head_dim)


# --- features -----------------------------------------------------------------------------------

FEATURES: tuple[str, ...] = ("overhead_us", "us_per_gflop", "us_per_gb", "us_per_gflop_tail")


def visible_pairs(p: Problem, *, dense: bool = False) -> int:
    """(query, key) pairs the problem's mask leaves (all of them with dense=True)."""
    if dense:
        return p.seqlen_q * p.seqlen_k
    if p.has_window:
        return window_visible_pairs(p.seqlen_q, p.seqlen_k, p.window)
    if p.effective_causal:
        return causal_visible_pairs(p.seqlen_q, p.seqlen_k)
    return p.seqlen_q * p.seqlen_k


@functools.lru_cache(maxsize=256)  # one problem is predicted for every eligible implementation
def features(p: Problem, sm_count: int, *, dense: bool = False) -> tuple[float, float, float, float]:
    """The model's inputs for `p` (FEATURES order): 1, GFLOP, GB, GFLOP x wave tail.

    dense=True counts the whole score matrix (an implementation that does not skip hidden blocks)
    and the (Sq, Sk) boolean mask it reads; else a window counts the pairs it leaves and the keys
    some query sees (window_visible_keys) as the K/V read."""
    elt = DTYPES_BY_NAME[p.dtype_name].itemsize if p.dtype_name in DTYPES_BY_NAME else 2
    pairs = visible_pairs(p, dense=dense)
    flop = 2.0 * p.batch * p.heads_q * pairs * (p.head_dim + p.head_dim_v)
    q_o = p.batch * p.heads_q * p.seqlen_q * (p.head_dim + p.head_dim_v)
    # K/V read: under a window, by a kernel that skips the hidden blocks, the keys some query sees
    keys = window_visible_keys(p.seqlen_q, p.seqlen_k, p.window) if p.has_window and not dense else p.seqlen_k
    kv = p.batch * p.heads_kv * keys * (p.head_dim + p.head_dim_v)
    nbytes = float(q_o + kv) * elt
    if p.needs_grad:
        flop *= 1.0 + BWD_FLOP_FACTOR
        nbytes *= 3.0  # reads q, k, v, o, do; writes dq, dk, dv (and the forward's traffic)
    if dense and p.is_variant:
        nbytes += float(p.seqlen_q * p.seqlen_k)  # the boolean mask (broadcast over batch and heads)
    programs = p.batch * p.heads_q * math.ceil(max(1, p.seqlen_q) / TAIL_BLOCK_M)
    sms = max(1, sm_count)
    waves = math.ceil(programs / sms)
    tail = waves * sms / programs - 1.0
    gflop = flop / 1e9
    return (1.0, gflop, nbytes / 1e9, gflop * tail)  # a tuple: the hot path does four products, no numpy


# --- the fitted model of one implementation on one group ---------------------------------------


@dataclass(frozen=True)
class Fit:
    """time_us = coef . features; coefficients >= 0; `rms` is the relative RMS error over the
    `n` points it was fitted to, whose GFLOP span [lo_gflop, hi_gflop]."""

    coef: tuple[float, float, float, float]
    rms: float
    n: int
    lo_gflop: float
    hi_gflop: float
    # the implementation's measured points (their order in the group) left out as slow outliers
    excluded: tuple[int, ...] = ()

    def predict_us(self, x: Sequence[float]) -> float:
        c = self.coef
        return c[0] * x[0] + c[1] * x[1] + c[2] * x[2] + c[3] * x[3]

    def describe(self) -> str:
        c0, g, b, t = self.coef
        parts = [f"{c0:.3g} us + "]
        parts.append(f"work at {1e3 / g:.4g} TFLOP/s" if g > 0 else "no compute term")
        if b > 0:
            parts.append(f" + bytes at {1e3 / b:.4g} TB/s")
        if t > 0:
            parts.append(f" + wave tail at {1e3 / t:.4g} TFLOP/s")
        out = "".join(parts) + f"; fit error {self.rms:.1%} over {self.n} points"
        if self.excluded:
            out += f" ({len(self.excluded)} slow outlier left out)"
        return out

    def to_yaml(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: _round(v) for k, v in zip(FEATURES, self.coef)}
        d.update(rms=_round(self.rms), n=self.n, gflop=[_round(self.lo_gflop), _round(self.hi_gflop)])
        if self.excluded:
            d["excluded"] = list(self.excluded)
        return d

    @staticmethod
    def from_yaml(d: Mapping[str, Any]) -> "Fit":
        missing = [k for k in FEATURES if not isinstance(d.get(k), (int, float)) or isinstance(d.get(k), bool)]
        if missing:
            raise ValueError(f"fit needs a number for each of {FEATURES}; missing or not a number: {missing}")
        coef = tuple(float(d[k]) for k in FEATURES)
        if any(c < 0 or not math.isfinite(c) for c in coef):
            raise ValueError(f"fit coefficients must be finite and >= 0, got {dict(zip(FEATURES, coef))}")
        if coef[1] <= 0 and coef[2] <= 0:
            raise ValueError("a fit must grow with the work or the bytes (us_per_gflop or us_per_gb > 0)")
        lo, hi = (d.get("gflop") or [0.0, 0.0])
        excluded = d.get("excluded") or []
        if not isinstance(excluded, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in excluded):
            raise ValueError(f"fit.excluded must be a list of point indices (ints >= 0), got {excluded!r}")
        return Fit(coef, float(d.get("rms", 0.0)), int(d.get("n", 0)), float(lo), float(hi),  # type: ignore[arg-type]
                   tuple(excluded))


def _round(x: float) -> float:
    return float(f"{x:.4g}")


# A model with one more term must have at most this fraction of the simpler one's error.
TERM_GAIN = 0.85
# The term a class's model keeps when the points cannot tell the work from the bytes (fit(prefer=)):
# the bytes for the memory-bound classes (few query rows per key read), the work elsewhere.
MEMORY_BOUND_CLASSES: tuple[str, ...] = ("decode", "speculative", "kvcache")
# The classes whose fits may leave out one slow outlier (robust_fit).
COMPUTE_BOUND_CLASSES: tuple[str, ...] = ("dense", "causal", "chunked", "causal_tall")


def preferred_term(cls: str) -> int:
    """The feature index (FEATURES order) fit() prefers for a class: 2 (bytes) or 1 (work)."""
    return 2 if cls in MEMORY_BOUND_CLASSES else 1


# A slow outlier (robust_fit): one of at least OUTLIER_MIN_POINTS points, measured at least
# OUTLIER_FACTOR times slower than the model of the others predicts, whose removal cuts the fit error
# to OUTLIER_GAIN of it or less. Timing faults only ever add time (a card at idle clocks after a
# compile, a host stall), and one such point can otherwise carry a group's fixed cost: on the H200
# the Gluon forward's smallest causal point read 0.31 ms where the held-out bench read it 1.2-1.5x
# SDPA at similar sizes, and its causal model's error went from 1.5% to 21%. Groups of the
# compute-bound classes only (Group.refit).
OUTLIER_MIN_POINTS = 5
OUTLIER_FACTOR = 2.0
OUTLIER_GAIN = 1.0 / 3.0


def robust_fit(xs: Sequence[Sequence[float]], times_us: Sequence[float], *, prefer: int = 1) -> Fit:
    """fit(), with at most one slow outlier left out (recorded in Fit.excluded by its index)."""
    full = fit(xs, times_us, prefer=prefer)
    n = len(times_us)
    if n < OUTLIER_MIN_POINTS:
        return full
    ratio = [t / max(full.predict_us(x), 1e-9) for x, t in zip(xs, times_us)]
    i = max(range(n), key=ratio.__getitem__)
    rest = [j for j in range(n) if j != i]
    sub = fit([xs[j] for j in rest], [times_us[j] for j in rest], prefer=prefer)
    if times_us[i] >= OUTLIER_FACTOR * sub.predict_us(xs[i]) and sub.rms <= full.rms * OUTLIER_GAIN:
        # the span stays the measured one: the left-out point was measured there, only slowly
        return dataclasses.replace(sub, excluded=(i,), lo_gflop=full.lo_gflop, hi_gflop=full.hi_gflop)
    return full


def fit(xs: Sequence[Sequence[float]], times_us: Sequence[float], *, prefer: int = 1) -> Fit:
    """Non-negative least squares on the relative error, by trying every subset of the four
    features: for each number of terms, the subset with the smallest error whose coefficients are
    all >= 0; more terms replace fewer only when they cut the error to TERM_GAIN of it or less.
    One point fits one term alone (a throughput: the class's own term, see `prefer`). From two
    points on, every model has the
    fixed cost and the work or the bytes term; the others join as the points allow (at most one
    term per two points beyond the first two).

    `prefer` (1: work, 2: bytes; FEATURES order) settles near-ties between models of the same size:
    a model without the preferred term replaces one with it only at TERM_GAIN of its error or less.
    Where the measured points keep the work and the bytes in one proportion (decode points of one
    GQA ratio), both models fit them alike and disagree everywhere else; the class's physics then
    decides (preferred_term()), not a rounding difference in the fit."""
    a = np.stack([np.asarray(x, dtype=np.float64) for x in xs])
    t = np.asarray(times_us, dtype=np.float64)
    if a.ndim != 2 or len(t) != len(a) or len(t) == 0:
        raise ValueError(f"fit: expected one feature row per time, got {a.shape} rows and {len(t)} times")
    if np.any(t <= 0) or not np.all(np.isfinite(t)):
        raise ValueError(f"fit: times must be finite and > 0, got {t.tolist()}")
    w = a / t[:, None]  # relative residuals: (a.c - t) / t = w.c - 1
    ones = np.ones(len(t))
    # From two points on, every model has the fixed cost (a kernel launch is never free; without it
    # a model fitted at large sizes predicts small ones at almost nothing) and the work or the
    # bytes; beyond those two, at most one term per two points (rounded up): four terms through four
    # points would pass through every one and say nothing between or beyond them.
    n = len(t)

    def search(with_overhead: bool) -> tuple[float, np.ndarray] | None:
        max_terms = 1 if not with_overhead else max(2, min(a.shape[1], (n + 1) // 2))
        best: tuple[float, np.ndarray] | None = None
        for r in range(1, max_terms + 1):
            size_best: tuple[float, np.ndarray] | None = None  # the best model with r terms
            size_pref: tuple[float, np.ndarray] | None = None  # ... and the best with the preferred term
            for subset in itertools.combinations(range(a.shape[1]), r):
                if 1 not in subset and 2 not in subset:
                    continue  # a model with neither work nor bytes says nothing about another size
                if with_overhead and 0 not in subset:
                    continue
                sub = w[:, subset]
                if not np.any(sub):
                    continue
                c, *_ = np.linalg.lstsq(sub, ones, rcond=None)
                if np.any(c < -1e-12):
                    continue
                full = np.zeros(a.shape[1])
                full[list(subset)] = np.maximum(c, 0.0)
                err = float(np.sqrt(np.mean((w @ full - 1.0) ** 2)))
                if size_best is None or err < size_best[0] - 1e-12:  # a tie keeps the earlier (work before bytes)
                    size_best = (err, full)
                if prefer in subset and (size_pref is None or err < size_pref[0] - 1e-12):
                    size_pref = (err, full)
            if size_pref is not None and size_best is not None and size_best[0] > size_pref[0] * TERM_GAIN - 1e-9:
                size_best = size_pref  # the other term is no clear improvement: the preferred one stays
            # a term must earn its place: r terms replace r - 1 only at TERM_GAIN of its error or less
            if size_best is not None and (best is None or size_best[0] < best[0] * TERM_GAIN - 1e-9):
                best = size_best
        return best

    # one point: a throughput; more: with the fixed cost, unless every such model needs a negative
    # coefficient (times that grow faster than the work), then without it
    best = (search(True) if n > 1 else None) or search(False)
    if best is None:  # only all-zero features (impossible for real shapes)
        raise ValueError("fit: no feature varies with the measurements")
    gf = a[:, 1]
    return Fit(tuple(float(c) for c in best[1]), best[0], len(t), float(gf.min()), float(gf.max()))  # type: ignore[arg-type]


# --- groups and points ------------------------------------------------------------------------


class Point(NamedTuple):
    """One measured shape of a group: the dims and every implementation's median time (ms).
    `host_us` holds the eager host time per call where the time is a CUDA-graph replay (decode)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    window: int = -1  # left window size for the window variant, -1 none
    ms: Mapping[str, float] = {}
    host_us: Mapping[str, float] = {}
    # unmeasured profiles: an argued order, fastest first, instead of times
    ranking: tuple[str, ...] = ()
    # the best config of each tuned implementation at this shape (the group's config otherwise)
    config: Mapping[str, Mapping[str, Any]] = {}

    def dims(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k)

    def same_shape(self, other: "Point") -> bool:
        return (self.dims(), self.window) == (other.dims(), other.window)

    def updated_by(self, new: "Point") -> "Point":
        """This shape measured again: the new times and configs win, the others stay."""
        return self._replace(ms={**self.ms, **new.ms}, config={**self.config, **new.config})

    def describe(self) -> str:
        w = f" window={self.window}" if self.window >= 0 else ""
        return f"B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} Sq={self.seqlen_q} Sk={self.seqlen_k}{w}"


def point_problem(key: GroupKey, pt: Point, device_kind: str = "cuda") -> Problem:
    """The Problem a point of group `key` measured (what attention() would build for it); for a
    serving class, the dense problem of the same work (B sequences of the point's lengths, causal)."""
    causal = key.cls in CAUSAL_CLASSES
    window = (pt.window, 0 if causal else pt.window) if pt.window >= 0 else NO_WINDOW
    return Problem(device_kind, 0, DTYPES_BY_NAME[key.dtype], pt.batch, pt.heads_q, pt.heads_kv, pt.seqlen_q,
                   pt.seqlen_k, key.head_dim, key.head_dim, causal, key.head_dim ** -0.5, "bhsd", True,
                   key.pass_ == "fwd_bwd", False, window, 30.0 if key.variant == "softcap" else 0.0,
                   key.variant == "sinks")


def point_class(key: GroupKey, pt: Point) -> str:
    """The class a point of group `key` falls in by its dims (the group's, when it is valid)."""
    if key.cls in SERVING_CLASSES:
        return serving_class(SERVING_KIND[key.cls], pt.seqlen_q)
    return shape_class(point_problem(key, pt))


def _usable(ms: float | None) -> bool:
    """A measured time a fit or a comparison may use: present, positive and finite."""
    return ms is not None and ms > 0 and math.isfinite(ms)


def _feature_distance(x: Sequence[float], y: Sequence[float]) -> float:
    """How far apart two problems' features are: |log| of the work ratio plus |log| of the bytes ratio."""
    return abs(math.log((x[1] + 1e-12) / (y[1] + 1e-12))) + abs(math.log((x[2] + 1e-12) / (y[2] + 1e-12)))


# anchored_ratio(): the measured points it anchors at (the nearest where both implementations were
# timed), and the distance (log GFLOP plus log bytes; 0.1 is about 10% in size) below which an
# anchor's weight stops growing: a problem at a measured point takes that point's ratio.
RATIO_POINTS = 2
ANCHOR_DISTANCE = 0.1

@dataclass
class Group:
    key: GroupKey
    points: list[Point]
    fits: dict[str, Fit] = field(default_factory=dict)
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    line: int | None = None

    def add(self, pt: Point) -> Point:
        """Take a measured point: one of the same shape is updated by it in place, else it is
        appended. Returns the point as stored (the caller refits)."""
        for i, old in enumerate(self.points):
            if old.same_shape(pt):
                self.points[i] = old.updated_by(pt)
                return self.points[i]
        self.points.append(pt)
        return pt

    def point_features(self, sm_count: int) -> list[tuple[float, float, float, float]]:
        """features() of every point (kept while the points and sm_count are unchanged)."""
        cached = self.__dict__.get("_x")
        if cached is None or cached[0] != (len(self.points), sm_count):
            cached = ((len(self.points), sm_count),
                      [features(point_problem(self.key, pt), sm_count) for pt in self.points])
            self.__dict__["_x"] = cached
        return cached[1]

    def implementations(self) -> list[str]:
        names: dict[str, None] = {}
        for pt in self.points:
            names.update(dict.fromkeys(pt.ms))
        return list(names)

    def measured(self, name: str, sm_count: int) -> list[tuple[tuple[float, float, float, float], float]]:
        """(features, time in us) of every point with a usable time of `name`, in the group's order:
        what its fit is made of (Fit.excluded counts in this list)."""
        out = []
        for pt, x in zip(self.points, self.point_features(sm_count)):
            ms = pt.ms.get(name)
            if _usable(ms):
                out.append((x, ms * 1e3))
        return out

    def refit(self, sm_count: int) -> None:
        """Fit every implementation measured at any point of the group (replaces self.fits)."""
        self.fits = {}
        for name in self.implementations():
            own = self.measured(name, sm_count)
            xs, ts = [x for x, _ in own], [t for _, t in own]
            if xs:
                # a slow outlier is left out only where time is close to linear in the work (the
                # dense compute-bound classes); in the memory-bound and serving classes one slow point
                # is as likely a real regime (a kernel without split-KV at a long cache), which the
                # unreliable-model rule of selection handles
                fitter = robust_fit if self.key.cls in COMPUTE_BOUND_CLASSES else fit
                self.fits[name] = fitter(xs, ts, prefer=preferred_term(self.key.cls))

    def nearest_points(self, p: Problem, name: str, sm_count: int, k: int = 2, *, has: str = "ms") -> list[Point]:
        """The k points nearest to `p` in log GFLOP and log bytes that hold `name` in their
        `has` field ("ms", "ranking" or "config"; name "": any non-empty one)."""
        x = features(p, sm_count)
        scored = []
        for i, (pt, y) in enumerate(zip(self.points, self.point_features(sm_count))):
            held = getattr(pt, has)
            if (name not in held) if name else not held:
                continue
            d = _feature_distance(x, y)
            scored.append((d, i, pt))
        scored.sort(key=lambda s: s[:2])
        return [pt for _, _, pt in scored[:k]]

    def anchored_ratio(self, p: Problem, a: str, b: str, sm_count: int) -> tuple[float, int] | None:
        """`a`'s time over `b`'s at `p`, as the two fits predict it, anchored at the RATIO_POINTS
        points nearest to `p` (log GFLOP plus log bytes) where both were timed, interleaved on the
        same inputs: at each, the fits' ratio at `p` times the measured ratio there over the fits'
        ratio there; the anchors weighted by 1 / (distance + ANCHOR_DISTANCE), a geometric mean.
        Between points the fits carry the trend from the nearer measurement; at a measured point
        (distance 0) its measured ratio alone is the answer. Beyond the work of every point timed
        for both (either way), the ratio measured at that end of the span is the answer, with 0
        anchors: the fits' trend is not carried past the measurements (on the H100 the
        forward+backward fits of the Triton and Gluon forwards, one of them set by a slow smallest
        point, drifted apart with the work and ranked a windowed 32k-token call the wrong way round,
        18.5 against 17.1 ms measured). Points either fit left out as a slow outlier are no anchors.
        Returns (ratio, anchors used), or None with fewer than RATIO_POINTS points holding both or
        without both fits."""
        fa, fb = self.fits.get(a), self.fits.get(b)
        if fa is None or fb is None:
            return None
        x = features(p, sm_count)
        left_out = self._left_out(a, b)  # slow outliers no fit trusts either
        both = [(i, pt, y) for i, (pt, y) in enumerate(zip(self.points, self.point_features(sm_count)))
                if i not in left_out and _usable(pt.ms.get(a)) and _usable(pt.ms.get(b))]
        if len(both) < RATIO_POINTS:
            return None
        # beyond the work of the points timed for both, the fits' trend is no measurement: the ratio
        # measured at the end of that span holds (0 anchors: the caller words it so)
        ends = [min(both, key=lambda t: t[2][1]), max(both, key=lambda t: t[2][1])]
        end = ends[1] if x[1] > ends[1][2][1] else ends[0] if x[1] < ends[0][2][1] else None
        if end is not None:
            return end[1].ms[a] / end[1].ms[b], 0
        at_p = max(fa.predict_us(x), 1e-9) / max(fb.predict_us(x), 1e-9)
        scored = []
        for i, pt, y in both:
            d = _feature_distance(x, y)
            fitted = max(fa.predict_us(y), 1e-9) / max(fb.predict_us(y), 1e-9)
            scored.append((d, i, at_p * (pt.ms[a] / pt.ms[b]) / fitted))
        scored.sort(key=lambda s: s[:2])
        near = scored[:RATIO_POINTS]
        if near[0][0] < 1e-9:  # the problem is a measured point: its measurement alone
            return near[0][2], 1
        w = [1.0 / (d + ANCHOR_DISTANCE) for d, _, _ in near]
        return math.exp(sum(wi * math.log(r) for wi, (_, _, r) in zip(w, near)) / sum(w)), len(near)

    def measured_ratio(self, p: Problem, a: str, b: str) -> float | None:
        """`a`'s time over `b`'s as measured at `p`'s very shape (batch, heads, lengths, window, head
        dim), timed interleaved on the same inputs; None when the group (its dtype may be the other
        half one) holds no such point with both, or either fit left that point out as a slow outlier."""
        if self.key.head_dim != p.head_dim:
            return None
        dims = (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k)
        for i, pt in enumerate(self.points):
            if pt.dims() != dims or point_problem(self.key, pt).window != p.window:
                continue
            ta, tb = pt.ms.get(a), pt.ms.get(b)
            if not (_usable(ta) and _usable(tb)) or i in self._left_out(a, b):
                return None
            return ta / tb
        return None

    def fewest_pairs(self, *names: str) -> tuple[int, Point] | None:
        """The point with the fewest query-key pairs per head (Sq x Sk; the least work at a tie)
        where every one of `names` has a usable time that its fit did not leave out as a slow
        outlier, with its Sq x Sk; None where no point holds them all. Kept until the points or fits
        change (every prediction of a compute-bound problem asks)."""
        fits = tuple(self.fits.get(n) for n in names)
        cache = self.__dict__.setdefault("_fewest", {})
        key = (names, fits, len(self.points))  # a refit or a new point makes a new key
        if key not in cache:
            left_out = self._left_out(*names)
            best: tuple[int, int, int] | None = None  # (pairs, work order, index)
            for i, pt in enumerate(self.points):
                if i in left_out or not all(_usable(pt.ms.get(n)) for n in names):
                    continue
                pairs = pt.seqlen_q * pt.seqlen_k
                cand = (pairs, pt.batch * pt.heads_q * pairs, i)
                if best is None or cand < best:
                    best = cand
            cache[key] = None if best is None else (best[0], self.points[best[2]])
        return cache[key]

    def gqa_span(self, name: str) -> tuple[int, int] | None:
        """The smallest and largest query heads per K/V head among the points where `name` has a time
        (None where it has none)."""
        ratios = [pt.heads_q // max(1, pt.heads_kv) for pt in self.points if pt.ms.get(name)]
        return (min(ratios), max(ratios)) if ratios else None

    def _left_out(self, *names: str) -> set[int]:
        """Indices into self.points of the points any of `names`' fits left out (Fit.excluded counts
        in the list of points that hold a usable time of its implementation, Group.measured's order)."""
        out: set[int] = set()
        for name in names:
            f = self.fits.get(name)
            if f is not None and f.excluded:
                usable = [i for i, pt in enumerate(self.points) if _usable(pt.ms.get(name))]
                out |= {usable[j] for j in f.excluded if j < len(usable)}
        return out

    def worst_error(self, name: str, sm_count: int) -> float:
        """How far `name`'s fit misses the group's point it misses most, as a factor minus one in
        either direction (predicted 2x too fast or 2x too slow: 1.0), where an average hides one
        bad point in three; 0.0 without a fit. Kept until the points or fits change."""
        f = self.fits.get(name)
        cache = self.__dict__.setdefault("_worst", {})
        key = (name, sm_count, f, len(self.points))  # a refit or a new point makes a new key
        if key not in cache:
            worst = 0.0
            if f is not None:
                for j, (x, us) in enumerate(self.measured(name, sm_count)):
                    if j not in f.excluded:
                        ratio = max(f.predict_us(x), 1e-9) / us
                        worst = max(worst, max(ratio, 1.0 / ratio) - 1.0)
            cache[key] = worst
        return cache[key]

    def config_for(self, p: Problem, name: str, sm_count: int) -> dict[str, Any]:
        """`name`'s tuned config for `p`: the nearest point's, else the group's, else {}."""
        near = self.nearest_points(p, name, sm_count, 1, has="config")
        if near:
            return dict(near[0].config[name])
        return dict(self.config.get(name, {}))


# How far outside the measured span of work a prediction may go before it is called an
# extrapolation (and autotune, when on, measures the problem instead).
EXTRAPOLATION_FACTOR = 4.0


def _extrapolates(f: Fit, work: float) -> bool:
    """Whether `work` (GFLOP) lies beyond EXTRAPOLATION_FACTOR of the span `f` was measured over
    (a fit to one point always extrapolates)."""
    return f.n < 2 or not (f.lo_gflop / EXTRAPOLATION_FACTOR <= work <= f.hi_gflop * EXTRAPOLATION_FACTOR)


def _short_rows(g: "Group", name: str, p: Problem) -> str:
    """Words when `p` has fewer query-key pairs per head (Sq x Sk) than 1 / EXTRAPOLATION_FACTOR of
    the fewest `name` was measured at in `g`, else "". Asked only for problems of a compute-bound
    class (decode and speculative steps have a row or a few: their models' bytes and wave tail follow
    the cache length and the programs, not tiles of rows). The models count work and bytes, not how short
    rows fill a kernel's tiles and programs, which differs from kernel to kernel: on the H100 a D=64
    group measured from 1024 x 1024 up put the Triton kernel 2% ahead of plain SDPA on ViT's 197-token
    rows (extrapolating its lower fitted launch cost), where it ran 23% slower."""
    edge = g.fewest_pairs(name)
    pairs = p.seqlen_q * p.seqlen_k
    if edge is None or pairs * EXTRAPOLATION_FACTOR >= edge[0]:
        return ""
    return (f"extrapolated: {p.seqlen_q} x {p.seqlen_k} query-key pairs per head, fewer than 1/"
            f"{EXTRAPOLATION_FACTOR:g} of the fewest measured ({edge[1].seqlen_q} x {edge[1].seqlen_k})")


@dataclass(frozen=True)
class Prediction:
    name: str
    ms: float
    key: GroupKey  # the group whose model predicted (may differ from the problem's own)
    fit: Fit
    borrowed: tuple[str, ...] = ()  # how the group differs from the problem's own, in words
    estimated: str = ""  # non-empty: a variant estimated from a plain model (how)
    extrapolated: bool = False
    short_rows: str = ""  # non-empty: extrapolated to shorter rows than measured (_short_rows, in words)
    # for describe(): the nearest measured points are looked up only when a person asks
    group: "Group | None" = field(default=None, compare=False, repr=False)
    problem: Problem | None = field(default=None, compare=False, repr=False)
    sm_count: int = 1
    model_name: str = ""  # whose fit predicted (another implementation's for a variant it runs as)
    gflop: float = 0.0  # the problem's work as the model counted it
    x: tuple[float, ...] = field(default=(), compare=False, repr=False)  # the features it predicted from

    def at_work(self, gflop: float) -> float:
        """The predicted ms of the same problem scaled to `gflop` of work (bytes and tail alike)."""
        if not self.x or self.x[1] <= 0:
            return self.ms
        s = gflop / self.x[1]
        return max(self.fit.predict_us((self.x[0], self.x[1] * s, self.x[2] * s, self.x[3] * s)), 1e-3) / 1e3

    @property
    def measured_as(self) -> str:
        """The implementation whose measurements the model was fitted to (model_name, else name)."""
        return self.model_name or self.name

    @property
    def nearest(self) -> tuple[Point, ...]:
        if self.group is None or self.problem is None:
            return ()
        return tuple(self.group.nearest_points(self.problem, self.measured_as, self.sm_count))

    @property
    def worst_error(self) -> float:
        """How far the model misses its worst measured point, a factor minus one (Group.worst_error);
        its relative rms where the group is not at hand."""
        if self.group is None:
            return self.fit.rms
        return self.group.worst_error(self.measured_as, self.sm_count)

    @property
    def exact(self) -> bool:
        return not self.borrowed and not self.estimated and not self.extrapolated

    def describe(self) -> str:
        how = [f"model {self.key.label()}: {self.fit.describe()}"]
        if self.borrowed:
            how.append("borrowed: " + ", ".join(self.borrowed))
        if self.estimated:
            how.append(self.estimated)
        if self.extrapolated and self.fit.n < 2:
            how.append(f"fitted to one point ({self.fit.lo_gflop:.3g} GFLOP; this problem {self.gflop:.3g})")
        elif self.short_rows:
            how.append(self.short_rows)
        elif self.extrapolated:
            how.append(f"extrapolated: this problem's {self.gflop:.3g} GFLOP lies beyond the measured "
                       f"{self.fit.lo_gflop:.3g}..{self.fit.hi_gflop:.3g}")
        mname = self.measured_as
        nearest = self.nearest
        if nearest:
            how.append("nearest measured: " + "; ".join(
                f"{pt.describe()} -> {pt.ms[mname]:.4g} ms" for pt in nearest if mname in pt.ms))
        return f"{self.name}: {self.ms:.4g} ms predicted ({'; '.join(how)})"


def compared_where_measured(a: Prediction, b: Prediction) -> tuple[float, float, str]:
    """Two predictions compared where both models were measured: at the problem's own work, or,
    when either extrapolates, at that work clamped into the span both groups measured (a model's
    fixed cost, fitted at large sizes, decides nothing far below them); when either is asked about
    shorter rows than measured (Prediction.short_rows), as both were timed at the shortest point
    that holds both. Returns (a ms, b ms, note)."""
    if (a.short_rows or b.short_rows) and a.group is not None and a.group is b.group \
            and not (a.estimated or b.estimated):
        # shorter rows than either was measured at: no trend is carried below the shortest point
        # measured for both; the two compare as they were timed there
        edge = a.group.fewest_pairs(a.measured_as, b.measured_as)
        if edge is not None:
            pt = edge[1]
            return (pt.ms[a.measured_as], pt.ms[b.measured_as],
                    f"compared as measured at the fewest query-key pairs per head both were timed at, {pt.describe()}")
    if not (a.extrapolated or b.extrapolated) or a.fit.n < 2 or b.fit.n < 2:
        return a.ms, b.ms, ""
    if a.estimated or b.estimated or not math.isclose(a.gflop, b.gflop, rel_tol=1e-9):
        return a.ms, b.ms, ""  # the two count different work (a variant one of them does not fuse)
    lo, hi = max(a.fit.lo_gflop, b.fit.lo_gflop), min(a.fit.hi_gflop, b.fit.hi_gflop)
    if lo > hi or a.gflop <= 0:
        return a.ms, b.ms, ""
    w = min(max(a.gflop, lo), hi)
    if w == a.gflop:
        return a.ms, b.ms, ""
    return a.at_work(w), b.at_work(w), f"compared at {w:.3g} GFLOP, inside both models' measured work"


class CostModel:
    """Every group of one profile, indexed for prediction."""

    def __init__(self, groups: Iterable[Group], sm_count: int) -> None:
        self.groups: dict[GroupKey, Group] = {}
        for g in groups:
            self.groups[g.key] = g
        self.sm_count = sm_count
        self._search_cache: dict[tuple[GroupKey, str, bool], tuple[Group, tuple[str, ...]] | None] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def candidates(self, key: GroupKey, *, own_class: bool = False) -> Iterable[tuple[GroupKey, tuple[str, ...]]]:
        """Groups that may stand in for `key`, nearest first, with the borrowing in words: the
        problem's class, then its neighbours; within a class the nearest head dim (log scale), and
        at each head dim the problem's dtype, then the other half-precision one (the same kernels)."""
        dtypes = [(key.dtype, ())]
        if key.dtype in HALF_DTYPE_TWIN:
            twin = HALF_DTYPE_TWIN[key.dtype]
            dtypes.append((twin, (f"{key.dtype} borrows {twin}'s measurements",)))
        classes = [(key.cls, ())]
        if not own_class:
            classes += [(c, (f"class {key.cls} borrows class {c}",)) for c in CLASS_NEIGHBOURS[key.cls]]
        dims = sorted({g.head_dim for g in self.groups},
                      key=lambda d: (abs(math.log2(d) - math.log2(max(1, key.head_dim))), -d))
        for cls, why_c in classes:
            for d in dims:
                why_d = () if d == key.head_dim else (f"D={key.head_dim} borrows D={d}",)
                for dt, why_t in dtypes:
                    yield GroupKey(key.pass_, cls, key.variant, dt, d), why_c + why_t + why_d

    def find(self, key: GroupKey, name: str, *, own_class: bool = False) -> tuple[Group, tuple[str, ...]] | None:
        """The nearest group with a model of `name` for problems of `key`, and how it differs."""
        ck = (key, name, own_class)
        if ck not in self._search_cache:
            found = None
            for k, why in self.candidates(key, own_class=own_class):
                g = self.groups.get(k)
                if g is not None and name in g.fits:
                    found = (g, why)
                    break
            self._search_cache[ck] = found
        return self._search_cache[ck]

    def predict(self, p: Problem, name: str, *, fuses_variants: bool = True, runs_as: str = "",
                key: GroupKey | None = None) -> Prediction | None:
        """The predicted time of implementation `name` on `p`, or None when the profile has no
        model that can say. `key`: group_key(p), if known.

        A variant problem (window, softcap, sinks) takes a group measured with that variant in the
        problem's own class; else an implementation that fuses the variant is predicted by its plain
        model at the visible work, and one that does not by the plain model of `runs_as` (the kernel
        that really runs it: a masked kernel, or explicit math) at the whole score matrix plus the
        mask; with no such model, None (the built-in order decides)."""
        key = key or group_key(p)
        dense = False
        estimated = ""
        model_name = name
        x = features(p, self.sm_count)
        if key.variant == "plain":
            found = self.find(key, name)
        else:
            found = self.find(key, name, own_class=True)
            own = found[0].fits[name] if found is not None else None
            if own is not None and fuses_variants and _extrapolates(own, x[1]):
                # the variant's own points lie far from this problem (a few small windows fix no
                # throughput: two near-equal times fit a launch cost and an absurd rate): the plain
                # model of the same kernel at the visible work, measured near it, says more
                plain = self.find(key._replace(variant="plain"), name)
                if plain is not None and not _extrapolates(plain[0].fits[name], x[1]):
                    found = plain
                    estimated = (f"{key.variant} estimated from the plain model at the visible work (its own "
                                 f"model was measured at {own.lo_gflop:.3g}..{own.hi_gflop:.3g} GFLOP)")
            if found is None:
                plain = key._replace(variant="plain")
                if fuses_variants:
                    found = self.find(plain, name)
                    estimated = f"{key.variant} estimated from the plain model at the visible work"
                elif runs_as:
                    model_name, dense = runs_as, True
                    found = self.find(plain, runs_as)
                    estimated = (f"{key.variant} runs as {runs_as} over the whole score matrix and its mask: "
                                 f"{runs_as}'s plain model at that work")
        if found is None:
            return None
        g, borrowed = found
        f = g.fits[model_name]
        if dense:
            x = features(p, self.sm_count, dense=True)
        us = max(f.predict_us(x), 1e-3)
        work = x[1]
        short = _short_rows(g, model_name, p) if key.cls in COMPUTE_BOUND_CLASSES else ""
        extrapolated = _extrapolates(f, work) or bool(short)
        return Prediction(name, us / 1e3, g.key, f, borrowed, estimated, extrapolated, short, g, p, self.sm_count,
                          model_name, work, tuple(x))
