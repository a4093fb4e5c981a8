"""The Triton backward kernels on a real GPU: bf16 and fp16 across the contract's matrix.

Run with `pytest -m gpu tests/test_triton_backward_gpu.py`. Gradients against float64 autograd of
the reference attention with flash-attention's 3x budget; out and lse come from the float64
reference (the kernels alone are under test) except in the end-to-end case through
flashdispatch.attention(backend="triton"), which runs the Triton forward too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import flashdispatch  # noqa: E402
from flashdispatch.reference import attention_math  # noqa: E402
from flashdispatch.tolerances import within_budget  # noqa: E402
from inputs import make_qkv, poison_outputs  # noqa: E402

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def _bwd():  # imported lazily: on a machine without a GPU the module is collected, never run
    from flashdispatch.backends.triton import backward

    return backward


def _configs():
    from flashdispatch.backends.triton import configs

    return configs


def _inputs(b, hq, hkv, sq, sk, d, dv, dtype, layout="bhsd", noncontig=False, seed=0):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv=dv, dtype=dtype, device="cuda", layout=layout,
                       noncontiguous=noncontig, seed=seed)
    do = make_qkv(b, hq, 1, sq, 1, dv, dtype=dtype, device="cuda", layout=layout, noncontiguous=noncontig,
                  seed=seed + 1)[0]
    if layout == "bshd":  # bhsd-indexed views of (B, S, H, D) memory, as attention() hands them over
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    return q, k, v, do


def _reference_grads(q, k, v, do, causal, scale):
    """((dq, dk, dv) in float64, the same in the input dtype, out in dtype, lse float32)."""
    grads = []
    for upcast in (True, False):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = attention_math(qq, kk, vv, causal=causal, scale=scale, upcast=upcast)
        out.backward(do.to(out.dtype))
        grads.append((qq.grad, kk.grad, vv.grad))
        if upcast:
            ref_out, ref_lse = out.detach().to(q.dtype), lse.detach().float()
    return grads[0], grads[1], ref_out, ref_lse


def _check(got, want, base, tensors, dtype):
    for name, g, w, bs, t in zip("qkv", got, want, base, tensors):
        assert g.shape == t.shape and g.dtype == t.dtype
        ok, err, allowed = within_budget(g, bs, w, dtype, grad=True)
        assert ok, f"d{name} error {err:.3g} > allowed {allowed:.3g}"


# (B, Hq, Hkv, Sq, Sk, D, Dv)
SHAPES = [
    (2, 4, 4, 1000, 1000, 128, 128),
    (1, 8, 2, 4097, 4097, 64, 64),  # GQA 4:1, ragged last block
    (1, 2, 2, 4097, 4097, 256, 256),
    (1, 4, 1, 113, 1000, 96, 96),  # chunked prefill: Sq < Sk
    (1, 4, 4, 1000, 113, 40, 40),  # Sq > Sk: leading rows see nothing
    (2, 6, 3, 777, 900, 80, 72),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}:{}-S{}x{}-D{}:{}".format(*s))
def test_gradients(shape, dtype, causal, monkeypatch):
    b, hq, hkv, sq, sk, d, dv = shape
    q, k, v, do = _inputs(*shape, dtype, seed=sum(shape))
    scale = d ** -0.5
    want, base, out, lse = _reference_grads(q, k, v, do, causal, scale)
    poison_outputs(monkeypatch)
    got = _bwd().attention_backward(do, q, k, v, out, lse, causal=causal, scale=scale, config=None)
    _check(got, want, base, (q, k, v), dtype)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_layouts_and_strides(layout, dtype, monkeypatch):
    q, k, v, do = _inputs(2, 8, 2, 513, 700, 64, 64, dtype, layout=layout, noncontig=True, seed=7)
    want, base, out, lse = _reference_grads(q, k, v, do, True, 0.125)
    poison_outputs(monkeypatch)
    got = _bwd().attention_backward(do, q, k, v, out, lse, causal=True, scale=0.125, config=None)
    _check(got, want, base, (q, k, v), dtype)


@pytest.mark.parametrize("head_dim, causal", [(64, False), (128, True), (256, True)])
def test_every_config_of_the_space(head_dim, causal, monkeypatch):
    bwd = _bwd()
    q, k, v, do = _inputs(1, 4, 2, 1030, 1030, head_dim, head_dim, torch.bfloat16, seed=head_dim)
    want, base, out, lse = _reference_grads(q, k, v, do, causal, head_dim ** -0.5)
    poison_outputs(monkeypatch)
    configs = _configs()
    for cfg in configs.backward_config_space(head_dim, atomic=True, arch=configs.arch_of_tensor(q)):
        got = bwd.attention_backward(do, q, k, v, out, lse, causal=causal, scale=head_dim ** -0.5, config=cfg)
        _check(got, want, base, (q, k, v), torch.bfloat16)


def test_the_dq_kernel_on_tiles_of_its_own(monkeypatch):
    """bench_backward's dq tiles (the dq kernel's own query and key tile, warps and stages beside the
    D=128 default's dk-dv tile): gradients within budget, causal, bf16, a ragged last block."""
    from flashdispatch.tools.bench_backward import EXTRA, parse_tiles

    bwd = _bwd()
    q, k, v, do = _inputs(1, 4, 2, 1030, 1030, 128, 128, torch.bfloat16, seed=11)
    want, base, out, lse = _reference_grads(q, k, v, do, True, 128 ** -0.5)
    poison_outputs(monkeypatch)
    own = [c for c in parse_tiles(EXTRA) if "BWD_DQ_BLOCK_M" in c]
    assert own
    for cfg in own:
        got = bwd.attention_backward(do, q, k, v, out, lse, causal=True, scale=128 ** -0.5, config=cfg)
        _check(got, want, base, (q, k, v), torch.bfloat16)


def test_deterministic_by_default():
    bwd = _bwd()
    q, k, v, do = _inputs(2, 8, 2, 2048, 2048, 128, 128, torch.bfloat16, seed=11)
    out, lse = attention_math(q, k, v, causal=True, upcast=False)
    runs = [bwd.attention_backward(do, q, k, v, out.to(q.dtype), lse.float(), causal=True, scale=0.1,
                                   config=None) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_end_to_end_through_attention(causal):
    # the Triton forward's out/lse feeding this backward through its autograd Function
    q, k, v, do = _inputs(2, 8, 2, 1500, 1700, 128, 128, torch.bfloat16, layout="bshd", seed=5)
    q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))  # the user's (B, S, H, D) tensors
    want, base = [], []
    for upcast, sink in ((True, want), (False, base)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, _ = attention_math(qq, kk, vv, causal=causal, layout="bshd", upcast=upcast)
        out.backward(do.to(out.dtype))
        sink.extend((qq.grad, kk.grad, vv.grad))
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = flashdispatch.attention(qq, kk, vv, causal=causal, layout="bshd", backend="triton")
    out.backward(do)
    _check((qq.grad, kk.grad, vv.grad), want, base, (q, k, v), torch.bfloat16)


@pytest.mark.alone  # about 25 GB of GPU memory
def test_offsets_past_2_31_elements(monkeypatch):
    # q, do, out and dq hold more than 2**31 elements: the last batch's addresses need 64 bits
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs about 25 GB of GPU memory")
    b, hq, hkv, s, d = 8300, 16, 2, 128, 128
    assert b * hq * s * d > 2**31
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, do = (torch.randn(b, hq, s, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hkv, s, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device="cuda", dtype=torch.float32)
    for i in range(0, b, 512):  # the float64 forward, a slice of batches at a time
        o, l = attention_math(q[i:i + 512], k[i:i + 512], v[i:i + 512], causal=True)
        out[i:i + 512], lse[i:i + 512] = o.to(out.dtype), l.float()
    poison_outputs(monkeypatch)
    dq, dk, dv = _bwd().attention_backward(do, q, k, v, out, lse, causal=True, scale=d ** -0.5, config=None)
    tail = slice(b - 2, b)
    want, base, _, _ = _reference_grads(q[tail], k[tail], v[tail], do[tail], True, d ** -0.5)
    _check((dq[tail], dk[tail], dv[tail]), want, base, (q[tail], k[tail], v[tail]), torch.bfloat16)
