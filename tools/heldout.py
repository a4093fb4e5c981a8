"""The held-out benchmark set: real model shapes that the tuner never measures.

The dispatcher is judged here, not on the tune grid (tools/shapes.py): a model fitted to the grid
must choose well for the shapes people actually run. Every shape below is one attention call of a
named model with that model's real head count, KV-head count and head dim (a tensor-parallel
shard where a model is served sharded, said in the name), at batch sizes and lengths a user has:
prompt and cache lengths are not powers of two, as they are not in serving. tests/test_heldout.py
fails when any of them appears in a named tune grid, and checks the coverage below.

Kinds (what the call does in the model; each is one of the dispatcher's shape classes):

- prefill: a whole prompt or an encoder's input at once (fwd; causal for decoders, full for
  encoders: BERT, ViT, CLIP, Whisper, a diffusion transformer);
- train: forward and backward of a training or fine-tuning step (fwd_bwd);
- decode: one new token per sequence against its KV cache (Sq = 1), batch 1 to 256;
- speculative: verifying 2 to 16 drafted tokens against the cache (bottom-right causal, Sq < Sk);
- chunked: one chunk of 256 to 2k prompt tokens against 8k to 32k of cache (bottom-right causal).

Serving runs decode and speculative steps inside CUDA graphs; the bench times those two kinds as
graph replays (tools/decode_timing.py).

    flashdispatch bench --heldout --out DIR
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from flashdispatch.problem import DECODE_MAX_SEQLEN_Q, problem_from_shape
from flashdispatch.costmodel import shape_class
from flashdispatch.profile_store import timing_pass

from .shapes import Shape, check_shape

KINDS: tuple[str, ...] = ("prefill", "train", "decode", "speculative", "chunked")

# What the set must cover (tests/test_heldout.py checks it, docs/bench.md states it).
MIN_SHAPES = 30
DTYPES: tuple[str, ...] = ("fp16", "bf16")
HEAD_DIMS: tuple[int, ...] = (64, 80, 96, 128, 256)
GQA_RATIOS: tuple[int, ...] = (1, 4, 8)
DECODE_BATCHES: tuple[int, int] = (1, 256)  # the smallest and the largest decode batch
SPECULATIVE_ROWS: tuple[int, int] = (2, 16)
CHUNK_ROWS: tuple[int, int] = (256, 2048)
CHUNK_CACHE: tuple[int, int] = (8192, 32768)
CONTEXTS: tuple[int, int] = (512, 131072)


class HeldOut(NamedTuple):
    model: str  # the model (and shard) the call comes from, e.g. "Llama-3 70B, TP=8 shard"
    kind: str  # one of KINDS
    shape: Shape

    @property
    def label(self) -> str:
        return self.shape.label


def kind_of(s: Shape) -> str:
    """The kind of call a shape is, from its sizes alone (what the held-out list declares): "train"
    for training, else the cost model's shape class where it names a kind of serving call (decode,
    speculative, chunked), "prefill" for the rest."""
    if s.pass_ == "fwd_bwd":
        return "train"
    cls = shape_class(s.problem())
    return cls if cls in ("decode", "speculative", "chunked") else "prefill"


def _slug(model: str) -> str:
    out = "".join(c.lower() if c.isalnum() or c == "." else "-" for c in model.split(",")[0])
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def make(model: str, kind: str, dtype: str, b: int, hq: int, hkv: int, sq: int, sk: int, d: int,
         causal: bool) -> HeldOut:
    """One held-out call; its pass is the one the dispatcher looks the problem up under."""
    if kind not in KINDS:
        raise ValueError(f"held-out {model!r}: kind expected one of {KINDS}, got {kind!r}")
    needs_grad = kind == "train"
    pass_ = timing_pass(problem_from_shape((b, hq, hkv, sq, sk, d), dtype=dtype, causal=causal,
                                            needs_grad=needs_grad))
    lens = f"s{sk}" if sq == sk else f"q{sq}-k{sk}"
    label = f"{_slug(model)}-{kind}-{dtype}-b{b}-{lens}"
    s = check_shape(Shape(label, dtype, b, hq, hkv, sq, sk, d, causal, pass_))
    if kind_of(s) != kind:
        raise ValueError(f"held-out {label!r}: declared {kind!r}, but its sizes make it {kind_of(s)!r}")
    return HeldOut(model, kind, s)


# Head counts and head dims from each model's published config (num_attention_heads,
# num_key_value_heads, head_dim or hidden_size / heads). A "TP=n shard" is what one GPU of an
# n-way tensor-parallel server runs: heads / n query heads and KV heads / n (at least one).
HELDOUT: tuple[HeldOut, ...] = (
    # --- prefill: prompts (causal) and encoders (full) -------------------------------------------
    make("Llama-3 8B", "prefill", "bf16", 2, 32, 8, 6000, 6000, 128, True),
    make("Llama-3.1 70B, TP=8 shard", "prefill", "bf16", 1, 8, 1, 12000, 12000, 128, True),
    make("Mistral 7B v0.3", "prefill", "fp16", 4, 32, 8, 3000, 3000, 128, True),
    make("Qwen2.5 7B", "prefill", "bf16", 1, 28, 4, 16000, 16000, 128, True),
    make("Gemma 7B", "prefill", "bf16", 2, 16, 16, 4000, 4000, 256, True),
    make("Gemma 3 12B, global layers", "prefill", "fp16", 1, 16, 8, 10000, 10000, 256, True),
    make("Phi-3-mini", "prefill", "bf16", 4, 32, 32, 2500, 2500, 96, True),
    make("Phi-2", "prefill", "fp16", 8, 32, 32, 1800, 1800, 80, True),
    make("Falcon 7B, MQA", "prefill", "bf16", 2, 71, 1, 2000, 2000, 64, True),
    make("BERT-base, SQuAD", "prefill", "fp16", 32, 12, 12, 384, 384, 64, False),
    make("ViT-B/16 at 224", "prefill", "bf16", 64, 12, 12, 197, 197, 64, False),
    make("CLIP ViT-L/14 at 224", "prefill", "fp16", 32, 16, 16, 257, 257, 64, False),
    make("ViT-L/14 at 336", "prefill", "bf16", 16, 16, 16, 577, 577, 64, False),
    make("Whisper large-v3 encoder", "prefill", "fp16", 8, 20, 20, 1500, 1500, 64, False),
    make("Stable Diffusion 1.5 UNet, 32x32 level", "prefill", "fp16", 8, 8, 8, 1024, 1024, 80, False),
    make("FLUX.1 at 1024x1024", "prefill", "bf16", 1, 24, 24, 4608, 4608, 128, False),
    # --- training / fine-tuning: forward + backward ----------------------------------------------
    make("Llama-3 8B", "train", "bf16", 1, 32, 8, 8192, 8192, 128, True),
    make("Llama-3 70B, TP=8 shard", "train", "bf16", 1, 8, 1, 8192, 8192, 128, True),
    make("Qwen2.5 7B", "train", "bf16", 2, 28, 4, 4096, 4096, 128, True),
    make("Phi-3-mini", "train", "bf16", 2, 32, 32, 4096, 4096, 96, True),
    make("Phi-2", "train", "fp16", 4, 32, 32, 2048, 2048, 80, True),
    make("Gemma 2B, MQA", "train", "bf16", 4, 8, 1, 2048, 2048, 256, True),
    make("BERT-base", "train", "fp16", 64, 12, 12, 512, 512, 64, False),
    # --- decode: one token per sequence against its cache ----------------------------------------
    make("Llama-3 8B", "decode", "bf16", 1, 32, 8, 1, 4000, 128, False),
    make("Llama-3.1 8B, 128k context", "decode", "bf16", 1, 32, 8, 1, 131072, 128, False),
    make("Llama-3 70B, TP=8 shard", "decode", "fp16", 16, 8, 1, 1, 6000, 128, False),
    make("Mistral 7B v0.3", "decode", "bf16", 32, 32, 8, 1, 3000, 128, False),
    make("Llama-3 8B", "decode", "fp16", 128, 32, 8, 1, 700, 128, False),
    make("Qwen2.5 72B, TP=4 shard", "decode", "bf16", 256, 16, 2, 1, 1000, 128, False),
    make("Gemma 7B", "decode", "fp16", 8, 16, 16, 1, 5000, 256, False),
    make("Phi-3-mini", "decode", "bf16", 64, 32, 32, 1, 1500, 96, False),
    make("Phi-2", "decode", "fp16", 4, 32, 32, 1, 1800, 80, False),
    make("Falcon 7B, MQA", "decode", "bf16", 16, 71, 1, 1, 2000, 64, False),
    make("StarCoder 15B, MQA", "decode", "bf16", 8, 48, 1, 1, 6000, 128, False),
    # --- speculative decoding: a few drafted tokens verified against the cache -------------------
    make("Llama-3 8B, 4 drafted tokens", "speculative", "bf16", 1, 32, 8, 4, 4004, 128, True),
    make("Llama-3.1 70B, TP=8 shard, 8 drafted", "speculative", "bf16", 8, 8, 1, 8, 12000, 128, True),
    make("Mistral 7B v0.3, 2 drafted", "speculative", "fp16", 16, 32, 8, 2, 2000, 128, True),
    make("Qwen2.5 7B, 16 drafted", "speculative", "bf16", 4, 28, 4, 16, 32000, 128, True),
    make("Gemma 3 12B, global layers, 5 drafted", "speculative", "fp16", 2, 16, 8, 5, 8000, 256, True),
    make("Llama-3.1 8B, 128k context, 8 drafted", "speculative", "bf16", 1, 32, 8, 8, 131072, 128, True),
    make("StarCoder 15B, MQA, 4 drafted", "speculative", "fp16", 4, 48, 1, 4, 6004, 128, True),
    # --- chunked prefill: a prompt chunk against the cache of the chunks before it ---------------
    make("Llama-3.1 8B", "chunked", "bf16", 1, 32, 8, 2048, 20000, 128, True),
    make("Llama-3.1 70B, TP=8 shard", "chunked", "fp16", 1, 8, 1, 1024, 12000, 128, True),
    make("Mistral 7B v0.3", "chunked", "bf16", 2, 32, 8, 512, 9000, 128, True),
    make("Qwen2.5 7B, last chunk of its 32k context", "chunked", "fp16", 1, 28, 4, 256, 32768, 128, True),
    make("Gemma 3 12B, global layers", "chunked", "bf16", 1, 16, 8, 1000, 8500, 256, True),
    make("Phi-3-mini-128k", "chunked", "bf16", 1, 32, 32, 768, 10000, 96, True),
)


def grid_key(s: Shape) -> tuple[object, ...]:
    """What makes two shapes the same problem (the label does not)."""
    return (s.dtype, s.batch, s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k, s.head_dim, s.causal, s.pass_)


def round_robin(items: Iterable[HeldOut]) -> list[HeldOut]:
    """Kinds interleaved (one prefill, one train, one decode, ...): a run cut short by a time
    budget, or --limit N, still covers every kind."""
    by_kind: dict[str, list[HeldOut]] = {k: [] for k in KINDS}
    for h in items:
        by_kind[h.kind].append(h)
    out: list[HeldOut] = []
    while any(by_kind.values()):
        for k in KINDS:
            if by_kind[k]:
                out.append(by_kind[k].pop(0))
    return out


def heldout(kinds: Sequence[str] | None = None, limit: int | None = None) -> list[HeldOut]:
    """The held-out calls in run order (kinds interleaved), optionally only some kinds, at most limit."""
    for k in kinds or ():
        if k not in KINDS:
            raise ValueError(f"--kinds: expected some of {', '.join(KINDS)}, got {k!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: expected a positive number of shapes, got {limit}")
    chosen = [h for h in HELDOUT if not kinds or h.kind in kinds]
    return round_robin(chosen)[:limit]


# Sizes a 2-core CPU runs in milliseconds per call (the dry run's, --scale-for-cpu).
CPU_MAX_BATCH = 2
CPU_MAX_HEADS_KV = 2
CPU_MAX_GQA = 4
CPU_MIN_TOKENS = 2 * (DECODE_MAX_SEQLEN_Q + 1)


def scale_for_cpu(h: HeldOut, max_tokens: int) -> HeldOut:
    """The same call at CPU size: batch, heads and lengths shrunk, the kind, dtype, head dim, mask
    and pass kept (so the dry run goes through the same code path and the same shape class).

    Lengths are capped at max_tokens; a chunk keeps its share of the cache (and more than 16 rows,
    so that it stays a chunk); speculative rows and head dims are kept as they are.
    """
    if max_tokens < CPU_MIN_TOKENS:
        raise ValueError(f"--max-tokens: expected at least {CPU_MIN_TOKENS}, got {max_tokens}")
    s = h.shape
    g = s.heads_q // s.heads_kv
    hkv = min(s.heads_kv, CPU_MAX_HEADS_KV)
    hq = hkv * min(g, CPU_MAX_GQA)
    sk = min(s.seqlen_k, max_tokens)
    if h.kind in ("decode", "speculative"):
        sq = s.seqlen_q
    elif h.kind == "chunked":
        sq = min(sk - 1, max(DECODE_MAX_SEQLEN_Q + 1, s.seqlen_q * sk // s.seqlen_k))
    else:
        sq = sk
    return make(h.model, h.kind, s.dtype, min(s.batch, CPU_MAX_BATCH), hq, hkv, sq, sk, s.head_dim, s.causal)
