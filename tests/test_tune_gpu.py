"""The tuner's GPU paths (pytest -m gpu): decode and speculative steps timed as CUDA-graph
replays over input sets larger than L2, the eager fallback when a call cannot be captured, host
time beside, and the window variant checked and timed.

    python -m pytest -q -m gpu tests/test_tune_gpu.py
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from flashdispatch.registry import REGISTRY
from flashdispatch.tools import shapes, timing, tune
from flashdispatch.tools.decode_timing import captured_in_serving

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator(device=CUDA)
    g.manual_seed(seed)
    return g


def _decode_sets(n: int, b: int = 1, hq: int = 32, hkv: int = 8, sk: int = 8192, d: int = 128):  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        g = _gen(i)
        q = torch.randn(b, hq, 1, d, device=CUDA, generator=g).bfloat16()
        k = torch.randn(b, hkv, sk, d, device=CUDA, generator=g).bfloat16()
        v = torch.randn(b, hkv, sk, d, device=CUDA, generator=g).bfloat16()
        out.append((q, k, v))
    return out


@pytest.mark.alone
def test_graph_replay_times_a_decode_step_per_call_from_hbm() -> None:
    per_set = 2 * 1 * 8 * 8192 * 128 * 2  # K and V: 32 MiB
    n = timing.rotation_sets(per_set, CUDA)
    assert n * per_set >= timing.GRAPH_L2_MULTIPLE * timing.l2_bytes(CUDA) or n == timing.GRAPH_MAX_SETS
    sets = _decode_sets(n)
    fns = [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True) for q, k, v in sets]
    graph_ms = timing.graph_replay_ms(fns, CUDA, rep_ms=25.0)
    eager_ms = timing.median_ms(fns[0], CUDA, warmup_ms=5, rep_ms=25)
    host_us = timing.host_us_per_call(fns[0], CUDA, 100)
    # 32 MiB read at most at the card's bandwidth (5 TB/s): no call can take less than ~6 us
    assert 0.005 < graph_ms < max(eager_ms, host_us / 1e3) * 3, (graph_ms, eager_ms, host_us)
    print(f"\ndecode B=1 Hq32/Hkv8 Sk8192 bf16 sdpa: graph {graph_ms * 1e3:.1f} us/call over {n} sets "
          f"({per_set * 1e-6 / graph_ms / 1e3:.2f} TB/s), eager do_bench {eager_ms * 1e3:.1f} us, host {host_us:.1f} us")


def test_a_call_that_cannot_be_captured_raises_capture_error_and_the_device_survives() -> None:
    (q, k, v), = _decode_sets(1)

    def syncs() -> None:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch.cuda.synchronize()  # forbidden during capture

    before = torch.cuda.current_stream()
    with pytest.raises(timing.CaptureError):
        timing.graph_replay_ms([syncs], CUDA)
    assert torch.cuda.current_stream() == before  # not left on the capture's side stream
    assert timing.context_alive(CUDA)
    ms = timing.graph_replay_ms([lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)], CUDA)
    assert ms > 0


@pytest.mark.parametrize("label", ["decode", "speculative"])
def test_the_tuner_times_decode_and_speculative_steps_as_graph_replays(label: str) -> None:
    s = (shapes.Shape("g-decode", "bf16", 4, 16, 2, 1, 8192, 128, False, "decode") if label == "decode" else
         shapes.Shape("g-spec", "bf16", 4, 16, 2, 8, 8192, 128, True, "fwd"))
    assert captured_in_serving(s)
    impls = {n: REGISTRY.get(n) for n in ("sdpa", "triton") if REGISTRY.availability(n) is None}
    r = tune.measure_bucket(s, impls, CUDA, tune.TuneOptions.preset(True), _gen())
    best = r.best()
    assert "sdpa" in best, r.trials
    for name, t in best.items():
        assert t.host_us and t.host_us > 0, (name, t)
        assert "CUDA-graph replay" in t.note or "cannot be captured" in t.note, (name, t.note)
    pt = r.point()
    assert set(pt.host_us) == set(pt.ms)
    print(f"\n{s.describe()}: " + ", ".join(f"{n} {t.ms * 1e3:.1f} us (host {t.host_us:.0f} us; "
                                          f"{'graph' if 'graph' in t.note else 'eager'})" for n, t in best.items()))


@pytest.mark.alone  # which candidates the tuner keeps rests on their measured times
def test_a_window_shape_is_checked_and_timed() -> None:
    s = shapes.Shape("g-window", "bf16", 1, 16, 4, 4096, 4096, 128, True, "fwd", 512)
    impls = {n: REGISTRY.get(n) for n in ("sdpa", "triton", "cupy") if REGISTRY.availability(n) is None}
    r = tune.measure_bucket(s, impls, CUDA, tune.TuneOptions.preset(True), _gen())
    assert s.group.variant == "window"
    assert "triton" in r.best(), [(t.name, t.status, t.note) for t in r.trials]
    assert not r.rejected(), r.rejected()
    print("\nwindow 512, S=4096: " + ", ".join(f"{n} {t.ms:.3f} ms" for n, t in sorted(r.best().items(),
                                                                                      key=lambda kv: kv[1].ms)))


def test_fwd_bwd_window_gradients_pass_the_check() -> None:
    s = shapes.Shape("g-window-bwd", "bf16", 1, 16, 4, 2048, 2048, 64, True, "fwd_bwd", 256)
    impls = {n: REGISTRY.get(n) for n in ("sdpa", "triton") if REGISTRY.availability(n) is None}
    r = tune.measure_bucket(s, impls, CUDA, tune.TuneOptions.preset(True), _gen())
    assert set(impls) <= set(r.best()), [(t.name, t.status, t.note) for t in r.trials]
    assert statistics.median(t.ms for t in r.best().values()) > 0


# --- serving points (tools/tune_serving.py) --------------------------------------------------------


@pytest.mark.parametrize("kind", ["varlen-fwd", "varlen-fwd_bwd", "kvcache-decode", "kvcache-chunk"])
def test_serving_points_are_checked_and_timed_for_both_families(kind: str) -> None:
    from flashdispatch.tools import tune_serving

    s = {
        "varlen-fwd": shapes.Shape("v", "bf16", 8, 16, 4, 1024, 1024, 128, True, "fwd", serving="varlen"),
        "varlen-fwd_bwd": shapes.Shape("vb", "bf16", 4, 16, 4, 1024, 1024, 128, True, "fwd_bwd", serving="varlen"),
        "kvcache-decode": shapes.Shape("k", "bf16", 8, 16, 4, 1, 8192, 128, True, "decode", serving="kvcache"),
        "kvcache-chunk": shapes.Shape("kc", "bf16", 2, 16, 4, 512, 8192, 128, True, "fwd", serving="kvcache"),
    }[kind]
    shapes.check_shape(s)
    r = tune_serving.measure_serving_bucket(s, ["triton", "sdpa"], CUDA, tune.TuneOptions.preset(True), _gen(),
                                            host_calls=20)
    by = {t.name: t for t in r.trials}
    assert set(by) == {"triton", "sdpa"}, (r.trials, r.skipped)
    for t in by.values():
        assert t.status == "ok" and t.ms is not None and t.ms > 0, t
        graphed = s.group.cls == "kvcache"
        assert ("CUDA-graph replay" in t.note) == graphed, t.note
        assert (t.host_us is not None) == graphed, t
    if s.serving == "kvcache":  # against the gather-then-attention fallback (varlen's is torch's own kernel: bench)
        assert by["triton"].ms < by["sdpa"].ms, {n: t.ms for n, t in by.items()}
