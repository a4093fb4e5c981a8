"""Varlen (packed) and KV-cache (contiguous and paged) Triton kernels under the interpreter.

The launch functions are called directly and checked against the float64 per-sequence reference
(serving_reference) within flash-attention's budget. Mixed lengths with empty sequences and
sequences of one token, GQA, window/softcap/sinks, block sizes 16/32/48 (not a power of two),
page tables in shuffled order, Sq > cache length (rows that see nothing). Outputs are poisoned
(NaN from torch.empty) so a row the kernels fail to write shows. fp16/fp32 (bf16: the GPU file).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterator

import pytest
import torch

from flashdispatch.serving_reference import kvcache_math, varlen_math
from flashdispatch.tolerances import within_budget

from inputs import cu_seqlens, make_cache, make_sinks

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; the GPU runs test_serving_gpu.py"),
]
MODULES = ("flashdispatch.backends.triton.forward", "flashdispatch.backends.triton.decode",
           "flashdispatch.backends.triton.backward", "flashdispatch.backends.triton.varlen",
           "flashdispatch.backends.triton.paged")
vl: ModuleType
pg: ModuleType
TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BWD_BLOCK_M": 16, "BWD_BLOCK_N": 16}


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels(triton_interpreter_state: None) -> Iterator[None]:
    """Kernels defined under TRITON_INTERPRET=1 for this file (the shared fixture, tests/conftest.py)."""
    global vl, pg
    mods = [importlib.import_module(n) for n in MODULES]
    vl, pg = mods[3], mods[4]
    yield


def _check(out: torch.Tensor, lse: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, ref_lse: torch.Tensor,
           dtype: torch.dtype) -> None:
    ok, err, allowed = within_budget(out, base, ref, dtype)
    assert ok, f"forward error {err:.3g} > allowed {allowed:.3g}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where the reference's is"
    if finite.any():
        lerr = float((lse.double()[finite] - ref_lse[finite]).abs().max())
        assert lerr < (1e-4 if dtype == torch.float32 else 2e-2), f"lse error {lerr}"


# (lengths_q, lengths_k, Hq, Hkv, D, causal, window, softcap, sinks)
VARLEN_CASES = [
    ([5, 0, 37, 1, 20], None, 4, 2, 32, True, None, None, "none"),        # self-attention, empty and 1
    ([5, 0, 23, 1, 20], None, 2, 2, 40, False, None, None, "none"),       # non-causal, D not a power of 2
    ([3, 17, 1], [30, 17, 45], 4, 1, 32, True, None, None, "random"),     # Sq < Sk per sequence, sinks
    ([33, 8], [12, 0], 2, 1, 32, True, None, None, "none"),               # Sq > Sk, a sequence with no keys
    ([40, 25, 2], None, 4, 2, 32, True, (7, 0), 3.0, "random"),           # window + softcap + sinks
    ([30, 19], [50, 19], 2, 2, 64, False, (5, 9), None, "dominant"),      # two-sided window
]


def _vid(c: tuple) -> str:
    return f"q{'_'.join(map(str, c[0]))}-h{c[2]}x{c[3]}-d{c[4]}{'-causal' if c[5] else ''}-w{c[6]}-cap{c[7]}-{c[8]}"


def _varlen_inputs(case: tuple, dtype: torch.dtype, requires_grad: bool = False):
    lq, lk, hq, hkv, d, causal, window, softcap, sinks_kind = case
    lk = lk or lq
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(lq), hq, d, generator=g).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(dtype).requires_grad_(requires_grad)
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=make_sinks(hq, sinks_kind))
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), max(lq), max(lk), kw


# every case in fp32, the variants' cases in fp16 too (the interpreter is slow: CI minutes)
FP32, FP16 = torch.float32, torch.float16


def _dtyped(cases: list[tuple], fp16: tuple[int, ...], ids) -> list:  # noqa: ANN001
    out = [pytest.param(c, FP32, id=f"{ids(c)}-fp32") for c in cases]
    return out + [pytest.param(cases[i], FP16, id=f"{ids(cases[i])}-fp16") for i in fp16]


def _forward_checked(q, k, v, cq, ck, mq, mk, dtype: torch.dtype, scale: float, config: dict,  # noqa: ANN001
                     **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """vl.varlen_forward with this config, held to the float64 per-sequence reference."""
    out, lse = vl.varlen_forward(q, k, v, cq, ck, mq, mk, scale=scale, config=config, **kw)
    ref, ref_lse = varlen_math(q, k, v, cq, ck, scale=scale, upcast=True, **kw)
    base, _ = varlen_math(q, k, v, cq, ck, scale=scale, upcast=False, **kw)
    _check(out, lse, ref, base, ref_lse, dtype)
    return out, lse


@pytest.mark.parametrize("case,dtype", _dtyped(VARLEN_CASES, (0, 4), _vid))
def test_varlen_forward(case: tuple, dtype: torch.dtype, poisoned: None) -> None:
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = _forward_checked(q, k, v, cq, ck, mq, mk, dtype, scale, TILES, **kw)
    assert out.shape == (q.shape[0], q.shape[1], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])


class _NotThisKernel:
    """Stands in for a kernel that must not run: launching it fails the test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, grid: object) -> None:
        raise AssertionError(f"the {self.name} kernel ran where the other should")


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_vid)
def test_varlen_forward_tma(case: tuple, poisoned: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hopper kernel (descriptors per sequence and head, emulated): the same cases and budget;
    a tile's rows past its sequence read as zeros and its store stops at the sequence's end."""
    monkeypatch.setattr(vl, "_varlen_fwd_kernel", _NotThisKernel("pointer"))
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(case, FP32)
    scale = q.shape[-1] ** -0.5
    _forward_checked(q, k, v, cq, ck, mq, mk, FP32, scale, {**TILES, "TMA": True}, **kw)


@pytest.mark.parametrize("d,dv,causal,window", [(32, 64, True, None), (40, 24, False, (5, 3))],
                         ids=["d32-dv64-causal", "d40-dv24-window"])
def test_varlen_forward_tma_value_dim_differs(d: int, dv: int, causal: bool, window, poisoned: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Dv != D (and not a power of two) on the descriptor kernel: V's and out's descriptors have their
    own width, zero-filled and clipped at Dv."""
    monkeypatch.setattr(vl, "_varlen_fwd_kernel", _NotThisKernel("pointer"))
    lengths = [5, 0, 37, 1, 20]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths), 4, d, generator=g)
    k = torch.randn(sum(lengths), 2, d, generator=g)
    v = torch.randn(sum(lengths), 2, dv, generator=g)
    cu = cu_seqlens(lengths)
    _forward_checked(q, k, v, cu, cu, max(lengths), max(lengths), FP32, 0.3, {**TILES, "TMA": True},
                     causal=causal, window=window)


def test_varlen_forward_unaligned_rows_take_the_pointer_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of 20 fp16 values (40 bytes) cannot be described to the copy engine: a TMA config runs
    on the pointer kernel, with the pointer tiles (configs.pointer_config)."""
    monkeypatch.setattr(vl, "_varlen_fwd_kernel_tma", _NotThisKernel("tensor-descriptor"))
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(([5, 9], None, 2, 1, 20, True, None, None, "none"), FP16)
    _forward_checked(q, k, v, cq, ck, mq, mk, FP16, 0.3, {**TILES, "TMA": True}, **kw)


def test_varlen_forward_past_the_descriptor_budget_takes_the_pointer_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid of more programs than MAX_TMA_PROGRAMS (each takes descriptor scratch, most exit at
    once in a mixed batch) runs the pointer kernel, with the same result."""
    monkeypatch.setattr(vl, "MAX_TMA_PROGRAMS", 5)  # this call's grid: 3 blocks x 2 seqs x 2 heads
    monkeypatch.setattr(vl, "_varlen_fwd_kernel_tma", _NotThisKernel("tensor-descriptor"))
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(([40, 7], None, 2, 1, 32, True, None, None, "none"), FP32)
    _forward_checked(q, k, v, cq, ck, mq, mk, FP32, 0.2, {**TILES, "TMA": True}, **kw)


@pytest.mark.parametrize("case,dtype", _dtyped(VARLEN_CASES, (4,), _vid))
def test_varlen_backward(case: tuple, dtype: torch.dtype) -> None:
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(case, dtype, requires_grad=True)
    sinks = kw.pop("sinks")
    if sinks is not None:
        sinks.requires_grad_(True)
    scale = q.shape[-1] ** -0.5
    do = torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=torch.Generator().manual_seed(5)).to(dtype)
    from types import SimpleNamespace

    from flashdispatch.backends.triton import serving as triton_serving

    # the family's serving path: the kernels joined by the dispatcher's one autograd Function
    sp = SimpleNamespace(needs_grad=True, seqlen_q=mq, seqlen_k=mk, causal=kw["causal"], scale=scale,
                         window=kw["window"], softcap=kw["softcap"])
    out, _ = triton_serving.varlen_forward(q, k, v, cq, ck, sp, sinks, TILES)
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    got = torch.autograd.grad(out, leaves, do)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_out, _ = varlen_math(*ref_leaves[:3], cq, ck, scale=scale, upcast=True, causal=kw["causal"],
                             window=kw["window"], softcap=kw["softcap"], sinks=ref_leaves[3] if sinks is not None else None)
    ref = torch.autograd.grad(ref_out, ref_leaves, do.double())
    base_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    base_out, _ = varlen_math(*base_leaves[:3], cq, ck, scale=scale, upcast=False, causal=kw["causal"],
                              window=kw["window"], softcap=kw["softcap"], sinks=base_leaves[3] if sinks is not None else None)
    base = torch.autograd.grad(base_out, base_leaves, do, allow_unused=True)
    for name, g, r, bb in zip(("dq", "dk", "dv", "dsinks"), got, ref, base):
        bb = torch.zeros_like(r) if bb is None else bb
        ok, err, allowed = within_budget(g, bb, r, dtype if name != "dsinks" else torch.float32, grad=True)
        assert ok, f"{name}: error {err:.3g} > allowed {allowed:.3g}"


# (B lengths, Sq, Hq, Hkv, D, page (0: contiguous), causal, window, softcap, sinks, splits)
KV_CASES = [
    ([37, 1, 0, 100], 1, 4, 2, 32, 16, True, None, None, "none", 0),     # decode, paged 16, empty + 1
    ([37, 1, 0, 100], 1, 4, 2, 32, 0, True, None, None, "none", 3),      # the same, contiguous, 3 splits
    ([50, 7, 90], 4, 8, 2, 32, 32, True, None, None, "random", 4),       # speculative Sq = 4, sinks
    ([50, 3, 90], 6, 4, 4, 64, 48, True, None, 4.0, "none", 2),          # page 48, Sq > a cache length
    ([80, 64], 3, 4, 1, 32, 16, True, (20, 0), None, "dominant", 3),     # window + dominant sinks
    ([80, 64], 2, 2, 2, 40, 0, False, None, 2.0, "random", 1),           # non-causal, D=40, direct
    ([120, 17, 64], 5, 4, 2, 32, 16, True, (9, 0), 3.0, "random", 0),    # all three, planner's splits
]


def _kvid(c: tuple) -> str:
    return f"L{'_'.join(map(str, c[0]))}-sq{c[1]}-h{c[2]}x{c[3]}-d{c[4]}-page{c[5]}-w{c[7]}-cap{c[8]}-{c[9]}-s{c[10]}"


@pytest.mark.parametrize("case,dtype", _dtyped(KV_CASES, (0, 2, 6), _kvid))
def test_kvcache_forward(case: tuple, dtype: torch.dtype, poisoned: None) -> None:
    lengths, sq, hq, hkv, d, page, causal, window, softcap, sinks_kind, splits = case
    q, k, v, seqlens, table = make_cache(lengths, sq, hq, hkv, d, page, dtype)
    sinks = make_sinks(hq, sinks_kind)
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks)
    cfg = {"BLOCK_N": 16, "NUM_SPLITS": splits}
    out, lse = pg.kvcache_forward(q, k, v, seqlens, table, scale=0.2, config=cfg, **kw)
    assert out.shape == (*q.shape[:3], v.shape[3]) and lse.shape == (q.shape[0], hq, sq)
    ref, ref_lse = kvcache_math(q, k, v, seqlens, table, scale=0.2, upcast=True, **kw)
    base, _ = kvcache_math(q, k, v, seqlens, table, scale=0.2, upcast=False, **kw)
    _check(out, lse, ref, base, ref_lse, dtype)


def test_kvcache_static_out_and_new_lengths_reuse_the_plan() -> None:
    """What a CUDA-graph replay does: same shapes, new cache_seqlens and block table values,
    output written into a static buffer; the plan (grid, splits) is made once."""
    q, k, v, seqlens, table = make_cache([20, 40], 2, 4, 2, 32, 16, torch.float32, spare_blocks=2)
    out = torch.full((*q.shape[:3], 32), float("nan"))
    cfg = {"BLOCK_N": 16, "NUM_SPLITS": 3}
    pg._PLANS.clear()
    for lens in ([20, 40], [40, 1], [0, 63]):
        new = torch.tensor(lens, dtype=torch.int32)
        got, _ = pg.kvcache_forward(q, k.nan_to_num(), v.nan_to_num(), new, table, scale=0.2, config=cfg, out=out)
        assert got.data_ptr() == out.data_ptr()
        ref, _ = kvcache_math(q, k.nan_to_num(), v.nan_to_num(), new, table, scale=0.2)
        assert (out.double() - ref).abs().max() < 1e-4
    assert len(pg._PLANS) == 1
    flipped = table.flip(0).contiguous()
    pg.kvcache_forward(q, k.nan_to_num(), v.nan_to_num(), seqlens, flipped, scale=0.2, config=cfg, out=out)
    ref, _ = kvcache_math(q, k.nan_to_num(), v.nan_to_num(), seqlens, flipped, scale=0.2)
    assert (out.double() - ref).abs().max() < 1e-4 and len(pg._PLANS) == 1


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
def test_kvcache_splits_for_mixed_lengths(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan sees the capacity, not the lengths: where the dense count leaves few splits, it takes
    more (MIXED_LENGTH_BALANCE), never below MIXED_LENGTH_MIN_KEYS keys a split and never fewer than
    the dense count; a config's NUM_SPLITS is taken as asked. 132 SMs, a 32k table (one shared page)."""
    from flashdispatch.backends.triton.forward import PLAIN

    monkeypatch.setattr(pg.configs, "sm_count_of", lambda kind, index: 132)
    page, capacity = 16, 32768
    q = torch.zeros(batch, 1, 32, 128, dtype=torch.bfloat16)
    cache = torch.zeros(1, page, 8, 128, dtype=torch.bfloat16)
    table = torch.zeros(batch, capacity // page, dtype=torch.int32)

    def splits(config: dict) -> tuple[int, int]:
        plan = pg._PagedPlan(q, cache, cache, table, True, 0.1, config, PLAIN)
        return plan.split.grid[1], plan.split.scalar("keys_per_split")

    got, keys = splits({})
    block_n = int(pg.configs.resolve_decode({}, pg.configs.arch_of_tensor(q), 128)["BLOCK_N"])
    dense = pg._plan(block_n, 0, batch, 32, 8, 1, capacity, 132 * pg.MIXED_LENGTH_SPLIT_FACTOR)[2]
    assert got >= dense and got * keys >= capacity
    if got > dense:
        assert keys >= pg.MIXED_LENGTH_MIN_KEYS
    # past B * 8 heads * splits >= BALANCE x 2 programs per SM, or at the keys' floor
    assert batch * 8 * got >= min(pg.MIXED_LENGTH_BALANCE * 2 * 132, batch * 8 * (capacity // pg.MIXED_LENGTH_MIN_KEYS))
    assert splits({"NUM_SPLITS": 3})[0] == 3


# --- the public calls on the triton backend (interpreter) -----------------------------------------


def test_public_varlen_triton_forward_backward() -> None:
    import flashdispatch as fd

    case = ([5, 0, 21, 1], [9, 3, 21, 4], 4, 2, 32, True, (6, 0), 2.0, "random")
    q, k, v, cq, ck, mq, mk, kw = _varlen_inputs(case, torch.float32, requires_grad=True)
    d = fd.explain_varlen(q, k, v, cq, ck, mq, mk, backend="triton", **kw)
    assert d.variant == "triton" and d.source == "argument"
    out, lse = fd.attention_varlen(q, k, v, cq, ck, mq, mk, backend="triton", return_lse=True, **kw)
    ref, ref_lse = varlen_math(q, k, v, cq, ck, upcast=True, **kw)
    base, _ = varlen_math(q, k, v, cq, ck, upcast=False, **kw)
    _check(out.detach(), lse, ref.detach(), base.detach(), ref_lse.detach(), torch.float32)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do.double())
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() < 1e-4


def test_public_kvcache_triton() -> None:
    import flashdispatch as fd

    q, k, v, seqlens, table = make_cache([33, 1, 0, 70], 3, 8, 2, 32, 32, torch.float16)
    sinks = make_sinks(8, "random")
    out, lse = fd.attention_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, backend="triton", sinks=sinks,
                                    return_lse=True)
    ref, ref_lse = kvcache_math(q, k, v, seqlens, table, sinks=sinks)
    base, _ = kvcache_math(q, k, v, seqlens, table, sinks=sinks, upcast=False)
    _check(out, lse, ref, base, ref_lse, torch.float16)
