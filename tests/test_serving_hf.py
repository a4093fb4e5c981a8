"""flashdispatch.hf with packed batches (transformers' padding-free path): several sequences in
one row, given by position_ids restarting at 0 or by cu_seq_lens_q/k (+ max_length_q/k), run
through attention_varlen: each sequence's logits equal the sequence run alone, and the backward
runs through the packed call."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashdispatch.hf as fdhf  # noqa: E402


def _config() -> "transformers.LlamaConfig":
    return transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    attention_dropout=0.0)


def test_packed_row_runs_varlen_and_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    fdhf.register()
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="flashdispatch").eval()
    lengths = [7, 1, 12, 5]
    ids = torch.randint(0, 97, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    seen: list[list[int]] = []
    real = fdhf.attention_varlen

    def spy(q, k, v, cu_q, cu_k, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(cu_q.tolist())
        return real(q, k, v, cu_q, cu_k, *a, **kw)

    monkeypatch.setattr(fdhf, "attention_varlen", spy)
    m = copy.deepcopy(ours)
    out = m(input_ids=ids, position_ids=pos, labels=ids)
    out.loss.backward()
    assert seen and seen[0] == [0, 7, 8, 20, 25]
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    runs = [(out.logits.detach(), None)]
    # each sequence alone gives the same logits as inside the packed row
    start = 0
    for n in lengths:
        alone = ours(input_ids=ids[:, start:start + n]).logits
        assert torch.allclose(alone, runs[0][0][:, start:start + n], atol=2e-5, rtol=1e-4)
        start += n


def test_packed_sequences_detection() -> None:
    q = torch.zeros(1, 2, 6, 8)
    assert fdhf.packed_sequences(q, q, {"position_ids": torch.arange(6).view(1, 6)}) is None  # one sequence
    cu, _, mq, _ = fdhf.packed_sequences(q, q, {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])})
    assert cu.tolist() == [0, 3, 5, 6] and mq == 3 and cu.dtype == torch.int32
    assert fdhf.packed_sequences(q, q, {"position_ids": torch.tensor([[0, 1, 3, 0, 1, 2]])}) is None  # a gap
    assert fdhf.packed_sequences(torch.zeros(2, 2, 3, 8), torch.zeros(2, 2, 3, 8), {}) is None


def test_cu_seq_lens_kwargs_run_varlen_with_their_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' padding-free kwargs cu_seq_lens_q/k and max_length_q/k (no position_ids) reach
    attention_varlen as given (any integer dtype, as int32); a missing max_length is the longest
    sequence; every sequence attends only to itself, as SDPA on that sequence alone."""
    import torch.nn.functional as F

    lengths = [7, 1, 12, 5]
    g = torch.Generator().manual_seed(0)
    s = sum(lengths)
    q = torch.randn(1, 4, s, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, s, 16, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 7, 8, 20, 25])
    module = torch.nn.Module()
    module.is_causal = True
    seen: list[tuple] = []
    real = fdhf.attention_varlen

    def spy(q, k, v, cu_q, cu_k, max_q, max_k, **kw):  # noqa: ANN001, ANN003, ANN202
        seen.append((cu_q.dtype, cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(fdhf, "attention_varlen", spy)
    out, _ = fdhf.attention_forward(module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu.int(),
                                    max_length_q=16, max_length_k=16)  # over the longest: still valid
    assert seen == [(torch.int32, cu.tolist(), cu.tolist(), 16, 16)]
    assert out.shape == (1, s, 4, 16)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=0.25,
                                             enable_gqa=True)
        torch.testing.assert_close(out[:, a:b], ref.transpose(1, 2))
    # without max_length_q/k: the longest sequence
    fdhf.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert seen[-1][3:] == (12, 12)
