"""The Triton backward kernels (dq, dk, dv) under Triton's CPU interpreter.

Gradients are checked against float64 autograd of the reference attention with flash-attention's
3x budget (tolerances.within_budget(grad=True)); out and lse come from the float64 reference
forward, so these tests hold the backward alone to account. fp32 and fp16 only: bf16 tl.dot is
garbage in the interpreter (the GPU tests cover bf16). Small tiles (16 x 32) so that odd sizes
cross several blocks and every masked/unmasked loop runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterator

import pytest
import torch

pytest.importorskip("triton")

from flashdispatch.backends.triton import configs  # noqa: E402
from flashdispatch.reference import attention_math  # noqa: E402
from flashdispatch.tolerances import within_budget  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter indexes ranges with 1-element arrays (numpy >= 1.25 warns; harmless)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
MODULE = "flashdispatch.backends.triton.backward"
bwd: ModuleType  # bound by the fixture below


@pytest.fixture(scope="module", autouse=True)
def backward_module(triton_interpreter_state: None) -> Iterator[ModuleType]:
    """The backward module with its kernels defined under the interpreter (CPU; the shared fixture,
    tests/conftest.py, restores the compiled kernels afterwards) or compiled (GPU)."""
    global bwd
    bwd = importlib.import_module(MODULE)
    yield bwd


SMALL = {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 32}


def _tensor(shape_bhsd: tuple[int, int, int, int], dtype: torch.dtype, layout: str, noncontig: bool,
            gen: torch.Generator) -> torch.Tensor:
    b, h, s, d = shape_bhsd
    if layout == "bhsd":
        t = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    else:  # stored (B, S, H, D); the kernel sees the bhsd-indexed view
        t = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)
    t = t.to(DEVICE, dtype)
    if noncontig:
        # a view into a larger NaN buffer: odd strides, and any read outside the view is NaN
        big = torch.full((b, h + 1, s + 3, d + 8), float("nan"), device=DEVICE, dtype=dtype)
        big[:, 1:, 2:2 + s, 5:5 + d] = t
        t = big[:, 1:, 2:2 + s, 5:5 + d]
    return t


def check_backward(
    b: int, hq: int, hkv: int, sq: int, sk: int, d: int, *, causal: bool, dtype: torch.dtype,
    dv: int | None = None, layout: str = "bhsd", noncontig: bool = False,
    config: dict | None = None, scale: float | None = None, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = _tensor((b, hq, sq, d), dtype, layout, noncontig, gen)
    k = _tensor((b, hkv, sk, d), dtype, layout, noncontig, gen)
    v = _tensor((b, hkv, sk, dv), dtype, layout, noncontig, gen)
    do = _tensor((b, hq, sq, dv), dtype, layout, noncontig, gen)
    scale = d ** -0.5 if scale is None else scale

    grads = []
    for upcast in (True, False):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = attention_math(qq, kk, vv, causal=causal, scale=scale, upcast=upcast)
        out.backward(do.to(out.dtype))
        grads.append((qq.grad, kk.grad, vv.grad))
        if upcast:
            ref_out, ref_lse = out.detach().to(dtype), lse.detach().float()
    got = bwd.attention_backward(do, q, k, v, ref_out, ref_lse, causal=causal, scale=scale,
                                 config=SMALL if config is None else config)
    for name, g, want, base, t in zip("qkv", got, grads[0], grads[1], (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype, f"d{name}: {g.shape} {g.dtype}"
        ok, err, allowed = within_budget(g, base, want, dtype, grad=True)
        assert ok, f"d{name} error {err:.3g} > allowed {allowed:.3g}"
    return got


# (B, Hq, Hkv, Sq, Sk, D): odd sizes; GQA 4:1; Sq < Sk and Sq > Sk (bottom-right causal)
SHAPES = [
    (1, 2, 2, 17, 17, 40),
    (2, 4, 1, 113, 113, 64),
    (1, 4, 1, 17, 113, 96),
    (1, 2, 2, 113, 17, 64),
    (1, 2, 1, 1, 17, 64),
]


def _id(s: tuple[int, ...]) -> str:
    return "B{}-H{}:{}-S{}x{}-D{}".format(*s)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_gradients(shape: tuple[int, ...], dtype: torch.dtype, causal: bool, poisoned: None) -> None:
    check_backward(*shape, causal=causal, dtype=dtype, seed=hash(shape) % 1000)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_layouts_and_strides(layout: str, poisoned: None) -> None:
    check_backward(2, 4, 2, 33, 70, 40, causal=True, dtype=torch.float16, layout=layout, noncontig=True)


def test_value_head_dim_differs(poisoned: None) -> None:
    check_backward(1, 2, 1, 33, 47, 40, dv=72, causal=True, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_default_tiles(dtype: torch.dtype, poisoned: None) -> None:
    # the shipped tiles (fp16: 32 x 128, fp32: 32 x 64): several query blocks per kv block, partial
    # blocks at both ends
    check_backward(1, 2, 2, 150, 140, 64, causal=True, dtype=dtype, config={})


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_atomic_dq(causal: bool, poisoned: None) -> None:
    cfg = {**SMALL, "BWD_DQ_ATOMIC": True}
    check_backward(1, 4, 1, 50, 113, 64, causal=causal, dtype=torch.float32, config=cfg)
    check_backward(1, 2, 2, 113, 50, 40, causal=causal, dtype=torch.float16, config=cfg)


def test_rows_that_see_nothing_get_zero_dq(poisoned: None) -> None:
    # Sq > Sk causal: the first Sq - Sk rows see no key (lse = -inf): dq is exactly 0 there, no NaN
    dq, dk, dv = check_backward(1, 2, 2, 40, 9, 64, causal=True, dtype=torch.float32)
    assert torch.equal(dq[:, :, :31], torch.zeros_like(dq[:, :, :31]))
    assert not any(torch.isnan(t).any() for t in (dq, dk, dv))


def test_deterministic() -> None:
    first = check_backward(1, 2, 1, 70, 70, 64, causal=True, dtype=torch.float16, seed=3)
    again = check_backward(1, 2, 1, 70, 70, 64, causal=True, dtype=torch.float16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_empty_sequence_gives_zero_gradients() -> None:
    q = torch.randn(1, 2, 5, 16, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 2, 0, 16, device=DEVICE, dtype=torch.float16)
    out = torch.zeros(1, 2, 5, 16, device=DEVICE, dtype=torch.float16)
    lse = torch.full((1, 2, 5), float("-inf"), device=DEVICE)
    dq, dk, dv = bwd.attention_backward(torch.randn_like(out), q, k, k, out, lse, causal=True, scale=0.25,
                                        config=None)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == k.shape


def _with_dq(cfg: dict) -> dict:
    """A backward config completed as the launcher completes it: the dq kernel's keys from the
    dk-dv ones (tiles swapped, launch the same)."""
    return {"BWD_DQ_BLOCK_M": cfg["BWD_BLOCK_N"], "BWD_DQ_BLOCK_N": cfg["BWD_BLOCK_M"],
            "BWD_DQ_num_warps": cfg["BWD_num_warps"], "BWD_DQ_num_stages": cfg["BWD_num_stages"], **cfg}


@pytest.mark.parametrize(
    "config, match",
    [({"BWD_BLOCK_M": 24}, "BWD_BLOCK_M"), ({"BWD_num_warps": 3}, "BWD_num_warps"),
     ({"BWD_DQ_ATOMIC": 1}, "BWD_DQ_ATOMIC"), ({"BWD_DQ_BLOCK_N": 8}, "BWD_DQ_BLOCK_N"),
     ({"BWD_DQ_num_stages": 0}, "BWD_DQ_num_stages")],
)
def test_bad_config_names_the_key(config: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        configs.resolve_backward_config(config, 64, 64)


def test_bad_shapes_name_the_argument() -> None:
    q = torch.randn(1, 2, 5, 16)
    lse = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="lse"):
        bwd.attention_backward(q, q, q, q, q, lse[:, :, :4], causal=False, scale=1.0, config=None)
    with pytest.raises(ValueError, match="heads"):
        k = torch.randn(1, 3, 5, 16)
        bwd.attention_backward(q, q, k, k, q, lse, causal=False, scale=1.0, config=None)


@pytest.mark.parametrize("head_dim", [40, 64, 96, 128, 200, 256])
def test_config_space_is_valid_data(head_dim: int) -> None:
    space = configs.backward_config_space(head_dim)
    assert space[0] == configs.default_backward_config(head_dim)
    assert not any(c["BWD_DQ_ATOMIC"] for c in space), "atomic dq only on request"
    with_atomic = configs.backward_config_space(head_dim, atomic=True)
    assert any(c["BWD_DQ_ATOMIC"] for c in with_atomic)
    assert all(configs.resolve_backward_config(c, head_dim, head_dim) == _with_dq(c) for c in with_atomic)
    fp32 = configs.default_backward_config(head_dim, fp32=True)
    assert configs.backward_config_space(head_dim, fp32=True) == [fp32]
    assert configs.resolve_backward_config(None, head_dim, head_dim, fp32=True) == _with_dq(fp32)


def test_the_dq_kernel_takes_its_own_tiles_or_the_swapped_pair(poisoned: None) -> None:
    """Without BWD_DQ_* keys the dq kernel runs the dk-dv tiles swapped; with them, its own tile
    and launch, and the gradients stay within budget (checked against float64 in the
    interpreter)."""
    own = {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 2,
           "BWD_DQ_BLOCK_M": 16, "BWD_DQ_BLOCK_N": 32, "BWD_DQ_num_warps": 2, "BWD_DQ_num_stages": 1}
    resolved = configs.resolve_backward_config(own, 64, 64)
    assert {k: resolved[k] for k in own} == own
    assert configs.resolve_backward_config({"BWD_BLOCK_M": 16}, 64, 64)["BWD_DQ_BLOCK_N"] == 16
    calls: list[dict] = []
    real = bwd._bwd_dq_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launch_keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
                calls.append({"grid": grid, **{k: kw[k] for k in launch_keys}})
                return real[grid](*args, **kw)
            return launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bwd, "_bwd_dq_kernel", Spy())
        check_backward(1, 2, 1, 40, 50, 64, causal=True, dtype=torch.float16, config=own, seed=7)
        check_backward(1, 2, 1, 40, 50, 64, causal=True, dtype=torch.float16, seed=7)
    assert calls[0] == {"grid": (3 * 2,), "BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 2, "num_stages": 1}
    # check_backward's own small tile, swapped, with the dk-dv kernel's launch options
    default = configs.default_backward_config(64)
    assert calls[1] == {"grid": (2 * 2,), "BLOCK_M": SMALL["BWD_BLOCK_N"], "BLOCK_N": SMALL["BWD_BLOCK_M"],
                        "num_warps": default["BWD_num_warps"], "num_stages": default["BWD_num_stages"]}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_config_of_the_space(head_dim: int, poisoned: None) -> None:
    for cfg in configs.backward_config_space(head_dim):
        check_backward(1, 2, 1, 40, 50, head_dim, causal=True, dtype=torch.float16, config=cfg, seed=5)


def test_aot_specs_cover_every_argument() -> None:
    from flashdispatch.backends.triton import aot

    for kern in aot.backward_kernels():
        for dtype in ("fp16", "bf16", "fp32"):
            spec = kern.spec(configs.default_backward_config(96), dtype, 96, 96, True)
            assert set(spec.signature) == set(kern.fn.arg_names), kern.name
            assert all(spec.signature[n] == "constexpr" for n in spec.constexprs)


@pytest.mark.parametrize("arch", ["sm_80", "gfx942", "gfx90a"])
def test_the_arch_table_leads_the_launcher_and_the_tuner_alike(arch: str) -> None:
    """On sm_80 and AMD the backward's default tiles are that arch's own (chosen by their spills),
    for the launcher (resolve_backward_config) and first in the tuner's space; sm_90 and the
    interpreter keep the shared (measured) table."""
    from flashdispatch.backends.triton import configs

    for d in (64, 128, 256):
        own = {**configs.BACKWARD_DEFAULTS_BY_ARCH[arch][configs.padded_head_dim(d)], "BWD_DQ_ATOMIC": False}
        assert configs.resolve_backward_config(None, d, d, arch=arch) == _with_dq(own)
        assert configs.backward_config_space(d, arch=arch)[0] == own
        shared = configs.default_backward_config(d)
        assert own != shared
        assert configs.resolve_backward_config(None, d, d, arch="sm_90") == _with_dq(shared)
        assert configs.resolve_backward_config(None, d, d, arch="interpreter") == _with_dq(shared)
        # a config's BWD_* keys still win over any table
        assert configs.resolve_backward_config({"BWD_BLOCK_N": 64}, d, d, arch=arch)["BWD_BLOCK_N"] == 64
