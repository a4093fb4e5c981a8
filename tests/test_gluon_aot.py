"""Ahead-of-time compile check of the Gluon Hopper forward (CPU, no GPU): the warp-specialised
kernel compiles for sm_90a at every head dim, plain and with a sliding window, fits shared memory,
uses wgmma and TMA, gives its consumer warpgroups 240 registers and its producer warp 24
(setmaxnreg), and ptxas spills nothing (the window kernels: at most two scalars of the prologue)."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

from flashdispatch.tools.aot_triton import ptxas_spill_bytes  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="kernels defined under the interpreter cannot be compiled ahead of time"),
]

SM90_SHARED_BYTES = 227 * 1024


# ptxas -v spill stores per thread of the window kernels: the prologue's seq_q + 127 and seq_q's sign
# word (reloaded once per partition and per tile, never inside the key loop); the plain kernels: none
WINDOW_SPILL_BYTES = 8


@pytest.mark.parametrize("head_dim,causal,window,dtype,order",
                         [(128, True, False, "bf16", 0), (64, False, False, "bf16", 0), (256, False, False, "bf16", 0),
                          (128, True, True, "bf16", 0), (128, False, True, "bf16", 0), (128, True, False, "fp16", 0),
                          (128, True, False, "bf16", 1), (128, True, False, "fp16", 2)],
                         ids=["d128-causal", "d64", "d256", "d128-causal-window", "d128-window", "d128-causal-fp16",
                              "d128-causal-bottom", "d128-causal-pairs-fp16"])
def test_gluon_forward_compiles_for_sm90(head_dim: int, causal: bool, window: bool, dtype: str, order: int) -> None:
    from flashdispatch.backends.triton import gluon_forward as gf

    k = gf.aot_compile(head_dim, causal, dtype, window=window, order=order)
    _check_sm90_kernel(k, gf.CONSUMER_REGS_2WG.value, WINDOW_SPILL_BYTES if window else 0)


def _check_sm90_kernel(k: object, consumer_regs: int, allowed_spills: int) -> None:
    """wgmma, TMA loads and the O store, the partitions' register budgets, shared memory that fits
    a CTA, and at most `allowed_spills` bytes of spill stores per thread (ptxas -v)."""
    from flashdispatch.backends.triton import gluon_forward as gf

    ptx = k.asm["ptx"]  # type: ignore[attr-defined]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor.4d.shared::cluster.global" in ptx  # TMA loads
    assert "cp.async.bulk.tensor.4d.global.shared::cta" in ptx  # TMA store of O
    regs = set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    assert {str(consumer_regs), str(gf.PRODUCER_REGS.value)} <= regs, regs
    assert 0 < int(k.metadata.shared) <= SM90_SHARED_BYTES  # type: ignore[attr-defined]
    spills = ptxas_spill_bytes(ptx, 90)
    if spills is None:
        pytest.skip("no ptxas on this machine")
    assert spills <= allowed_spills, f"{spills} B of register spill stores per thread (allowed: {allowed_spills})"


def test_window_kernel_masks_the_window() -> None:
    """The window kernel is another kernel: its PTX differs from the plain causal one (the window's
    compares), while causal and non-causal windows compile to the same code (causal is right = 0).
    The three compiles are the ones above (Triton's cache returns them)."""
    from flashdispatch.backends.triton import gluon_forward as gf

    plain = gf.aot_compile(128, True, "bf16").asm["ptx"]
    causal_w = gf.aot_compile(128, True, "bf16", window=True).asm["ptx"]
    noncausal_w = gf.aot_compile(128, False, "bf16", window=True).asm["ptx"]
    body = lambda ptx: re.sub(r"//.*|\.loc.*", "", ptx)  # noqa: E731  (source positions aside)
    assert body(plain) != body(causal_w)
    assert body(causal_w) == body(noncausal_w)


def test_fp16_scores_keep_the_row_max_exact() -> None:
    """fp16: p = exp2((s - m) * scale), not one FMA s * scale - m (whose unrounded product gives the
    row's largest score p = exp2(residual) != 1, which fp16 rounds away in P @ V but l keeps); bf16
    keeps the FMA. Counted in the PTX: one exponential per score either way."""
    from flashdispatch.backends.triton import gluon_forward as gf

    for dtype, fused in (("fp16", False), ("bf16", True)):
        ptx = gf.aot_compile(128, True, dtype).asm["ptx"]
        exps, fmas = ptx.count("ex2.approx"), ptx.count("fma.rn.f32")
        assert exps > 0
        assert (fmas >= exps) is fused, f"{dtype}: {fmas} fma.rn.f32 for {exps} ex2.approx"


# ptxas -v spill stores per thread with three consumer warpgroups at D=64 (160 registers each): what
# the default takes on long rows (gluon_forward.default_config); measured faster than two warpgroups
# there despite them, so the bound holds them where they are
C3_SPILL_BYTES = {False: 16, True: 64}


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_three_consumer_warpgroups_compile_for_sm90(causal: bool) -> None:
    from flashdispatch.backends.triton import gluon_forward as gf

    k = gf.aot_compile(64, causal, "bf16", config={"CONSUMERS": 3})
    _check_sm90_kernel(k, gf.CONSUMER_REGS_3WG.value, C3_SPILL_BYTES[causal])
