"""The conformance suite for sliding window, softcap and sinks: every registered implementation x
the devices present x fp16/bf16/fp32 x variant cases (GQA, both layouts, Sq != Sk, decode, rows that
see no key, dominant sinks), for the forward with lse and the gradients (the sinks' included),
against the float64 reference with the flash-attention budget.

An implementation that declines a case must do so for the reasons the table expects: the base
table of tests/conformance.py (devices, dtypes, lse, ...) plus VARIANT_REFUSALS here; a variant
served where the table expects a refusal (or the reverse) fails until the table is updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import flashdispatch as fd
from flashdispatch.errors import NoBackendError
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
from conformance import (
    BF16, DTYPE_IDS, FP16, FP32, Case, expected_refusals, implementation_of, implementations, pinned_implementations,
)
from inputs import make_case_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning",
                                        "ignore:overflow encountered in exp2:RuntimeWarning")

GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class VCase:
    base: Case
    window: tuple[int, int] | None = None
    softcap: float | None = None
    sinks: str | None = None  # None, "random" or "dominant"

    def id(self) -> str:
        w = f"w{self.window[0]}_{self.window[1]}" if self.window else ""
        return "-".join(filter(None, (self.base.id(), w, f"cap{self.softcap:g}" if self.softcap else "",
                                      f"sinks_{self.sinks}" if self.sinks else "")))


def vcases(device: str) -> list[VCase]:
    if device == "cpu":
        return [
            VCase(Case("window", 1, 4, 2, 37, 37, 32, causal=True, layout="bshd"), window=(9, 0)),
            VCase(Case("two_sided", 1, 2, 2, 20, 45, 32), window=(5, 7), softcap=5.0),
            VCase(Case("blind", 1, 2, 1, 29, 11, 32, causal=True), window=(4, 0), sinks="dominant"),
            VCase(Case("decode", 2, 4, 2, 1, 50, 32, causal=True), window=(15, 0), softcap=10.0, sinks="random"),
        ]
    return [
        VCase(Case("window", 2, 8, 2, 1000, 1000, 128, causal=True, layout="bshd"), window=(255, 0)),
        VCase(Case("two_sided", 1, 4, 4, 333, 777, 64), window=(50, 90), softcap=20.0),
        VCase(Case("blind", 1, 4, 4, 600, 250, 128, causal=True), window=(63, 0), sinks="dominant"),
        VCase(Case("softcap", 1, 8, 8, 513, 513, 128, causal=True, scale=1.0), softcap=50.0),
        VCase(Case("decode", 4, 32, 8, 1, 5000, 128, causal=True, layout="bshd"), window=(1023, 0), sinks="random"),
    ]


def variant_refusals(impl: str, v: VCase) -> list[str]:
    """The variant part of the table: what each implementation declares it cannot compute."""
    wants = [name for name, on in (("window", v.window), ("softcap", v.softcap), ("sinks", v.sinks)) if on]
    serves = {
        "triton": {"window", "softcap", "sinks"}, "cupy": {"window", "softcap", "sinks"},
        "sdpa": {"window", "softcap", "sinks"}, "sdpa:math": {"window", "softcap", "sinks"},
        "sdpa:efficient": {"window"}, "sdpa:flash": set(), "sdpa:cudnn": set(), "triton:gluon": {"window"},
    }.get(implementation_of(impl), set())
    # an implementation not available here says so instead (its capabilities are never asked)
    return [f"{w} || unavailable" for w in wants if w not in serves]


def _grid() -> list:
    params = []
    for device in (["cuda"] if GPU else []) + ["cpu"]:
        # on the GPU also "triton:tl": forcing "triton" may run the Gluon forward for a window there
        for impl in implementations() + (pinned_implementations() if device == "cuda" else []):
            for dtype, dname in DTYPE_IDS.items():
                if dtype not in (FP16, BF16, FP32):
                    continue
                if device == "cuda" and impl == "cupy" and dtype != BF16:
                    continue  # every cupy variant kernel is an NVRTC compile: bf16 here, the rest in
                    # tests/test_cupy_variants_gpu.py (which compiles them in parallel first)
                for v in vcases(device):
                    for kind in ("lse", "grad"):
                        refused = expected_refusals(impl, device, v.base, dtype, kind) + variant_refusals(impl, v)
                        marks = [pytest.mark.gpu] if device == "cuda" else []
                        params.append(pytest.param(device, impl, v, dtype, kind, marks=marks, id=(
                            f"{device}-{impl}-{dname}-{kind}-{v.id()}{'-refused' if refused else ''}")))
    return params


@pytest.fixture(autouse=True)
def _setup(triton_interpreter_state: None, poisoned: None) -> None:
    """Triton under its interpreter on CPU-only machines; outputs start as NaN."""


def _sinks(v: VCase, hq: int, device: str) -> torch.Tensor | None:
    if v.sinks is None:
        return None
    t = torch.randn(hq, generator=torch.Generator().manual_seed(11)) + (8.0 if v.sinks == "dominant" else 0.0)
    return t.float().to(device)


@pytest.mark.parametrize("device, impl, v, dtype, kind", _grid())
def test_variants(device: str, impl: str, v: VCase, dtype: torch.dtype, kind: str) -> None:
    c = v.base
    grad = kind == "grad"
    q, k, vv = make_case_inputs(c, dtype, device, requires_grad=grad)
    sinks = _sinks(v, c.hq, device)
    if sinks is not None and grad:
        sinks.requires_grad_(True)
    kw = dict(causal=c.causal, scale=c.scale, window=v.window, softcap=v.softcap)
    expected = expected_refusals(impl, device, c, dtype, kind) + variant_refusals(impl, v)
    try:
        res = fd.attention(q, k, vv, layout=c.layout, return_lse=not grad, backend=impl, sinks=sinks, **kw)
    except NoBackendError as e:
        reasons = " | ".join(e.reasons.get(implementation_of(impl), [])) or str(e)
        assert expected, f"{impl} refused a case it is expected to serve: {reasons}"
        missing = [t for t in expected if not any(alt in reasons for alt in t.split(" || "))]
        assert not missing, f"{impl} refused, but not for the expected reason {missing}: {reasons}"
        return
    assert not expected, f"{impl} served a case the table says it refuses ({expected})"
    out, lse = (res, None) if grad else res
    qd, kd, vd = q.detach(), k.detach(), vv.detach()
    sd = sinks.detach() if sinks is not None else None
    ref, ref_lse = attention_math(qd, kd, vd, layout=c.layout, upcast=True, sinks=sd, **kw)
    base, _ = attention_math(qd, kd, vd, layout=c.layout, upcast=False, sinks=sd, **kw)
    assert not torch.isnan(out).any(), "NaN in the output"
    ok, err, allowed = within_budget(out.detach(), base, ref, dtype)
    assert ok, f"forward error {err:.3g} > allowed {allowed:.3g}"
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse: -inf exactly where the reference's is"
        if finite.any():
            mag = float(ref_lse[finite].abs().max())
            tol = (1e-4 if dtype == FP32 else 2e-2) * max(1.0, mag / 16)
            assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) <= tol
        return
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out)
    out.backward(do)
    runs = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, vv)]
        s = None
        if sinks is not None:
            s = sinks.detach().clone().to(torch.float64 if upcast else torch.float32).requires_grad_(True)
        o, _ = attention_math(*leaves, layout=c.layout, upcast=upcast, sinks=s, **kw)
        o.backward(do.to(o.dtype))
        runs.append([t.grad for t in leaves] + ([s.grad] if s is not None else []))
    got = [q.grad, k.grad, vv.grad] + ([sinks.grad] if sinks is not None else [])
    for name, g, want, b in zip(["dq", "dk", "dv", "dsinks"], got, runs[0], runs[1]):
        assert g is not None and torch.isfinite(g).all(), f"{name} missing or not finite"
        # dsinks too gets the input dtype's floor: it is a reduction of dO . O over the stored (fp16/bf16) output
        ok, err, allowed = within_budget(g, b, want, dtype, grad=True)
        assert ok, f"{name} error {err:.3g} > allowed {allowed:.3g}"
