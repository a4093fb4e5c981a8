"""torch.compile over flashdispatch.attention (CPU, SDPA backend): one graph, no break, eager's results.

Most cases compile with the "aot_eager" backend: it runs Dynamo, the fake ops and AOTAutograd
(everything that decides whether the call traces) without spending CI minutes in Inductor's C++
compiler; one case goes through Inductor end to end. The Triton backend runs under its CPU
interpreter in a child process (TRITON_INTERPRET=1 must be set before triton defines its kernels);
bf16, CUDA graphs and the CuPy backend are GPU-only (tests/test_integration_gpu.py).
"""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch

import flashdispatch as fd
from flashdispatch import ops
from flashdispatch.backend import Capabilities, Implementation
from flashdispatch.device import DeviceInfo
from flashdispatch.problem import Problem
from flashdispatch.reference import attention_math
from flashdispatch.registry import REGISTRY
from inputs import check_forward, check_grads, make_qkv

# (B, Hq, Hkv, Sq, Sk, D): small and odd; GQA; causal with Sq < Sk and Sq > Sk
SHAPES = [(2, 4, 2, 17, 17, 16), (1, 4, 1, 9, 23, 8), (1, 2, 2, 13, 5, 24)]


def _id(shape: tuple[int, ...]) -> str:
    return "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}".format(*shape)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_breaks(fn, *args: Any) -> tuple[int, int, list[str]]:
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_count, ex.graph_break_count, [str(b.reason) for b in ex.break_reasons]


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_graph_no_break(layout: str, causal: bool) -> None:
    q, k, v = make_qkv(2, 4, 2, 17, 33, 16, layout=layout, requires_grad=True)

    def loss(q, k, v):
        return fd.attention(q, k, v, causal=causal, layout=layout).float().square().sum()

    graphs, breaks, reasons = _graph_breaks(loss, q, k, v)
    assert (graphs, breaks) == (1, 0), reasons


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fullgraph_matches_reference(shape: tuple[int, ...], layout: str, causal: bool) -> None:
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, layout=layout, requires_grad=True)
    fn = torch.compile(
        lambda q, k, v: fd.attention(q, k, v, causal=causal, layout=layout), fullgraph=True, backend="aot_eager"
    )
    out = fn(q, k, v)
    check_forward(out.detach(), q.detach(), k.detach(), v.detach(), causal=causal, layout=layout)
    check_grads(fn, q.detach(), k.detach(), v.detach(), causal=causal, layout=layout)
    # the op writes a bshd problem's output in bshd storage: the user gets a contiguous tensor
    assert out.is_contiguous()


def test_return_lse_compiles() -> None:
    q, k, v = make_qkv(1, 4, 2, 13, 29, 16, requires_grad=True)
    fn = torch.compile(
        lambda q, k, v: fd.attention(q, k, v, causal=True, return_lse=True), fullgraph=True, backend="aot_eager"
    )
    out, lse = fn(q, k, v)
    check_forward(out.detach(), q.detach(), k.detach(), v.detach(), causal=True, lse=lse)
    assert not lse.requires_grad
    check_grads(lambda *t: fn(*t)[0], q.detach(), k.detach(), v.detach(), causal=True)


@pytest.mark.slow
def test_inductor_forward_and_backward() -> None:
    q, k, v = make_qkv(1, 4, 2, 21, 21, 16, requires_grad=True)

    def block(q, k, v):
        # attention between ordinary ops, so that Inductor has something of its own to fuse
        return fd.attention(q * 1.5, k, v.tanh(), causal=True, scale=0.3) * 2.0

    fn = torch.compile(block, fullgraph=True)
    out = fn(q, k, v)
    ref = block(q, k, v)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)


def test_dynamic_shapes_no_recompile_per_length() -> None:
    fn = torch.compile(lambda q, k, v: fd.attention(q, k, v, causal=True), fullgraph=True, dynamic=True,
                       backend="aot_eager")
    for s in (11, 19, 40):
        q, k, v = make_qkv(1, 2, 2, s, s, 16, requires_grad=True)
        out = fn(q, k, v)
        check_forward(out.detach(), q.detach(), k.detach(), v.detach(), causal=True)
        out.sum().backward()
        assert q.grad is not None and not torch.isnan(q.grad).any()


def test_non_unit_last_stride_is_copied_under_compile() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 11, 16)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    out = torch.compile(lambda q, k, v: fd.attention(q, k, v, causal=True), fullgraph=True,
                        backend="aot_eager")(qt, k, v)
    check_forward(out, q, k, v, causal=True)


def test_empty_input_compiles() -> None:
    q, k, v = make_qkv(1, 2, 2, 0, 7, 8)
    out = torch.compile(lambda q, k, v: fd.attention(q, k, v), fullgraph=True, backend="aot_eager")(q, k, v)
    assert out.shape == (1, 2, 0, 8)


# --- an implementation flashdispatch knows nothing about still compiles: run() and its own autograd


class _Spy(Implementation):
    """Plain torch math (differentiable), counting how often the ops call it."""

    name: ClassVar[str] = "spy"
    backend: ClassVar[str] = "spy"
    calls: ClassVar[int] = 0

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=frozenset({"cpu", "cuda", "rocm"}), dtypes=frozenset({torch.float32}))

    def run(self, q, k, v, p: Problem, config: dict[str, Any]):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        assert config == {"tile": 7}
        out, lse = attention_math(q, k, v, causal=p.causal, scale=p.scale, upcast=False)
        return out.to(q.dtype), lse.float()

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        return {"tile": 7}


@pytest.fixture
def spy():
    impl = _Spy()
    _Spy.calls = 0
    REGISTRY.register(impl)
    fd.refresh()
    yield impl
    REGISTRY.unregister(impl.name)
    fd.refresh()


def test_unknown_implementation_runs_through_its_own_autograd(spy: _Spy) -> None:
    q, k, v = make_qkv(1, 4, 2, 9, 15, 8, requires_grad=True)
    with fd.use_backend("spy"):  # read at trace time and baked into the graph
        fn = torch.compile(lambda q, k, v: fd.attention(q, k, v, causal=True), fullgraph=True, backend="aot_eager")
        out = fn(q, k, v)
    assert _Spy.calls == 1
    check_forward(out.detach(), q.detach(), k.detach(), v.detach(), causal=True)
    out = fn(q, k, v)  # outside the block: the traced graph keeps the forced backend
    assert _Spy.calls == 2
    out.sum().backward()
    assert _Spy.calls == 3, "the backward op recomputes the forward once"
    check_grads(fn, q.detach(), k.detach(), v.detach(), causal=True)


def test_ops_pass_opcheck() -> None:
    q, k, v = make_qkv(1, 4, 2, 9, 13, 8, requires_grad=True)
    args = (q, k, v, ops.SELECT_AT_RUN_TIME, "", ops.NOT_FORCED, True, 0.3, "bhsd", False, True)
    torch.library.opcheck(ops.attention_fwd, args)
    qt, kt, vt = make_qkv(1, 4, 2, 9, 13, 8, layout="bshd", requires_grad=True)
    bshd = (qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2))
    torch.library.opcheck(ops.attention_fwd, bshd + args[3:8] + ("bshd", False, True))


def test_forced_backend_that_cannot_serve_fails_at_trace_time() -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8)
    fn = torch.compile(lambda q, k, v: fd.attention(q, k, v, backend="sdpa:cudnn"), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(Exception, match="sdpa:cudnn"):
        fn(q, k, v)


# --- decision logging ---------------------------------------------------------------------------


def test_decision_log_once_per_problem(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("FLASHDISPATCH_LOG", "decisions")
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8)
    with caplog.at_level(logging.INFO, logger="flashdispatch"):
        for _ in range(3):
            fd.attention(q, k, v, causal=True)
        fd.attention(*make_qkv(1, 2, 2, 11, 11, 8), causal=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flashdispatch decision")]
    assert len(lines) == 2, lines
    assert all("(source: " in line for line in lines)
    assert "Sq=9" in lines[0] and "Sq=11" in lines[1]


def test_decision_log_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8)
    with caplog.at_level(logging.INFO, logger="flashdispatch"):
        fd.attention(q, k, v)
    assert not [r for r in caplog.records if r.getMessage().startswith("flashdispatch decision")]


# --- the Triton backend under its CPU interpreter, in a process of its own ------------------------

_TRITON_SCRIPT = """
import torch, flashdispatch as fd
from inputs import check_forward, check_grads, make_qkv
assert fd.explain(*make_qkv(1, 2, 2, 9, 9, 16), backend="triton").variant == "triton"
for layout, (sq, sk) in (("bhsd", (13, 29)), ("bshd", (21, 21))):
    q, k, v = make_qkv(1, 4, 2, sq, sk, 16, layout=layout)
    fn = torch.compile(lambda q, k, v: fd.attention(q, k, v, causal=True, layout=layout, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    check_forward(fn(q, k, v), q, k, v, causal=True, layout=layout)
    check_grads(fn, q, k, v, causal=True, layout=layout)
# decode without grad: run() takes the split-KV kernel inside the op
q, k, v = make_qkv(2, 4, 1, 1, 77, 16)
out, lse = torch.compile(lambda q, k, v: fd.attention(q, k, v, return_lse=True, backend="triton"),
                         fullgraph=True, backend="aot_eager")(q, k, v)
check_forward(out, q, k, v, causal=False, lse=lse)
print("TRITON-COMPILE-OK")
"""


def test_triton_backend_compiles_under_the_interpreter() -> None:
    """fullgraph compile through the Triton kernels (forward, backward, decode) on CPU.

    TRITON_INTERPRET must be set before triton defines its kernels, and it would make the Triton
    backend eligible for every other test here, so the check runs in a child process.
    """
    pytest.importorskip("triton")
    tests_dir = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], cwd=tests_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON-COMPILE-OK" in proc.stdout, proc.stderr[-4000:]


def test_import_stays_light() -> None:
    """`import flashdispatch` loads neither torch._dynamo (the ops load it when tracing starts) nor
    transformers (flashdispatch.hf loads it in register())."""
    code = (
        "import sys, flashdispatch, flashdispatch.nn, flashdispatch.hf\n"
        "heavy = [m for m in ('torch._dynamo', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
