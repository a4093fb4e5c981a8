"""Sliding window, logit softcap and attention sinks in the Triton kernels on a real GPU
(pytest -m gpu): fp16 and bf16, forward (pointer and tensor-descriptor kernels), split-KV decode,
backward with the sinks' gradient. Adversarial values: a large scale (softcap saturates), rows that
see no key, windows that hide whole key blocks, sinks that dominate the softmax. Everything against
the float64 reference within flash-attention's budget; outputs poisoned (NaN) before each run."""

from __future__ import annotations

import pytest
import torch

from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget
from inputs import make_qkv

pytestmark = pytest.mark.gpu
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sinks(hq: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    base = torch.randn(hq, generator=torch.Generator().manual_seed(3))
    return (base + 10.0 if kind == "dominant" else base).float().cuda()


def _check(out, lse, q, k, v, **kw) -> None:
    ref, ref_lse = attention_math(q, k, v, upcast=True, **kw)
    base, _ = attention_math(q, k, v, upcast=False, **kw)
    ok, err, allowed = within_budget(out, base, ref, q.dtype)
    assert ok, f"forward error {err:.3g} > allowed {allowed:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where the reference's is"
    if finite.any():
        assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 2e-2


# (B, Hq, Hkv, Sq, Sk, D, causal, window, softcap, sinks, scale)
FORWARD = [
    (2, 8, 2, 1024, 1024, 128, True, (255, 0), None, "none", None),      # Mistral-style, blocks skipped
    (1, 4, 4, 1500, 1500, 64, False, (100, 100), None, "random", None),   # two-sided, ragged
    (1, 4, 2, 700, 300, 128, True, (64, 0), None, "random", None),        # Sq > Sk: 400 blind rows
    (1, 4, 1, 333, 2048, 128, True, (511, 0), 50.0, "random", None),      # Sq < Sk, gemma-ish
    (1, 4, 4, 512, 512, 128, True, (-1, -1), 5.0, "none", 2.0),           # softcap saturated
    (1, 8, 8, 777, 777, 96, False, (-1, -1), None, "dominant", None),     # sinks dominate
    (1, 2, 2, 8192, 8192, 128, True, (4095, 0), None, "random", None),    # the 4096 window at 8k
]


def _fid(c: tuple) -> str:
    return f"h{c[1]}x{c[2]}-sq{c[3]}-sk{c[4]}-d{c[5]}{'-causal' if c[6] else ''}-w{c[7][0]}_{c[7][1]}-cap{c[8]}-{c[9]}"


@pytest.mark.parametrize("cfg", [{}, {"TMA": False}, {"BLOCK_M": 64, "BLOCK_N": 32}], ids=["default", "pointer", "m64n32"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", FORWARD, ids=_fid)
def test_forward_variants(case: tuple, dtype: str, cfg: dict, poisoned: None) -> None:
    from flashdispatch.backends.triton.forward import attention_forward

    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind, scale = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", seed=1, layout="bshd")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scale = d ** -0.5 if scale is None else scale
    sinks = _sinks(hq, sinks_kind)
    out, lse = attention_forward(q, k, v, causal=causal, scale=scale, config=cfg, window=window, softcap=softcap,
                                 sinks=sinks)
    _check(out, lse, q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)


DECODE = [
    (4, 32, 8, 1, 8192, 128, True, (1023, 0), None, "random"),
    (2, 16, 2, 4, 5000, 128, True, (4095, 0), 30.0, "dominant"),
    (64, 8, 1, 1, 4096, 64, True, (511, 0), None, "none"),
    (1, 8, 8, 2, 3000, 128, False, (-1, -1), 50.0, "random"),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"b{c[0]}-h{c[1]}x{c[2]}-sq{c[3]}-sk{c[4]}-w{c[7][0]}-cap{c[8]}-{c[9]}")
def test_decode_variants(case: tuple, dtype: str, poisoned: None) -> None:
    from flashdispatch.backends.triton.decode import decode_forward

    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", seed=2)
    sinks = _sinks(hq, sinks_kind)
    for splits in (0, 1):  # the planner's choice (several splits: the merge adds the sink) and one
        out, lse = decode_forward(q, k, v, causal=causal, scale=d ** -0.5, config={"NUM_SPLITS": splits},
                                  window=window, softcap=softcap, sinks=sinks)
        _check(out, lse, q, k, v, causal=causal, scale=d ** -0.5, window=window, softcap=softcap, sinks=sinks)


BACKWARD = [
    (2, 8, 2, 1024, 1024, 128, True, (127, 0), None, "random"),
    (1, 4, 4, 600, 900, 64, False, (50, 70), 20.0, "none"),
    (1, 4, 2, 700, 300, 128, True, (64, 0), None, "dominant"),
    (1, 4, 4, 512, 512, 128, True, (-1, -1), 50.0, "random"),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", BACKWARD, ids=lambda c: f"h{c[1]}x{c[2]}-sq{c[3]}-sk{c[4]}-w{c[7][0]}_{c[7][1]}-cap{c[8]}-{c[9]}")
def test_backward_variants(case: tuple, dtype: str) -> None:
    import flashdispatch

    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind = case
    dt = DTYPES[dtype]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dt, device="cuda", seed=4, requires_grad=True)
    sinks = _sinks(hq, sinks_kind)
    if sinks is not None:
        sinks.requires_grad_(True)
    scale = d ** -0.5
    out = flashdispatch.attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks,
                                  backend="triton")
    do = torch.randn_like(out)
    out.backward(do)
    got = [q.grad, k.grad, v.grad] + ([sinks.grad] if sinks is not None else [])
    runs = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        s = None
        if sinks is not None:
            s = sinks.detach().clone().to(torch.float64 if upcast else torch.float32).requires_grad_(True)
        ro, _ = attention_math(*leaves, causal=causal, scale=scale, window=window, softcap=softcap, sinks=s,
                               upcast=upcast)
        ro.backward(do.to(ro.dtype))
        runs.append([t.grad for t in leaves] + ([s.grad] if s is not None else []))
    for name, g, want, base in zip(["dq", "dk", "dv", "dsinks"], got, runs[0], runs[1]):
        # dsinks gets the input dtype's floor too: it is -sum P(sink) * (dO . O) over the stored fp16/bf16
        # output, whose rounding alone moves it by about eps(dtype) * |dsinks| (H200: 4.29e-4 against an
        # fp32 floor of 4.15e-4 with dominant sinks in fp16)
        ok, err, allowed = within_budget(g, base, want, dt, grad=True)
        assert ok, f"{name} error {err:.3g} > allowed {allowed:.3g}"


# --- through the public API --------------------------------------------------------------------

API_CASES = [
    (2, 8, 2, 700, 700, 128, True, (255, 0), None, "random"),
    (1, 8, 8, 300, 900, 64, True, (127, 0), 30.0, "dominant"),
    (1, 4, 4, 512, 512, 128, False, (-1, -1), 50.0, "none"),
]


@pytest.mark.parametrize("backend", ["triton", None], ids=["triton", "auto"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", API_CASES, ids=lambda c: f"sq{c[3]}-sk{c[4]}-d{c[5]}-w{c[7][0]}-cap{c[8]}-{c[9]}")
def test_attention_api_forward_and_gradients(case: tuple, dtype: str, backend: str | None) -> None:
    """attention(window=, softcap=, sinks=) end to end: forward, lse and every gradient (sinks'
    too) within budget; the dispatcher's own choice on a GPU is one of our kernels."""
    import flashdispatch
    from flashdispatch.errors import NoBackendError

    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind = case
    dt = DTYPES[dtype]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dt, device="cuda", seed=7, layout="bshd", requires_grad=True)
    sinks = _sinks(hq, sinks_kind)
    if sinks is not None:
        sinks.requires_grad_(True)
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks)
    if backend is None:
        chosen = flashdispatch.explain(q, k, v, layout="bshd", **kw).variant
        assert chosen in ("triton", "cupy"), chosen
    try:
        out, lse = flashdispatch.attention(q, k, v, layout="bshd", return_lse=True, backend=backend, **kw)
    except NoBackendError as e:
        if backend == "cupy" and "CuPy is not importable" in str(e):
            pytest.skip("cupy not installed")
        raise
    do = torch.randn_like(out)
    out.backward(do)
    got = [q.grad, k.grad, v.grad] + ([sinks.grad] if sinks is not None else [])
    runs = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        s = None
        if sinks is not None:
            s = sinks.detach().clone().to(torch.float64 if upcast else torch.float32).requires_grad_(True)
        ro, rlse = attention_math(*leaves, layout="bshd", upcast=upcast, sinks=s, causal=causal, window=window,
                                  softcap=softcap)
        ro.backward(do.to(ro.dtype))
        runs.append([ro, rlse] + [t.grad for t in leaves] + ([s.grad] if s is not None else []))
    ok, err, allowed = within_budget(out, runs[1][0], runs[0][0], dt)
    assert ok, f"out error {err:.3g} > allowed {allowed:.3g}"
    finite = torch.isfinite(runs[0][1])
    assert torch.equal(torch.isfinite(lse), finite)
    for name, g, want, base in zip(["dq", "dk", "dv", "dsinks"], got, runs[0][2:], runs[1][2:]):
        # dsinks gets the input dtype's floor too: it is -sum P(sink) * (dO . O) over the stored fp16/bf16
        # output, whose rounding alone moves it by about eps(dtype) * |dsinks| (H200: 4.29e-4 against an
        # fp32 floor of 4.15e-4 with dominant sinks in fp16)
        ok, err, allowed = within_budget(g, base, want, dt, grad=True)
        assert ok, f"{name} error {err:.3g} > allowed {allowed:.3g}"


def test_compile_fullgraph_with_variants_on_gpu() -> None:
    import flashdispatch

    torch._dynamo.reset()
    q, k, v = make_qkv(1, 8, 2, 300, 300, 128, dtype=torch.bfloat16, device="cuda", seed=8, requires_grad=True)
    sinks = _sinks(8, "random").requires_grad_(True)

    def loss(q, k, v, sinks):  # type: ignore[no-untyped-def]
        out = flashdispatch.attention(q, k, v, causal=True, window=(63, 0), softcap=30.0, sinks=sinks)
        return out.float().square().sum()

    ex = torch._dynamo.explain(loss)(q, k, v, sinks)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(r.reason) for r in ex.break_reasons]
    got = torch.compile(loss, fullgraph=True)(q, k, v, sinks)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    want = loss(q, k, v, sinks)
    want.backward()
    torch._dynamo.reset()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    for g, t in zip(grads, (q, k, v, sinks)):
        assert torch.allclose(g.float(), t.grad.float(), rtol=2e-2, atol=2e-2)


def test_decode_with_a_window_replays_in_a_cuda_graph() -> None:
    import flashdispatch

    q = torch.randn(4, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    sinks = _sinks(32, "random")
    call = lambda: flashdispatch.attention(q, k, v, causal=True, window=(1023, 0), sinks=sinks)  # noqa: E731
    for _ in range(3):
        eager = call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            captured = call()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    ref, _ = attention_math(q, k, v, causal=True, window=(1023, 0), sinks=sinks)
    assert float((captured.double() - ref).abs().max()) < 2e-2
