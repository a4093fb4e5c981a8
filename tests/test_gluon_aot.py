"""Ahead-of-time compile check of the Gluon Hopper forward (CPU, no GPU): the warp-specialised
kernel compiles for sm_90a at every head dim, fits shared memory, uses wgmma and TMA, gives its
consumer warpgroups 240 registers and its producer warp 24 (setmaxnreg), and ptxas spills nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="kernels defined under the interpreter cannot be compiled ahead of time"),
]

SM90_SHARED_BYTES = 227 * 1024


def _ptxas() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return str(path)
    except Exception:  # the knob moved: fall back to PATH
        pass
    return shutil.which("ptxas")


def _ptxas_report(ptx: str) -> str:
    exe = _ptxas()
    if exe is None:
        pytest.skip("no ptxas on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


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
    report = _ptxas_report(ptx)
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)]
    assert spills and all(s == (0, 0) for s in spills), report
