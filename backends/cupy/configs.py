"""Kernel configurations of the cupy backend: the one place that says which exist.

A config is the dict a profile stores under `cupy:` (and that run() receives):
``{"BLOCK_M", "BLOCK_N", "WARPS"}`` for the forward kernel (BLOCK_M query rows per CTA, BLOCK_N
keys per step) and ``{"BWD_BLOCK_M", "BWD_BLOCK_N", "BWD_WARPS"}`` for the two backward kernels,
which share one shape: each CTA owns BWD_BLOCK_N rows (key rows for dK/dV, query rows for dQ) and
walks the other sequence BWD_BLOCK_M at a time. Optional ``{"DQ_BLOCK_M", "DQ_BLOCK_N",
"DQ_WARPS"}`` give the dQ kernel a shape of its own (DQ_BLOCK_M query rows per CTA, DQ_BLOCK_N
keys per step): its accumulators are half those of dK/dV, so it can own more rows per warp.
Defaults, the tuner's space, the nvcc check and `warmup` all read the tables below.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, NamedTuple

HEAD_DIMS: tuple[int, ...] = (32, 64, 96, 128, 256)
# dK and dV accumulators of 16 rows x D each would not fit the register file for D = 256.
BACKWARD_HEAD_DIMS: tuple[int, ...] = (32, 64, 96, 128)
DTYPE_NAMES: tuple[str, ...] = ("fp16", "bf16")
KINDS: tuple[str, ...] = ("fwd", "bwd_prep", "bwd_dq", "bwd_dkdv")

FWD_KEYS: tuple[str, ...] = ("BLOCK_M", "BLOCK_N", "WARPS")
BWD_KEYS: tuple[str, ...] = ("BWD_BLOCK_M", "BWD_BLOCK_N", "BWD_WARPS")
DQ_KEYS: tuple[str, ...] = ("DQ_BLOCK_M", "DQ_BLOCK_N", "DQ_WARPS")
CONFIG_KEYS: tuple[str, ...] = FWD_KEYS + BWD_KEYS + DQ_KEYS

# Padding of every shared-memory row, in elements (FD_PAD in flash_attn.cuh).
SMEM_PAD = 8
ELEM_BYTES = 2
# Opt-in shared memory per block by compute capability (CUDA programming guide, table of
# technical specifications); unknown archs get the portable 48 KiB.
SMEM_LIMIT_BY_CC: dict[int, int] = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                                    100: 232448, 120: 101376}
SMEM_LIMIT_DEFAULT = 49152
# Accumulator floats per thread the tuner may ask of ptxas (`nvcc -Xptxas -v`, sm_90, nvcc 13.0).
# At 192 some configs park a few words in local memory: the forward's 128x64w4 at D=128 (FA2's
# tile) spills 32 bytes on sm_90 (60 on sm_80) and still measured fastest on the H100
# (docs/cupy.md; the A100 shares this default unmeasured); 256x64w8 and dK/dV D=128 at 192 spill
# more, which the tuner measures. No default spills more than the CPU test allows
# (tests/test_cupy_compile.py); tools/nvcc_check.py --verbose reports every config.
MAX_ACC_FLOATS: dict[str, int] = {"fwd": 192, "bwd_dq": 192, "bwd_dkdv": 192, "bwd_prep": 0}

# Defaults per head dim: (BLOCK_M, BLOCK_N, WARPS), (BWD_BLOCK_M, BWD_BLOCK_N, BWD_WARPS).
DEFAULT_FWD: dict[int, tuple[int, int, int]] = {
    32: (128, 64, 4),
    64: (128, 64, 4),
    96: (128, 64, 8),
    128: (128, 64, 4),
    256: (64, 32, 4),
}
DEFAULT_BWD: dict[int, tuple[int, int, int]] = {
    32: (64, 64, 4),
    64: (32, 128, 4),
    96: (32, 64, 4),
    128: (32, 64, 4),
}
# dQ shapes of their own (DQ_BLOCK_M, DQ_BLOCK_N, DQ_WARPS) where one measured faster than the
# shared backward shape (H100, docs/cupy.md); other head dims derive dQ from BWD_*.
DEFAULT_DQ: dict[int, tuple[int, int, int]] = {
    128: (128, 32, 4),
}
# What the tuner may try (before pruning by shared memory and registers).
FWD_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 64, 4), (128, 32, 8), (128, 64, 8), (128, 128, 8),
    (256, 32, 8), (256, 64, 8),
)
BWD_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (32, 64, 4), (64, 64, 4), (32, 128, 8), (64, 128, 8), (128, 64, 4), (32, 128, 4), (16, 128, 4),
    (16, 64, 4), (16, 128, 8),
)
# (DQ_BLOCK_M, DQ_BLOCK_N, DQ_WARPS): query rows per CTA, keys per step, warps.
DQ_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (64, 64, 4), (128, 16, 4), (128, 32, 4), (128, 64, 4), (128, 32, 8), (128, 64, 8),
)


class KernelSpec(NamedTuple):
    """One template instantiation: what a compiled module is keyed on."""

    kind: str  # one of KINDS
    head_dim: int
    dtype: str  # "fp16" | "bf16"
    causal: bool
    block_m: int
    block_n: int
    warps: int
    # variants (template flags; off: the plain kernel). sinks: forward only.
    window: bool = False
    softcap: bool = False
    sinks: bool = False

    @property
    def threads(self) -> int:
        return 256 if self.kind == "bwd_prep" else 32 * self.warps

    @property
    def symbol(self) -> str:
        """The extern "C" name of the kernel (unique per instantiation)."""
        if self.kind == "bwd_prep":
            return f"fd_bwd_prep_d{self.head_dim}_{self.dtype}"
        c = "c" if self.causal else "nc"
        variants = ("_win" if self.window else "") + ("_cap" if self.softcap else "") + (
            "_sink" if self.sinks else "")
        return (
            f"fd_{self.kind}_d{self.head_dim}_m{self.block_m}_n{self.block_n}_w{self.warps}_{c}_{self.dtype}"
            + variants
        )

    def smem_bytes(self) -> int:
        row = (self.head_dim + SMEM_PAD) * ELEM_BYTES
        m, n = self.block_m, self.block_n
        if self.kind == "fwd":
            return (m + 4 * n) * row
        if self.kind == "bwd_dq":
            return (2 * m + 4 * n) * row
        if self.kind == "bwd_dkdv":
            return (2 * n + 4 * m) * row + 4 * m * 4
        return 0  # bwd_prep: static 1 KiB only

    def acc_floats(self) -> int:
        """Per-thread fp32 accumulators: the register-pressure estimate behind MAX_ACC_FLOATS."""
        d8 = self.head_dim // 8
        if self.kind == "fwd":
            mt = self.block_m // (16 * self.warps)
            return mt * d8 * 4 + mt * (self.block_n // 8) * 4
        if self.kind == "bwd_dq":
            mt = self.block_m // (16 * self.warps)
            return mt * d8 * 4 + 2 * mt * (self.block_n // 8) * 4
        if self.kind == "bwd_dkdv":
            mt = self.block_n // (16 * self.warps)
            return 2 * mt * d8 * 4 + 2 * mt * (self.block_m // 8) * 4
        return 0

    def problems(self) -> list[str]:
        """Why this instantiation is invalid (empty: valid). Shapes only, not the device."""
        r: list[str] = []
        if self.kind not in KINDS:
            r.append(f"kind={self.kind!r} (expected one of {KINDS})")
        if self.head_dim not in HEAD_DIMS:
            r.append(f"head_dim={self.head_dim} (supported: {list(HEAD_DIMS)})")
        if self.dtype not in DTYPE_NAMES:
            r.append(f"dtype={self.dtype!r} (supported: {list(DTYPE_NAMES)})")
        if self.sinks and self.kind != "fwd":
            r.append(f"sinks in a {self.kind} kernel (only the forward takes them)")
        if self.kind == "bwd_prep":
            if self.window or self.softcap:
                r.append("window/softcap in bwd_prep (it has neither)")
            return r
        if self.warps not in (1, 2, 4, 8):
            r.append(f"WARPS={self.warps} (expected 1, 2, 4 or 8)")
            return r
        rows, steps = (self.block_n, self.block_m) if self.kind == "bwd_dkdv" else (self.block_m, self.block_n)
        if rows <= 0 or rows % (16 * self.warps):
            r.append(f"{rows} rows per CTA must be a positive multiple of 16 * WARPS = {16 * self.warps}")
        if steps <= 0 or steps % 16:
            r.append(f"{steps} per step must be a positive multiple of 16")
        if self.kind in ("bwd_dq", "bwd_dkdv") and self.head_dim not in BACKWARD_HEAD_DIMS:
            r.append(f"backward head_dim={self.head_dim} (supported: {list(BACKWARD_HEAD_DIMS)})")
        limit = MAX_ACC_FLOATS.get(self.kind, 0)
        if not r and self.acc_floats() > limit:
            r.append(f"{self.acc_floats()} accumulator floats per thread (max {limit}: would spill)")
        return r


def smem_limit(cuda_capability: int) -> int:
    return SMEM_LIMIT_BY_CC.get(cuda_capability, SMEM_LIMIT_DEFAULT)


def fits(spec: KernelSpec, cuda_capability: int) -> bool:
    """Valid shapes and enough shared memory on this compute capability."""
    return not spec.problems() and spec.smem_bytes() <= smem_limit(cuda_capability)


def default_config(head_dim: int, cuda_capability: int = 90) -> dict[str, int]:
    """The built-in config for a head dim; falls back to the largest candidate that fits."""
    cfg: dict[str, int] = {}
    fwd = DEFAULT_FWD.get(head_dim)
    if fwd is not None:
        if not fits(KernelSpec("fwd", head_dim, "fp16", False, *fwd), cuda_capability):
            fwd = next(
                (c for c in sorted(FWD_CANDIDATES, key=lambda c: -c[0] * c[1])
                 if fits(KernelSpec("fwd", head_dim, "fp16", False, *c), cuda_capability)),
                None,
            )
        if fwd is not None:
            cfg.update(zip(FWD_KEYS, fwd))
    bwd = DEFAULT_BWD.get(head_dim)
    if bwd is not None:
        if not all(fits(s, cuda_capability) for s in bwd_specs(head_dim, "fp16", False, bwd)):
            bwd = next(
                (c for c in sorted(BWD_CANDIDATES, key=lambda c: -c[0] * c[1])
                 if all(fits(s, cuda_capability) for s in bwd_specs(head_dim, "fp16", False, c))),
                None,
            )
        if bwd is not None:
            cfg.update(zip(BWD_KEYS, bwd))
            dq = DEFAULT_DQ.get(head_dim)
            if dq is not None and fits(KernelSpec("bwd_dq", head_dim, "fp16", False, *dq), cuda_capability):
                cfg.update(zip(DQ_KEYS, dq))
    return cfg


def parse_config(config: dict[str, Any], head_dim: int, cuda_capability: int = 90) -> dict[str, int]:
    """Defaults overlaid with `config`; unknown keys or non-integer values raise ValueError."""
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"cupy config: unknown keys {unknown}; expected a subset of {list(CONFIG_KEYS)}")
    out = default_config(head_dim, cuda_capability)
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"cupy config {key}: expected an int, got {value!r}")
        out[key] = value
    return out


def runnable_config(config: dict[str, Any], head_dim: int, cuda_capability: int) -> dict[str, int]:
    """parse_config, then the forward or backward tiles that do not fit this device's shared
    memory replaced by the device's defaults: a profile written for another card of the same
    family (an sm_86/89 GPU reads the A100's) must not fail at launch."""
    cfg = parse_config(config, head_dim, cuda_capability)
    default = default_config(head_dim, cuda_capability)
    if all(k in cfg for k in FWD_KEYS) and not fits(fwd_spec(head_dim, "fp16", False, cfg), cuda_capability):
        for k in FWD_KEYS:
            cfg.pop(k, None)
        cfg.update({k: default[k] for k in FWD_KEYS if k in default})
    if all(k in cfg for k in BWD_KEYS) and not all(
            fits(s, cuda_capability) for s in bwd_specs(head_dim, "fp16", False, cfg)):
        for k in BWD_KEYS + DQ_KEYS:
            cfg.pop(k, None)
        cfg.update({k: default[k] for k in BWD_KEYS + DQ_KEYS if k in default})
    return cfg


@functools.lru_cache(maxsize=256)
def no_fit_reasons(head_dim: int, cuda_capability: int, backward: bool) -> tuple[str, ...]:
    """Why no tile of this head dim can run on the device (empty when one fits); cached: selection
    asks on every new problem."""
    cfg = default_config(head_dim, cuda_capability)
    limit = f"the {smem_limit(cuda_capability)} bytes of shared memory per block of sm_{cuda_capability}"
    r = []
    if head_dim in HEAD_DIMS and not all(k in cfg for k in FWD_KEYS):
        r.append(f"no forward tile for D={head_dim} fits {limit}")
    if backward and head_dim in BACKWARD_HEAD_DIMS and not all(k in cfg for k in BWD_KEYS):
        r.append(f"no backward tile for D={head_dim} fits {limit}")
    return tuple(r)


def fwd_spec(head_dim: int, dtype: str, causal: bool, cfg: dict[str, int], *, window: bool = False,
             softcap: bool = False, sinks: bool = False) -> KernelSpec:
    return KernelSpec("fwd", head_dim, dtype, causal, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["WARPS"],
                      window, softcap, sinks)


def bwd_specs(
    head_dim: int, dtype: str, causal: bool, bwd: tuple[int, int, int] | dict[str, int], *,
    window: bool = False, softcap: bool = False,
) -> list[KernelSpec]:
    m, n, w = (bwd["BWD_BLOCK_M"], bwd["BWD_BLOCK_N"], bwd["BWD_WARPS"]) if isinstance(bwd, dict) else bwd
    dq_rows, dq_step, dq_w = n, m, w  # the shared shape: rows n, step m (see top)
    if isinstance(bwd, dict) and all(k in bwd for k in DQ_KEYS):
        dq_rows, dq_step, dq_w = (bwd[k] for k in DQ_KEYS)
    return [
        KernelSpec("bwd_prep", head_dim, dtype, False, 0, 0, 0),
        KernelSpec("bwd_dq", head_dim, dtype, causal, dq_rows, dq_step, dq_w, window, softcap),
        KernelSpec("bwd_dkdv", head_dim, dtype, causal, m, n, w, window, softcap),
    ]


def config_space(head_dim: int, cuda_capability: int, backward: bool) -> list[dict[str, int]]:
    """Configs worth timing for one head dim, pruned to what fits the device (one dtype/causal
    value suffices: neither changes shared memory or registers)."""
    base = default_config(head_dim, cuda_capability)
    space: list[dict[str, int]] = []
    for c in FWD_CANDIDATES:
        if fits(KernelSpec("fwd", head_dim, "fp16", False, *c), cuda_capability):
            space.append({**base, **dict(zip(FWD_KEYS, c))})
    if backward and head_dim in BACKWARD_HEAD_DIMS:
        for c in bwd_candidates(head_dim, cuda_capability):
            cfg = {**base, **dict(zip(BWD_KEYS, c))}
            if cfg not in space:
                space.append(cfg)
        for c in dq_candidates(head_dim, cuda_capability):
            cfg = {**base, **dict(zip(DQ_KEYS, c))}
            if cfg not in space:
                space.append(cfg)
    return space


def bwd_candidates(head_dim: int, cuda_capability: int) -> list[tuple[int, int, int]]:
    """Shared backward shapes (BWD_*) that are valid and fit the device."""
    return [
        c for c in BWD_CANDIDATES
        if all(fits(s, cuda_capability) for s in bwd_specs(head_dim, "fp16", False, c))
    ]


def dq_candidates(head_dim: int, cuda_capability: int) -> list[tuple[int, int, int]]:
    """dQ shapes of their own (DQ_*) that are valid and fit the device."""
    if head_dim not in BACKWARD_HEAD_DIMS:
        return []
    return [c for c in DQ_CANDIDATES if fits(KernelSpec("bwd_dq", head_dim, "fp16", False, *c), cuda_capability)]


def specs_for(
    configs: Iterable[dict[str, int]], head_dims: Iterable[int], dtypes: Iterable[str] = DTYPE_NAMES,
    causal: Iterable[bool] = (False, True), backward: bool = True,
) -> list[KernelSpec]:
    """Every instantiation the given configs can launch (deduplicated, stable order)."""
    seen: dict[KernelSpec, None] = {}
    cfgs = list(configs)
    for d in head_dims:
        for dt in dtypes:
            for c in causal:
                for cfg in cfgs:
                    if all(k in cfg for k in FWD_KEYS):
                        seen.setdefault(fwd_spec(d, dt, c, cfg))
                    if backward and d in BACKWARD_HEAD_DIMS and all(k in cfg for k in BWD_KEYS):
                        for s in bwd_specs(d, dt, c, cfg):
                            seen.setdefault(s)
    return list(seen)
