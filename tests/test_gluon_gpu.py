"""The Gluon Hopper forward on a real GPU (pytest -m gpu; sm_90 only): fp16 and bf16, causal and not,
bottom-right causal for Sq != Sk, GQA, partial tiles (sizes that are not multiples of the 128-row
tile or the key block), both memory layouts and unaligned views, large softmax scales, rows that
see no key, more tiles than SMs (the persistent loop), the lse that the Triton backward uses, and
sliding windows (the window kernel: left edges in and on block boundaries, two-sided and
one-side-unbounded windows, Sq != Sk, gradients through the dispatcher).
Every check is against the float64 reference with the flash-attention budget; outputs are
poisoned (NaN) before each run."""

from __future__ import annotations

import os
import sys
import threading
from typing import Iterator

import pytest
import torch

from inputs import check_forward, check_grads, make_qkv

# outputs start as NaN in every test (the shared `poisoned` fixture, tests/conftest.py)
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _is_sm90() -> bool:
    return torch.cuda.is_available() and not torch.version.hip and torch.cuda.get_device_capability() == (9, 0)


requires_sm90 = pytest.mark.skipif(not _is_sm90(), reason="the Gluon forward is written for sm_90 (Hopper)")
HANG_SECONDS = 120.0


@pytest.fixture(autouse=True)
def hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """A deadlocked kernel cannot be interrupted: name the test and end the process instead of
    letting the run wait forever."""

    def fire() -> None:
        sys.stdout.write(f"\nHANG: {request.node.nodeid} did not finish within {HANG_SECONDS:.0f} s\n")
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(HANG_SECONDS, fire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()

# (B, Hq, Hkv, Sq, Sk, D, causal)
CASES = [
    (2, 4, 4, 1000, 1000, 128, True),  # partial last tile and key block
    (1, 4, 4, 2048, 2048, 128, False),  # whole tiles
    (1, 8, 2, 1023, 1023, 128, True),  # GQA 4:1
    (1, 4, 4, 113, 1027, 128, True),  # Sq < Sk: bottom-right causal (chunked prefill)
    (1, 2, 2, 1027, 113, 64, True),  # Sq > Sk: the first 914 rows see no key
    (1, 3, 1, 333, 333, 64, False),  # MQA
    (2, 2, 2, 777, 777, 64, True),
    (1, 2, 2, 64, 64, 128, True),  # one warpgroup's rows only
    (3, 5, 5, 129, 129, 128, False),  # one row past a tile
    (1, 4, 4, 1, 1000, 128, False),  # a single query row
    (1, 2, 2, 2048, 2048, 256, True),
    (1, 2, 1, 300, 517, 256, False),
    (4, 16, 4, 4096, 4096, 128, True),  # 2048 tiles: many per CTA
    (1, 2, 2, 16384, 16384, 128, True),
    (1, 1, 1, 16384, 16384, 64, False),
]


def _id(c: tuple) -> str:
    b, hq, hkv, sq, sk, d, causal = c
    return f"b{b}-h{hq}x{hkv}-sq{sq}-sk{sk}-d{d}{'-causal' if causal else ''}"


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, layout: str,
         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on bhsd views of q, k, v given in `layout`; out back in `layout`."""
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = gluon_attention_forward(q, k, v, causal=causal,
                                       scale=q.shape[-1] ** -0.5 if scale is None else scale)
    torch.cuda.synchronize()
    return (out.transpose(1, 2) if layout == "bshd" else out), lse


@requires_sm90
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward(case: tuple, dtype: str) -> None:
    b, hq, hkv, sq, sk, d, causal = case
    layout = "bshd" if (sq + d) % 2 else "bhsd"
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", layout=layout)
    out, lse = _run(q, k, v, causal, layout)
    check_forward(out, q, k, v, causal=causal, layout=layout, lse=lse)


@requires_sm90
@pytest.mark.parametrize("scale", [8.0, 30.0])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_large_scale(dtype: str, scale: float) -> None:
    """Scores of hundreds: the running max moves by large steps and exp2 underflows to 0."""
    q, k, v = make_qkv(2, 4, 2, 555, 700, 128, dtype=DTYPES[dtype], device="cuda")
    for causal in (False, True):
        out, lse = _run(q, k, v, causal, "bhsd", scale)
        check_forward(out, q, k, v, causal=causal, scale=scale, lse=lse)


@requires_sm90
def test_rows_without_keys_are_zero_with_minus_inf_lse() -> None:
    q, k, v = make_qkv(1, 2, 2, 500, 100, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = _run(q, k, v, True, "bhsd")
    blind = 500 - 100
    assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
    assert torch.isneginf(lse[:, :, :blind]).all() and torch.isfinite(lse[:, :, blind:]).all()
    check_forward(out, q, k, v, causal=True, lse=lse)


@requires_sm90
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_unaligned_and_strided_views(dtype: str) -> None:
    """Views into NaN-filled buffers (a base 6 bytes off alignment: copied for TMA) and a bshd
    view whose strides the copy engine takes as they are."""
    q, k, v = make_qkv(2, 4, 2, 300, 517, 64, dtype=DTYPES[dtype], device="cuda", noncontiguous=True)
    out, lse = _run(q, k, v, True, "bhsd")
    check_forward(out, q, k, v, causal=True, lse=lse)
    big = torch.full((2, 517, 6, 136), float("nan"), device="cuda", dtype=DTYPES[dtype])
    kk = big[:, :, :2, :128].copy_(torch.randn(2, 517, 2, 128, device="cuda"))  # bshd, row stride 816
    vv = big[:, :, 2:4, :128].copy_(torch.randn(2, 517, 2, 128, device="cuda"))
    qq = torch.randn(2, 300, 4, 128, device="cuda", dtype=DTYPES[dtype])
    out, lse = _run(qq, kk, vv, True, "bshd")
    check_forward(out, qq, kk, vv, causal=True, layout="bshd", lse=lse)


@requires_sm90
def test_deterministic_across_runs() -> None:
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, dtype=torch.bfloat16, device="cuda")
    a = _run(q, k, v, True, "bhsd")
    b = _run(q, k, v, True, "bhsd")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@requires_sm90
@pytest.mark.parametrize("case", [(1, 4, 2, 700, 700, 128, True), (2, 2, 2, 300, 1000, 64, True)], ids=_id)
def test_lse_drives_the_triton_backward(case: tuple) -> None:
    """out and lse from this forward, gradients from backward.attention_backward: within the 3x
    gradient budget of float64 autograd."""
    from flashdispatch.backends.triton.backward import attention_backward
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda")

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # type: ignore[no-untyped-def,override]
            out, lse = gluon_attention_forward(q, k, v, causal=causal, scale=d**-0.5)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, do):  # type: ignore[no-untyped-def,override]
            q, k, v, out, lse = ctx.saved_tensors
            return attention_backward(do, q, k, v, out, lse, causal=causal, scale=d**-0.5, config={})

    check_grads(Fn.apply, q, k, v, causal=causal)


@requires_sm90
def test_through_the_dispatcher() -> None:
    """backend="triton:gluon" through the public call: forward with lse, and gradients (the Triton
    backward from this forward's out and lse) within the 3x budget."""
    import flashdispatch

    q, k, v = make_qkv(2, 8, 2, 777, 777, 128, dtype=torch.bfloat16, device="cuda", layout="bshd")
    d = flashdispatch.explain(q, k, v, causal=True, layout="bshd", backend="triton:gluon")
    assert any("Gluon forward" in n for n in d.notes), d.notes
    out, lse = flashdispatch.attention(q, k, v, causal=True, layout="bshd", return_lse=True,
                                       backend="triton:gluon")
    check_forward(out, q, k, v, causal=True, layout="bshd", lse=lse)
    check_grads(lambda a, b, c: flashdispatch.attention(a, b, c, causal=True, layout="bshd", backend="triton:gluon"),
                q, k, v, causal=True, layout="bshd")


@requires_sm90
@pytest.mark.parametrize("d,config", [(64, {"CONSUMERS": 3}), (128, {"STAGES": 3, "O_SEPARATE": False}),
                                      (128, {"PINGPONG": False}), (64, {"STAGES": 4}),
                                      (64, {"CONSUMERS": 3, "BLOCK_N": 64, "STAGES": 4}), (128, {"XTILE": True}),
                                      (64, {"XTILE": True})],
                         ids=["d64-3wg", "d128-3stages-o-in-q", "d128-no-pingpong", "d64-4stages", "d64-3wg-n64",
                              "d128-xtile", "d64-xtile"])
def test_other_configs(d: int, config: dict) -> None:
    """Configs the benchmark compares (not the defaults) are as correct as the defaults."""
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    # causal 1000 x 1000: the persistent loop over many tiles; 1027 x 113: tiles whose rows see no key
    for b, hq, hkv, sq, sk, causal in ((2, 4, 2, 1000, 1000, True), (1, 3, 3, 333, 1027, True),
                                       (1, 5, 5, 1027, 113, True)):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda")
        out, lse = gluon_attention_forward(q, k, v, causal=causal, scale=d**-0.5, config=config)
        check_forward(out, q, k, v, causal=causal, lse=lse)


@requires_sm90
@pytest.mark.parametrize("xtile", [False, True], ids=["plain", "xtile"])
@pytest.mark.parametrize("order", ["head", "bottom", "pairs"])
def test_every_tile_order(order: str, xtile: bool) -> None:
    """Each tile order (the launcher picks one per call; config ORDER forces it) is exact, with one
    or many units per CTA, an odd tile count (a last unit of one tile under pairs), tiles whose rows
    see no key, and XTILE's cross-tile hand-over."""
    from flashdispatch.backends.triton import gluon_forward as gf

    config = {"ORDER": {"head": gf.ORDER_HEAD, "bottom": gf.ORDER_BOTTOM, "pairs": gf.ORDER_PAIRS}[order],
              "XTILE": xtile}
    # 8 x 9 = 72 and 3 x 9 tiles (odd); 41 heads x 8 row blocks: several rounds on 132 SMs; 1027 x 113
    for b, hq, hkv, sq, sk in ((2, 4, 2, 1100, 1100), (1, 3, 3, 1100, 2000), (1, 41, 41, 1000, 1000),
                               (1, 5, 5, 1027, 113)):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, 128, dtype=torch.bfloat16, device="cuda")
        out, lse = gf.gluon_attention_forward(q, k, v, causal=True, scale=128**-0.5, config=config)
        check_forward(out, q, k, v, causal=True, lse=lse)


@requires_sm90
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_repeated_calls_take_the_bound_kernel_with_fresh_inputs(layout: str) -> None:
    """After the compiling and the checked launches, a call signature runs the compiled launcher
    with descriptor records: every call (new tensors each time) still matches the reference."""
    from flashdispatch.backends.triton import gluon_forward as gf
    from flashdispatch.backends.triton.forward import plan_key

    b, hq, hkv, sq, sk, d = 2, 8, 2, 700, 700, 128
    for i in range(6):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda", layout=layout, seed=i)
        out, lse = _run(q, k, v, True, layout)
        check_forward(out, q, k, v, causal=True, layout=layout, lse=lse)
    views = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
    plan = gf._PLANS[plan_key(*views, True, d ** -0.5, None)]
    assert plan.launch is not None and plan.launch.kernel is not None and plan.launch.checked
    assert gf._LAUNCHER.enabled


# --- sliding window -------------------------------------------------------------------------------------

# (B, Hq, Hkv, Sq, Sk, D, causal, window): windows that hide whole key blocks or none, left edges inside a
# block and on its boundary (0, 1, 63, 64, 127, 1000), two-sided and one-side-unbounded non-causal windows,
# Sq < Sk (tiles starting past key 0), Sq > Sk (tiles and rows that see no key), GQA/MQA, partial tiles
WINDOW_CASES = [
    (2, 4, 4, 1000, 1000, 128, True, (0, 0)),  # each row sees only itself
    (1, 8, 2, 1000, 1000, 128, True, (1, 0)),  # GQA 4:1
    (1, 4, 4, 1027, 1027, 64, True, (63, 0)),
    (1, 4, 4, 777, 777, 128, True, (64, 0)),
    (1, 4, 1, 1500, 1500, 128, True, (127, 0)),  # MQA
    (2, 4, 2, 2100, 2100, 128, True, (1000, 0)),
    (1, 4, 4, 113, 1027, 128, True, (127, 0)),  # Sq < Sk: chunked prefill against a cache
    (1, 4, 4, 1027, 300, 64, True, (63, 0)),  # Sq > Sk: 727 rows see no key
    (1, 4, 2, 700, 700, 128, False, (63, 130)),
    (1, 4, 4, 333, 777, 64, False, (50, 90)),
    (1, 2, 2, 1027, 129, 256, False, (0, 5)),  # Sq > Sk, non-causal: rows whose window ends before key 0
    (1, 4, 4, 600, 600, 128, False, (-1, 7)),  # unbounded left
    (1, 4, 4, 600, 600, 128, False, (200, -1)),  # unbounded right
    (1, 2, 2, 1000, 1000, 256, True, (127, 0)),
    (1, 2, 2, 8192, 8192, 128, True, (4095, 0)),  # Mistral's window
]


def _wid(c: tuple) -> str:
    return f"{_id(c[:7])}-w{c[7][0]}_{c[7][1]}"


@requires_sm90
@pytest.mark.parametrize("case", WINDOW_CASES, ids=_wid)
def test_window_forward(case: tuple) -> None:
    """out and lse of the window kernel (bf16; fp16 on the D=128 cases) against the float64 reference,
    in both layouts (by the case's parity); lse is -inf exactly on the rows that see no key."""
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    b, hq, hkv, sq, sk, d, causal, window = case
    layout = "bshd" if (sq + d + window[0]) % 2 else "bhsd"
    for dtype in ("bf16", "fp16") if d == 128 and sq < 8192 else ("bf16",):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], device="cuda", layout=layout)
        views = (q, k, v) if layout == "bhsd" else tuple(t.transpose(1, 2) for t in (q, k, v))
        out, lse = gluon_attention_forward(*views, causal=causal, scale=d**-0.5, window=window)
        torch.cuda.synchronize()
        out = out.transpose(1, 2) if layout == "bshd" else out
        check_forward(out, q, k, v, causal=causal, layout=layout, lse=lse, window=window)


@requires_sm90
@pytest.mark.parametrize("d,config", [(128, {"XTILE": True}), (64, {"CONSUMERS": 3, "BLOCK_N": 64, "STAGES": 4}),
                                      (128, {"STAGES": 3, "O_SEPARATE": False}), (64, {"CONSUMERS": 3}),
                                      (64, {"XTILE": True})],
                         ids=["d128-xtile", "d64-3wg-n64", "d128-3stages-o-in-q", "d64-3wg", "d64-xtile"])
def test_window_other_configs(d: int, config: dict) -> None:
    """The window under the configs whose tile hand-over differs (XTILE carries a tile's last P V
    into the next tile, which may start past key 0 or see no key at all)."""
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    for b, hq, hkv, sq, sk, causal, window in ((2, 4, 2, 1000, 1000, True, (100, 0)),
                                               (1, 3, 3, 1027, 300, True, (63, 0)),
                                               (1, 3, 3, 333, 1027, False, (1, 64))):
        q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda")
        out, lse = gluon_attention_forward(q, k, v, causal=causal, scale=d**-0.5, config=config, window=window)
        check_forward(out, q, k, v, causal=causal, lse=lse, window=window)


@requires_sm90
@pytest.mark.parametrize("layout,causal,window,shape", [
    ("bshd", True, (63, 0), (2, 8, 2, 777, 777, 128)),
    ("bhsd", False, (50, 90), (1, 4, 4, 300, 517, 64)),
], ids=["bshd-causal-w63", "bhsd-w50_90-sq-lt-sk"])
def test_window_through_the_dispatcher(layout: str, causal: bool, window: tuple, shape: tuple) -> None:
    """backend="triton:gluon" with a window: the notes say it is fused, the forward (with lse) and the
    gradients (the Triton backward, given the window) within budget."""
    import flashdispatch

    b, hq, hkv, sq, sk, d = shape
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16, device="cuda", layout=layout)
    kw = dict(causal=causal, layout=layout, window=window, backend="triton:gluon")
    dec = flashdispatch.explain(q, k, v, **kw)
    assert dec.variant == "triton:gluon" and any("outside the window are skipped" in n for n in dec.notes)
    out, lse = flashdispatch.attention(q, k, v, return_lse=True, **kw)
    check_forward(out, q, k, v, causal=causal, layout=layout, lse=lse, window=window)
    check_grads(lambda a, b_, c: flashdispatch.attention(a, b_, c, **kw), q, k, v, causal=causal, layout=layout,
                window=window)
