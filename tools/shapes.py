"""The named shape lists that the tuner and the benchmark run, each with where it comes from.

A `Shape` is one attention problem in one pass ("fwd", "fwd_bwd" or "decode", the passes of
dispatch/profile_store.py), optionally with a causal sliding window. The benchmark runs the
benchmark shapes; the tuner measures the *model grid* (`tune_shapes`): for every group of the cost
model (dispatch/costmodel.py: pass x shape class x variant x dtype x head dim) a few work sizes,
generic round sizes (powers of two and their 1.5x) so that the fitted model is judged on the shapes
people run, not on the ones it was fitted to. The grid also holds the benchmark shapes, so that the
tuned-shape benchmark keeps measuring measured shapes.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from flashdispatch import serving
from flashdispatch.costmodel import SERVING_KIND, GroupKey, group_key
from flashdispatch.serving import ServingProblem
from flashdispatch.problem import DECODE_MAX_SEQLEN_Q, DTYPES_BY_NAME, Problem, problem_from_shape
from flashdispatch.profile_store import TIMING_PASSES, timing_pass


SERVING_KINDS: tuple[str, ...] = ("varlen", "kvcache")
# The page size of the paged caches the tuner measures (vLLM's default block size).
SERVING_PAGE = 16


class Shape(NamedTuple):
    label: str
    dtype: str  # "bf16" | "fp16" | ...
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    pass_: str  # "fwd" | "fwd_bwd" | "decode"
    # a causal sliding window: each query row sees itself and the `window` keys before it (-1: none)
    window: int = -1
    # a serving call (dispatch/serving.py), causal: "varlen", B packed sequences of mean length Sq = Sk
    # (varlen_lengths); "kvcache", Sq new rows per sequence against a paged cache of Sk keys each
    # (block size SERVING_PAGE); "": a dense attention() call
    serving: str = ""

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(B, Hq, Hkv, Sq, Sk, D), the order of problem_from_shape."""
        return (self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k, self.head_dim)

    @property
    def needs_grad(self) -> bool:
        return self.pass_ == "fwd_bwd"

    def problem(self, device_kind: str = "cuda") -> Problem:
        """The Problem attention() builds for this shape (meta tensors: no memory); for a serving
        shape, the dense problem of the same work (the cost model's, ServingProblem.work)."""
        return problem_from_shape(self.dims, dtype=self.dtype, device_kind=device_kind, causal=self.causal,
                                  needs_grad=self.needs_grad, window=(self.window, 0) if self.window >= 0 else None)

    def serving_problem(self, device_kind: str = "cuda") -> ServingProblem:
        """The ServingProblem attention_varlen / attention_kvcache builds for this serving shape's
        call (meta tensors: no memory, no values)."""
        meta: dict[str, Any] = dict(device="meta", dtype=DTYPES_BY_NAME[self.dtype])
        ints: dict[str, Any] = dict(device="meta", dtype=torch.int32)
        scale = self.head_dim ** -0.5
        if self.serving == "varlen":
            lengths = varlen_lengths(self.batch, self.seqlen_q)
            q = torch.empty(sum(lengths), self.heads_q, self.head_dim, **meta).requires_grad_(self.needs_grad)
            k = torch.empty(sum(lengths), self.heads_kv, self.head_dim, **meta)
            with torch.set_grad_enabled(self.needs_grad):
                sp = serving.varlen_problem(q, k, k, torch.empty(self.batch + 1, **ints), max(lengths), max(lengths),
                                            self.causal, scale, None, None, None, False)
        elif self.serving == "kvcache":
            pages = -(-self.seqlen_k // SERVING_PAGE)
            q = torch.empty(self.batch, self.seqlen_q, self.heads_q, self.head_dim, **meta)
            kc = torch.empty(self.batch * pages, SERVING_PAGE, self.heads_kv, self.head_dim, **meta)
            sp = serving.kvcache_problem(q, kc, kc, torch.empty(self.batch, pages, **ints), self.causal, scale, None,
                                         None, None, False)
        else:
            raise ValueError(f"shape {self.label!r}: not a serving shape (serving={self.serving!r})")
        return sp.evolve(device_kind=device_kind)

    @property
    def group(self) -> GroupKey:
        """The cost model's group this shape is a point of."""
        return self.serving_problem().model_key() if self.serving else group_key(self.problem())

    def describe(self) -> str:
        q = f"Sq={self.seqlen_q} Sk={self.seqlen_k}" if self.seqlen_q != self.seqlen_k else f"S={self.seqlen_k}"
        if self.serving == "varlen":
            q = f"mean S={self.seqlen_k}"
        w = f" window={self.window}" if self.window >= 0 else ""
        kind = {"varlen": " varlen", "kvcache": f" kvcache(page {SERVING_PAGE})"}.get(self.serving, "")
        return (
            f"{self.pass_}{kind} {self.dtype} B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} {q} "
            f"D={self.head_dim}{' causal' if self.causal else ''}{w}"
        )


def check_shape(s: Shape) -> Shape:
    """Raise ValueError when a shape's pass disagrees with what the dispatcher would look up."""
    if s.dtype not in DTYPES_BY_NAME:
        raise ValueError(f"shape {s.label!r}: dtype expected one of {sorted(DTYPES_BY_NAME)}, got {s.dtype!r}")
    if s.pass_ not in TIMING_PASSES:
        raise ValueError(f"shape {s.label!r}: pass expected one of {TIMING_PASSES}, got {s.pass_!r}")
    if s.heads_kv <= 0 or s.heads_q % s.heads_kv:
        raise ValueError(f"shape {s.label!r}: heads_q={s.heads_q} must be a multiple of heads_kv={s.heads_kv}")
    if s.window >= 0 and not s.causal:
        raise ValueError(f"shape {s.label!r}: window={s.window} needs causal=True (the tuner measures causal "
                         "sliding windows)")
    if s.window < -1:
        raise ValueError(f"shape {s.label!r}: window expected -1 (none) or >= 0, got {s.window}")
    if s.serving:
        return _check_serving(s)
    looked_up = timing_pass(s.problem())
    if s.pass_ != looked_up:
        raise ValueError(
            f"shape {s.label!r}: pass={s.pass_!r} but the dispatcher looks up Sq={s.seqlen_q}, Sk={s.seqlen_k}"
            f"{' causal' if s.causal else ''} as {looked_up!r}"
        )
    return s


def _check_serving(s: Shape) -> Shape:
    if s.serving not in SERVING_KINDS:
        raise ValueError(f"shape {s.label!r}: serving expected one of {SERVING_KINDS} or '', got {s.serving!r}")
    if not s.causal or s.window >= 0:
        raise ValueError(f"shape {s.label!r}: the tuner measures serving calls causal, without a window")
    if s.serving == "varlen":
        if s.seqlen_q != s.seqlen_k or s.pass_ not in ("fwd", "fwd_bwd"):
            raise ValueError(f"shape {s.label!r}: a varlen shape has Sq = Sk (the mean length) and pass fwd or "
                             f"fwd_bwd, got Sq={s.seqlen_q} Sk={s.seqlen_k} pass={s.pass_!r}")
        return s
    timed = serving_timed_pass("kvcache", "fwd", s.seqlen_q)
    if s.seqlen_q > s.seqlen_k or s.pass_ != timed:
        raise ValueError(f"shape {s.label!r}: a kvcache shape has Sq <= Sk and pass {timed!r} (forward only), got "
                         f"Sq={s.seqlen_q} Sk={s.seqlen_k} pass={s.pass_!r}")
    return s


def serving_timed_pass(kind: str, pass_: str, seqlen_q: int) -> str:
    """How a serving call of `pass_` is timed: a cache step of few rows as a graph replay
    ("decode"), everything else in its own pass."""
    return "decode" if kind == "kvcache" and seqlen_q <= DECODE_MAX_SEQLEN_Q else pass_


def varlen_lengths(batch: int, mean: int) -> list[int]:
    """The sequence lengths of a varlen shape: `batch` lengths spread evenly from a quarter of
    `mean` to 1.75x it (a packed batch mixes short and long sequences), summing to batch x mean,
    in a fixed shuffled order."""
    if batch <= 1:
        return [mean] * batch
    lo, hi = max(1, mean // 4), max(1, mean * 7 // 4)
    lengths = [round(lo + (hi - lo) * i / (batch - 1)) for i in range(batch)]
    lengths[-1] = max(1, lengths[-1] + batch * mean - sum(lengths))
    random.Random(batch * 100_003 + mean).shuffle(lengths)
    return lengths


# The FlashAttention-2 paper's benchmark (section 4.1, also flash-attention's benchmarks/
# benchmark_flash_attention.py): B*S = 16k tokens, hidden size 2048 split into 2048/D heads,
# S from 512 to 16k, D 64 and 128, with and without the causal mask.
FA2_TOKENS = 16384
FA2_HIDDEN = 2048
FA2_SEQLENS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
FA2_HEAD_DIMS: tuple[int, ...] = (64, 128)


def fa2_sweep(
    dtypes: Sequence[str] = ("bf16",),
    head_dims: Sequence[int] = FA2_HEAD_DIMS,
    seqlens: Sequence[int] = FA2_SEQLENS,
    causals: Sequence[bool] = (False, True),
    passes: Sequence[str] = ("fwd", "fwd_bwd"),
) -> list[Shape]:
    out = []
    for pass_ in passes:
        for dt in dtypes:
            for d in head_dims:
                for causal in causals:
                    for s in seqlens:
                        h = FA2_HIDDEN // d
                        b = max(1, FA2_TOKENS // s)
                        label = f"fa2-{pass_}-{dt}-d{d}-{'causal' if causal else 'full'}-s{s}"
                        out.append(check_shape(Shape(label, dt, b, h, h, s, s, d, causal, pass_)))
    return out


def special_shapes(dtypes: Sequence[str] = ("bf16",)) -> list[Shape]:
    """Shapes where plain SDPA has no fast path, at D=128 (GQA prefill, chunked prefill, decode)."""
    out = []
    for dt in dtypes:
        out += [
            # GQA as in Llama-3-8B / Mistral-7B (32 query heads, 8 KV heads): prefill, causal.
            Shape(f"gqa4-{dt}-b4-s4096", dt, 4, 32, 8, 4096, 4096, 128, True, "fwd"),
            # Chunked prefill: a 512-token chunk against an 8k KV cache, bottom-right causal.
            Shape(f"chunked-prefill-{dt}-b4-q512-k8192", dt, 4, 32, 32, 512, 8192, 128, True, "fwd"),
            # Decode: one new token per sequence against a KV cache (32 MiB .. 512 MiB of K/V).
            Shape(f"decode-{dt}-b1-gqa4-k8192", dt, 1, 32, 8, 1, 8192, 128, False, "decode"),
            Shape(f"decode-{dt}-b8-gqa4-k8192", dt, 8, 32, 8, 1, 8192, 128, False, "decode"),
            Shape(f"decode-{dt}-b64-gqa4-k2048", dt, 64, 32, 8, 1, 2048, 128, False, "decode"),
            Shape(f"decode-{dt}-b1-mha-k32768", dt, 1, 32, 32, 1, 32768, 128, False, "decode"),
        ]
    return [check_shape(s) for s in out]


def bench_shapes(dtypes: Sequence[str] = ("bf16",), *, quick: bool = False) -> list[Shape]:
    """What `flashdispatch bench` runs: the FA2 sweep, then the special shapes.

    quick: S in {1024, 4096, 16384} only (one third of the sweep), all the special shapes.
    """
    seqlens = (1024, 4096, 16384) if quick else FA2_SEQLENS
    return fa2_sweep(dtypes, seqlens=seqlens) + special_shapes(dtypes)


# --- the model's grid --------------------------------------------------------------------------
#
# Every shape of the grid has GRID_HEADS_Q query heads (GQA 1 / 4 / 8 through the KV heads) and
# round lengths: powers of two and their 1.5x. Real models' shapes (odd head counts, prompt and
# cache lengths that are not powers of two) are what the model is judged on, so they stay out.
GRID_HEADS_Q = 16
# Points per shape class as (B, Hkv, Sq, Sk), in the order they are measured. The first two of
# each class span its work (a small problem and a large one), so that a run cut short still fits
# a model with an overhead and a work term; the next ones add sizes and GQA ratios (the bytes term).
# Sq = Sk, 2k to 128k tokens; the first two at 2k and 8k tokens (the benchmark's FA2 lengths all hold
# 16k): bytes that do not follow the work tell the overhead from the bytes; the third has short rows
# (512, the FA2 sweep's shortest): how each kernel fills its tiles and programs there is no trend of
# the longer rows (encoders run 197-1500 tokens), and the selection carries none below the shortest
# rows measured
SQUARE_POINTS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 2048, 2048), (1, 2, 8192, 8192), (64, 4, 512, 512), (2, 4, 16384, 16384),
    (4, 2, 4096, 4096), (16, 16, 1024, 1024), (2, 16, 6144, 6144), (8, 4, 16384, 16384))
CLASS_POINTS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "dense": SQUARE_POINTS,  # no mask
    "causal": SQUARE_POINTS,  # causal: the same sizes
    # a prompt chunk of 256..2k rows against a cache 4x..32x longer (bottom-right causal)
    "chunked": ((1, 4, 512, 8192), (2, 16, 2048, 16384), (1, 2, 1024, 32768), (2, 4, 1024, 4096),
                (4, 16, 256, 8192), (1, 4, 2048, 65536)),
    # 2..16 draft tokens verified against a cache (bottom-right causal), batch 1..256
    # (the third: few programs against a long cache, where a kernel without split-KV runs on a
    # handful of SMs: the wave-tail term needs such a point)
    "speculative": ((1, 2, 4, 8192), (16, 4, 8, 4096), (1, 2, 8, 131072), (4, 16, 16, 32768), (64, 4, 2, 2048),
                    (256, 2, 4, 1024)),
    # one row per sequence against its cache: batch 1..256, cache 1k..128k
    "decode": ((1, 2, 1, 8192), (32, 4, 1, 4096), (1, 4, 1, 131072), (4, 16, 1, 32768), (256, 2, 1, 1024),
               (128, 4, 1, 8192), (8, 16, 1, 2048)),
    # causal with Sq > Sk (the first Sq - Sk rows see no key): rare, small
    "causal_tall": ((2, 16, 2048, 1024), (1, 4, 8192, 4096), (8, 2, 1024, 512)),
}
# The window variant (causal sliding window), as (B, Hkv, S, window).
WINDOW_POINTS: tuple[tuple[int, int, int, int], ...] = (
    (1, 4, 8192, 1024), (4, 16, 4096, 256), (1, 2, 16384, 4096), (2, 16, 8192, 512))
WINDOW_HEAD_DIMS: tuple[int, ...] = (64, 128)
# Classes measured per pass (decode and speculative steps run without gradients).
PASS_CLASSES: dict[str, tuple[str, ...]] = {
    "fwd": ("causal", "dense", "chunked", "speculative", "decode", "causal_tall"),
    "fwd_bwd": ("causal", "dense", "chunked", "causal_tall"),
}
# Serving calls per class (dispatch/costmodel.py's SERVING_CLASSES) as (B, Hkv, Sq, Sk): a varlen
# point is B packed sequences of mean length Sq = Sk (varlen_lengths), a kvcache point Sq new rows
# per sequence against a paged cache of Sk keys each (every sequence full: the fallback's gather
# copies the whole capacity anyway, and our kernel's time then matches what it reads).
SERVING_POINTS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "varlen": ((8, 4, 1024, 1024), (16, 4, 4096, 4096), (4, 16, 2048, 2048), (32, 2, 512, 512)),
    "kvcache": ((1, 2, 1, 8192), (64, 4, 1, 2048), (8, 4, 8, 16384), (256, 2, 1, 1024), (16, 16, 4, 32768)),
    "kvcache_chunked": ((1, 4, 512, 8192), (4, 2, 1024, 16384), (2, 16, 256, 4096)),
}
SERVING_PASS_CLASSES: dict[str, tuple[str, ...]] = {"fwd": ("varlen", "kvcache", "kvcache_chunked"),
                                                     "fwd_bwd": ("varlen",)}
MODEL_HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 192, 256)
QUICK_HEAD_DIMS: tuple[int, ...] = (64, 128)
MODEL_DTYPES: tuple[str, ...] = ("bf16", "fp16")


class GridSpec(NamedTuple):
    """How many points of each class a grid measures: the class's first `points[(pass, class)]`
    of CLASS_POINTS (absent: the class is not measured in that pass), the window variant's first
    `window_points`, at these dtypes and head dims. Every dtype after the first is measured at
    `second_dtype_head_dims` only (the others borrow the first dtype's models, and the decision
    says so) with at most `second_dtype_points` points per group."""

    points: dict[tuple[str, str], int]
    window_points: int
    window_head_dims: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    second_dtype_points: int
    second_dtype_head_dims: tuple[int, ...]
    class_head_dims: dict[str, tuple[int, ...]]  # classes measured at these head dims only
    bench_quick: bool  # which benchmark list the grid holds: bench_shapes(quick=...)
    # serving calls: the first `serving_points[(pass, class)]` of SERVING_POINTS, at the first
    # dtype and these head dims (the other dtype and head dims borrow, and the decision says so)
    serving_points: dict[tuple[str, str], int] = {}
    serving_head_dims: tuple[int, ...] = ()


QUICK_GRID = GridSpec(
    # the square classes at D 64 and 128 also hold the quick benchmark's three FA2 lengths (16k
    # tokens each, so alike in bytes): own points at 2k tokens (and 8k for the forward) separate the
    # overhead from the bytes there. With the 2k point alone, a fit that left it out as a slow
    # outlier could not tell them apart: on the H200 the Gluon causal forward's model took a 106 us
    # overhead, predicted Llama-3.1 70B's TP=8 prefill (8 heads, 12k tokens) 22% slow, and SDPA ran
    # where Gluon was 16% faster. The forward's 8k points are paid for by decode's third own point
    # (decode at D=128 also holds the benchmark's four decode shapes); the plan stays under 10 minutes.
    points={("fwd", "causal"): 2, ("fwd", "dense"): 3, ("fwd", "chunked"): 2, ("fwd", "speculative"): 3,
            ("fwd", "decode"): 2, ("fwd", "causal_tall"): 2,
            ("fwd_bwd", "causal"): 1, ("fwd_bwd", "dense"): 1, ("fwd_bwd", "chunked"): 2},
    window_points=2, window_head_dims=(128,), head_dims=QUICK_HEAD_DIMS, dtypes=("bf16",),
    second_dtype_points=2, second_dtype_head_dims=QUICK_HEAD_DIMS, class_head_dims={}, bench_quick=True,
    serving_points={("fwd", "varlen"): 2, ("fwd", "kvcache"): 2, ("fwd", "kvcache_chunked"): 2,
                    ("fwd_bwd", "varlen"): 2},
    serving_head_dims=(128,),
)
FULL_GRID = GridSpec(
    points={("fwd", "causal"): 4, ("fwd", "dense"): 4, ("fwd", "chunked"): 3, ("fwd", "speculative"): 3,
            ("fwd", "decode"): 3, ("fwd", "causal_tall"): 3,
            ("fwd_bwd", "causal"): 4, ("fwd_bwd", "dense"): 4, ("fwd_bwd", "chunked"): 3},
    window_points=4, window_head_dims=WINDOW_HEAD_DIMS, head_dims=MODEL_HEAD_DIMS, dtypes=MODEL_DTYPES,
    second_dtype_points=3, second_dtype_head_dims=(128,),
    class_head_dims={"causal_tall": QUICK_HEAD_DIMS},  # rare: the other head dims borrow
    bench_quick=False,
    serving_points={("fwd", "varlen"): 3, ("fwd", "kvcache"): 3, ("fwd", "kvcache_chunked"): 3,
                    ("fwd_bwd", "varlen"): 3},
    serving_head_dims=(128,),
)


def _class_shape(pass_: str, cls: str, dt: str, d: int, pt: tuple[int, int, int, int]) -> Shape:
    b, hkv, sq, sk = pt
    causal = cls not in ("dense", "decode")
    timed = "decode" if cls == "decode" else pass_
    lens = f"s{sk}" if sq == sk else f"q{sq}-k{sk}"
    label = f"grid-{pass_}-{cls}-{dt}-d{d}-b{b}-g{GRID_HEADS_Q // hkv}-{lens}"
    return check_shape(Shape(label, dt, b, GRID_HEADS_Q, hkv, sq, sk, d, causal, timed))


def _window_shape(pass_: str, dt: str, d: int, pt: tuple[int, int, int, int]) -> Shape:
    b, hkv, s, w = pt
    label = f"grid-{pass_}-window{w}-{dt}-d{d}-b{b}-g{GRID_HEADS_Q // hkv}-s{s}"
    return check_shape(Shape(label, dt, b, GRID_HEADS_Q, hkv, s, s, d, True, pass_, w))


def _serving_shape(pass_: str, cls: str, dt: str, d: int, pt: tuple[int, int, int, int]) -> Shape:
    b, hkv, sq, sk = pt
    kind = SERVING_KIND[cls]
    timed = serving_timed_pass(kind, pass_, sq)
    lens = f"s{sk}" if kind == "varlen" else f"q{sq}-k{sk}"
    label = f"grid-{pass_}-{cls}-{dt}-d{d}-b{b}-g{GRID_HEADS_Q // hkv}-{lens}"
    return check_shape(Shape(label, dt, b, GRID_HEADS_Q, hkv, sq, sk, d, True, timed, serving=kind))


def grid_groups(spec: GridSpec, dtypes: Sequence[str] | None = None,
                head_dims: Sequence[int] | None = None) -> dict[GroupKey, list[Shape]]:
    """The grid's shapes per model group, each group's in measuring order: its own points, then
    the benchmark shapes that fall in it."""
    dts = tuple(dtypes or spec.dtypes)
    ds = tuple(head_dims or spec.head_dims)
    groups: dict[GroupKey, list[Shape]] = {}

    def add(s: Shape) -> None:
        groups.setdefault(s.group, []).append(s)

    for i, dt in enumerate(dts):
        cap = None if i == 0 else spec.second_dtype_points
        for d in ds:
            if i and not head_dims and d not in spec.second_dtype_head_dims:
                continue
            for pass_, classes in PASS_CLASSES.items():
                for cls in classes:
                    if not head_dims and d not in spec.class_head_dims.get(cls, (d,)):
                        continue
                    n = spec.points.get((pass_, cls), 0)
                    for pt in CLASS_POINTS[cls][:n if cap is None else min(n, cap)]:
                        add(_class_shape(pass_, cls, dt, d, pt))
                if d in spec.window_head_dims:
                    n = spec.window_points if cap is None else min(spec.window_points, cap)
                    for pt in WINDOW_POINTS[:n]:
                        add(_window_shape(pass_, dt, d, pt))
                if i == 0 and (head_dims or d in spec.serving_head_dims):
                    for cls in SERVING_PASS_CLASSES.get(pass_, ()):
                        for pt in SERVING_POINTS[cls][:spec.serving_points.get((pass_, cls), 0)]:
                            add(_serving_shape(pass_, cls, dt, d, pt))
    seen = {s.dims + (s.dtype, s.causal, s.pass_, s.window) for g in groups.values() for s in g if not s.serving}
    for s in bench_shapes(dts[:1], quick=spec.bench_quick):  # the benchmark runs one dtype
        key = s.dims + (s.dtype, s.causal, s.pass_, s.window)
        if key not in seen:
            seen.add(key)
            add(s)
    return groups


def breadth_first(groups: dict[GroupKey, list[Shape]]) -> list[Shape]:
    """Every group's first point, then every group's second, ...: a run cut short by a time
    budget has as many groups as possible with at least two points."""
    out: list[Shape] = []
    lists = list(groups.values())
    for i in range(max((len(g) for g in lists), default=0)):
        out += [g[i] for g in lists if i < len(g)]
    return out


def tune_shapes(
    quick: bool = False,
    dtypes: Sequence[str] | None = None,
    head_dims: Sequence[int] | None = None,
) -> list[Shape]:
    """The tuner's grid in measuring order (breadth first across the model's groups).

    quick: bf16, D 64 and 128, every class (2-3 work sizes each), the window variant and the
    serving calls (varlen, paged KV cache) at D=128, and the quick benchmark shapes; full: bf16
    and fp16, D 64/80/96/128/192/256, 3-6 work sizes per class, the window variant at D 64 and
    128, the serving calls at D=128 (3 sizes per class), and every benchmark shape. Other dtypes or head dims
    (`dtypes`, `head_dims`) take the same points.
    """
    return breadth_first(grid_groups(QUICK_GRID if quick else FULL_GRID, dtypes, head_dims))


def tiny_shapes(dtype: str = "fp32") -> list[Shape]:
    """CPU-sized shapes for tests and dry runs: odd sizes, GQA, bottom-right causal, decode."""
    return [
        check_shape(Shape("tiny-fwd", dtype, 2, 2, 2, 33, 33, 16, False, "fwd")),
        check_shape(Shape("tiny-fwd-causal-gqa", dtype, 1, 4, 2, 17, 40, 16, True, "fwd")),
        check_shape(Shape("tiny-fwd-bwd", dtype, 1, 2, 1, 29, 29, 16, True, "fwd_bwd")),
        check_shape(Shape("tiny-decode", dtype, 3, 4, 2, 1, 70, 16, False, "decode")),
    ]


def cpu_shapes(dtype: str = "fp32") -> list[Shape]:
    """What `tune --quick` and `bench --quick` run on a CPU: each kind of call a model makes, at
    sizes a 2-core machine times in seconds (training, prefill, GQA, chunked prefill,
    speculative verification, decode)."""
    return [check_shape(s) for s in (
        Shape(f"cpu-fwd-{dtype}-s256", dtype, 1, 8, 8, 256, 256, 64, False, "fwd"),
        Shape(f"cpu-fwd-causal-{dtype}-s256", dtype, 1, 8, 8, 256, 256, 64, True, "fwd"),
        Shape(f"cpu-gqa4-causal-{dtype}-s256", dtype, 1, 8, 2, 256, 256, 64, True, "fwd"),
        Shape(f"cpu-fwd-bwd-causal-{dtype}-s128", dtype, 1, 8, 8, 128, 128, 64, True, "fwd_bwd"),
        Shape(f"cpu-chunked-{dtype}-q64-k1024", dtype, 1, 8, 8, 64, 1024, 64, True, "fwd"),
        Shape(f"cpu-speculative-{dtype}-q4-k1024", dtype, 2, 8, 2, 4, 1024, 64, True, "fwd"),
        Shape(f"cpu-decode-{dtype}-b4-k1024", dtype, 4, 8, 2, 1, 1024, 64, False, "decode"),
    )]


def cpu_serving_shapes(dtype: str = "fp32") -> list[Shape]:
    """The serving calls a CPU tune measures beside cpu_shapes: a packed batch (forward, and
    forward and backward) and a decode step against a paged cache."""
    return [check_shape(s) for s in (
        Shape(f"cpu-varlen-{dtype}-b4-s64", dtype, 4, 8, 2, 64, 64, 64, True, "fwd", serving="varlen"),
        Shape(f"cpu-varlen-fwd-bwd-{dtype}-b4-s64", dtype, 4, 8, 2, 64, 64, 64, True, "fwd_bwd", serving="varlen"),
        Shape(f"cpu-kvcache-{dtype}-b4-k1024", dtype, 4, 8, 2, 1, 1024, 64, True, "decode", serving="kvcache"),
    )]


NAMED: dict[str, str] = {
    "quick": "the model grid at bf16, D 64/128, 2-3 work sizes per shape class, varlen and paged-cache calls at "
             "D=128, and the quick benchmark shapes",
    "full": "the model grid at bf16+fp16, D 64..256, 3-6 work sizes per class, varlen and paged-cache calls at "
            "D=128, and every benchmark shape",
    "cpu": "CPU-sized shapes, one per kind of call, serving calls included (the default of --quick on a CPU)",
    "tiny": "the smallest shapes, for tests and dry runs",
}


def named(name: str, dtypes: Sequence[str] | None = None, head_dims: Sequence[int] | None = None) -> list[Shape]:
    if name == "quick":
        return tune_shapes(True, dtypes, head_dims)
    if name == "full":
        return tune_shapes(False, dtypes, head_dims)
    if name == "tiny":
        return tiny_shapes(dtypes[0] if dtypes else "fp32")
    if name == "cpu":
        dt = dtypes[0] if dtypes else "fp32"
        return cpu_shapes(dt) + cpu_serving_shapes(dt)
    raise ValueError(f"shape list: expected one of {sorted(NAMED)}, got {name!r}")


def filter_shapes(
    shapes: Iterable[Shape],
    *,
    dtypes: Sequence[str] | None = None,
    head_dims: Sequence[int] | None = None,
    passes: Sequence[str] | None = None,
    causal: bool | None = None,
    seqlens: Sequence[int] | None = None,
) -> list[Shape]:
    out = []
    for s in shapes:
        if dtypes and s.dtype not in dtypes:
            continue
        if head_dims and s.head_dim not in head_dims:
            continue
        if passes and s.pass_ not in passes:
            continue
        if causal is not None and s.causal != causal:
            continue
        if seqlens and s.seqlen_k not in seqlens:
            continue
        out.append(s)
    return out
