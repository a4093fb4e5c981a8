"""Input factories and the reference check used across the test files (one place)."""

from __future__ import annotations

import zlib

import torch

from flashdispatch.reference import attention_math, causal_mask
from flashdispatch.tolerances import within_budget


POISON_BYTES = 512 * 2**20


def poison_cuda_allocator() -> None:
    """Fill the memory the caching allocator hands out next with NaN, so that an output element a
    kernel never writes reads back as NaN (for buffers allocated in C++ or by a backend)."""
    torch.cuda.synchronize()
    junk = torch.full((POISON_BYTES // 4,), float("nan"), device="cuda", dtype=torch.float32)
    del junk


def sdpa_switches() -> tuple[bool, ...]:
    """torch's SDPA kernel switches (flash, efficient, math, cuDNN), read directly: what a pinned
    kernel must leave as it found them (not backends/sdpa's own table, which a missed switch would
    fool)."""
    import torch.backends.cuda as sw

    return (sw.flash_sdp_enabled(), sw.mem_efficient_sdp_enabled(), sw.math_sdp_enabled(), sw.cudnn_sdp_enabled())


def _nan_filled(make):  # type: ignore[no-untyped-def]
    def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
        t = make(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    return wrapped


def poison_outputs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Outputs start as NaN: every floating-point buffer from torch.empty / empty_like /
    empty_strided is NaN-filled, and on a GPU so is the memory the allocator hands out next."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _nan_filled(getattr(torch, name)))
    if torch.cuda.is_available():
        poison_cuda_allocator()


def nan_padded_view(t: torch.Tensor) -> torch.Tensor:
    """t's values as a view into a larger NaN-filled buffer (one extra slice on dim 1, 8 extra
    columns, an odd offset): a kernel that reads outside the view picks up NaN and fails."""
    b, s1, s2, d = t.shape
    big = torch.full((b, s1 + 1, s2, d + 8), float("nan"), device=t.device, dtype=t.dtype)
    big[:, 1:, :, 3:3 + d] = t
    return big[:, 1:, :, 3:3 + d]


def make_qkv(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, *, dv: int | None = None,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", layout: str = "bhsd",
    noncontiguous: bool = False, requires_grad: bool = False, seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q, k, v. noncontiguous=True gives views into larger NaN-filled buffers (odd
    strides): a kernel that reads outside the view picks up NaN and fails the check."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
    dv = dv or d

    def one(h: int, s: int, dd: int) -> torch.Tensor:
        shape = (b, h, s, dd) if layout == "bhsd" else (b, s, h, dd)
        t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        return (nan_padded_view(t) if noncontiguous else t).requires_grad_(requires_grad)

    return one(hq, sq, d), one(hkv, sk, d), one(hkv, sk, dv)


def make_qkv_do(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, *, dtype: torch.dtype, seed: int,
    layout: str = "bhsd", device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """q, k, v and an output gradient do shaped like q: N(0, 1) drawn in float64 on the CPU from
    `seed` (in that order), then cast to dtype and moved to device."""
    g = torch.Generator().manual_seed(seed)

    def one(h: int, s: int) -> torch.Tensor:
        shape = (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return [one(hq, sq), one(hkv, sk), one(hkv, sk), one(hq, sq)]


# Per-head sink distributions, (mean, std): about a row's scores; outweighing every key; from
# barely there (-2) to dominating a row (10).
SINK_KINDS = {"random": (0.0, 1.0), "dominant": (8.0, 1.0), "spread": (4.0, 3.0)}


def make_sinks(hq: int, kind: str, *, seed: int = 7, device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Attention sinks, float32 (hq,), of a SINK_KINDS distribution drawn from `seed`; None for
    kind "none"."""
    if kind == "none":
        return None
    mean, std = SINK_KINDS[kind]
    base = torch.randn(hq, generator=torch.Generator().manual_seed(seed))
    return (base * std + mean).float().to(device)


def cu_seqlens(lengths: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """The int32 cumulative sequence offsets of attention_varlen: [0, l0, l0 + l1, ...]."""
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def make_cache(lengths: list[int], sq: int, hq: int, hkv: int, d: int, page: int, dtype: torch.dtype,
               *, spare_blocks: int = 1, seed: int = 3, device: str | torch.device = "cpu"):
    """attention_kvcache inputs: q (B, Sq, Hq, D), k/v caches, cache_seqlens (int32), block_table.
    page > 0: a paged cache, pages in shuffled order, `spare_blocks` unused table columns per
    sequence, rows past each sequence's end NaN (a kernel that reads them fails); page 0: a
    contiguous cache (B, max length + 5, Hkv, D), NaN past each length, and no table. Drawn on the
    CPU from `seed`, then moved to device."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(lengths)
    q = torch.randn(bsz, sq, hq, d, generator=g).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if page == 0:
        smax = max(lengths) + 5
        k = torch.full((bsz, smax, hkv, d), float("nan")).to(dtype)
        v = torch.full((bsz, smax, hkv, d), float("nan")).to(dtype)
        for b, n in enumerate(lengths):
            k[b, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
            v[b, :n] = torch.randn(n, hkv, d, generator=g).to(dtype)
        return q.to(device), k.to(device), v.to(device), seqlens.to(device), None
    max_blocks = max(-(-n // page) for n in lengths) + spare_blocks
    nblocks = bsz * max_blocks + 2
    k = torch.full((nblocks, page, hkv, d), float("nan")).to(dtype)
    v = torch.full((nblocks, page, hkv, d), float("nan")).to(dtype)
    perm = torch.randperm(nblocks, generator=g)
    table = torch.zeros(bsz, max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        for j in range(max_blocks):
            table[b, j] = perm[used]
            used += 1
            rows = min(page, max(n - j * page, 0))
            if rows:
                k[perm[used - 1], :rows] = torch.randn(rows, hkv, d, generator=g).to(dtype)
                v[perm[used - 1], :rows] = torch.randn(rows, hkv, d, generator=g).to(dtype)
    return q.to(device), k.to(device), v.to(device), seqlens.to(device), table.to(device)


def check_forward(out, q, k, v, *, causal, layout="bhsd", scale=None, lse=None, window=None):
    """Assert out (and lse) are within the flash-attention budget of plain torch vs float64."""
    ref, ref_lse = attention_math(q, k, v, causal=causal, layout=layout, scale=scale, upcast=True, window=window)
    base, _ = attention_math(q, k, v, causal=causal, layout=layout, scale=scale, upcast=False, window=window)
    ok, err, allowed = within_budget(out, base, ref, q.dtype)
    assert ok, f"forward error {err:.3g} > allowed {allowed:.3g}"
    assert out.shape == ref.shape and out.dtype == q.dtype
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where no key is visible"
        assert not torch.isnan(lse).any()
        if finite.any():
            lerr = float((lse.double()[finite] - ref_lse[finite]).abs().max())
            assert lerr < (1e-4 if q.dtype in (torch.float32, torch.float64) else 2e-2), f"lse error {lerr}"


def check_grads(fn, q, k, v, *, causal, layout="bhsd", scale=None, window=None):
    """fn(q, k, v) -> out; compare dq, dk, dv to float64 autograd of the reference (3x budget)."""
    do = torch.randn_like(attention_math(q, k, v, causal=causal, layout=layout, upcast=False, window=window)[0])
    grads = []
    for upcast in (True, False):
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out, _ = attention_math(qq, kk, vv, causal=causal, layout=layout, scale=scale, upcast=upcast, window=window)
        out.backward(do.to(out.dtype))
        grads.append((qq.grad, kk.grad, vv.grad))
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(do)
    for name, g, g_ref, g_base in zip("qkv", (qq.grad, kk.grad, vv.grad), grads[0], grads[1]):
        assert g is not None, f"no gradient reached {name}"
        ok, err, allowed = within_budget(g, g_base, g_ref, q.dtype, grad=True)
        assert ok, f"d{name} error {err:.3g} > allowed {allowed:.3g}"


def make_case_inputs(case, dtype: torch.dtype, device: str, *, requires_grad: bool = False, seed: int = 0):
    """q, k, v for a conformance Case (tests/conformance.py): fresh N(0, 1) values mapped through the
    case's value distribution, in the case's layout, as NaN-padded strided views when case.strided."""
    from conformance import VALUES

    g = torch.Generator(device="cpu").manual_seed(seed + zlib.crc32(case.id().encode()))
    q = torch.randn(case.b, case.hq, case.sq, case.d, generator=g, dtype=torch.float64)
    k = torch.randn(case.b, case.hkv, case.sk, case.d, generator=g, dtype=torch.float64)
    v = torch.randn(case.b, case.hkv, case.sk, case.head_dim_v, generator=g, dtype=torch.float64)
    q, k, v = VALUES[case.values][0](q, k, v, g)

    def place(t: torch.Tensor) -> torch.Tensor:
        if case.layout == "bshd":
            t = t.transpose(1, 2)
        t = t.to(device=device, dtype=dtype)
        return (nan_padded_view(t) if case.strided else t.contiguous()).requires_grad_(requires_grad)

    return place(q), place(k), place(v)


def baseline_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case) -> torch.Tensor:
    """Plain PyTorch math in the input dtype: what sets the error budget. Where the scores overflow
    the input dtype (values near the fp16 range) plain torch has no answer, and the budget comes from
    the same math with float32 scores, as every flash kernel computes them."""
    out, _ = attention_math(q, k, v, causal=case.causal, scale=case.scale, layout=case.layout, upcast=False)
    if q.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
        out, _ = attention_math(q.float(), k.float(), v.float(), causal=case.causal, scale=case.scale,
                                layout=case.layout, upcast=False)
        out = out.to(q.dtype)
    return out


def flash_style_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, case,
                      compute: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv as every flash-style backward computes them (ours, cuDNN's, torch's flash and
    memory-efficient kernels): exact (float64; `compute=torch.float32` for the arithmetic of a
    kernel) but for the kernel's roundings to the input dtype,
    delta = rowsum(dO * O) from the *stored* low-precision O, and P and dS rounded before their
    matmuls. Where the softmax is sharp (a large scale or large logits), P * (dP - delta) cancels
    almost exactly and the stored O's rounding is all that is left: dq's error then scales with
    scale * eps * |dO| |O| |K|, however exact the kernel. Plain torch's math (the other baseline)
    keeps the softmax in fp32 and cancels exactly, so it alone would hold these kernels to an error
    no flash-style backward can reach (an H200's cuDNN read dq 0.0137 against 0.0037 allowed at
    B1 H2 Sq1 Sk2 D96 fp16 scale 8). Returned in q's dtype and layout; non-finite where the
    gradients overflow it (the caller then keeps the other baseline)."""
    dt = q.dtype
    if case.layout == "bshd":
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    b, hq, sq, d = q.shape
    hkv, sk, dv_ = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    scale = case.scale if case.scale is not None else d ** -0.5
    qd, kd, vd, dod = (t.detach().to(compute) for t in (q, k, v, do))
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    s = qd @ kd.transpose(-1, -2) * scale
    if case.causal:
        s = s.masked_fill(~causal_mask(sq, sk, device=s.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees no key: zeros
    o = (p @ vd).to(dt).to(compute)  # the stored output
    delta = (dod * o).sum(-1, keepdim=True)
    ds = (p * (dod @ vd.transpose(-1, -2) - delta)).to(dt).to(compute)
    dq = ds @ kd * scale
    dk = (ds.transpose(-1, -2) @ qd * scale).view(b, hkv, group, sk, d).sum(2)
    dv = (p.to(dt).to(compute).transpose(-1, -2) @ dod).view(b, hkv, group, sk, dv_).sum(2)
    grads = (dq, dk, dv)
    if case.layout == "bshd":
        grads = tuple(t.transpose(1, 2) for t in grads)
    return tuple(t.to(dt) for t in grads)  # type: ignore[return-value]
