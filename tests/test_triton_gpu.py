"""The Triton backend on a real GPU (pytest -m gpu): bf16 and fp16, S up to 16k, D up to 256,
decode shapes, tensor-descriptor and warp-specialised configs on Hopper, tensors over 2^31
elements, and agreement with the SDPA backend. Every check is against the float64 reference with
the flash-attention budget (tolerances.within_budget); outputs are poisoned before each run."""

from __future__ import annotations

import pytest
import torch

import flashdispatch
from flashdispatch.reference import attention_math
from flashdispatch.tolerances import within_budget

from inputs import check_forward, make_qkv

# outputs start as NaN in every test (the shared `poisoned` fixture, tests/conftest.py)
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_hopper() -> bool:
    return torch.cuda.is_available() and not torch.version.hip and torch.cuda.get_device_capability()[0] >= 9


# (B, Hq, Hkv, Sq, Sk, D, causal): odd sizes, GQA, Sq != Sk both ways, S up to 16k, D up to 256
FORWARD_CASES = [
    (2, 4, 4, 1000, 1000, 64, True),
    (1, 4, 4, 2048, 2048, 128, False),
    (1, 8, 2, 1023, 1023, 128, True),
    (1, 4, 4, 113, 1027, 128, True),
    (1, 2, 2, 1027, 113, 96, True),
    (1, 3, 1, 333, 333, 40, False),
    (1, 2, 2, 777, 777, 72, True),
    (1, 2, 1, 1500, 1500, 80, True),
    (1, 2, 2, 2048, 2048, 256, True),
    (1, 2, 2, 16384, 16384, 128, True),
    (1, 1, 1, 16384, 16384, 64, False),
]


def _id(c: tuple) -> str:
    b, hq, hkv, sq, sk, d, causal = c
    return f"b{b}-h{hq}x{hkv}-sq{sq}-sk{sk}-d{d}{'-causal' if causal else ''}"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", FORWARD_CASES, ids=_id)
def test_forward_matrix(case: tuple, dtype: str) -> None:
    b, hq, hkv, sq, sk, d, causal = case
    layout = "bshd" if (sq + d) % 2 else "bhsd"
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", layout=layout)
    out, lse = flashdispatch.attention(q, k, v, causal=causal, layout=layout, return_lse=True,
                                       backend="triton:tl")
    check_forward(out, q, k, v, causal=causal, layout=layout, lse=lse)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_noncontiguous(dtype: str) -> None:
    q, k, v = make_qkv(2, 4, 2, 300, 517, 64, dtype=DTYPES[dtype], device="cuda", noncontiguous=True)
    out, lse = flashdispatch.attention(q, k, v, causal=True, return_lse=True, backend="triton:tl")
    check_forward(out, q, k, v, causal=True, lse=lse)


DECODE_CASES = [
    (1, 32, 8, 1, 8192, 128, False),
    (8, 32, 8, 1, 8192, 128, False),
    (64, 32, 8, 1, 2048, 128, False),
    (2, 16, 2, 5, 1000, 64, True),
    (1, 8, 8, 16, 4099, 256, True),
    (3, 6, 1, 3, 777, 72, True),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", DECODE_CASES, ids=_id)
def test_decode(case: tuple, dtype: str) -> None:
    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", layout="bshd")
    d_ = flashdispatch.explain(q, k, v, causal=causal, layout="bshd", backend="triton:tl")
    assert any("split-KV" in n for n in d_.notes), d_.notes
    out, lse = flashdispatch.attention(q, k, v, causal=causal, layout="bshd", return_lse=True,
                                       backend="triton:tl")
    check_forward(out, q, k, v, causal=causal, layout="bshd", lse=lse)


@pytest.mark.parametrize("splits", [1, 3, 64])
def test_decode_splits(splits: int) -> None:
    from flashdispatch.backends.triton.decode import decode_forward

    q, k, v = make_qkv(2, 8, 2, 2, 3000, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = decode_forward(q, k, v, causal=True, scale=128**-0.5,
                              config={"NUM_SPLITS": splits, "BLOCK_N": 32})
    check_forward(out, q, k, v, causal=True, lse=lse)


HOPPER_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "TMA": True, "WS": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": True, "WS": True},
]


@pytest.mark.skipif(not _is_hopper(), reason="tensor descriptors / warp specialisation: Hopper only")
@pytest.mark.parametrize("cfg", HOPPER_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("case", [(1, 4, 2, 1000, 1000, 128, True), (2, 2, 2, 333, 1111, 64, True),
                                  (1, 2, 2, 517, 517, 96, False)], ids=_id)
def test_hopper_configs(case: tuple, cfg: dict) -> None:
    from flashdispatch.backends.triton.forward import attention_forward

    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda", layout="bshd")
    qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = attention_forward(qv, kv, vv, causal=causal, scale=d**-0.5, config=cfg)
    check_forward(out.transpose(1, 2), q, k, v, causal=causal, layout="bshd", lse=lse)


@pytest.mark.skipif(not _is_hopper(), reason="the descriptor kernel's fallback: Hopper only")
@pytest.mark.parametrize("d,causal", [(128, True), (256, False)], ids=["d128-causal", "d256"])
def test_unaligned_tensors_fall_back_to_the_pointer_tiles(d: int, causal: bool) -> None:
    """Inputs whose base is not 16-byte aligned cannot be described to the copy engine: a TMA default
    (D=128 causal, D=256) runs on the pointer kernel with pointer tiles (configs.pointer_config),
    poisoned output rewritten, against the float64 reference."""
    from flashdispatch.backends.triton import configs
    from flashdispatch.backends.triton.forward import attention_forward

    assert configs.forward_defaults("sm_90", d, causal, 1000, 1000).get("TMA")
    b, h, s = 1, 4, 1000
    g = torch.Generator(device="cuda").manual_seed(11)

    def unaligned() -> torch.Tensor:  # one element past an aligned base: 2 bytes off
        flat = torch.randn(b * s * h * d + 1, device="cuda", generator=g).to(torch.bfloat16)
        return flat[1:].view(b, s, h, d)

    q, k, v = unaligned(), unaligned(), unaligned()
    assert q.data_ptr() % 16
    out, lse = attention_forward(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal, scale=d ** -0.5,
                                 config={})
    check_forward(out.transpose(1, 2), q, k, v, causal=causal, layout="bshd", lse=lse)


def test_over_2_31_elements() -> None:
    """64-bit offsets: q/k/v/out of 2^31 + 2^17 elements; the last batches are checked."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    b, h, s, d = 2**31 // (1024 * 128) + 1, 1, 1024, 128
    g = torch.Generator(device="cuda")
    g.manual_seed(7)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    assert q.numel() > 2**31
    out, lse = flashdispatch.attention(q, k, v, causal=True, return_lse=True, backend="triton:tl")
    tail = slice(b - 2, b)
    check_forward(out[tail], q[tail], k[tail], v[tail], causal=True, lse=lse[tail])
    del q, k, v, out, lse
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", [(2, 16, 16, 1024, 1024, 128, True), (4, 32, 8, 1, 2048, 128, False),
                                  (1, 8, 2, 512, 2048, 64, True)], ids=_id)
def test_agrees_with_sdpa(case: tuple, dtype: str) -> None:
    """The triton result is as close to float64 as the SDPA backend's (within the 2x budget)."""
    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda")
    ours = flashdispatch.attention(q, k, v, causal=causal, backend="triton:tl")
    theirs = flashdispatch.attention(q, k, v, causal=causal, backend="sdpa")
    ref, _ = attention_math(q, k, v, causal=causal, upcast=True)
    ok, err, allowed = within_budget(ours, theirs, ref, q.dtype)
    assert ok, f"triton error {err:.3g} > 2 x sdpa's + floor = {allowed:.3g}"


@pytest.mark.parametrize("case", [(2, 8, 8, 1000, 1000, 128, False), (2, 8, 2, 777, 777, 64, True),
                                  (1, 32, 8, 1, 8192, 128, False), (64, 32, 8, 1, 2048, 128, False)], ids=_id)
def test_direct_launch_matches_jit(case: tuple) -> None:
    """Launches after the first skip Triton's JIT dispatch (launch.py); the first of them is
    checked against a JIT launch. Results stay bitwise equal and the direct path stays on."""
    from flashdispatch.backends.triton import decode, forward

    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda")
    # call 1 compiles, 2 is the checked direct launch, 3 hands the kernel to the plan, 4-5 are the plan's own
    runs = [flashdispatch.attention(q, k, v, causal=causal, return_lse=True, backend="triton:tl") for _ in range(5)]
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    check_forward(runs[-1][0], q, k, v, causal=causal, lse=runs[-1][1])
    launchers = (forward._FWD, forward._FWD_TMA, decode._SPLIT, decode._MERGE)
    assert all(la.enabled for la in launchers)
    assert any(la.verified for la in launchers)


def test_direct_launch_in_cuda_graph() -> None:
    q, k, v = make_qkv(1, 32, 8, 1, 4096, 128, dtype=torch.bfloat16, device="cuda")
    ref = flashdispatch.attention(q, k, v, backend="triton:tl")
    flashdispatch.attention(q, k, v, backend="triton:tl")  # first direct launch: checked outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = flashdispatch.attention(q, k, v, backend="triton:tl")
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    check_forward(out, q, k, v, causal=False)
    assert not torch.equal(out, ref)
