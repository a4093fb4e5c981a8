"""The held-out set (tools/heldout.py): never in a tune grid, and covering what it promises.

The tune grid changes as the tuner grows; these tests compare against whatever every named grid
returns when they run, so a grid that starts to measure a held-out shape fails here.
"""

from __future__ import annotations

import inspect

import pytest

from flashdispatch.problem import DECODE_MAX_SEQLEN_Q, problem_from_shape
from flashdispatch.profile_store import timing_pass
from flashdispatch.tools import heldout, shapes

HELD = heldout.HELDOUT


def _grids() -> dict[str, list[shapes.Shape]]:
    """Every named tune grid, as the tuner runs it by default and, where the grid takes them, with
    every dtype and head dim of the held-out set."""
    out: dict[str, list[shapes.Shape]] = {}
    params = inspect.signature(shapes.named).parameters
    for name in shapes.NAMED:
        out[name] = list(shapes.named(name))
        if "dtypes" in params and "head_dims" in params and name not in ("tiny", "cpu"):
            out[f"{name} (fp16+bf16, D {heldout.HEAD_DIMS})"] = list(
                shapes.named(name, dtypes=heldout.DTYPES, head_dims=heldout.HEAD_DIMS))
    return out


def test_no_heldout_shape_is_in_a_tune_grid() -> None:
    grids = _grids()
    assert grids and all(grids.values()), "a named grid came back empty"
    for name, grid in grids.items():
        tuned = {heldout.grid_key(s) for s in grid}
        clash = [h.label for h in HELD if heldout.grid_key(h.shape) in tuned]
        assert not clash, f"held-out shapes measured by the tune grid {name!r}: {clash}"


def test_the_comparison_can_fail() -> None:
    """A grid shape relabelled as held-out is caught: the key ignores the label."""
    s = shapes.named("quick")[0]
    assert heldout.grid_key(s._replace(label="renamed")) in {heldout.grid_key(g) for g in shapes.named("quick")}


def test_size_and_every_dtype_head_dim_gqa_and_kind() -> None:
    assert len(HELD) >= heldout.MIN_SHAPES
    assert {h.shape.dtype for h in HELD} >= set(heldout.DTYPES)
    assert {h.shape.head_dim for h in HELD} >= set(heldout.HEAD_DIMS)
    assert {h.shape.heads_q // h.shape.heads_kv for h in HELD} >= set(heldout.GQA_RATIOS)
    assert {h.kind for h in HELD} == set(heldout.KINDS)
    assert {h.shape.pass_ for h in HELD} == {"fwd", "fwd_bwd", "decode"}


def test_each_kind_spans_its_range() -> None:
    decode = [h.shape for h in HELD if h.kind == "decode"]
    assert min(s.batch for s in decode) == heldout.DECODE_BATCHES[0]
    assert max(s.batch for s in decode) == heldout.DECODE_BATCHES[1]
    spec = [h.shape for h in HELD if h.kind == "speculative"]
    assert {min(s.seqlen_q for s in spec), max(s.seqlen_q for s in spec)} == set(heldout.SPECULATIVE_ROWS)
    chunked = [h.shape for h in HELD if h.kind == "chunked"]
    for s in chunked:
        assert heldout.CHUNK_ROWS[0] <= s.seqlen_q <= heldout.CHUNK_ROWS[1], s
        assert heldout.CHUNK_CACHE[0] <= s.seqlen_k <= heldout.CHUNK_CACHE[1], s
    assert {min(s.seqlen_q for s in chunked), max(s.seqlen_q for s in chunked)} == set(heldout.CHUNK_ROWS)
    assert max(s.seqlen_k for s in chunked) == heldout.CHUNK_CACHE[1]
    contexts = [h.shape.seqlen_k for h in HELD if h.kind != "prefill" or h.shape.causal]
    assert min(contexts) <= heldout.CONTEXTS[0] and max(contexts) >= heldout.CONTEXTS[1]
    prefill = [h.shape for h in HELD if h.kind == "prefill"]
    assert {s.causal for s in prefill} == {True, False}  # decoders' prompts and encoders
    assert {s.seqlen_k for s in prefill} >= {197, 257, 577}  # ViT / CLIP lengths: no tile multiple
    assert {s.heads_kv for s in prefill + decode} >= {1}  # MQA


def test_every_shape_is_a_labelled_consistent_call() -> None:
    assert len({h.label for h in HELD}) == len(HELD)
    assert len({heldout.grid_key(h.shape) for h in HELD}) == len(HELD)
    for h in HELD:
        s = h.shape
        assert h.model.strip() and h.kind in heldout.KINDS
        assert heldout.kind_of(s) == h.kind, h
        assert shapes.check_shape(s) == s
        p = problem_from_shape(s.dims, dtype=s.dtype, causal=s.causal, needs_grad=s.needs_grad)
        assert timing_pass(p) == s.pass_
        if h.kind in ("decode", "speculative"):
            assert s.seqlen_q <= DECODE_MAX_SEQLEN_Q < s.seqlen_k


def test_kinds_are_interleaved_so_a_short_run_covers_them_all() -> None:
    first = heldout.heldout(limit=len(heldout.KINDS))
    assert [h.kind for h in first] == list(heldout.KINDS)
    assert sorted(h.label for h in heldout.heldout()) == sorted(h.label for h in HELD)
    assert {h.kind for h in heldout.heldout(["decode"])} == {"decode"}
    with pytest.raises(ValueError, match="--kinds"):
        heldout.heldout(["prefil"])


@pytest.mark.parametrize("max_tokens", [64, 256])
def test_cpu_scaling_keeps_the_class_and_shrinks_the_work(max_tokens: int) -> None:
    for h in HELD:
        c = heldout.scale_for_cpu(h, max_tokens)
        s, t = h.shape, c.shape
        assert (c.model, c.kind, t.dtype, t.head_dim, t.causal, t.pass_) == (h.model, h.kind, s.dtype, s.head_dim,
                                                                             s.causal, s.pass_)
        assert t.seqlen_k <= max_tokens and t.batch <= heldout.CPU_MAX_BATCH and t.heads_kv <= heldout.CPU_MAX_HEADS_KV
        assert t.heads_q // t.heads_kv == min(s.heads_q // s.heads_kv, heldout.CPU_MAX_GQA)
        assert t.batch * t.heads_q * t.seqlen_q * t.seqlen_k <= 2**20
    with pytest.raises(ValueError, match="--max-tokens"):
        heldout.scale_for_cpu(HELD[0], 8)


def test_a_declared_kind_that_the_sizes_contradict_is_refused() -> None:
    with pytest.raises(ValueError, match="declared 'chunked'"):
        heldout.make("Llama-3 8B", "chunked", "bf16", 1, 32, 8, 8, 9000, 128, True)
