"""GPU: the triton varlen forward/backward and KV-cache kernels in bf16/fp16 against the float64
per-sequence reference (GQA 32/8, D=128, mixed lengths with 0 and 1, block sizes 16/32/64), the
sdpa fallbacks, and attention_kvcache captured once in a CUDA graph and replayed with new
cache_seqlens and block tables (no host sync in the capture, no allocation in the replay, the
poisoned static output rewritten)."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from flashdispatch.serving_reference import kvcache_math, varlen_math
from flashdispatch.tolerances import within_budget

from inputs import cu_seqlens, make_cache

pytestmark = pytest.mark.gpu


def _lse_ok(lse: torch.Tensor, ref_lse: torch.Tensor) -> None:
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 2e-2


VARLEN_LENGTHS = [([0, 1, 17, 256, 1000, 129, 64], None), ([5, 300, 1, 0], [700, 300, 64, 9])]


# bf16 across the matrix, fp16 on two cases (each constexpr combination is one more compile)
BF16, FP16 = torch.bfloat16, torch.float16
VARLEN_CASES = [
    pytest.param(VARLEN_LENGTHS[s], c, BF16, var, id=f"{'self' if s == 0 else 'cross'}-{'causal' if c else 'full'}-bf16-{var}")
    for s in (0, 1) for c in (True, False) for var in ("plain", "window_softcap_sinks")
] + [pytest.param(VARLEN_LENGTHS[0], True, FP16, "plain", id="self-causal-fp16-plain"),
     pytest.param(VARLEN_LENGTHS[1], False, FP16, "window_softcap_sinks", id="cross-full-fp16-window_softcap_sinks")]


@pytest.mark.parametrize("lengths,causal,dtype,variant", VARLEN_CASES)
def test_varlen_triton_forward_backward(lengths, causal: bool, dtype: torch.dtype, variant: str) -> None:
    lq, lk = lengths
    lk = lk or lq
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(sum(lq), 32, 128, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(lk), 8, 128, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(lk), 8, 128, device="cuda", generator=g).to(dtype).requires_grad_()
    kw: dict = {}
    if variant != "plain":
        kw = dict(window=(100, 0 if causal else 50), softcap=20.0,
                  sinks=torch.randn(32, device="cuda", generator=g).requires_grad_())
    cq, ck = cu_seqlens(lq, device="cuda"), cu_seqlens(lk, device="cuda")
    out, lse = fd.attention_varlen(q, k, v, cq, ck, max(lq), max(lk), causal=causal, return_lse=True,
                                   backend="triton", **kw)
    ref, ref_lse = varlen_math(q, k, v, cq, ck, causal=causal, upcast=True, **kw)
    base, _ = varlen_math(q, k, v, cq, ck, causal=causal, upcast=False, **kw)
    ok, err, allowed = within_budget(out.detach(), base.detach(), ref.detach(), dtype)
    assert ok, f"forward {err:.3g} > {allowed:.3g}"
    _lse_ok(lse, ref_lse.detach())
    do = torch.randn_like(out)
    leaves = [t for t in (q, k, v, kw.get("sinks")) if t is not None]
    got = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(ref, leaves, do.double())
    basegrads = torch.autograd.grad(base, leaves, do)
    for name, a, w, b in zip(("dq", "dk", "dv", "dsinks"), got, want, basegrads):
        # dsinks is float32 but made of the input dtype's out and lse: the input dtype's budget
        ok, err, allowed = within_budget(a, b, w, dtype, grad=True)
        assert ok, f"{name} {err:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("path", ["default", "pointer"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen_forward_kernel_paths(d: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both forward kernels (on Hopper the default is the per-sequence descriptor kernel at D=128/256;
    MAX_TMA_PROGRAMS=0 sends every call to the pointer kernel) at each head-dim bucket, against the
    float64 reference; a NaN in one sequence's first value row reaches that sequence's rows only."""
    from flashdispatch.backends.triton import varlen as vl

    if path == "pointer":
        monkeypatch.setattr(vl, "MAX_TMA_PROGRAMS", 0)
    lengths = [0, 1, 17, 300, 129, 64, 2]
    g = torch.Generator(device="cuda").manual_seed(3)
    total = sum(lengths)
    q = torch.randn(total, 16, d, device="cuda", generator=g).to(BF16)
    k = torch.randn(total, 4, d, device="cuda", generator=g).to(BF16)
    v = torch.randn(total, 4, d, device="cuda", generator=g).to(BF16)
    cu = cu_seqlens(lengths, device="cuda")
    out, lse = vl.varlen_forward(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, scale=d ** -0.5)
    ref, ref_lse = varlen_math(q, k, v, cu, cu, causal=True, upcast=True, scale=d ** -0.5)
    base, _ = varlen_math(q, k, v, cu, cu, causal=True, upcast=False, scale=d ** -0.5)
    ok, err, allowed = within_budget(out, base, ref, BF16)
    assert ok, f"forward {err:.3g} > {allowed:.3g}"
    _lse_ok(lse, ref_lse)
    start = int(cu[3])  # sequence 3 (300 rows): every row sees its first key
    v_bad = v.clone()
    v_bad[start] = float("nan")
    out_bad, _ = vl.varlen_forward(q, k, v_bad, cu, cu, max(lengths), max(lengths), causal=True, scale=d ** -0.5)
    rows_nan = torch.isnan(out_bad).any(dim=(1, 2))
    assert bool(rows_nan[start:start + 300].all()) and not bool(rows_nan[:start].any() or rows_nan[start + 300:].any())


KV_CASES = [(16, 1, BF16), (16, 5, BF16), (32, 1, BF16), (64, 5, BF16), (0, 1, BF16), (0, 5, BF16),
            (16, 1, FP16), (64, 5, FP16)]


@pytest.mark.parametrize("page,sq,dtype", [pytest.param(*c, id=f"page{c[0] or 'contig'}-sq{c[1]}-{'bf16' if c[2] == BF16 else 'fp16'}")
                                           for c in KV_CASES])
def test_kvcache_triton(page: int, sq: int, dtype: torch.dtype) -> None:
    lengths = [0, 1, 37, 4096, 700, 3]
    q, k, v, lens, table = make_cache(lengths, sq, 32, 8, 128, page, dtype, device="cuda")
    assert fd.explain_kvcache(q, k, v, cache_seqlens=lens, block_table=table).variant == "triton"
    for kw in ({}, dict(window=(64, 0), softcap=30.0, sinks=torch.randn(32, device="cuda"))):
        out, lse = fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, return_lse=True, **kw)
        ref, ref_lse = kvcache_math(q, k, v, lens, table, **kw)
        base, _ = kvcache_math(q, k, v, lens, table, upcast=False, **kw)
        ok, err, allowed = within_budget(out, base, ref, dtype)
        assert ok, f"{kw.keys()}: {err:.3g} > {allowed:.3g}"
        _lse_ok(lse, ref_lse)


def test_sdpa_fallbacks_on_gpu() -> None:
    q, k, v, lens, table = make_cache([0, 1, 300, 77], 4, 32, 8, 128, 16, torch.bfloat16, device="cuda")
    out = fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="sdpa")
    ref, _ = kvcache_math(q, k, v, lens, table)
    base, _ = kvcache_math(q, k, v, lens, table, upcast=False)
    assert within_budget(out, base, ref, torch.bfloat16)[0]
    lq = [3, 0, 200, 1]
    qq = torch.randn(sum(lq), 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kk = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    vv = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = cu_seqlens(lq, device="cuda")
    o = fd.attention_varlen(qq, kk, vv, cu, cu, 200, 200, causal=True, backend="sdpa")
    r, _ = varlen_math(qq, kk, vv, cu, cu, causal=True)
    b, _ = varlen_math(qq, kk, vv, cu, cu, causal=True, upcast=False)
    assert within_budget(o.detach(), b.detach(), r.detach(), torch.bfloat16)[0]
    o.sum().backward()
    assert torch.isfinite(qq.grad).all()


@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_kvcache_cuda_graph_replay(sq: int, backend: str) -> None:
    """Capture once (validation on: it is skipped inside the capture; a host read would make
    the capture fail), then replay with new lengths and a new table, copied into the captured
    tensors: no allocation, no host sync, the poisoned output rewritten each time."""
    torch.manual_seed(0)
    page, bsz, max_blocks = 16, 4, 64
    nblocks = bsz * max_blocks + 8
    k = torch.randn(nblocks, page, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(nblocks, page, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(bsz, sq, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([100, 1, 513, 1000], dtype=torch.int32, device="cuda")
    table = torch.randperm(nblocks, device="cuda")[:bsz * max_blocks].view(bsz, max_blocks).int()

    def step() -> torch.Tensor:
        return fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # compile, the checked direct launch, one more
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    torch.cuda.synchronize()
    for new_lens in ([1000, 0, 7, 1], [17, 1024, 1023, 512], [1, 1, 1, 1]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        table.copy_(torch.randperm(nblocks, device="cuda")[:bsz * max_blocks].view(bsz, max_blocks).int())
        q.copy_(torch.randn_like(q))
        static_out.fill_(float("nan"))
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "the replay allocated"
        ref, _ = kvcache_math(q, k, v, lens, table)
        base, _ = kvcache_math(q, k, v, lens, table, upcast=False)
        assert not torch.isnan(static_out).any(), "the replay left poisoned rows"
        ok, err, allowed = within_budget(static_out, base, ref, torch.bfloat16)
        assert ok, f"replay with lengths {new_lens}: {err:.3g} > {allowed:.3g}"
