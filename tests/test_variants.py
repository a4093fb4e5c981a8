"""attention(window=, softcap=, sinks=) through the public API on the CPU: validation (errors that
name the argument), every variant and combination against the float64 reference (both layouts,
GQA, Sq != Sk, return_lse, gradients including the sinks'), what explain() says and picks, and
torch.compile fullgraph without a graph break."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from flashdispatch.errors import NoBackendError
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
from inputs import make_qkv

# (Hq, Hkv, Sq, Sk, causal, window, softcap, with sinks)
CASES = [
    (4, 2, 19, 19, True, (4, 0), None, False),      # Mistral-style
    (4, 2, 9, 31, True, (6, 0), 5.0, True),         # chunked prefill, gpt-oss-like + softcap
    (2, 2, 25, 10, True, (3, 0), None, True),       # Sq > Sk: blind rows, lse = sink
    (2, 1, 17, 17, False, (2, 3), 2.0, False),      # two-sided
    (2, 2, 13, 13, False, (-1, -1), 3.0, False),    # softcap alone
    (4, 1, 12, 20, True, (-1, -1), None, True),     # sinks alone
    (2, 2, 1, 40, True, (7, 0), None, True),        # decode step
]


def _id(c: tuple) -> str:
    hq, hkv, sq, sk, causal, window, softcap, sinks = c
    return f"h{hq}x{hkv}-sq{sq}-sk{sk}{'-causal' if causal else ''}-w{window[0]}_{window[1]}-cap{softcap}-sinks{int(sinks)}"


def _sinks(hq: int, on: bool, grad: bool = False) -> torch.Tensor | None:
    if not on:
        return None
    return (torch.randn(hq, generator=torch.Generator().manual_seed(9)) + 1.0).requires_grad_(grad)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_and_lse_against_the_reference(case: tuple, layout: str) -> None:
    hq, hkv, sq, sk, causal, window, softcap, with_sinks = case
    q, k, v = make_qkv(2, hq, hkv, sq, sk, 16, layout=layout, seed=0)
    sinks = _sinks(hq, with_sinks)
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks)
    out, lse = fd.attention(q, k, v, layout=layout, return_lse=True, **kw)
    ref, ref_lse = attention_math(q, k, v, layout=layout, upcast=True, **kw)
    base, _ = attention_math(q, k, v, layout=layout, upcast=False, **kw)
    ok, err, allowed = within_budget(out, base, ref, q.dtype)
    assert ok, f"{err} > {allowed}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 1e-4


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gradients_including_the_sinks(case: tuple) -> None:
    hq, hkv, sq, sk, causal, window, softcap, with_sinks = case
    q, k, v = make_qkv(1, hq, hkv, sq, sk, 16, seed=1)
    sinks = _sinks(hq, with_sinks)
    kw = dict(causal=causal, window=window, softcap=softcap)
    do = torch.randn(1, hq, sq, 16, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)] + ([sinks.clone().requires_grad_(True)]
                                                                     if with_sinks else [])
    fd.attention(*leaves[:3], sinks=leaves[3] if with_sinks else None, **kw).backward(do)
    runs = []
    for upcast in (True, False):
        rl = [t.clone().to(torch.float64 if upcast else torch.float32).requires_grad_(True)
              for t in [q, k, v] + ([sinks] if with_sinks else [])]
        out, _ = attention_math(*rl[:3], sinks=rl[3] if with_sinks else None, upcast=upcast, **kw)
        out.backward(do.to(out.dtype))
        runs.append([t.grad for t in rl])
    for name, got, want, base in zip(["q", "k", "v", "sinks"], [t.grad for t in leaves], *runs):
        assert got is not None, f"no gradient reached {name}"
        ok, err, allowed = within_budget(got, base, want, torch.float32, grad=True)
        assert ok, f"d{name}: {err} > {allowed}"


def test_no_window_equals_plain_attention() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, seed=3)
    plain = fd.attention(q, k, v, causal=True)
    assert torch.equal(fd.attention(q, k, v, causal=True, window=(-1, -1)), plain)
    assert torch.equal(fd.attention(q, k, v, causal=True, window=(-1, 5)), plain)  # right is 0 under causal


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_no_key_at_all_gives_zeros_and_the_sink_as_lse(layout: str, compiled: bool) -> None:
    """Sk = 0 with sinks (no kernel runs): out is zeros in q's layout and dtype, lse is each head's
    sink (the sink is all a row's denominator holds), and the gradients are zeros, the sinks' too."""
    q, k, v = make_qkv(2, 4, 2, 5, 0, 16, dv=8, layout=layout, requires_grad=True, seed=1)
    sinks = _sinks(4, True, grad=True)

    def call(q, k, v, sinks):  # noqa: ANN001, ANN202
        return fd.attention(q, k, v, causal=True, layout=layout, window=(3, 0), softcap=5.0, sinks=sinks,
                            return_lse=True)

    fn = torch.compile(call, backend="eager", fullgraph=True) if compiled else call
    out, lse = fn(q, k, v, sinks)
    assert out.shape == ((2, 4, 5, 8) if layout == "bhsd" else (2, 5, 4, 8)) and out.dtype == q.dtype
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.dtype == torch.float32 and torch.equal(lse, sinks.detach().view(1, 4, 1).expand(2, 4, 5))
    out.sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("sinks", sinks)):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), name
    if compiled:
        torch._dynamo.reset()


@pytest.mark.parametrize("kwargs,kind,words", [
    (dict(window=(-2, 0)), ValueError, "window left"),
    (dict(window=(3, -5)), ValueError, "window right"),
    (dict(window=(3,)), TypeError, "window"),
    (dict(window=(1.5, 0)), TypeError, "window left"),
    (dict(window=4096), TypeError, "window"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks shape"),
    (dict(sinks=torch.zeros(2, dtype=torch.float16)), TypeError, "sinks.dtype"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks"),
    (dict(sinks=torch.zeros(2, device="meta")), ValueError, "sinks.device"),
])
def test_bad_values_name_the_argument(kwargs: dict, kind: type, words: str) -> None:
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(kind, match=words):
        fd.attention(q, k, v, **kwargs)


def test_explain_names_the_variants_and_the_fallback() -> None:
    q, k, v = make_qkv(1, 4, 2, 16, 16, 16)
    d = fd.explain(q, k, v, causal=True, window=(4, 0), softcap=30.0, sinks=torch.zeros(4))
    text = str(d)
    assert "window=(4, 0)" in text and "softcap=30" in text and "sinks" in text
    assert d.variant.startswith("sdpa")
    assert any("explicit" in n for n in d.notes), d.notes
    d = fd.explain(q, k, v, causal=True, window=(4, 0))
    assert any("mask" in n for n in d.notes), d.notes


def test_explain_by_shape_on_a_simulated_gpu_picks_triton_for_the_variants() -> None:
    for kw in (dict(window=(4095, 0)), dict(softcap=50.0), dict(sinks=True), dict(window=(127, 0), sinks=True)):
        d = fd.explain(shape=(1, 32, 8, 16384, 16384, 128), dtype="bf16", causal=True, device="h200", **kw)
        # our kernels: the tl kernel, or the Gluon one (Hopper) where the variant is a window alone
        assert d.backend == "triton" and d.variant in ("triton", "triton:gluon"), (kw, str(d))
        if "softcap" in kw or "sinks" in kw:
            assert d.variant == "triton", (kw, str(d))
        d = fd.explain(shape=(8, 32, 8, 1, 32768, 128), dtype="bf16", causal=True, device="h100", **kw)
        assert d.variant == "triton", (kw, str(d))


def test_forced_backend_that_cannot_serve_a_variant_says_why() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(NoBackendError, match="softcap"):
        fd.attention(q, k, v, softcap=5.0, backend="sdpa:flash")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_compile_fullgraph_no_break(layout: str) -> None:
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 4, 2, 11, 11, 16, layout=layout, requires_grad=True, seed=4)
    sinks = _sinks(4, True, grad=True)

    def loss(q, k, v, sinks):  # type: ignore[no-untyped-def]
        out = fd.attention(q, k, v, causal=True, window=(3, 0), softcap=4.0, sinks=sinks, layout=layout)
        return out.float().square().sum()

    ex = torch._dynamo.explain(loss)(q, k, v, sinks)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, sinks)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    want = loss(q, k, v, sinks)
    want.backward()
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, (q, k, v, sinks)):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-5)
