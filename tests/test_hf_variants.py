"""Sliding window, softcap and sinks through attn_implementation="flashdispatch" (CPU; tiny random
models built from configs, no download): Mistral (sliding window), Gemma 2 (softcap, alternating
sliding and global layers), gpt-oss (sinks and a sliding window). Logits (and gradients, sinks'
included) within the float64 budget of attn_implementation="eager"; every layer's attention runs
through flashdispatch with the variant the model asked for."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashdispatch.hf as fdhf  # noqa: E402
from flashdispatch.tolerances import within_budget  # noqa: E402

VOCAB = 97
SEQ = 23  # longer than the window: the window hides keys
WINDOW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_dropout=0.0)


def _config(kind: str):  # type: ignore[no-untyped-def]
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **COMMON)
    if kind == "gemma2":
        return transformers.Gemma2Config(sliding_window=WINDOW, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=30.0, **COMMON)
    return transformers.GptOssConfig(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                     **{**COMMON, "intermediate_size": 64, "max_position_embeddings": 4096})


# what each model's layers must pass to flashdispatch.attention: (window, softcap given, sinks given)
EXPECTED = {
    "mistral": [((WINDOW - 1, 0), False, False)] * 2,
    "gemma2": [((WINDOW - 1, 0), True, False), (None, True, False)],
    "gpt_oss": [((WINDOW - 1, 0), False, True), (None, False, True)],
}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    seen: list[tuple] = []
    real = fdhf.attention

    def spy(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append((kw.get("window"), kw.get("softcap") is not None, kw.get("sinks") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fdhf, "attention", spy)
    return seen


def _models(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    fdhf.register()
    torch.manual_seed(1234)
    # gpt-oss's experts: the plain loop (torch's grouped matmul has no float64, which the reference needs)
    kw = {"experts_implementation": "eager"} if kind == "gpt_oss" else {}
    ours = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="flashdispatch", **kw)
    ref = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager", **kw)
    ref.load_state_dict(ours.state_dict())
    if kind == "gpt_oss":  # random sinks, large enough to matter
        with torch.no_grad():
            for m in (ours, ref):
                for i, layer in enumerate(m.model.layers):
                    layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4) + i)
    return ours.eval(), ref.eval()


def _run(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    m = copy.deepcopy(model).to(dtype)
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_logits_and_gradients_match_eager(kind: str, calls: list[tuple]) -> None:
    ours, ref = _models(kind)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    logits, grads = _run(ours, ids, torch.float32)
    assert calls == EXPECTED[kind], calls
    base, base_grads = _run(ref, ids, torch.float32)
    gold, gold_grads = _run(ref, ids, torch.float64)
    ok, err, allowed = within_budget(logits, base, gold, torch.float32)
    assert ok, f"{kind} logits error {err:.3g} > allowed {allowed:.3g}"
    assert grads.keys() == gold_grads.keys()
    for name, g in grads.items():
        ok, err, allowed = within_budget(g, base_grads[name], gold_grads[name], torch.float32, grad=True)
        assert ok, f"{kind} grad of {name}: error {err:.3g} > allowed {allowed:.3g}"
    if kind == "gpt_oss":
        assert any(n.endswith("sinks") for n in grads), "the sinks take a gradient"


@pytest.mark.parametrize("kind", ["mistral", "gpt_oss"])
def test_generation_with_a_window_matches_eager(kind: str, calls: list[tuple]) -> None:
    """Decode steps past the window: one query against a cache longer than the window."""
    ours, ref = (copy.deepcopy(m).double() for m in _models(kind))
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    got = ours.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert calls and calls[0][0] == (WINDOW - 1, 0)


def test_padding_with_a_window_falls_back_with_the_window_in_the_mask(calls: list[tuple]) -> None:
    ours, ref = _models("mistral")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert not calls
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-4, rtol=1e-4)
