"""flashdispatch.nn.MultiheadAttention against torch.nn.MultiheadAttention (CPU).

torch's module run in float64 is the reference and the same module in float32 sets the budget
(tolerances.within_budget): our module, loaded from torch's state_dict, must match outputs and the
gradients of inputs and parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flashdispatch as fd
from flashdispatch.nn import MultiheadAttention
from flashdispatch.tolerances import within_budget


def _pair(embed: int, heads: int, *, batch_first: bool, bias: bool = True, kdim: int | None = None,
          vdim: int | None = None) -> tuple[nn.MultiheadAttention, MultiheadAttention]:
    ref = nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():  # torch zeroes the biases at init: give them values that matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _check(got: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, what: str, grad: bool = False) -> None:
    ok, err, allowed = within_budget(got.detach(), base.detach(), ref.detach(), torch.float32, grad=grad)
    assert ok, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


def _compare(ref_mod: nn.MultiheadAttention, ours: MultiheadAttention, inputs: list[torch.Tensor],
             self_attn: bool, **kw) -> None:
    """Forward and backward of ours vs torch's module in float32 (budget) and float64 (reference)."""
    ref64 = copy.deepcopy(ref_mod).double()
    runs = []
    for mod, dt in ((ours, torch.float32), (ref_mod, torch.float32), (ref64, torch.float64)):
        mod.to(dt).zero_grad()
        xs = [x.detach().to(dt).requires_grad_() for x in inputs]
        q, k, v = (xs[0], xs[0], xs[0]) if self_attn else xs
        out, weights = mod(q, k, v, need_weights=False, **kw)
        assert weights is None
        out.backward(torch.ones_like(out) + out.detach().sin())
        runs.append((out, [x.grad for x in xs], {n: p.grad for n, p in mod.named_parameters()}))
    (out, gx, gp), (out32, gx32, gp32), (out64, gx64, gp64) = runs
    assert out.shape == out32.shape and out.dtype == torch.float32
    _check(out, out32, out64, "output")
    for i, (a, b, c) in enumerate(zip(gx, gx32, gx64)):
        _check(a, b, c, f"d input {i}", grad=True)
    assert gp.keys() == gp32.keys()
    for name in gp:
        _check(gp[name], gp32[name], gp64[name], f"d {name}", grad=True)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_self_attention_matches_torch(batch_first: bool, bias: bool) -> None:
    ref, ours = _pair(48, 6, batch_first=batch_first, bias=bias)
    x = torch.randn((3, 17, 48) if batch_first else (17, 3, 48))
    _compare(ref, ours, [x], self_attn=True)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_causal_matches_torch(batch_first: bool) -> None:
    ref, ours = _pair(40, 5, batch_first=batch_first)
    x = torch.randn((2, 23, 40) if batch_first else (23, 2, 40))
    mask = nn.Transformer.generate_square_subsequent_mask(23)
    # torch's module needs the mask next to the is_causal hint; ours needs only the flag
    ref_run = lambda m, q, k, v, **kw: m(q, k, v, attn_mask=mask.to(q.dtype), is_causal=True, **kw)  # noqa: E731
    ref64 = copy.deepcopy(ref).double()
    outs = []
    for mod, dt, fn in ((ours, torch.float32, None), (ref, torch.float32, ref_run), (ref64, torch.float64, ref_run)):
        mod.to(dt)
        xx = x.detach().to(dt).requires_grad_()
        out = (fn(mod, xx, xx, xx, need_weights=False) if fn else mod(xx, xx, xx, is_causal=True))[0]
        out.sum().backward()
        outs.append((out, xx.grad))
    _check(outs[0][0], outs[1][0], outs[2][0], "causal output")
    _check(outs[0][1], outs[1][1], outs[2][1], "causal d input", grad=True)


def test_cross_attention_with_kdim_vdim() -> None:
    ref, ours = _pair(32, 4, batch_first=True, kdim=24, vdim=40)
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(ours.state_dict())
    q, k, v = torch.randn(2, 13, 32), torch.randn(2, 29, 24), torch.randn(2, 29, 40)
    _compare(ref, ours, [q, k, v], self_attn=False)


def test_unbatched_input() -> None:
    ref, ours = _pair(24, 3, batch_first=False)
    x = torch.randn(11, 24)
    out, _ = ours(x, x, x, need_weights=False)
    want, _ = ref(x, x, x, need_weights=False)
    assert out.shape == (11, 24)
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip() -> None:
    ref, ours = _pair(32, 4, batch_first=True)
    assert set(ref.state_dict()) == set(ours.state_dict())
    back = nn.MultiheadAttention(32, 4, batch_first=True)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 32)
    assert torch.equal(back(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    """num_kv_heads=2 of 6: the same as torch's module whose k/v rows are repeated per group."""
    embed, heads, kv_heads = 48, 6, 2
    dh, group = embed // heads, heads // kv_heads
    ours = MultiheadAttention(embed, heads, num_kv_heads=kv_heads, batch_first=True)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert ours.in_proj_weight.shape == (embed + 2 * kv_heads * dh, embed)
    ref = nn.MultiheadAttention(embed, heads, batch_first=True)

    def expand(t: torch.Tensor) -> torch.Tensor:  # (kv_heads * dh, ...) -> (heads * dh, ...)
        return t.unflatten(0, (kv_heads, dh)).repeat_interleave(group, dim=0).flatten(0, 1)

    w, b = ours.in_proj_weight.detach(), ours.in_proj_bias.detach()
    e, ekv = embed, kv_heads * dh
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([w[:e], expand(w[e:e + ekv]), expand(w[e + ekv:])]))
        ref.in_proj_bias.copy_(torch.cat([b[:e], expand(b[e:e + ekv]), expand(b[e + ekv:])]))
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    x = torch.randn(2, 19, embed, dtype=torch.float64)
    got = ours.double()(x, x, x)[0]
    want = ref.double()(x, x, x, need_weights=False)[0]
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, arg",
    [({"dropout": 0.1}, "dropout"), ({"add_bias_kv": True}, "add_bias_kv"), ({"num_kv_heads": 3}, "num_kv_heads")],
)
def test_unsupported_constructor_arguments_raise(kwargs: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        MultiheadAttention(16, 4, **kwargs)


def test_backend_argument_is_forwarded() -> None:
    m = MultiheadAttention(16, 2, batch_first=True, backend="sdpa:math")
    x = torch.randn(1, 5, 16)
    assert m(x, x, x, need_weights=False)[0].shape == (1, 5, 16)
    with pytest.raises(fd.NoBackendError, match="sdpa:cudnn"):
        MultiheadAttention(16, 2, batch_first=True, backend="sdpa:cudnn")(x, x, x, need_weights=False)
    with pytest.raises(ValueError, match="need_weights: the forced backend 'sdpa:math'"):
        m(x, x, x)  # torch's default asks for the weights, which no kernel forms


def test_module_compiles_without_graph_break() -> None:
    torch._dynamo.reset()
    m = MultiheadAttention(32, 4, num_kv_heads=2, batch_first=True)
    x = torch.randn(2, 13, 32, requires_grad=True)
    fn = torch.compile(lambda x: m(x, x, x, is_causal=True, need_weights=False)[0], fullgraph=True,
                       backend="aot_eager")
    out = fn(x)
    want = m(x, x, x, is_causal=True, need_weights=False)[0]
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert x.grad is not None and m.in_proj_weight.grad is not None
    torch._dynamo.reset()


def test_window_and_softcap_match_the_reference_math() -> None:
    """window= and softcap= reach every call: the module equals its own projections followed by the
    reference attention with the same window and cap (float64 reference, float32 budget)."""
    from flashdispatch.reference import attention_math

    torch.manual_seed(5)
    mod = MultiheadAttention(32, 4, batch_first=True, num_kv_heads=2, window=(3, 0), softcap=2.0)
    assert "window=(3, 0)" in repr(mod) and "softcap=2" in repr(mod)
    x = torch.randn(2, 11, 32)
    got, _ = mod(x, x, x, is_causal=True, need_weights=False)

    def manual(dt: torch.dtype, upcast: bool) -> torch.Tensor:
        m = copy.deepcopy(mod).to(dt)
        xx = x.to(dt)
        q, k, v = m._project(xx, xx, xx, True)
        q = q.unflatten(-1, (4, 8))
        k = k.unflatten(-1, (2, 8))
        v = v.unflatten(-1, (2, 8))
        o, _ = attention_math(q, k, v, causal=True, scale=8 ** -0.5, layout="bshd", window=(3, 0), softcap=2.0,
                              upcast=upcast)
        return m.out_proj(o.to(dt).reshape(2, 11, 32))

    _check(got, manual(torch.float32, False), manual(torch.float64, True), "out")


def test_bad_window_or_softcap_fails_when_built() -> None:
    with pytest.raises(ValueError, match="window left"):
        MultiheadAttention(32, 4, window=(-3, 0))
    with pytest.raises(ValueError, match="softcap"):
        MultiheadAttention(32, 4, softcap=0.0)


def test_default_call_returns_torchs_weights() -> None:
    """A drop-in returns what torch's module returns for the same call: need_weights defaults to
    True, so `out, w = mha(x, x, x)` gives the head-averaged weights."""
    ref, ours = _pair(24, 3, batch_first=True)
    x = torch.randn(2, 7, 24)
    out, w = ours(x, x, x)
    want, w_ref = ref(x, x, x)
    assert w is not None and w.shape == w_ref.shape == (2, 7, 7)
    assert torch.allclose(w, w_ref, atol=1e-5, rtol=1e-5) and torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    assert ours(x, x, x, need_weights=False)[1] is None


def test_a_mask_given_with_is_causal_is_applied_where_torch_applies_it() -> None:
    """torch reads an attn_mask passed with is_causal=True unless need_weights=False and there is
    no key_padding_mask: a causal mask that also hides a band of keys shows the difference."""
    ref, ours = _pair(24, 3, batch_first=True)
    x = torch.randn(2, 9, 24)
    mask = torch.ones(9, 9).triu(1).bool() | torch.ones(9, 9).tril(-4).bool()  # causal + a window of 4
    for need_weights in (True, False):
        want, w_ref = ref(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
        got, w = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=need_weights)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), need_weights
        assert (w is None) == (w_ref is None) and (w is None or torch.allclose(w, w_ref, atol=1e-5))
