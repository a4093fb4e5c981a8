"""attn_implementation="flashdispatch" in Hugging Face transformers (CPU; skipped without transformers).

A tiny randomly initialised Llama (GQA 4:2, no download) runs with flashdispatch and with
transformers' "sdpa"; logits and every parameter's gradient must be within the float64 budget
(the "sdpa" model in float64 is the reference, in float32 the baseline).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashdispatch.hf as fdhf  # noqa: E402
from flashdispatch.tolerances import within_budget  # noqa: E402

VOCAB = 97


def _config() -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
    )


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(flashdispatch model, sdpa model) with the same random weights, float32."""
    name = fdhf.register()
    assert name == "flashdispatch"
    torch.manual_seed(1234)
    ours = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="flashdispatch")
    ref = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="sdpa")
    ref.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "flashdispatch"
    assert ref.config._attn_implementation == "sdpa"
    return ours.eval(), ref.eval()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of q for each call that reached flashdispatch.attention through the integration."""
    seen: list[tuple[int, ...]] = []
    real = fdhf.attention

    def spy(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append(tuple(q.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fdhf, "attention", spy)
    return seen


def _run(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, **kw):
    m = copy.deepcopy(model).to(dtype)
    out = m(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}


def test_logits_and_gradients_match_sdpa(models, calls) -> None:
    ours, ref = models
    ids = torch.randint(0, VOCAB, (2, 23))
    labels = torch.randint(0, VOCAB, (2, 23))
    logits, grads = _run(ours, ids, labels, torch.float32)
    assert len(calls) == 2, "each of the 2 layers must run through flashdispatch"
    base, base_grads = _run(ref, ids, labels, torch.float32)
    gold, gold_grads = _run(ref, ids, labels, torch.float64)
    ok, err, allowed = within_budget(logits, base, gold, torch.float32)
    assert ok, f"logits error {err:.3g} > allowed {allowed:.3g}"
    assert grads.keys() == gold_grads.keys()
    for name, g in grads.items():
        ok, err, allowed = within_budget(g, base_grads[name], gold_grads[name], torch.float32, grad=True)
        assert ok, f"grad of {name}: error {err:.3g} > allowed {allowed:.3g}"


def test_padding_mask_falls_back_to_sdpa_with_a_logged_reason(models, calls, caplog) -> None:
    ours, ref = models
    ids = torch.randint(0, VOCAB, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    fdhf._reported.clear()
    with caplog.at_level(logging.WARNING, logger="flashdispatch"), torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        again = ours(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    assert not calls
    assert torch.equal(got, want) and torch.equal(again, want)
    reasons = [r.getMessage() for r in caplog.records if "falling back to sdpa" in r.getMessage()]
    assert len(reasons) == 1 and "attention mask" in reasons[0], reasons


def test_all_ones_mask_runs_flashdispatch(models, calls) -> None:
    ours, ref = models
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)  # no padding: transformers drops the mask
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert calls
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_kv_cache_matches_sdpa(models, calls) -> None:
    ours, ref = (copy.deepcopy(m).double() for m in models)  # float64: no argmax ties
    ids = torch.randint(0, VOCAB, (1, 9))
    got = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert (1, 4, 1, 16) in calls, "decode steps (one query against the cache) go through flashdispatch"


def test_fallback_reasons() -> None:
    assert fdhf.fallback_reason(None, 0.0, {}) is None
    assert "mask" in fdhf.fallback_reason(torch.ones(1, 1, 2, 2, dtype=torch.bool), 0.0, {})
    assert "dropout" in fdhf.fallback_reason(None, 0.1, {})
    assert "position bias" in fdhf.fallback_reason(None, 0.0, {"position_bias": torch.zeros(1)})
    assert fdhf.fallback_reason(None, 0.0, {"sliding_window": None}) is None


def test_register_is_idempotent() -> None:
    assert fdhf.register() == fdhf.register() == "flashdispatch"
    assert "flashdispatch" in transformers.AttentionInterface._global_mapping


@pytest.mark.slow
def test_model_compiles_fullgraph_forward_and_backward(models, calls) -> None:
    ours, _ = models
    m = copy.deepcopy(ours)
    ids = torch.randint(0, VOCAB, (2, 17))
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: m(input_ids=ids, labels=ids).loss, fullgraph=True, backend="aot_eager")
    loss = fn(ids)
    loss.backward()
    compiled_grad = m.model.layers[0].self_attn.q_proj.weight.grad.clone()
    m.zero_grad()
    eager = m(input_ids=ids, labels=ids).loss
    eager.backward()
    torch._dynamo.reset()
    assert torch.allclose(loss, eager, atol=1e-5, rtol=1e-5)
    assert torch.allclose(compiled_grad, m.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


def test_static_cache_generation_matches_sdpa(models, calls) -> None:
    """Prefill against a static cache passes no mask and more keys than queries (the empty slots):
    the integration crops them as transformers' sdpa does; decode steps carry a mask and fall back."""
    ours, ref = (copy.deepcopy(m).double() for m in models)
    ids = torch.randint(0, VOCAB, (1, 9))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    got = ours.generate(ids, **kw)
    want = ref.generate(ids, **kw)
    assert torch.equal(got, want)
    assert (1, 4, 9, 16) in calls, "the prefill runs through flashdispatch"
