"""PyTorch integration on a GPU (pytest -m gpu): torch.compile and CUDA graphs for every backend,
the nn module and the transformers integration on the device.

Every GPU implementation goes through the same checks; one that is unavailable here or declines
the case is skipped with its reasons. The host time that `attention()` adds over calling the
chosen implementation directly is measured by `python -m flashdispatch.tools.host_cost`
(docs/integration.md).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import flashdispatch as fd
from flashdispatch.registry import REGISTRY
from inputs import check_forward, check_grads, make_qkv

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["sdpa", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "sdpa:math", "triton", "cupy"]
# (B, Hq, Hkv, Sq, Sk, D), GQA: bottom-right causal with Sq < Sk first; Sq == Sk for the kernels
# that decline it (sdpa:flash, sdpa:cudnn)
CASES = [(1, 8, 2, 113, 300, 128), (2, 4, 2, 257, 257, 64)]


def _declines(name: str, case: tuple[int, ...], layout: str) -> list[str] | None:
    b, hq, hkv, sq, sk, d = case
    try:
        fd.explain(shape=case, dtype=torch.bfloat16, layout=layout, causal=True, needs_grad=True, backend=name)
    except fd.NoBackendError as e:
        return e.reasons.get(name, [str(e)])
    return None


def _case_for(name: str, layout: str) -> tuple[int, ...]:
    """The first of CASES that `name` serves on this device; skips the test when none is."""
    if name not in REGISTRY.all():
        pytest.skip(f"{name} is not registered")
    reasons = {}
    for case in CASES:
        why = _declines(name, case, layout)
        if why is None:
            return case
        reasons[case] = why
    pytest.skip(f"{name} declines every case: {reasons}")


def _serves_or_skip(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> None:
    if name not in REGISTRY.all():
        pytest.skip(f"{name} is not registered")
    try:
        fd.explain(q, k, v, backend=name, needs_grad=True, **kw)
    except fd.NoBackendError as e:
        pytest.skip(f"{name} declines: {e.reasons}")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_compile_fullgraph_every_backend(name: str, layout: str) -> None:
    b, hq, hkv, sq, sk, d = _case_for(name, layout)
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda", layout=layout,
                       requires_grad=True)

    def fn(q, k, v):
        return fd.attention(q, k, v, causal=True, layout=layout, backend=name)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    qd, kd, vd = (t.detach() for t in (q, k, v))
    check_forward(compiled(q, k, v).detach(), qd, kd, vd, causal=True, layout=layout)
    check_grads(compiled, qd, kd, vd, causal=True, layout=layout)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graph_replays_forward_and_backward(name: str, layout: str) -> None:
    b, hq, hkv, sq, sk, d = _case_for(name, layout)
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float16, device="cuda", layout=layout,
                       requires_grad=True)
    _serves_or_skip(name, q, k, v, causal=True, layout=layout)
    do = torch.randn_like(fd.attention(q, k, v, causal=True, layout=layout, backend=name))

    def step() -> torch.Tensor:
        out = fd.attention(q, k, v, causal=True, layout=layout, backend=name)
        out.backward(do)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: selection, compilation and autotuning happen here
        for _ in range(3):
            step()
            for t in (q, k, v):
                t.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    static_grads = (q.grad, k.grad, v.grad)

    for _ in range(2):  # fresh data through the captured buffers, replay, compare
        fresh = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.float16, device="cuda", layout=layout)
        with torch.no_grad():
            for dst, src in zip((q, k, v), fresh):
                dst.copy_(src)
            do.copy_(torch.randn_like(do))
            static_out.fill_(float("nan"))  # poison: the replay must write every element
            for g in static_grads:
                g.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        qq, kk, vv = (t.detach() for t in (q, k, v))
        check_forward(static_out.detach(), qq, kk, vv, causal=True, layout=layout)
        qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
        fd.attention(qe, ke, ve, causal=True, layout=layout, backend=name).backward(do)
        for got, want in zip(static_grads, (qe.grad, ke.grad, ve.grad)):
            assert not torch.isnan(got).any()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_multihead_attention_module_on_gpu() -> None:
    ref = torch.nn.MultiheadAttention(128, 4, batch_first=True, device="cuda", dtype=torch.bfloat16)
    ours = fd.nn.MultiheadAttention(128, 4, batch_first=True, device="cuda", dtype=torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    got = ours(x, x, x, is_causal=True, need_weights=False)[0]
    mask = torch.nn.Transformer.generate_square_subsequent_mask(300, device="cuda", dtype=torch.bfloat16)
    want = ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


def test_transformers_llama_on_gpu() -> None:
    transformers = pytest.importorskip("transformers")
    import flashdispatch.hf

    flashdispatch.hf.register()

    def config():
        return transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(config(), attn_implementation="flashdispatch")
    ref = transformers.AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.cuda().bfloat16(), ref.cuda().bfloat16()
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    got = ours(input_ids=ids, labels=ids)
    want = ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=5e-2, atol=5e-2)
    got.loss.backward()
    want.loss.backward()
    g, w = (m.model.layers[0].self_attn.q_proj.weight.grad.float() for m in (ours, ref))
    assert float((g - w).norm() / w.norm()) < 5e-2


@pytest.mark.parametrize("name", ["sdpa", "triton"])
def test_inductor_with_cuda_graphs(name: str) -> None:
    """mode="reduce-overhead": Inductor code around the ops, replayed as a CUDA graph."""
    q, k, v = make_qkv(2, 8, 2, 200, 200, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    _serves_or_skip(name, q, k, v, causal=True)

    def block(q, k, v):
        return fd.attention(q * 0.5, k, v, causal=True, backend=name).float().square().mean()

    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # record, then replay
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    want = block(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    assert torch.allclose(loss, want, rtol=2e-2, atol=1e-4)
    for g, w in zip(grads, want_grads):
        g, w = g.float(), w.float()
        assert not torch.isnan(g).any() and float((g - w).norm() / w.norm()) < 2e-2
