"""Every bad input raises TypeError/ValueError naming the argument, what was expected and what came."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from inputs import make_qkv


def _qkv(**kw):
    return make_qkv(1, 4, 2, 8, 8, 16, **kw)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, ["q", "4-d", "3-d"]),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, ["k", "4-d", "5-d"]),
        (lambda q, k, v: (q, k.half(), v), TypeError, ["k.dtype", "float32", "float16"]),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, ["q.dtype", "int32"]),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, ["device", "cpu", "meta"]),
        (lambda q, k, v: (q, k[:, :, :, :8], v), ValueError, ["head dim", "16", "8"]),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, ["heads", "Hq=3", "Hkv=2"]),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, ["v heads/seqlen", "(2, 8)", "(2, 5)"]),
        (lambda q, k, v: (q, k[:1].expand(1, 2, 8, 16), v), ValueError, []),  # control: valid
        (lambda q, k, v: (q.numpy(), k, v), TypeError, ["q", "torch.Tensor", "ndarray"]),
    ],
)
def test_tensor_validation(mutate, exc, words):
    q, k, v = _qkv()
    a, b, c = mutate(q, k, v)
    if not words:
        fd.attention(a, b, c)
        return
    with pytest.raises(exc) as ei:
        fd.attention(a, b, c)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_batch_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"batch size of k/v: expected q's batch 1, got 2/2"):
        fd.attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1))


@pytest.mark.parametrize("layout", ["BHSD", "bsh", "", None])
def test_bad_layout(layout):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"layout: expected one of \('bhsd', 'bshd'\), got"):
        fd.attention(q, k, v, layout=layout)


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_scale(scale, exc):
    q, k, v = _qkv()
    with pytest.raises(exc, match="scale"):
        fd.attention(q, k, v, scale=scale)


def test_bad_causal_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="causal: expected a bool, got int"):
        fd.attention(q, k, v, causal=1)


def test_unknown_backend_argument_lists_valid_names():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend: unknown backend 'flash2'; expected one of: .*sdpa:cudnn"):
        fd.attention(q, k, v, backend="flash2")


def test_validation_survives_the_hot_path_cache():
    """A bad call after a good one with the same shapes still raises (the cache key covers it)."""
    q, k, v = _qkv()
    fd.attention(q, k, v)
    with pytest.raises(TypeError):
        fd.attention(q, k.half(), v)
    with pytest.raises(ValueError):
        fd.attention(q, k, v, scale=-2.0)


def test_explain_shape_validation():
    with pytest.raises(ValueError, match=r"shape: expected \(B, Hq, Hkv, Sq, Sk, D\)"):
        fd.explain(shape=(1, 2, 3))
    with pytest.raises(ValueError, match="device: expected one of"):
        fd.explain(shape=(1, 2, 2, 4, 4, 16), device="tpu")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        fd.explain(shape=(1, 2, 2, 4, 4, 16), dtype="fp8")
    with pytest.raises(TypeError, match="either tensors"):
        q, k, v = _qkv()
        fd.explain(q, k, v, shape=(1, 2, 2, 4, 4, 16))
