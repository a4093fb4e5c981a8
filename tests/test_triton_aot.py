"""Ahead-of-time compile checks (CPU, no GPU): every Triton kernel with every config the defaults
(and shipped profiles) can choose compiles for cuda sm_80, sm_90, hip gfx90a and gfx942, and its
shared memory / LDS (the compiler's own figure) fits the target."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from flashdispatch.tools.aot_triton import TARGETS, check_configs, default_cases, make_case  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="kernels defined under the interpreter cannot be compiled ahead of time",
)


# Register spill stores per thread (ptxas -v) allowed at the defaults, per NVIDIA target and kernel;
# a case with window + softcap + sinks compiled in may spill VARIANT_EXTRA more. sm_90's backward
# at D 64/128 runs its measured-best tiles (80-1008 B, up to 1724 B with the variants: listed, not held);
# sm_80's tiles are chosen by their spills.
SPILL_LIMITS: dict[str, dict[str, int]] = {
    "cuda:sm_90": {"forward": 128, "forward_tma": 128, "varlen_forward": 128, "varlen_forward_tma": 128,
                   "decode": 256, "paged_decode": 256, "decode_merge": 0},
    "cuda:sm_80": {"forward": 128, "varlen_forward": 128, "decode": 256, "paged_decode": 256, "decode_merge": 0,
                   "bwd_dkdv": 256, "bwd_dq": 256},
}
# AMD (VGPR spills, 4 B per register per lane): the forward runs AMD's published tiles, which spill
# 40-43 VGPRs at D=128 in these kernels (listed under the limit); the backward's tiles spill none.
_AMD_LIMITS = {"forward": 192, "varlen_forward": 192, "decode": 128, "paged_decode": 128, "decode_merge": 0,
               "bwd_dkdv": 0, "bwd_dq": 0}
SPILL_LIMITS["hip:gfx942"] = SPILL_LIMITS["hip:gfx90a"] = _AMD_LIMITS
VARIANT_EXTRA = 128


# Each target's cases are compiled in this many tests (every PARTS-th case from a different start),
# so that -n spreads one target's compiles over the workers.
PARTS = 3


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_defaults_cover_every_kernel(target: str) -> None:
    cases = default_cases(target)
    kernels = {c.kernel for c in cases}
    assert {"forward", "varlen_forward", "decode", "paged_decode", "decode_merge", "bwd_preprocess", "bwd_dkdv",
            "bwd_dq"} <= kernels, kernels
    assert any(c.variants for c in cases), "no window/softcap/sinks case"
    if target == "cuda:sm_90":
        assert {"forward_tma", "varlen_forward_tma"} <= kernels, kernels


@pytest.mark.slow
@pytest.mark.parametrize("part", range(PARTS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_defaults_compile_and_fit(target: str, part: int) -> None:
    """Every default (and shipped profile) config of `target` compiles and fits; part `part` of them."""
    results = check_configs([target], default_cases(target)[part::PARTS])
    bad = [str(r) for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    assert all(r.shared is not None and 0 <= r.shared <= r.limit for r in results)
    limits = SPILL_LIMITS.get(target)
    if limits:
        read = [r for r in results if r.extra.get("spill_bytes") is not None]
        if not read:
            pytest.skip("no ptxas on this machine: spills not read")
        over = [str(r) for r in read if r.case.origin == "default" and r.case.kernel in limits
                and r.case.dtype != "fp32"  # fp32: a correctness path (IEEE dots), listed, not held
                and r.extra["spill_bytes"] > limits[r.case.kernel] + (VARIANT_EXTRA if r.case.variants else 0)]
        assert not over, "\n".join(over)


@pytest.mark.slow
def test_spill_check_can_fail() -> None:
    """The TMA tiles of D=128 causal on the pointer kernel (what packed sequences once ran) spill."""
    case = make_case("varlen_forward", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                     head_dim=128, causal=True, dtype="bf16")
    (r,) = check_configs(["cuda:sm_90"], [case])
    if r.extra.get("spill_bytes") is None:
        pytest.skip("no ptxas on this machine: spills not read")
    assert r.ok and r.extra["spill_bytes"] > SPILL_LIMITS["cuda:sm_90"]["varlen_forward"], str(r)


@pytest.mark.slow
def test_oversized_config_is_reported() -> None:
    """A tile that cannot fit 64 KiB of LDS comes back as a failed result, not an exception."""
    case = make_case("forward", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
                     head_dim=256, causal=False)
    (r,) = check_configs(["hip:gfx942"], [case])
    assert not r.ok
    assert (r.compiled and r.shared is not None and r.shared > r.limit) or not r.compiled


@pytest.mark.slow
def test_odd_head_dim_and_fp32_compile() -> None:
    cases = [make_case("forward", {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, head_dim=72,
                       dtype="bf16", causal=True),
             make_case("forward", {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, head_dim=40,
                       head_dim_v=96, dtype="fp32")]
    results = check_configs(["cuda:sm_80", "hip:gfx90a"], cases)
    assert all(r.ok for r in results), "\n".join(str(r) for r in results)


def test_a_config_too_large_for_dv_shrinks_until_it_fits(caplog: pytest.LogCaptureFixture) -> None:
    from flashdispatch.backends.triton import configs

    tuned_for_d64 = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
    assert configs.shrink_to_fit(tuned_for_d64, "sm_90", 64, 64) is tuned_for_d64  # fits: untouched
    assert not configs.fits_shared_memory(tuned_for_d64, "sm_90", 64, 256)  # Dv=256 V tiles
    with caplog.at_level("WARNING", logger="flashdispatch"):
        got = configs.shrink_to_fit(tuned_for_d64, "sm_90", 64, 256)
    assert configs.fits_shared_memory(got, "sm_90", 64, 256) and got["BLOCK_M"] == 128
    assert got["num_stages"] < 3 or got["BLOCK_N"] < 128
    assert any("does not fit" in r.getMessage() for r in caplog.records)
    amd = configs.shrink_to_fit({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}, "gfx942", 256, 256)
    assert configs.fits_shared_memory(amd, "gfx942", 256, 256)


def test_pointer_config_replaces_tma_tiles() -> None:
    """A TMA config that must run on the pointer kernel takes the pointer tiles of its head-dim
    bucket (the 4-warp TMA tiles spill there); other configs, and the interpreter's tiles, stay."""
    from flashdispatch.backends.triton import configs

    tma = configs.forward_defaults("sm_90", 128, True, 4096, 4096)
    assert tma.get("TMA")
    got = configs.pointer_config(tma, "sm_90", 128)
    assert "TMA" not in got and "WS" not in got
    assert {k: got[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} == configs.POINTER_DEFAULTS["sm_90"][128]
    assert configs.pointer_config({**tma, "WS": True}, "sm_90", 200) == {**got, **configs.POINTER_DEFAULTS["sm_90"][256]}
    plain = configs.forward_defaults("sm_90", 64, True)
    assert not plain.get("TMA") and configs.pointer_config(plain, "sm_90", 64) is plain
    tiles = {"BLOCK_M": 16, "BLOCK_N": 16, "TMA": True}
    assert configs.pointer_config(tiles, "interpreter", 32) == {"BLOCK_M": 16, "BLOCK_N": 16}
