"""The named shape lists that the tuner and the benchmark run, each with where it comes from.

A `Shape` is one attention problem in one pass ("fwd", "fwd_bwd" or "decode", the passes of
dispatch/profile_store.py). The benchmark runs these shapes; the tuner measures the same shapes as
profile buckets, so that every benchmark shape has a profile entry measured at exactly its size.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from flashdispatch.problem import DTYPES_BY_NAME, problem_from_shape
from flashdispatch.profile_store import PASSES, problem_pass


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

    @property
    def dims(self) -> tuple[int, int, int, int, int, int]:
        """(B, Hq, Hkv, Sq, Sk, D), the order of problem_from_shape."""
        return (self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k, self.head_dim)

    @property
    def needs_grad(self) -> bool:
        return self.pass_ == "fwd_bwd"

    def describe(self) -> str:
        q = f"Sq={self.seqlen_q} Sk={self.seqlen_k}" if self.seqlen_q != self.seqlen_k else f"S={self.seqlen_k}"
        return (
            f"{self.pass_} {self.dtype} B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} {q} "
            f"D={self.head_dim}{' causal' if self.causal else ''}"
        )


def check_shape(s: Shape) -> Shape:
    """Raise ValueError when a shape's pass disagrees with what the dispatcher would look up."""
    if s.dtype not in DTYPES_BY_NAME:
        raise ValueError(f"shape {s.label!r}: dtype expected one of {sorted(DTYPES_BY_NAME)}, got {s.dtype!r}")
    if s.pass_ not in PASSES:
        raise ValueError(f"shape {s.label!r}: pass expected one of {PASSES}, got {s.pass_!r}")
    if s.heads_kv <= 0 or s.heads_q % s.heads_kv:
        raise ValueError(f"shape {s.label!r}: heads_q={s.heads_q} must be a multiple of heads_kv={s.heads_kv}")
    looked_up = problem_pass(problem_from_shape(s.dims, dtype=s.dtype, causal=s.causal, needs_grad=s.needs_grad))
    if s.pass_ != looked_up:
        raise ValueError(
            f"shape {s.label!r}: pass={s.pass_!r} but the dispatcher looks up Sq={s.seqlen_q}, Sk={s.seqlen_k}"
            f"{' causal' if s.causal else ''} as {looked_up!r}"
        )
    return s


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


def _gqa_shapes(dtypes: Sequence[str], head_dims: Sequence[int]) -> list[Shape]:
    """GQA prefill buckets beyond the anchor: Llama-style 4x and 8x groups at 2k and 8k tokens."""
    out = []
    for dt in dtypes:
        for d in head_dims:
            for g in (4, 8):
                for s in (2048, 8192):
                    for causal in (False, True):
                        for pass_ in ("fwd", "fwd_bwd"):
                            b = max(1, FA2_TOKENS // s)
                            label = f"gqa{g}-{pass_}-{dt}-d{d}-{'causal' if causal else 'full'}-s{s}"
                            out.append(check_shape(Shape(label, dt, b, 32, 32 // g, s, s, d, causal, pass_)))
    return out


def _decode_shapes(dtypes: Sequence[str], head_dims: Sequence[int]) -> list[Shape]:
    """Decode buckets: batch 1 / 8 / 64, KV caches from 2k to 32k, MHA and GQA 4x / 8x."""
    out = []
    for dt in dtypes:
        for d in head_dims:
            for hkv in (32, 8, 4):
                for b, sk in ((1, 2048), (1, 8192), (1, 32768), (8, 8192), (64, 2048)):
                    label = f"decode-{dt}-d{d}-b{b}-hkv{hkv}-k{sk}"
                    out.append(check_shape(Shape(label, dt, b, 32, hkv, 1, sk, d, False, "decode")))
    return out


def tune_shapes(
    quick: bool = False,
    dtypes: Sequence[str] | None = None,
    head_dims: Sequence[int] | None = None,
) -> list[Shape]:
    """The tuner's buckets.

    quick: exactly the bf16 benchmark shapes (so each one has an entry measured at its own size);
    full: fp16 and bf16, the whole FA2 sweep, GQA prefill and a grid of decode shapes.
    """
    if quick:
        # Most telling sequence lengths first: if a time budget cuts the sweep short, every
        # (pass, D, causal) group already has an entry, and the nearest-seqlen lookup covers the rest.
        order = {4096: 0, 1024: 1, 16384: 2, 512: 3, 2048: 4, 8192: 5}
        shapes = bench_shapes(tuple(dtypes or ("bf16",)))
        return sorted(shapes, key=lambda s: (order.get(s.seqlen_k, 0) if s.label.startswith("fa2") else 0))
    dts = tuple(dtypes or ("bf16", "fp16"))
    ds = tuple(head_dims or FA2_HEAD_DIMS)
    return (
        fa2_sweep(dts, ds)
        + special_shapes(dts)
        + _gqa_shapes(dts, ds)
        + _decode_shapes(dts, ds)
    )


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
    sizes a 2-core machine times in about a minute (training, prefill, GQA, chunked prefill,
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


NAMED: dict[str, str] = {
    "quick": "the bf16 benchmark shapes (FA2 sweep + the special shapes: GQA, chunked prefill, decode)",
    "full": "fp16+bf16 FA2 sweep, special shapes, GQA prefill, decode grid",
    "cpu": "CPU-sized shapes, one per kind of call (the default of --quick on a CPU)",
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
        return cpu_shapes(dtypes[0] if dtypes else "fp32")
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
