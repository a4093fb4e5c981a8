"""The sdpa backend's fallbacks for the variants: window through a boolean mask, softcap and sinks
through explicit math, against the float64 reference (forward and gradients, sinks' included)."""

from __future__ import annotations

import pytest
import torch

from flashdispatch.backends.sdpa import blind_rows, math_with_lse, windowed_sdpa
from flashdispatch.problem import problem_from_tensors
from flashdispatch.reference import attention_math, visible_mask
from flashdispatch.tolerances import within_budget
from inputs import make_qkv

WINDOWS = [((3, 0), True), ((2, 1), False), ((-1, 4), False), ((5, -1), False), ((0, 0), True)]


@pytest.mark.parametrize("sq,sk", [(20, 20), (30, 12), (9, 40), (1, 17)])
@pytest.mark.parametrize("window,causal", WINDOWS)
def test_windowed_sdpa_matches_the_reference(sq: int, sk: int, window: tuple[int, int], causal: bool) -> None:
    q, k, v = make_qkv(2, 4, 2, sq, sk, 16, dtype=torch.float32, seed=0, requires_grad=True)
    out = windowed_sdpa(q, k, v, causal=causal, window=window, kwargs={"scale": 0.3, "enable_gqa": True})
    ref, _ = attention_math(q, k, v, causal=causal, scale=0.3, window=window)
    base, _ = attention_math(q, k, v, causal=causal, scale=0.3, window=window, upcast=False)
    ok, err, allowed = within_budget(out, base, ref, torch.float32)
    assert ok, f"{err} > {allowed}"
    out.sum().backward()  # rows that see no key stay out of the call: no NaN in the gradients
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))


@pytest.mark.parametrize("sq,sk", [(1, 40), (3, 40), (20, 20), (30, 12), (1, 1)])
@pytest.mark.parametrize("window,causal", WINDOWS + [((7, 0), True), ((7, 0), False)])
def test_windowed_sdpa_reads_only_the_keys_some_query_sees(sq: int, sk: int, window: tuple[int, int], causal: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # what reaches torch: K and V as views of the visible range (window_key_range), the mask over that
    # range only, and none for one query row (a decode step: SDPA's own kernels at the window's cost)
    import torch.nn.functional as F

    from flashdispatch.problem import window_key_range

    seen: list[tuple[int, object]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):  # type: ignore[no-untyped-def]
        seen.append((k.shape[2], attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = make_qkv(2, 4, 2, sq, sk, 16, dtype=torch.float64, seed=1)
    out = windowed_sdpa(q, k, v, causal=causal, window=window, kwargs={"scale": 0.3, "enable_gqa": True})
    ref, _ = attention_math(q, k, v, causal=causal, scale=0.3, window=window)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-9, atol=1e-9)
    lo, hi = window_key_range(sq, sk, window)
    (keys, mask), = seen
    assert keys == hi - lo
    if sq == 1:
        assert mask is None
    else:
        assert mask.shape[-1] == hi - lo


@pytest.mark.parametrize("sq,sk", [(20, 20), (30, 12), (9, 40), (4, 0)])
@pytest.mark.parametrize("window,causal", WINDOWS)
def test_blind_rows_are_exactly_the_rows_without_a_key(sq: int, sk: int, window: tuple[int, int], causal: bool) -> None:
    mask = visible_mask(sq, sk, causal=causal, window=window)
    blind = blind_rows(sq, sk, causal, window)
    assert not mask[:blind].any() and bool(mask[blind:].any(dim=1).all())
    # a block of it built as such is that block of the whole
    r0, c0, c1 = sq // 3, sk // 4, sk - sk // 5
    block = visible_mask(sq, sk, causal=causal, window=window, rows=(r0, sq), cols=(c0, c1))
    assert torch.equal(block, mask[r0:, c0:c1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_math_with_lse_variants_forward_and_gradients(dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 4, 2, 24, 30, 16, dtype=dtype, seed=1)
    sinks = torch.randn(4) + 1.0
    kw = dict(causal=True, scale=0.9, window=(6, 0), softcap=3.0)
    do = torch.randn(1, 4, 24, 16).to(dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)] + [sinks.clone().requires_grad_(True)]
    p = problem_from_tensors(q, k, v, scale=0.9, layout="bhsd", return_lse=True, causal=True, window=(6, 0),
                             softcap=3.0, sinks=sinks)
    out, lse = math_with_lse(*leaves[:3], p, sinks=leaves[3])
    out.backward(do)
    runs = []
    for upcast in (True, False):
        rl = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        rs = sinks.clone().to(torch.float64 if upcast else torch.float32).requires_grad_(True)
        ro, rlse = attention_math(*rl, upcast=upcast, sinks=rs, **kw)
        ro.backward(do.to(ro.dtype))
        runs.append((ro, rlse, [t.grad for t in rl] + [rs.grad]))
    (ref, ref_lse, ref_g), (base, _, base_g) = runs
    assert within_budget(out, base, ref, dtype)[0]
    assert lse.dtype == torch.float32 and float((lse.double() - ref_lse).abs().max()) < 1e-4
    for got, want, b, name in zip([t.grad for t in leaves], ref_g, base_g, ["q", "k", "v", "sinks"]):
        ok, err, allowed = within_budget(got, b, want, dtype, grad=True)
        assert ok, f"d{name}: {err} > {allowed}"


def test_math_with_lse_rows_that_see_no_key_have_zero_gradients() -> None:
    q, k, v = make_qkv(1, 2, 2, 12, 5, 8, seed=3, requires_grad=True)
    p = problem_from_tensors(q, k, v, scale=0.5, layout="bhsd", return_lse=True, causal=True, window=(2, 0))
    out, lse = math_with_lse(q, k, v, p)
    assert torch.equal(out[:, :, :7], torch.zeros_like(out[:, :, :7])) and bool(torch.isneginf(lse[:, :, :7]).all())
    out.sum().backward()
    assert bool(torch.isfinite(q.grad).all()) and torch.equal(q.grad[:, :, :7], torch.zeros_like(q.grad[:, :, :7]))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("variant", ["causal", "window_softcap_sinks", "none"])
def test_the_reference_in_blocks_equals_the_reference_whole(layout: str, upcast: bool, variant: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REFERENCE_BLOCK_ELEMENTS scores the reference works block by block (batch entry, K/V head
    group, query rows); every mask, softcap, sink and GQA head stays where the whole computation has it."""
    from flashdispatch import reference

    g = torch.Generator().manual_seed(7)
    b, hq, hkv, sq, sk, d = 2, 6, 2, 37, 53, 16
    shape = (lambda h, s: (b, s, h, d)) if layout == "bshd" else (lambda h, s: (b, h, s, d))
    q = torch.randn(*shape(hq, sq), generator=g, dtype=torch.float32)
    k, v = (torch.randn(*shape(hkv, sk), generator=g, dtype=torch.float32) for _ in range(2))
    kw: dict = {"causal": variant == "causal"}
    if variant == "window_softcap_sinks":
        kw.update(window=(9, 3), softcap=2.0, sinks=torch.randn(hq, generator=g))
    whole = reference.attention_math(q, k, v, layout=layout, upcast=upcast, **kw)
    monkeypatch.setattr(reference, "REFERENCE_BLOCK_ELEMENTS", 5 * 3 * sk)   # 5 rows of a 3-head group
    blocks = reference.attention_math(q, k, v, layout=layout, upcast=upcast, **kw)
    for a, c in zip(whole, blocks):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert torch.equal(torch.isinf(a), torch.isinf(c))
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
