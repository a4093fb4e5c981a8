"""flashdispatch.nn.MultiheadAttention as a drop-in inside torch's transformer modules.

Each torch module (TransformerEncoderLayer, TransformerDecoderLayer, nn.Transformer) runs three
ways: as torch builds it in float64 (the reference), in float32 (the budget), and in float32 with
every attention module replaced by ours loaded from torch's state_dict. Training and inference
(where torch's encoder layer takes its fused fast path), masks, padding and need_weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flashdispatch as fd
from flashdispatch.nn import MultiheadAttention
from flashdispatch.tolerances import within_budget

E, H = 32, 4


def _swap(model: nn.Module, num_kv_heads: int | None = None) -> nn.Module:
    """A copy of `model` with each torch MultiheadAttention replaced by ours (same weights)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                ours = MultiheadAttention(child.embed_dim, child.num_heads, batch_first=child.batch_first,
                                          bias=child.in_proj_bias is not None, num_kv_heads=num_kv_heads)
                ours.load_state_dict(child.state_dict())
                setattr(mod, child_name, ours.to(next(child.parameters()).dtype))
    return model


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _check(got: torch.Tensor, base: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    ok, err, allowed = within_budget(got.detach(), base.detach(), ref.detach(), torch.float32)
    assert ok, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


def _run_three(model: nn.Module, train: bool, *inputs: torch.Tensor, **kw) -> None:
    ref = copy.deepcopy(model).double()
    ours = _swap(model)
    for m in (ref, model, ours):
        m.train(train)

    def run(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        args = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        kws = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        if train:
            return m(*args, **kws)
        with torch.no_grad():
            return m(*args, **kws)

    y_ref, y_base, y_ours = run(ref, torch.float64), run(model, torch.float32), run(ours, torch.float32)
    _check(y_ours, y_base, y_ref, f"output ({'train' if train else 'eval'})")
    if train:
        grads = []
        for m, y in ((ref, y_ref), (model, y_base), (ours, y_ours)):
            m.zero_grad()
            y.pow(2).mean().backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
        for n in grads[0]:
            _check(grads[2][n], grads[1][n], grads[0][n], f"grad {n}")


def _padding(n: int, s: int) -> torch.Tensor:
    pad = torch.zeros(n, s, dtype=torch.bool)
    pad[0, -3:] = True  # the first sequence is 3 tokens shorter
    return pad


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer(train, batch_first, norm_first):
    torch.manual_seed(1)
    layer = _randomize(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=batch_first,
                                                  norm_first=norm_first))
    x = torch.randn(2, 10, E) if batch_first else torch.randn(10, 2, E)
    _run_three(layer, train, x)
    _run_three(layer, train, x, src_key_padding_mask=_padding(2, 10))
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    _run_three(layer, train, x, src_mask=causal, is_causal=True)
    _run_three(layer, train, x, src_mask=causal)  # a causal mask not declared causal: read as a mask
    _run_three(layer, train, x, src_mask=torch.rand(10, 10) > 0.7)  # an arbitrary bool mask


def test_encoder_layer_eval_with_the_issue_s_example():
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    sd = layer.self_attn.state_dict()
    layer.self_attn = MultiheadAttention(64, 4, batch_first=True)
    layer.self_attn.load_state_dict(sd)
    layer.eval()
    with torch.no_grad():
        assert layer(torch.randn(2, 10, 64)).shape == (2, 10, 64)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_encoder_stack_with_padding_takes_nested_fast_path_or_not(train):
    torch.manual_seed(2)
    enc = _randomize(nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True),
                                           num_layers=2, enable_nested_tensor=True))
    x = torch.randn(2, 10, E)
    pad = _padding(2, 10)
    ref = copy.deepcopy(enc).double()
    ours = _swap(enc)
    for m in (ref, enc, ours):
        m.train(train)
    with torch.set_grad_enabled(train):
        y_ref = ref(x.double(), src_key_padding_mask=pad)
        y_base, y_ours = enc(x, src_key_padding_mask=pad), ours(x, src_key_padding_mask=pad)
    keep = ~pad.unsqueeze(-1)  # padded positions: torch's nested path leaves zeros there
    _check(y_ours * keep, y_base * keep, y_ref * keep, "encoder stack")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_decoder_layer(train):
    torch.manual_seed(3)
    layer = _randomize(nn.TransformerDecoderLayer(E, H, 64, dropout=0.0, batch_first=True))
    tgt, mem = torch.randn(2, 7, E), torch.randn(2, 12, E)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    _run_three(layer, train, tgt, mem, tgt_mask=causal, tgt_is_causal=True)
    _run_three(layer, train, tgt, mem, tgt_mask=causal, memory_key_padding_mask=_padding(2, 12),
               tgt_key_padding_mask=_padding(2, 7))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_transformer(train):
    torch.manual_seed(4)
    model = _randomize(nn.Transformer(E, H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                                      dropout=0.0, batch_first=True))
    src, tgt = torch.randn(2, 12, E), torch.randn(2, 7, E)
    _run_three(model, train, src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7),
               src_key_padding_mask=_padding(2, 12), memory_key_padding_mask=_padding(2, 12))


def test_need_weights_like_torch():
    torch.manual_seed(5)
    ref = _randomize(nn.MultiheadAttention(E, H, batch_first=True))
    ours = _swap(nn.Sequential(ref))[0]
    x = torch.randn(2, 9, E)
    pad = _padding(2, 9)
    for average in (True, False):
        o_ref, w_ref = ref.double()(x.double(), x.double(), x.double(), key_padding_mask=pad,
                                    need_weights=True, average_attn_weights=average)
        o, w = ours(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=average)
        ref.float()
        o_b, w_b = ref(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=average)
        _check(o, o_b, o_ref, "output")
        assert w.shape == w_ref.shape
        _check(w, w_b, w_ref, "weights")


def test_gqa_module_in_an_encoder_layer_in_inference():
    """num_kv_heads != num_heads: torch's fused path (which assumes its own weight layout) is left
    alone and the module's forward runs, through the dispatcher."""
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    layer.self_attn = MultiheadAttention(E, H, batch_first=True, num_kv_heads=2)
    layer.eval()
    x = torch.randn(2, 10, E)
    with torch.no_grad():
        y = layer(x)
        with fd.use_backend("sdpa:math"):
            y2 = layer(x)
    assert y.shape == (2, 10, E) and torch.allclose(y, y2, atol=1e-5)


def test_forced_backend_with_a_mask_is_a_clear_error():
    m = MultiheadAttention(E, H, batch_first=True, backend="sdpa")
    x = torch.randn(2, 7, E)
    with pytest.raises(ValueError, match="key_padding_mask: the forced backend 'sdpa'"):
        m(x, x, x, key_padding_mask=_padding(2, 7))
    with pytest.raises(ValueError, match="need_weights"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask: expected"):
        MultiheadAttention(E, H, batch_first=True)(x, x, x, attn_mask=torch.zeros(3, 3))
