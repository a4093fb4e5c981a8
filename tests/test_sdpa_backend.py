"""The SDPA backend against the float64 reference: forward, lse and gradients (CPU; GPU with -m gpu)."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from inputs import check_forward, check_grads, make_qkv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Hq, Hkv, Sq, Sk, D): odd sizes on purpose; causal Sq < Sk and Sq > Sk; GQA 4:1 and 8:1
SHAPES = [
    (2, 4, 4, 17, 17, 40),
    (1, 8, 2, 1, 113, 64),
    (2, 8, 1, 113, 17, 96),
    (1, 4, 1, 17, 113, 128),
    (1, 2, 2, 113, 113, 64),
]
CPU_VARIANTS = ["sdpa", "sdpa:flash", "sdpa:math"]


def _id(shape):
    return "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}".format(*shape)


def _run_case(variant, dtype, shape, causal, layout, noncontig, device):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device=device, layout=layout, noncontiguous=noncontig)
    try:
        out = fd.attention(q, k, v, causal=causal, layout=layout, backend=variant)
    except fd.NoBackendError as e:
        pytest.skip(f"{variant} declines this case: {e.reasons}")
    check_forward(out, q, k, v, causal=causal, layout=layout)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_forward_cpu(variant, dtype, shape, causal, layout):
    _run_case(variant, dtype, shape, causal, layout, noncontig=False, device="cpu")


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_noncontiguous_inputs(variant, layout):
    _run_case(variant, torch.float32, (2, 8, 2, 17, 33, 64), True, layout, noncontig=True, device="cpu")


def test_last_dim_stride_is_copied_and_noted():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, stride(-1) != 1
    assert qt.stride(-1) != 1
    out = fd.attention(qt, k, v)
    check_forward(out, q, k, v, causal=False)
    assert any("non-unit last stride" in n for n in fd.explain(qt, k, v).notes)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lse_cpu(dtype, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype)
    out, lse = fd.attention(q, k, v, causal=causal, return_lse=True)
    check_forward(out, q, k, v, causal=causal, lse=lse)
    assert fd.explain(q, k, v, causal=causal, return_lse=True).variant == "sdpa:math"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_gradients_cpu(variant, dtype, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype)
    if variant == "sdpa:flash" and causal and 1 < sq < sk:
        pytest.skip("sdpa:flash declines bottom-right causal with Sq < Sk")
    check_grads(lambda a, b_, c: fd.attention(a, b_, c, causal=causal, backend=variant), q, k, v, causal=causal)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gradients_noncontiguous_bshd(layout):
    q, k, v = make_qkv(2, 4, 2, 17, 29, 40, layout=layout, noncontiguous=True)
    check_grads(lambda a, b_, c: fd.attention(a, b_, c, causal=True, layout=layout), q, k, v,
                causal=True, layout=layout)


def test_rows_that_see_no_key_are_zero():
    q, k, v = make_qkv(1, 2, 2, 7, 3, 16)
    for variant in CPU_VARIANTS:
        out = fd.attention(q, k, v, causal=True, backend=variant)
        assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4])), variant
        assert not torch.isnan(out).any()
    _, lse = fd.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()


@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5, 8), (2, 0, 0, 5, 5, 8), (2, 2, 2, 0, 5, 8), (2, 2, 2, 5, 0, 8)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_empty_inputs(shape, layout):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, layout=layout, requires_grad=True)
    out, lse = fd.attention(q, k, v, causal=True, layout=layout, return_lse=True)
    expect = (b, hq, sq, d) if layout == "bhsd" else (b, sq, hq, d)
    assert out.shape == expect and lse.shape == (b, hq, sq)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert q.grad is not None and (q.grad == 0).all()


def test_default_scale_and_explicit_scale():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 32)
    for scale in (None, 0.05, 1.0):
        check_forward(fd.attention(q, k, v, scale=scale), q, k, v, causal=False, scale=scale)


def test_head_dim_v_differs():
    q, k, v = make_qkv(1, 4, 2, 9, 13, 32, dv=48)
    out = fd.attention(q, k, v, causal=True)
    assert out.shape == (1, 4, 9, 48)
    check_forward(out, q, k, v, causal=True)


# --- GPU: the same checks where they use CUDA (pytest -m gpu) -----------------------------------

GPU_VARIANTS = ["sdpa", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient", "sdpa:math"]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_forward_gpu(variant, dtype, shape, causal, layout):
    _run_case(variant, dtype, shape, causal, layout, noncontig=(layout == "bshd"), device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_gradients_gpu(variant, dtype, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device="cuda")
    p = fd.explain(q, k, v, causal=causal, needs_grad=True, backend=None)
    try:
        fd.explain(q, k, v, causal=causal, needs_grad=True, backend=variant)
    except fd.NoBackendError:
        pytest.skip(f"{variant} declines this case")
    del p
    check_grads(lambda a, b_, c: fd.attention(a, b_, c, causal=causal, backend=variant), q, k, v, causal=causal)


@pytest.mark.gpu
def test_every_eligible_variant_runs_gpu():
    """Capabilities are honest: whatever a variant claims on this GPU, it really runs."""
    failures = []
    for shape in SHAPES + [(2, 8, 2, 1, 4097, 128), (1, 4, 4, 1000, 1000, 256)]:
        for causal in (False, True):
            b, hq, hkv, sq, sk, d = shape
            q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda")
            for variant in GPU_VARIANTS:
                try:
                    fd.explain(q, k, v, causal=causal, backend=variant)
                except fd.NoBackendError:
                    continue
                try:
                    check_forward(fd.attention(q, k, v, causal=causal, backend=variant), q, k, v, causal=causal)
                except Exception as e:  # collect all, report together
                    failures.append(f"{variant} {shape} causal={causal}: {type(e).__name__}: {str(e)[:200]}")
    assert not failures, "\n".join(failures)


def test_aligned_copies_only_views_a_16_byte_vector_load_would_break() -> None:
    from flashdispatch.alignment import aligned16 as _aligned

    base = torch.randn(2, 4, 9, 72, dtype=torch.float16)
    assert _aligned(base) is base  # contiguous, 144-byte rows
    odd_start = torch.randn(2 * 4 * 9 * 72 + 1, dtype=torch.float16)[1:].view(2, 4, 9, 72)
    assert odd_start.data_ptr() % 16 and _aligned(odd_start) is not odd_start
    assert _aligned(odd_start).data_ptr() % 16 == 0
    narrow = base[..., :60]  # 120-byte rows inside 144-byte ones: strides fine, a view, kept
    assert _aligned(narrow) is narrow
    odd_rows = torch.randn(2, 4, 9, 70, dtype=torch.float16)[..., :64]  # 140-byte row stride
    assert _aligned(odd_rows) is not odd_rows and _aligned(odd_rows).is_contiguous()
    odd_dim = torch.randn(2, 4, 9, 36, dtype=torch.float16)  # 72-byte rows: a copy would keep them
    assert _aligned(odd_dim) is odd_dim
    one_head = torch.randn(2, 9, 1, 64, dtype=torch.float16).transpose(1, 2)  # extent-1 dim, any stride
    assert _aligned(one_head) is one_head
    strided_last = base[..., ::2]  # a non-unit last stride: copied dense
    assert _aligned(strided_last).stride(-1) == 1


@pytest.mark.parametrize("sq, sk", [(17, 17), (1, 33), (33, 17), (17, 33), (0, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_bottom_right_sdpa_is_the_contracts_mask(sq: int, sk: int, causal: bool) -> None:
    """The one "plain SDPA, causal" helper: bottom-right for Sq < Sk, zero rows for Sq > Sk, no
    mask for one query row; GQA through SDPA's own keyword."""
    from flashdispatch.backends.sdpa import bottom_right_sdpa

    q, k, v = make_qkv(2, 4, 2, sq, sk, 16, dtype=torch.float32, device="cpu")
    check_forward(bottom_right_sdpa(q, k, v, causal=causal, enable_gqa=True), q, k, v, causal=causal)
