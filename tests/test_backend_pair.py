"""The forward/backward pair contract and the one autograd Function that joins it (CPU)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import flashdispatch as fd
from flashdispatch.autograd import apply_pair
from flashdispatch.backend import Capabilities, Gradients, Implementation, Inputs
from flashdispatch.reference import attention_math
from flashdispatch.registry import REGISTRY
from inputs import make_qkv


class _MathPair(Implementation):
    """The float64 reference as a forward/backward pair, with an optional extra tensor `bias`
    (a per-head additive logit offset) to show that extras flow both ways."""

    name: ClassVar[str] = "test:mathpair"
    backend: ClassVar[str] = "test"
    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    def capabilities(self, dev: Any) -> Capabilities:
        return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float64}))

    def _out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool):
        out, lse = attention_math(q, k, v, causal=causal)
        return out if bias is None else out + bias.view(1, -1, 1, 1), lse

    def forward(self, inp: Inputs, p: Any, config: dict[str, Any]):
        self.calls.append("forward")
        out, lse = self._out(inp.q, inp.k, inp.v, inp.extras.get("bias"), p.causal)
        return out.detach(), lse.detach().float()

    def backward(self, inp: Inputs, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, p: Any,
                 config: dict[str, Any]) -> Gradients:
        self.calls.append("backward")
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v)]
            bias = inp.extras.get("bias")
            b = None if bias is None else bias.detach().requires_grad_()
            o, _ = self._out(*leaves, b, p.causal)
            grads = torch.autograd.grad(o, leaves + ([b] if b is not None else []), do)
        extras = {"bias": grads[3]} if b is not None else {}
        return Gradients(grads[0], grads[1], grads[2], extras)


def test_builtin_implementations_declare_their_pairs() -> None:
    assert REGISTRY.get("triton").has_backward and REGISTRY.get("cupy").has_backward
    assert not any(REGISTRY.get(n).has_backward for n in ("sdpa", "sdpa:math", "sdpa:flash"))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_runs_the_pair_through_the_one_autograd_function(causal: bool) -> None:
    impl = _MathPair()
    REGISTRY.register(impl)
    try:
        q, k, v = make_qkv(2, 4, 2, 5, 7, 8, dtype=torch.float64, requires_grad=True)
        out = fd.attention(q, k, v, causal=causal, backend=impl.name)
        assert impl.calls == ["forward"]
        do = torch.randn_like(out)
        out.backward(do)
        assert impl.calls == ["forward", "backward"]
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ref, _ = attention_math(*leaves, causal=causal)
        ref.backward(do)
        for got, want in zip((q.grad, k.grad, v.grad), leaves):
            torch.testing.assert_close(got, want.grad)
    finally:
        REGISTRY.unregister(impl.name)


def test_extra_tensors_flow_to_the_pair_and_get_their_gradient() -> None:
    impl = _MathPair()
    q, k, v = make_qkv(1, 3, 3, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    p = fd.explain(q, k, v).problem._replace(needs_grad=True)
    out, lse = apply_pair(impl, Inputs(q, k, v, {"bias": bias}), p, {})
    assert not lse.requires_grad
    out.sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 4 * 8.0))  # d(sum)/d(bias_h) = Sq * Dv
    assert q.grad is not None and impl.calls == ["forward", "backward"]
