"""cupy backend variants on a real GPU: sliding window, logit softcap and attention sinks, forward,
lse and gradients (sinks' included) against a float64 reference with flash-attention's budget
(dispatch/tolerances.py), calling the launch functions directly.

Covered: windows bounded on the left only, on both sides, with causal (Mistral's form), narrow
enough to hide whole key and query blocks, and with rows that see no key (zeros, lse = -inf, or
lse = sink with sinks; never NaN); softcap 10 / 30 / 50 with a large scale (logits far past the
cap); sinks alone, with a window and with softcap; fp16 and bf16; outputs poisoned with NaN.

    pytest -m gpu tests/test_cupy_variants_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from flashdispatch import tolerances
from flashdispatch.reference import attention_math, visible_mask

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

from flashdispatch.backends.cupy import configs, cupy_backward, cupy_forward  # noqa: E402
from inputs import make_qkv_do, make_sinks, poison_cuda_allocator  # noqa: E402
from flashdispatch.backends.cupy.ops import _mask  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Case:
    def __init__(self, name: str, shape: tuple[int, int, int, int, int], *, d: int = 128, causal: bool = False,
                 window: tuple[int, int] = (-1, -1), softcap: float = 0.0, scale: float | None = None,
                 sinks: bool = False) -> None:
        self.name, self.shape, self.d, self.causal = name, shape, d, causal
        self.window, self.softcap, self.scale, self.sinks = window, softcap, scale, sinks

    def kwargs(self) -> dict:
        return {"causal": self.causal, "scale": self.scale, "window_left": self.window[0],
                "window_right": self.window[1], "softcap": self.softcap}


# (B, Hq, Hkv, Sq, Sk); GQA everywhere; odd lengths on purpose.
CASES = [
    Case("left-only", (1, 4, 2, 600, 600), window=(100, -1)),
    Case("both-sides", (1, 4, 2, 517, 700), window=(64, 37)),
    Case("causal-left", (1, 4, 2, 1000, 1000), causal=True, window=(255, -1)),
    Case("causal-left-sq<sk", (2, 4, 4, 100, 900), causal=True, window=(300, -1)),
    Case("hides-blocks", (1, 2, 1, 1500, 1500), window=(20, 5)),
    # p = i - 550: rows i < 545 see no key (whole query blocks and parts of one)
    Case("no-key-rows", (1, 4, 2, 700, 150), window=(10, 5)),
    Case("no-key-rows-causal", (1, 4, 2, 700, 150), causal=True, window=(30, -1)),
    Case("d64-both-sides", (1, 4, 1, 333, 444), d=64, window=(40, 70)),
    Case("softcap10", (1, 4, 2, 513, 513), softcap=10.0, scale=1.0),
    Case("softcap30-causal", (1, 4, 2, 513, 513), causal=True, softcap=30.0, scale=1.0),
    Case("softcap50", (1, 4, 2, 257, 600), softcap=50.0, scale=1.0),
    Case("window-softcap-causal", (1, 4, 2, 800, 800), causal=True, window=(200, -1), softcap=50.0, scale=1.0),
    Case("sinks", (1, 4, 2, 300, 300), sinks=True),
    Case("sinks-no-key-rows", (1, 4, 2, 700, 150), window=(10, 5), sinks=True),
    Case("sinks-softcap-causal", (1, 4, 2, 400, 400), causal=True, softcap=30.0, scale=1.0, sinks=True),
]


def visible(sq: int, sk: int, case: Case, device: torch.device | str = "cuda") -> torch.Tensor:
    """Bool (Sq, Sk): query i (at p = i + Sk - Sq) sees key j."""
    return visible_mask(sq, sk, causal=case.causal, window=case.window, device=device)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, case: Case,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the one reference math (dispatch/reference.py) in float64 (upcast) or in q's
    dtype with float32 statistics (plain torch, which sets the budget)."""
    return attention_math(q, k, v, causal=case.causal, scale=case.scale, upcast=upcast, window=case.window,
                          softcap=case.softcap or None, sinks=sinks)


def make(case: Case, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v, do (bhsd) and the case's sinks, spread from barely there to dominating a row."""
    b, hq, hkv, sq, sk = case.shape
    q, k, v, do = make_qkv_do(b, hq, hkv, sq, sk, case.d, dtype=dtype, seed=seed, device="cuda")
    return q, k, v, do, make_sinks(hq, "spread" if case.sinks else "none", seed=seed, device="cuda")


def _specs(case: Case, dt: str, cc: int) -> list[configs.KernelSpec]:
    sq, sk = case.shape[3], case.shape[4]
    m = _mask(sq, sk, case.causal, *case.window)
    cfg = configs.default_config(case.d, cc)
    cap = case.softcap > 0
    return [configs.fwd_spec(case.d, dt, m.causal, cfg, window=m.window, softcap=cap, sinks=case.sinks),
            *configs.bwd_specs(case.d, dt, m.causal, cfg, window=m.window, softcap=cap)]


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """Every kernel of the module compiled up front, in parallel (NVRTC runs without the GIL)."""
    from flashdispatch.tools.warmup import warmup

    major, minor = torch.cuda.get_device_capability()
    specs = [s for c in CASES for dt in DTYPES for s in _specs(c, dt, major * 10 + minor)]
    report = warmup(list(dict.fromkeys(specs)), jobs=16)
    assert report.ok, report.failed


def check_lse(lse: torch.Tensor, lse_ref: torch.Tensor, lse_base: torch.Tensor) -> None:
    assert not torch.isnan(lse).any(), "lse has NaN"
    inf_ref = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), inf_ref), "lse = -inf exactly where a row sees no key"
    fin = ~inf_ref
    if fin.any():
        _, err, allowed = tolerances.within_budget(lse[fin], lse_base[fin].float(), lse_ref[fin], torch.float32)
        allowed = max(allowed, 1e-3 * float(lse_ref[fin].abs().max()) + 1e-3)
        assert err <= allowed, f"lse error {err:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dt", list(DTYPES))
def test_forward_lse_and_grads(dt: str, case: Case) -> None:
    dtype = DTYPES[dt]
    q, k, v, do, sinks = make(case, dtype, seed=sum(map(ord, case.name + dt)))
    poison_cuda_allocator()
    out, lse = cupy_forward(q, k, v, sinks=sinks, **case.kwargs())
    ref, lse_ref = reference(q, k, v, sinks, case, upcast=True)
    base, lse_base = reference(q, k, v, sinks, case, upcast=False)
    assert not torch.isnan(out).any(), "out has NaN"
    ok, err, allowed = tolerances.within_budget(out, base, ref, dtype)
    assert ok, f"out error {err:.3g} > {allowed:.3g}"
    check_lse(lse, lse_ref, lse_base)
    nokey = ~visible(case.shape[3], case.shape[4], case).any(-1)
    assert (out[:, :, nokey] == 0).all(), "rows that see no key must be zeros"
    if sinks is not None and nokey.any():  # ... with lse = their head's sink
        assert torch.equal(lse[:, :, nokey], sinks.view(1, -1, 1).expand(lse.shape)[:, :, nokey])

    poison_cuda_allocator()
    grads = cupy_backward(do, q, k, v, out, lse, sinks=sinks, **case.kwargs())
    assert len(grads) == (4 if case.sinks else 3)

    def autograd(upcast: bool) -> tuple[torch.Tensor, ...]:
        leaf_dt = torch.float64 if upcast else dtype
        leaves = [t.detach().to(leaf_dt).requires_grad_() for t in (q, k, v)]
        if sinks is not None:
            leaves.append(sinks.detach().to(torch.float64 if upcast else torch.float32).requires_grad_())
        o, _ = reference(*leaves[:3], leaves[3] if sinks is not None else None, case, upcast=upcast)
        return torch.autograd.grad(o, leaves, do.to(o.dtype))

    want, plain = autograd(True), autograd(False)
    for name, got, w, b in zip(("dq", "dk", "dv", "dsinks"), grads, want, plain):
        budget_dtype = dtype if name != "dsinks" else torch.float32
        ok, err, allowed = tolerances.within_budget(got, b, w, budget_dtype, grad=True)
        if name == "dsinks":  # a sum over rows of half-precision P * delta: the dtype's floor
            allowed = max(allowed, 3 * tolerances.max_abs_err(b, w) + 1e-2 * float(w.abs().max()) + 1e-3)
            ok = err <= allowed
        assert ok, f"{name} error {err:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("dt", list(DTYPES))
def test_defaults_and_equivalent_windows_are_bit_identical(dt: str) -> None:
    """window=(-1, 0) is bottom-right causal; a window wider than the sequence is no window; the
    defaults are today's call (same kernel, same bits)."""
    case = Case("plain", (1, 4, 2, 300, 500))
    q, k, v, do, _ = make(case, DTYPES[dt], seed=5)
    plain = cupy_forward(q, k, v, causal=True, scale=None)
    for causal, kw in ((False, {"window_left": -1, "window_right": 0}),
                       (False, {"window_left": 10**6, "window_right": 0}),
                       (True, {"window_left": -1, "window_right": -1, "softcap": 0.0, "sinks": None})):
        got = cupy_forward(q, k, v, causal=causal, scale=None, **kw)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1]), kw
    gp = cupy_backward(do, q, k, v, *plain, causal=True, scale=None)
    gw = cupy_backward(do, q, k, v, *plain, causal=False, scale=None, window_left=-1, window_right=0)
    assert all(torch.equal(a, b) for a, b in zip(gp, gw))


@pytest.mark.parametrize("dt", list(DTYPES))
def test_large_negative_logits_in_a_window_give_no_nan(dt: str) -> None:
    """Rows whose first visible block holds only very negative logits (q >= 0, k <= 0, scale 2:
    logits near -160, past exp2's range once in base 2): the online softmax must start them from
    alpha = 0, never 0 * inf = NaN."""
    case = Case("neg", (1, 2, 2, 400, 400), window=(70, 3), scale=2.0)
    q, k, v, do, _ = make(case, DTYPES[dt], seed=9)
    q, k = q.abs(), -k.abs()
    out, lse = cupy_forward(q, k, v, **case.kwargs())
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref, lse_ref = reference(q, k, v, None, case, upcast=True)
    base, _ = reference(q, k, v, None, case, upcast=False)
    ok, err, allowed = tolerances.within_budget(out, base, ref, DTYPES[dt])
    assert ok, f"out error {err:.3g} > {allowed:.3g}"


def test_bad_variant_arguments_are_named() -> None:
    case = Case("plain", (1, 4, 2, 64, 64))
    q, k, v, _, _ = make(case, torch.float16, seed=1)
    with pytest.raises(ValueError, match="window_left"):
        cupy_forward(q, k, v, causal=False, scale=None, window_left=-2)
    with pytest.raises(ValueError, match="softcap"):
        cupy_forward(q, k, v, causal=False, scale=None, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks"):
        cupy_forward(q, k, v, causal=False, scale=None, sinks=torch.zeros(3, device="cuda"))
    with pytest.raises(ValueError, match="sinks"):
        cupy_forward(q, k, v, causal=False, scale=None, sinks=torch.zeros(4, device="cuda", dtype=torch.float16))
