"""Shape classes on the shipped H200 profile: a few query rows under a bottom-right causal mask
(speculative verification) are predicted by the speculative class's model, or the chunked one's
(a long cache under a bottom-right mask) where the profile has no speculative group, never by the
decode model (Sq = 1, no mask); decode and square causal problems keep their own classes."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from flashdispatch.backends.triton import configs
from flashdispatch.problem import problem_from_shape
from flashdispatch.profile_store import timing_pass

LONG_CACHE_GROUPS = ("#fwd speculative bf16 D=128", "#fwd chunked bf16 D=128")


@pytest.mark.parametrize("sq", [2, 4, 8, 16])
@pytest.mark.parametrize("hq, hkv", [(8, 8), (32, 8)])
def test_speculative_verification_is_predicted_by_a_long_cache_causal_model(sq, hq, hkv):
    d = fd.explain(shape=(4, hq, hkv, sq, 8192, 128), causal=True, device="h200")
    assert d.source.startswith("profile:") and d.source.endswith(LONG_CACHE_GROUPS), d.source
    assert "class:    fwd speculative bf16 D=128" in str(d)
    assert d.variant == "triton"
    assert any("split-KV decode" in n for n in d.notes), d.notes  # the few-row kernel runs


def test_chunked_prefill_selects_triton_from_its_class():
    d = fd.explain(shape=(4, 32, 32, 512, 8192, 128), causal=True, device="h200")
    # one of our kernels (the H200 measured triton:gluon 0.50 ms, triton 0.53, plain SDPA 0.77 here)
    assert d.source.endswith("#fwd chunked bf16 D=128") and d.backend == "triton", d


@pytest.mark.parametrize("shape, causal, group", [
    ((1, 32, 8, 1, 8192, 128), True, "fwd decode bf16 D=128"),   # one token: the mask hides nothing
    ((1, 32, 8, 4, 8192, 128), False, "fwd decode bf16 D=128"),  # a few rows, no mask
    ((4, 32, 8, 4096, 4096, 128), True, "fwd causal bf16 D=128"),  # square causal
])
def test_other_classes_keep_their_models(shape, causal, group):
    d = fd.explain(shape=shape, causal=causal, device="h200")
    assert ("#" + group) in d.source, d.source  # (a "baseline margin" suffix may follow)


def test_timing_pass():
    assert timing_pass(problem_from_shape((1, 2, 2, 4, 64, 16), causal=True)) == "fwd"
    assert timing_pass(problem_from_shape((1, 2, 2, 4, 64, 16), causal=False)) == "decode"
    assert timing_pass(problem_from_shape((1, 2, 2, 1, 64, 16), causal=True)) == "decode"
    assert timing_pass(problem_from_shape((1, 2, 2, 4, 64, 16), causal=True, needs_grad=True)) == "fwd_bwd"


def test_split_kv_keeps_its_tiles_under_a_forward_measured_config():
    fwd_tiles = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": True}
    got = configs.resolve_decode({**configs.decode_defaults("sm_90", 128), **fwd_tiles}, "sm_90", 128)
    assert got == configs.decode_defaults("sm_90", 128)
    # PATH="forward" (the tuner's candidate for decode shapes) carries forward tiles: accepted
    assert configs.resolve_decode({"PATH": "forward", **fwd_tiles}, "sm_90", 128)["PATH"] == "forward"
