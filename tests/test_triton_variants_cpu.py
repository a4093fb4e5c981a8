"""Sliding window, logit softcap and attention sinks in the Triton kernels, under the interpreter.

The launch functions are called directly (forward, split-KV decode, backward, the autograd
Function) and checked against the float64 reference (reference.attention_math) within
flash-attention's budget. Small tiles (16 x 16) so that windows hide whole key blocks and every
masked/unmasked loop runs; adversarial cases: rows that see no key (zeros, lse = -inf or the sink),
a large scale, sinks that dominate the softmax. fp16/fp32 only (bf16 runs in the GPU file).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterator

import pytest
import torch

from flashdispatch.reference import attention_math, visible_mask
from flashdispatch.tolerances import within_budget
from inputs import make_qkv, make_sinks

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning"),  # tanh at |x| >> 1: exact
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; the GPU runs test_variants_gpu.py"),
]
MODULES = ("flashdispatch.backends.triton.forward", "flashdispatch.backends.triton.decode",
           "flashdispatch.backends.triton.backward")
fwd: ModuleType
dec: ModuleType
bwd: ModuleType
TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
BWD_TILES = {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 16}


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels(triton_interpreter_state: None) -> Iterator[None]:
    """Kernels defined under TRITON_INTERPRET=1 for this file (the shared fixture, tests/conftest.py)."""
    global fwd, dec, bwd
    fwd, dec, bwd = (importlib.import_module(n) for n in MODULES)
    yield


def check_out(out, lse, q, k, v, *, causal, scale, window, softcap, sinks) -> None:
    kw = dict(causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
    ref, ref_lse = attention_math(q, k, v, upcast=True, **kw)
    base, _ = attention_math(q, k, v, upcast=False, **kw)
    ok, err, allowed = within_budget(out, base, ref, q.dtype)
    assert ok, f"forward error {err:.3g} > allowed {allowed:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where the reference's is"
    if finite.any():
        lerr = float((lse.double()[finite] - ref_lse[finite]).abs().max())
        assert lerr < (1e-4 if q.dtype == torch.float32 else 2e-2), f"lse error {lerr}"


# (B, Hq, Hkv, Sq, Sk, D, causal, window, softcap, sinks, scale)
FORWARD_CASES = [
    (1, 2, 1, 70, 70, 32, True, (20, 0), None, "none", None),       # Mistral-style; blocks skipped
    (1, 4, 2, 50, 113, 40, True, (7, 0), 5.0, "random", None),     # Sq < Sk, GQA, all three
    (1, 2, 2, 60, 25, 32, True, (3, 0), None, "random", None),     # Sq > Sk: first rows see nothing
    (1, 2, 2, 60, 25, 32, False, (2, 1), None, "none", None),      # two-sided, empty rows, lse -inf
    (1, 2, 1, 45, 90, 64, False, (5, 9), 2.0, "dominant", 1.5),    # large scale, dominant sinks
    (2, 2, 2, 33, 33, 32, False, (-1, 4), None, "none", None),     # left unbounded
    (1, 2, 2, 33, 47, 32, True, (-1, -1), 1.0, "none", 2.0),       # softcap alone, tight cap
    (1, 3, 1, 40, 40, 32, False, (-1, -1), None, "dominant", None),  # sinks alone
]


def _fid(c: tuple) -> str:
    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks, scale = c
    return (f"h{hq}x{hkv}-sq{sq}-sk{sk}-d{d}{'-causal' if causal else ''}-w{window[0]}_{window[1]}"
            f"-cap{softcap}-sinks_{sinks}")


def _trimmed(cases: list, extra: list[tuple[str, object, object]], fid) -> list:  # type: ignore[no-untyped-def]
    """Every case in fp16 with the first option; the other (dtype, option) pairs on every other case:
    the interpreter is slow, and CI runs this file on 2 cores."""
    params = [pytest.param(c, torch.float16, extra[0][2], id=f"{fid(c)}-fp16-{extra[0][0]}") for c in cases]
    for i, (name, dtype, option) in enumerate(extra[1:]):
        params += [pytest.param(c, dtype, option, id=f"{fid(c)}-{name}") for c in cases[i % 2::2]]
    return params


@pytest.mark.parametrize("case,dtype,kernel", _trimmed(
    FORWARD_CASES, [("pointer", torch.float16, "pointer"), ("fp16-tma", torch.float16, "tma"),
                    ("fp32-pointer", torch.float32, "pointer")], _fid))
def test_forward_variants(case: tuple, dtype: torch.dtype, kernel: str, poisoned: None) -> None:
    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind, scale = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, seed=1)
    scale = d ** -0.5 if scale is None else scale
    sinks = make_sinks(hq, sinks_kind)
    cfg = {**TILES, "TMA": True} if kernel == "tma" else TILES
    out, lse = fwd.attention_forward(q, k, v, causal=causal, scale=scale, config=cfg, window=window,
                                     softcap=softcap, sinks=sinks)
    check_out(out, lse, q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)


def test_rows_that_see_no_key_give_zeros_and_the_sink() -> None:
    q, k, v = make_qkv(1, 2, 2, 40, 20, 32, dtype=torch.float16, seed=2)
    sinks = torch.tensor([0.5, -3.0])
    out, lse = fwd.attention_forward(q, k, v, causal=True, scale=0.2, config=TILES, window=(2, 0), sinks=sinks)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    assert torch.equal(lse[:, :, :20], sinks.view(1, 2, 1).expand(1, 2, 20))
    out, lse = fwd.attention_forward(q, k[:, :, :0], v[:, :, :0], causal=False, scale=0.2, config={}, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, sinks.view(1, 2, 1).expand_as(lse))


def test_window_visits_only_visible_blocks() -> None:
    """The block ranges of the window kernel: every visible key inside [n_lo, n_end), the unmasked
    part [full_lo, full_hi) seen by every row, and the number of visited blocks ~ window / BLOCK_N."""
    import numpy as np

    for sq, sk, left, right, bm, bn in [(64, 64, 20, 0, 16, 16), (40, 100, 5, 9, 16, 32), (60, 25, 3, 0, 16, 16),
                                        (1, 4096, 1024, 0, 16, 64), (128, 4096, 4095, 0, 64, 32)]:
        mask = visible_mask(sq, sk, window=(left, right)).numpy()
        for start in range(0, sq, bm):
            lo, flo, fhi, end = _py_range(start, sq, sk, left, right, bm, bn)
            rows = mask[start:start + bm]
            cols = np.nonzero(rows.any(axis=0))[0]
            if cols.size:
                assert lo <= cols.min() and cols.max() < end
            assert lo <= flo <= fhi <= end and lo % bn == 0
            if flo < fhi:  # the unmasked loop runs over whole blocks only
                assert flo % bn == 0 and fhi % bn == 0 and fhi <= sk
            assert rows[:, flo:fhi].all()
            assert end - lo <= left + right + bm + 2 * bn


def _py_range(start: int, sq: int, sk: int, left: int, right: int, bm: int, bn: int) -> tuple[int, int, int, int]:
    """window_block_range run through the interpreter on scalars."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(OUT, start, sq, sk, left, right, BM: tl.constexpr, BN: tl.constexpr):
        a, b, c, d = fwd.window_block_range(start, sq, sk, left, right, BM, BN)
        tl.store(OUT + 0, a)
        tl.store(OUT + 1, b)
        tl.store(OUT + 2, c)
        tl.store(OUT + 3, d)

    out = torch.zeros(4, dtype=torch.int32)
    probe[(1,)](out, start, sq, sk, left, right, BM=bm, BN=bn)
    return tuple(int(x) for x in out)  # type: ignore[return-value]


WINDOW_RANGE_CASES = [  # (Sq, Sk, left, right, BLOCK_M, BLOCK_N)
    (64, 64, 20, 0, 16, 16), (40, 100, 5, 9, 16, 32), (60, 25, 3, 0, 16, 16), (1, 4096, 1024, 0, 16, 64),
    (128, 4096, 4095, 0, 64, 32), (300, 300, 40, 17, 32, 64), (100, 37, 0, 0, 16, 16), (257, 513, 64, 64, 32, 128),
]


@pytest.mark.parametrize("sq, sk, left, right, bm, bn", WINDOW_RANGE_CASES)
def test_backward_window_ranges_visit_only_visible_blocks(sq: int, sk: int, left: int, right: int, bm: int,
                                                          bn: int) -> None:
    """The backward's block ranges under a window. dq (per query block, in keys): every visible key
    inside [lo, end), [full_lo, full_hi) whole blocks seen by every row. dk/dv (per key block, in query
    blocks): every row that sees one of the block's keys inside [first, end), the unmasked blocks
    [full_lo, full_hi) only rows that see all of them; the visited work follows the window, not S."""
    import numpy as np

    mask = visible_mask(sq, sk, window=(left, right)).numpy()
    for m0 in range(0, sq, bm):
        lo, flo, fhi, end = _probe(bwd._window_key_blocks, m0, sq, sk, left, right, bm, bn)
        rows = mask[m0:m0 + bm]
        cols = np.nonzero(rows.any(axis=0))[0]
        if cols.size:
            assert lo <= cols.min() and cols.max() < end
        assert lo <= flo <= fhi <= end and lo % bn == 0
        if flo < fhi:
            assert flo % bn == 0 and fhi % bn == 0
        assert rows[:, flo:fhi].all()
        assert end - lo <= left + right + bm + 2 * bn
    n_m = -(-sq // bm)
    for n0 in range(0, sk, bn):
        first, flo, fhi, end = _probe(bwd._window_query_blocks, n0, sq, sk, left, right, bm, bn)
        keys = mask[:, n0:n0 + bn]
        seen = np.nonzero(keys.any(axis=1))[0]
        assert 0 <= first <= flo <= fhi <= end <= n_m
        if seen.size:
            assert first * bm <= seen.min() and seen.max() < end * bm
        for blk in range(flo, fhi):  # unmasked: every real row of the block sees every real key
            assert keys[blk * bm:(blk + 1) * bm].all(), (n0, blk)
        assert (end - first) * bm <= left + right + bn + 2 * bm


def _probe(fn, start: int, sq: int, sk: int, left: int, right: int, bm: int, bn: int) -> tuple[int, int, int, int]:
    """A four-int @triton.jit range helper run through the interpreter on scalars."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(OUT, start, sq, sk, left, right, F: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        a, b, c, d = F(start, sq, sk, left, right, BM, BN)
        tl.store(OUT + 0, a)
        tl.store(OUT + 1, b)
        tl.store(OUT + 2, c)
        tl.store(OUT + 3, d)

    out = torch.zeros(4, dtype=torch.int32)
    probe[(1,)](out, start, sq, sk, left, right, F=fn, BM=bm, BN=bn)
    return tuple(int(x) for x in out)  # type: ignore[return-value]


DECODE_CASES = [
    # (B, Hq, Hkv, Sq, Sk, D, causal, window, softcap, sinks, splits)
    (2, 4, 2, 1, 300, 32, True, (40, 0), None, "none", 3),
    (1, 4, 1, 4, 200, 64, True, (33, 0), 3.0, "random", 4),
    (1, 2, 2, 3, 150, 32, False, (-1, -1), None, "dominant", 1),
    (1, 2, 2, 3, 150, 32, False, (-1, -1), 4.0, "random", 5),
    (1, 2, 1, 2, 90, 32, True, (0, 0), None, "random", 2),
]


@pytest.mark.parametrize("case,dtype,_", _trimmed(
    DECODE_CASES, [("", torch.float16, None), ("fp32", torch.float32, None)],
    lambda c: f"h{c[1]}x{c[2]}-sq{c[3]}-sk{c[4]}-w{c[7]}-cap{c[8]}-{c[9]}-s{c[10]}"))
def test_decode_variants(case: tuple, dtype: torch.dtype, _: None, poisoned: None) -> None:
    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind, splits = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, layout="bshd", seed=3)
    qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))
    sinks = make_sinks(hq, sinks_kind)
    out, lse = dec.decode_forward(qv, kv, vv, causal=causal, scale=0.125, config={"NUM_SPLITS": splits, "BLOCK_N": 16},
                                  window=window, softcap=softcap, sinks=sinks)
    check_out(out, lse, qv, kv, vv, causal=causal, scale=0.125, window=window, softcap=softcap, sinks=sinks)


def test_decode_window_splits_only_the_window() -> None:
    assert dec.visible_key_range(True, (4095, 0), 1, 32768) == (32768 - 4096, 32768)
    assert dec.visible_key_range(True, (-1, -1), 1, 32768) == (0, 32768)
    assert dec.visible_key_range(False, (10, 3), 4, 100) == (86, 100)


BACKWARD_CASES = [
    (1, 2, 1, 70, 70, 32, True, (20, 0), None, "none"),
    (1, 4, 2, 50, 113, 40, True, (7, 0), 5.0, "random"),
    (1, 2, 2, 60, 25, 32, True, (3, 0), None, "random"),
    (1, 2, 2, 45, 90, 32, False, (5, 9), 2.0, "dominant"),
    (1, 2, 2, 33, 47, 32, True, (-1, -1), 1.0, "none"),
    (2, 2, 1, 40, 40, 32, False, (-1, 3), None, "random"),
]


@pytest.mark.parametrize("case,dtype,atomic", _trimmed(
    BACKWARD_CASES, [("det", torch.float16, False), ("fp16-atomic", torch.float16, True),
                     ("fp32-det", torch.float32, False)],
    lambda c: f"h{c[1]}x{c[2]}-sq{c[3]}-sk{c[4]}-w{c[7]}-cap{c[8]}-{c[9]}"))
def test_backward_variants(case: tuple, dtype: torch.dtype, atomic: bool, poisoned: None) -> None:
    b, hq, hkv, sq, sk, d, causal, window, softcap, sinks_kind = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, seed=4)
    do = torch.randn(b, hq, sq, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    sinks = make_sinks(hq, sinks_kind)
    scale = d ** -0.5
    kw = dict(causal=causal, scale=scale, window=window, softcap=softcap)
    grads = []
    for upcast in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        s = sinks.detach().clone().double().requires_grad_(True) if sinks is not None else None
        out, lse = attention_math(*leaves, upcast=upcast, sinks=s, **kw)
        out.backward(do.to(out.dtype))
        grads.append([t.grad for t in leaves] + ([s.grad] if s is not None else []))
        if upcast:
            ref_out, ref_lse = out.detach().to(dtype), lse.detach().float()
    got = bwd.attention_backward(do, q, k, v, ref_out, ref_lse, config={**BWD_TILES, "BWD_DQ_ATOMIC": atomic},
                                 sinks=sinks, **kw)
    assert len(got) == (4 if sinks is not None else 3)
    for name, g, want, base in zip(["dq", "dk", "dv", "dsinks"], got, grads[0], grads[1]):
        # dsinks gets the input dtype's floor too: a reduction of dO . O over the stored output
        ok, err, allowed = within_budget(g, base, want, dtype, grad=True)
        assert ok, f"{name} error {err:.3g} > allowed {allowed:.3g}"


def test_attention_through_triton_gives_the_sinks_gradient() -> None:
    q, k, v = make_qkv(1, 4, 2, 37, 37, 32, dtype=torch.float32, requires_grad=True, seed=6)
    sinks = make_sinks(4, "random").requires_grad_(True)
    import flashdispatch

    # the backend's forward/backward pair through the generic autograd Function
    out = flashdispatch.attention(q, k, v, causal=True, scale=0.2, window=(9, 0), softcap=3.0, sinks=sinks,
                                  backend="triton")
    do = torch.randn_like(out)
    out.backward(do)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref, _ = attention_math(*leaves[:3], causal=True, scale=0.2, window=(9, 0), softcap=3.0, sinks=leaves[3])
    ref.backward(do.double())
    for got, want in zip((q.grad, k.grad, v.grad, sinks.grad), (t.grad for t in leaves)):
        assert got is not None and float((got.double() - want).abs().max()) < 1e-4


def test_sinks_are_checked() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 32, dtype=torch.float32)
    with pytest.raises(ValueError, match="sinks"):
        fwd.attention_forward(q, k, v, causal=False, scale=0.1, config={}, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="sinks"):
        fwd.attention_forward(q, k, v, causal=False, scale=0.1, config={}, sinks=torch.zeros(2, dtype=torch.float64))
