"""Ahead-of-time compile check of the Gluon Hopper forward (CPU, no GPU): the warp-specialised
kernel compiles for sm_90a at every head dim, fits shared memory, uses wgmma and TMA, gives its
consumer warpgroups 240 registers and its producer warp 24 (setmaxnreg), and ptxas spills nothing."""

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


@pytest.mark.parametrize("head_dim,causal", [(128, True), (64, False), (256, False)],
                         ids=["d128-causal", "d64", "d256"])
def test_gluon_forward_compiles_for_sm90(head_dim: int, causal: bool) -> None:
    from flashdispatch.backends.triton import gluon_forward as gf

    k = gf.aot_compile(head_dim, causal, "bf16")
    ptx = k.asm["ptx"]
    assert ".target sm_90a" in ptx
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor.4d.shared::cluster.global" in ptx  # TMA loads
    assert "cp.async.bulk.tensor.4d.global.shared::cta" in ptx  # TMA store of O
    regs = set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))
    assert {str(gf.CONSUMER_REGS_2WG.value), str(gf.PRODUCER_REGS.value)} <= regs, regs
    assert 0 < int(k.metadata.shared) <= SM90_SHARED_BYTES
    spills = ptxas_spill_bytes(ptx, 90)
    if spills is None:
        pytest.skip("no ptxas on this machine")
    assert spills == 0, f"{spills} B of register spill stores per thread"
