"""Kernel configs of the Triton backend: the one place for defaults, config spaces and limits.

The kernels (forward.py, decode.py, backward.py, varlen.py), the Implementation (default_config /
config_space), the ahead-of-time specs (aot.py) and the tuner all read this module. A config is a
flat dict:

- forward: BLOCK_M, BLOCK_N, num_warps, num_stages; on Hopper TMA (tensor descriptors) and WS
  (warp specialisation of the unmasked loop); on AMD waves_per_eu and matrix_instr_nonkdim.
- decode (split-KV): BLOCK_N, num_warps, num_stages, NUM_SPLITS (0: chosen from the SM count),
  and PATH ("split_kv" or "forward": lets a profile send a decode-shaped problem to the
  prefill kernel).
- backward: BWD_BLOCK_M, BWD_BLOCK_N, BWD_num_warps, BWD_num_stages, BWD_DQ_ATOMIC, in the same
  dict as the forward's keys (the forward ignores them); defaults by the padded head dim.

Defaults are keyed by architecture family and head-dim bucket (next power of two of D, at least
16). Where they come from is noted beside each table (measured numbers are in docs/triton.md).
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any

import torch

log = logging.getLogger("flashdispatch")

DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32})
MAX_HEAD_DIM = 256
# Compiler options a config may carry (passed to the launch); everything else is a tile size.
LAUNCH_KEYS: tuple[str, ...] = ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim")
FORWARD_KEYS: frozenset[str] = frozenset(
    {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "TMA", "WS", "waves_per_eu", "matrix_instr_nonkdim"}
)
DECODE_KEYS: frozenset[str] = frozenset(
    {"BLOCK_N", "num_warps", "num_stages", "NUM_SPLITS", "PATH", "waves_per_eu", "matrix_instr_nonkdim"}
)
PATHS: tuple[str, ...] = ("split_kv", "forward")
FORWARD_ONLY_KEYS: frozenset[str] = FORWARD_KEYS - DECODE_KEYS
# Keys of the backward kernels (BACKWARD_KEYS, below) share the config dict; the forward ignores them.
BACKWARD_KEY_PREFIX = "BWD_"

ARCHS: tuple[str, ...] = ("sm_80", "sm_90", "gfx90a", "gfx942", "interpreter")
# Shared memory (NVIDIA) / LDS (AMD) one program may use, bytes.
SHARED_MEMORY_BYTES: dict[str, int] = {
    "sm_80": 163 * 1024,
    "sm_90": 227 * 1024,
    "gfx90a": 64 * 1024,
    "gfx942": 64 * 1024,
    "interpreter": 1 << 30,
}
# Registers of one SM/CU's register file a program's fp32 accumulators may use, per thread:
# above this the compiler spills (seen as the usual ceiling for FA-style kernels).
MAX_ACC_REGS_PER_THREAD = 128
WARP_SIZE: dict[str, int] = {"sm_80": 32, "sm_90": 32, "gfx90a": 64, "gfx942": 64, "interpreter": 32}
HEAD_DIM_BUCKETS: tuple[int, ...] = (64, 128, 256)
# Triton 3.6's warp-specialisation pass fails on this kernel with 4 warps (seen on H100).
WS_MIN_WARPS = 8

# --- forward defaults -----------------------------------------------------------------------------
# (arch, head-dim bucket, causal) -> config.
# sm_90: measured on H100 80GB HBM3 (bf16, tools/bench_triton.py --tune); see docs/triton.md.
# sm_80: FlashAttention-2-style tiles for 163 KiB (not measured here; AOT-checked to fit).
# gfx90a/gfx942: 64 KiB LDS tiles following AMD's published Triton FA settings (waves_per_eu=2,
# 16x16 MFMA); not measured here, AOT-checked to fit.
_F = dict


def _amd_forward_defaults() -> dict[tuple[int, bool], dict[str, Any]]:
    """Both CDNA generations start from the same tiles (64 KiB LDS), causal or not; a fresh dict per
    arch so that a tuned entry for one never changes the other. (In these kernels the D=128 tile
    spills 40-43 VGPRs per lane on gfx942, AOT; 128 x 32 or 8 warps spill none: a GPU decides.)"""
    tiles = {64: (128, 64), 128: (128, 64), 256: (64, 32)}
    return {(b, c): _F(BLOCK_M=tiles[b][0], BLOCK_N=tiles[b][1], num_warps=4, num_stages=1, waves_per_eu=2,
                       matrix_instr_nonkdim=16)
            for b in HEAD_DIM_BUCKETS for c in (False, True)}


FORWARD_DEFAULTS: dict[str, dict[tuple[int, bool], dict[str, Any]]] = {
    "sm_90": {
        (64, False): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False),
        (64, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False),
        (128, False): _F(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True),
        (128, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, TMA=True),
        # D=256 is not measured: chosen ahead of time (tools/aot_triton.py, ptxas for sm_90a) as the
        # descriptor kernel's 128-row tile, which spills nothing, where the pointer kernel's 64x64
        # 4-warp tile spills 244-272 B per thread. The tuner measures both (config_space).
        (256, False): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True),
        (256, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=True),
    },
    # Tile classes with their own entries (tile_class; not the cost model's shape classes): "chunk" =
    # causal with Sk >= CHUNK_RATIO * Sq (chunked prefill against a long cache: nearly every row sees nearly every
    # key); "short" = Sk < SHORT_SEQLEN (few key blocks per program: the descriptor set-up of the TMA
    # kernel does not pay; measured 252 us TMA vs 220 us pointer at D=128, S=512, B=32, H=16).
    "sm_90:chunk": {
        (128, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
    },
    "sm_90:short": {
        (128, False): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False),
    },
    "sm_80": {
        (64, False): _F(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        (64, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        (128, False): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        (128, True): _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        (256, False): _F(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        (256, True): _F(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    },
    "gfx942": _amd_forward_defaults(),
    "gfx90a": _amd_forward_defaults(),
    # The interpreter runs tiles as numpy arrays: few large ops beat many small ones.
    "interpreter": {
        (b, c): _F(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        for b in HEAD_DIM_BUCKETS for c in (False, True)
    },
}

# The pointer kernel holds its K/V tile addresses in registers (a 64-bit pointer per element of a
# tile), so a TMA config's tiles can spill there: ptxas for sm_90 reports 460-500 B of spill stores
# per thread for the D=128 causal TMA tiles (128x64, 4 warps) on the pointer kernels, none with 8
# warps (D=256: 64x64 with 8 warps, 28-48 B). When a TMA config has to run on the pointer kernel (views the
# copy engine cannot address), it takes the pointer tiles of its head-dim bucket from here.
POINTER_DEFAULTS: dict[str, dict[int, dict[str, Any]]] = {
    "sm_90": {
        64: _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        128: _F(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        256: _F(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    },
}

CHUNK_RATIO = 4
SHORT_SEQLEN = 2048
SHAPE_CLASSES: tuple[str, ...] = ("base", "short", "chunk")

# --- decode (split-KV) defaults -------------------------------------------------------------------
# (arch, head-dim bucket) -> config. Memory-bound: enough loads in flight matters most.
DECODE_DEFAULTS: dict[str, dict[int, dict[str, Any]]] = {
    # D=128: 128-key blocks measured 1.01-1.03x SDPA at B=8 and B=64 on the H100, 64-key 0.96x
    "sm_90": {b: _F(PATH="split_kv", BLOCK_N={64: 64, 128: 128}.get(b, 32), num_warps=4, num_stages=3,
                    NUM_SPLITS=0) for b in HEAD_DIM_BUCKETS},
    "sm_80": {b: _F(PATH="split_kv", BLOCK_N=64 if b <= 128 else 32, num_warps=4, num_stages=3,
                    NUM_SPLITS=0) for b in HEAD_DIM_BUCKETS},
    # AMD: 32-key blocks at D=256, as on NVIDIA (64 spilled 68 VGPRs on gfx942, AOT; not measured)
    "gfx942": {b: _F(PATH="split_kv", BLOCK_N=32 if b == 256 else 64, num_warps=4, num_stages=1, NUM_SPLITS=0,
                     waves_per_eu=2) for b in HEAD_DIM_BUCKETS},
    "gfx90a": {b: _F(PATH="split_kv", BLOCK_N=32 if b == 256 else 64, num_warps=4, num_stages=1, NUM_SPLITS=0,
                     waves_per_eu=2) for b in HEAD_DIM_BUCKETS},
    "interpreter": {b: _F(PATH="split_kv", BLOCK_N=32, num_warps=4, num_stages=1, NUM_SPLITS=0)
                    for b in HEAD_DIM_BUCKETS},
}
# Split-KV sizing: aim for this many programs per SM/CU, and never fewer keys per split than
# DECODE_MIN_BLOCKS_PER_SPLIT key blocks (below that the merge costs more than it spreads).
DECODE_PROGRAMS_PER_SM = 2
DECODE_MIN_BLOCKS_PER_SPLIT = 2
DECODE_MAX_SPLITS = 128
# Rows of one decode program: (Hq/Hkv) x Sq padded to at least the smallest tl.dot M.
DECODE_MIN_BLOCK_M = 16
DECODE_MAX_BLOCK_M = 64
SM_COUNT_FALLBACK = 132


def head_dim_bucket(d: int) -> int:
    """64, 128 or 256: the smallest bucket holding D."""
    for b in HEAD_DIM_BUCKETS:
        if d <= b:
            return b
    raise ValueError(f"head dim: expected at most {MAX_HEAD_DIM}, got {d}")


@functools.lru_cache(maxsize=None)
def block_dim(d: int) -> int:
    """Tile width for a head dim: next power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, 1 << (max(d, 1) - 1).bit_length())


def arch_family(kind: str, arch: str) -> str:
    """Map a device (DeviceInfo.kind, .arch) onto a key of the default tables."""
    if kind == "cpu":
        return "interpreter"
    if kind == "rocm":
        if arch.startswith("gfx94") or arch.startswith("gfx95"):
            return "gfx942"
        return "gfx90a"
    digits = "".join(ch for ch in arch[3:] if ch.isdigit()) if arch.startswith("sm_") else ""
    cc = int(digits) if digits else 80
    return "sm_90" if cc >= 90 else "sm_80"


@functools.lru_cache(maxsize=None)
def _device_arch(device_type: str, index: int) -> str:
    if device_type != "cuda":
        return "interpreter"
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        return arch_family("rocm", getattr(props, "gcnArchName", "gfx90a").split(":")[0])
    return arch_family("cuda", f"sm_{props.major}{props.minor}")


def arch_of_tensor(t: torch.Tensor) -> str:
    """Arch family of the device holding `t` (cached after the first query per device)."""
    return _device_arch(t.device.type, t.device.index or 0)


@functools.lru_cache(maxsize=None)
def sm_count_of(device_type: str, index: int) -> int:
    if device_type != "cuda":
        return 4  # the interpreter: a few splits exercise the merge without slowing the tests
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _check_keys(config: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"config: unknown {what} key(s) {unknown}; expected keys among {sorted(allowed)}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if key in config:
            val = config[key]
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"config[{key!r}]: expected a power of two >= 16, got {val!r}")
    for key in ("num_warps",):
        if key in config and config[key] not in (1, 2, 4, 8, 16):
            raise ValueError(f"config[{key!r}]: expected 1, 2, 4, 8 or 16, got {config[key]!r}")
    if "num_stages" in config and not (isinstance(config["num_stages"], int) and config["num_stages"] >= 1):
        raise ValueError(f"config['num_stages']: expected an int >= 1, got {config['num_stages']!r}")


def tile_class(causal: bool, seqlen_q: int, seqlen_k: int) -> str:
    """Which default-table variant a problem uses: "chunk", "short" or "base" (0 = unknown length)."""
    if causal and seqlen_q and seqlen_k >= CHUNK_RATIO * seqlen_q:
        return "chunk"
    if seqlen_k and seqlen_k < SHORT_SEQLEN:
        return "short"
    return "base"


def forward_defaults(arch: str, head_dim: int, causal: bool, seqlen_q: int = 0, seqlen_k: int = 0) -> dict[str, Any]:
    """Default forward config for (arch, D bucket, causal) and the problem's shape class."""
    return _forward_defaults_by_class(arch, head_dim_bucket(head_dim), bool(causal),
                                      tile_class(causal, seqlen_q, seqlen_k))


def _forward_defaults_by_class(arch: str, bucket: int, causal: bool, cls: str) -> dict[str, Any]:
    key = (bucket, causal)
    if cls != "base":
        special = FORWARD_DEFAULTS.get(f"{arch}:{cls}", {})
        if key in special:
            return dict(special[key])
    table = FORWARD_DEFAULTS.get(arch, FORWARD_DEFAULTS["sm_80"])
    return dict(table[key])


def decode_defaults(arch: str, head_dim: int) -> dict[str, Any]:
    table = DECODE_DEFAULTS.get(arch, DECODE_DEFAULTS["sm_80"])
    return dict(table[head_dim_bucket(head_dim)])


def _frozen(config: dict[str, Any] | None) -> frozenset[tuple[str, Any]] | None:
    try:
        return frozenset((config or {}).items())
    except TypeError:  # an unhashable value: resolve without the cache (and let the checks speak)
        return None


def resolve_forward(config: dict[str, Any] | None, arch: str, head_dim: int, causal: bool,
                    seqlen_q: int = 0, seqlen_k: int = 0) -> dict[str, Any]:
    """Defaults for (arch, D, causal, shape class) overlaid with the given config's forward keys.

    Cached per (config, arch, bucket, causal, class): it runs on every call of a launch-bound path.
    """
    frozen = _frozen(config)
    cls = tile_class(causal, seqlen_q, seqlen_k)
    if frozen is None:
        return _resolve_forward(config, arch, head_dim_bucket(head_dim), causal, cls)
    return dict(_resolve_forward_cached(frozen, arch, head_dim_bucket(head_dim), bool(causal), cls))


@functools.lru_cache(maxsize=1024)
def _resolve_forward_cached(frozen: frozenset[tuple[str, Any]], arch: str, bucket: int, causal: bool,
                            cls: str) -> tuple[tuple[str, Any], ...]:
    return tuple(_resolve_forward(dict(frozen), arch, bucket, causal, cls).items())


def _resolve_forward(config: dict[str, Any] | None, arch: str, bucket: int, causal: bool,
                     cls: str) -> dict[str, Any]:
    cfg = _forward_defaults_by_class(arch, bucket, bool(causal), cls)
    given = {k: v for k, v in (config or {}).items()
             if k not in ("PATH", "NUM_SPLITS") and not k.startswith(BACKWARD_KEY_PREFIX)}
    _check_keys(given, FORWARD_KEYS, "forward")
    cfg.update(given)
    if arch not in ("gfx90a", "gfx942"):
        cfg.pop("waves_per_eu", None)
        cfg.pop("matrix_instr_nonkdim", None)
    if arch not in ("sm_90", "interpreter"):
        # tensor descriptors and warp specialisation are Hopper-only (the interpreter emulates them)
        cfg.pop("TMA", None)
        cfg.pop("WS", None)
    return cfg


def pointer_config(cfg: dict[str, Any], arch: str, head_dim: int) -> dict[str, Any]:
    """`cfg` for the pointer kernel: unchanged unless it is a TMA config, whose tiles (and WS) give
    way to the arch's POINTER_DEFAULTS for the head-dim bucket (the interpreter keeps its tiles)."""
    if not cfg.get("TMA"):
        return cfg
    out = {k: v for k, v in cfg.items() if k not in ("TMA", "WS")}
    out.update(POINTER_DEFAULTS.get(arch, {}).get(head_dim_bucket(head_dim), {}))
    return out


def resolve_decode(config: dict[str, Any] | None, arch: str, head_dim: int) -> dict[str, Any]:
    """Decode defaults for (arch, D) overlaid with the given config (cached like resolve_forward)."""
    frozen = _frozen(config)
    if frozen is None:
        return _resolve_decode(config, arch, head_dim_bucket(head_dim))
    return dict(_resolve_decode_cached(frozen, arch, head_dim_bucket(head_dim)))


@functools.lru_cache(maxsize=1024)
def _resolve_decode_cached(frozen: frozenset[tuple[str, Any]], arch: str, bucket: int) -> tuple[tuple[str, Any], ...]:
    return tuple(_resolve_decode(dict(frozen), arch, bucket).items())


def _resolve_decode(config: dict[str, Any] | None, arch: str, head_dim: int) -> dict[str, Any]:
    cfg = decode_defaults(arch, head_dim)
    given = {k: v for k, v in (config or {}).items() if not k.startswith(BACKWARD_KEY_PREFIX)}
    # a decode-shaped problem's config may carry forward tiles: PATH="forward" runs them, and a
    # profile entry measured on the forward kernel (causal, Sq < Sk) ranks triton for speculative
    # verification, whose split-KV kernel then keeps its own tiles
    _check_keys(given, DECODE_KEYS | FORWARD_KEYS, "decode")
    if FORWARD_ONLY_KEYS & given.keys():
        given = {k: v for k, v in given.items() if k in ("PATH", "NUM_SPLITS")}
    cfg.update(given)
    if cfg["PATH"] not in PATHS:
        raise ValueError(f"config['PATH']: expected one of {PATHS}, got {cfg['PATH']!r}")
    if arch not in ("gfx90a", "gfx942"):
        cfg.pop("waves_per_eu", None)
        cfg.pop("matrix_instr_nonkdim", None)
    return cfg


# --- fit predicates and config spaces -------------------------------------------------------------


def forward_shared_bytes(cfg: dict[str, Any], head_dim: int, head_dim_v: int, elt_bytes: int) -> int:
    """Estimate of the forward kernel's shared memory: the Q tile plus num_stages K and V tiles.

    An estimate that the AOT check (tools/aot_triton.py) confirms against the compiler's figure.
    """
    bd, bdv = block_dim(head_dim), block_dim(head_dim_v)
    stages = max(1, int(cfg.get("num_stages", 1)))
    return elt_bytes * (cfg["BLOCK_M"] * bd + stages * cfg["BLOCK_N"] * (bd + bdv))


def fits_shared_memory(cfg: dict[str, Any], arch: str, head_dim: int, head_dim_v: int,
                       elt_bytes: int = 2) -> bool:
    return forward_shared_bytes(cfg, head_dim, head_dim_v, elt_bytes) <= SHARED_MEMORY_BYTES[arch]


def shrink_to_fit(cfg: dict[str, Any], arch: str, head_dim: int, head_dim_v: int,
                  elt_bytes: int = 2) -> dict[str, Any]:
    """`cfg`, or the nearest smaller config whose tiles fit `arch`'s shared memory: fewer stages
    first, then half the key block, then half the query block.

    Why: a profile entry is matched on D, not Dv, so a config tuned for D = Dv = 64 can meet
    Dv = 256 (its V tiles four times larger); launching it would fail with Triton's
    OutOfResources instead of running a little slower.
    """
    if fits_shared_memory(cfg, arch, head_dim, head_dim_v, elt_bytes):
        return cfg
    out = dict(cfg)
    while not fits_shared_memory(out, arch, head_dim, head_dim_v, elt_bytes):
        if out.get("num_stages", 1) > 1:
            out["num_stages"] -= 1
        elif out["BLOCK_N"] > 16:
            out["BLOCK_N"] //= 2
        elif out["BLOCK_M"] > 16:
            out["BLOCK_M"] //= 2
        else:
            break  # nothing smaller: let the compiler say why
    log.warning("flashdispatch triton: config %s does not fit %s shared memory at D=%d, Dv=%d; using %s",
                cfg, arch, head_dim, head_dim_v, out)
    return out


def fits_registers(cfg: dict[str, Any], arch: str, head_dim_v: int) -> bool:
    """The fp32 accumulator (BLOCK_M x BLOCK_DV) spread over the program's threads."""
    threads = cfg["num_warps"] * WARP_SIZE[arch]
    return cfg["BLOCK_M"] * block_dim(head_dim_v) // threads <= MAX_ACC_REGS_PER_THREAD


def forward_config_space(arch: str, head_dim: int, head_dim_v: int | None = None,
                         elt_bytes: int = 2) -> list[dict[str, Any]]:
    """Every forward config the tuner may try on `arch`, pruned by shared-memory and register fit."""
    dv = head_dim if head_dim_v is None else head_dim_v
    amd = arch in ("gfx90a", "gfx942")
    space: list[dict[str, Any]] = []
    stages = (1, 2) if amd else (2, 3, 4)
    for bm, bn, warps, st in itertools.product((64, 128), (32, 64, 128), (4, 8), stages):
        cfg: dict[str, Any] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": st}
        if amd:
            for wpe in (1, 2):
                space.append({**cfg, "waves_per_eu": wpe, "matrix_instr_nonkdim": 16})
        elif arch == "sm_90":
            # TMA stated either way: a config overlays the defaults, which may say TMA=True
            space.append({**cfg, "TMA": False})
            space.append({**cfg, "TMA": True})
            if warps >= WS_MIN_WARPS:
                space.append({**cfg, "TMA": True, "WS": True})
        else:
            space.append(cfg)
    return [c for c in space
            if fits_shared_memory(c, arch, head_dim, dv, elt_bytes) and fits_registers(c, arch, dv)]


def decode_config_space(arch: str, head_dim: int) -> list[dict[str, Any]]:
    amd = arch in ("gfx90a", "gfx942")
    stages = (1, 2) if amd else (2, 3, 4)
    space = []
    # NUM_SPLITS 0 sizes the split count from the SM count; large fixed counts put more loads in
    # flight for one small batch (B=1 decode reads 32 MiB through only B x Hkv = 8 kv heads), small
    # ones (1: no merge launch) suit batches that fill the GPU by themselves (B=8: 1 split was best)
    for bn, warps, st, splits in itertools.product((32, 64, 128), (2, 4), stages[:2], (0, 1, 2, 4, 64, 128)):
        cfg: dict[str, Any] = {"PATH": "split_kv", "BLOCK_N": bn, "num_warps": warps, "num_stages": st,
                               "NUM_SPLITS": splits}
        if amd:
            cfg["waves_per_eu"] = 2
        space.append(cfg)
    return [c for c in space
            if fits_shared_memory({**c, "BLOCK_M": DECODE_MAX_BLOCK_M}, arch, head_dim, head_dim)]


def decode_block_m(rows: int) -> int:
    """Rows of one decode program for (Hq/Hkv) x Sq query rows."""
    bm = DECODE_MIN_BLOCK_M
    while bm < rows and bm < DECODE_MAX_BLOCK_M:
        bm *= 2
    return bm


def decode_num_splits(cfg: dict[str, Any], programs: int, seq_k: int, sm_count: int) -> int:
    """How many key ranges to spread one decode problem over (1: no merge kernel)."""
    if cfg.get("NUM_SPLITS"):
        wanted = int(cfg["NUM_SPLITS"])
    else:
        wanted = -(-DECODE_PROGRAMS_PER_SM * sm_count // max(programs, 1))
    most = max(1, seq_k // (cfg["BLOCK_N"] * DECODE_MIN_BLOCKS_PER_SPLIT))
    return max(1, min(wanted, most, DECODE_MAX_SPLITS))


# ---------------------------------------------------------------------------------------------
# Backward (backward.py): which block shapes it uses and may try.
#
# BWD_BLOCK_M / BWD_BLOCK_N are the query / key tile of the dk-dv kernel. The dq kernel uses the
# transposed pair (query tile BWD_BLOCK_N, key tile BWD_BLOCK_M) unless a config gives its own
# (BWD_DQ_BLOCK_M: query tile, BWD_DQ_BLOCK_N: key tile, BWD_DQ_num_warps, BWD_DQ_num_stages): the
# operand that stays resident in registers is the large one in both kernels, the one that streams
# is small.
# ---------------------------------------------------------------------------------------------

BACKWARD_KEYS: tuple[str, ...] = (
    "BWD_BLOCK_M", "BWD_BLOCK_N", "BWD_num_warps", "BWD_num_stages", "BWD_DQ_ATOMIC",
    "BWD_DQ_BLOCK_M", "BWD_DQ_BLOCK_N", "BWD_DQ_num_warps", "BWD_DQ_num_stages",
)
# The dq kernel's keys and the dk-dv key each one defaults to (the tiles swapped, the launch the same)
DQ_KEY_DEFAULTS: dict[str, str] = {
    "BWD_DQ_BLOCK_M": "BWD_BLOCK_N", "BWD_DQ_BLOCK_N": "BWD_BLOCK_M",
    "BWD_DQ_num_warps": "BWD_num_warps", "BWD_DQ_num_stages": "BWD_num_stages",
}
# BWD_DQ_ATOMIC=True accumulates dq inside the dk-dv kernel with fp32 atomics (FlashAttention-2's
# way: 5 block matmuls instead of 7, but run-to-run rounding differences). Off by default: the
# backend promises deterministic gradients unless a config opts out.

# Defaults by the padded head dim (BLOCK_D). 64 and 128: the fastest of the sweep on one H100 80GB
# HBM3 (bf16, B*S=16k, S 512..16k, causal and not; docs/triton_backward.md), at every shape of it.
# 256: smaller tiles keep the fp32 dk/dv accumulators (2 * BLOCK_N * BLOCK_D floats) in registers;
# correct on H100, not timed. 16/32: the 64 tiles.
BACKWARD_DEFAULTS: dict[int, dict[str, Any]] = {
    16: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 3},
    32: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 3},
    64: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 3},
    # D=128: 64 x 128 with 3 stages, FlexAttention's own tile on Hopper: on an H100 (bf16, B=1, H=32,
    # causal, S=16k; tools/bench_backward.py) 1.23x the earlier 32 x 128 / 2 stages with a 4096-key
    # window (5.92 against 7.27 ms) and 1.24x without (12.48 against 15.44 ms)
    128: {"BWD_BLOCK_M": 64, "BWD_BLOCK_N": 128, "BWD_num_warps": 8, "BWD_num_stages": 3},
    # D=256: 32 x 64, one stage, despite ptxas's 1048 B / 876 B of spill stores per thread in dk/dv
    # and dq (sm_90a): the spill-free 32 x 32 tile with 2 stages measured 1.47x slower on an H100
    # (causal S=8k, B=1, H=16/8, bf16: 16.29 ms against 11.11 ms, interleaved medians)
    256: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_num_warps": 8, "BWD_num_stages": 1},
}

# sm_80 (A100) is not measured here (no such card): its 16-bit tiles are the ones ptxas for sm_80
# spills least on, per thread plain / with window + softcap: 32 x 128, 8 warps, 2 stages up to D=64
# (40 B / 148 B), 16 x 128 at D=128 (140 B / 240 B), 16 x 32 at D=256 (24 B / 76 B). The table above
# spills 596 B / 15 KB, 852 B / 13 KB and 580 B / 704 B there (softcap keeps its tanh tile live across
# the dP product, and the 32 x 128 tiles then overflow mma.sync's register budget).
# AMD (gfx90a, gfx942; not measured here either): one stage and 4 warps, the tiles with no VGPR spills
# in the compiled code (plain, with window + softcap, fp16 non-causal): 32 x 128 up to D=64, 16 x 128
# at D=128, 16 x 64 at D=256, where the table above spills 62-682 VGPRs per lane on gfx942.
_AMD_BACKWARD: dict[int, dict[str, Any]] = {
    16: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 1},
    32: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 1},
    64: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 1},
    128: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 128, "BWD_num_warps": 4, "BWD_num_stages": 1},
    256: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 1},
}
BACKWARD_DEFAULTS_BY_ARCH: dict[str, dict[int, dict[str, Any]]] = {
    "gfx942": _AMD_BACKWARD,
    "gfx90a": _AMD_BACKWARD,
    "sm_80": {
        16: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 8, "BWD_num_stages": 2},
        32: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 8, "BWD_num_stages": 2},
        64: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 128, "BWD_num_warps": 8, "BWD_num_stages": 2},
        128: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 128, "BWD_num_warps": 8, "BWD_num_stages": 2},
        256: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 32, "BWD_num_warps": 8, "BWD_num_stages": 2},
    },
}

# fp32 inputs (full-precision dots, a correctness path rather than a fast one) hold twice the bytes
# per tile: the 16-bit tiles would overflow sm_80's shared memory from D=128 on. Sized to fit
# sm_80 (163 KiB) and gfx90a/gfx942 (64 KiB LDS); compile-checked, not timed.
BACKWARD_DEFAULTS_FP32: dict[int, dict[str, Any]] = {
    16: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 2},
    32: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 2},
    64: {"BWD_BLOCK_M": 32, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 2},
    128: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 64, "BWD_num_warps": 4, "BWD_num_stages": 1},
    256: {"BWD_BLOCK_M": 16, "BWD_BLOCK_N": 32, "BWD_num_warps": 4, "BWD_num_stages": 1},
}

# What the tuner may try beyond the default, per padded head dim: (BLOCK_M, BLOCK_N, num_warps,
# num_stages). D=64: on the H100 sweep the runner-up was 9-18% slower than the default; the rest are
# untimed neighbours. D=128, timed on an H100 by tools/bench_backward.py (window 4096 and full causal,
# S=16k): the ones kept are within 0-23% of the default (4 stages ties it); 16 x 128 (0.6x), 32 x 64
# (0.35x), 16 x 64 (0.18x, though ptxas spills least there) and 128 x 128 (0.4x) were dropped. The
# atomic-dq variant was 0.5-0.8x of the default at every shape of that sweep, so it is offered only on
# request (atomic=True). AMD runs the same tables: compile-checked for gfx90a/gfx942, never timed there.
_BACKWARD_SPACE: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    16: ((32, 64, 4, 3),),
    32: ((32, 64, 4, 3),),
    64: ((64, 128, 8, 3), (32, 128, 8, 2), (32, 128, 4, 4), (64, 128, 4, 3)),
    128: ((64, 128, 8, 4), (32, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 2)),
    256: ((32, 64, 8, 1), (16, 64, 8, 1), (32, 32, 4, 2)),
}

# Rows per program of the delta = rowsum(dO * O) preprocess: memory-bound, one tile of rows.
PREPROCESS_BLOCK_M = 64

def padded_head_dim(head_dim: int, head_dim_v: int | None = None) -> int:
    """The BLOCK_D a head dim runs with (the larger of D and Dv decides the config bucket)."""
    return block_dim(max(head_dim, head_dim_v or head_dim))


def default_backward_config(
    head_dim: int, head_dim_v: int | None = None, *, fp32: bool = False, arch: str | None = None
) -> dict[str, Any]:
    """The backward keys to use when the forward's config carries none (fp32: fp32 inputs; arch:
    the arch family, whose own 16-bit table, if any, comes first)."""
    table = BACKWARD_DEFAULTS_FP32 if fp32 else BACKWARD_DEFAULTS_BY_ARCH.get(arch or "", BACKWARD_DEFAULTS)
    return {**table[padded_head_dim(head_dim, head_dim_v)], "BWD_DQ_ATOMIC": False}


def backward_config_space(
    head_dim: int, head_dim_v: int | None = None, *, atomic: bool = False, fp32: bool = False,
    arch: str | None = None,
) -> list[dict[str, Any]]:
    """Backward configs the tuner may try for this head dim (the default first), all deterministic
    unless atomic=True adds the atomic-dq twin of each. fp32 inputs get their default only."""
    block_d = padded_head_dim(head_dim, head_dim_v)
    space = [default_backward_config(head_dim, head_dim_v, fp32=fp32, arch=arch)]
    if fp32:
        return space
    for atomic_dq in (False, True) if atomic else (False,):
        for bm, bn, w, s in _BACKWARD_SPACE.get(block_d, ()):
            cfg = {"BWD_BLOCK_M": bm, "BWD_BLOCK_N": bn, "BWD_num_warps": w, "BWD_num_stages": s,
                   "BWD_DQ_ATOMIC": atomic_dq}
            if cfg not in space:
                space.append(cfg)
    return space


def resolve_backward_config(
    config: dict[str, Any] | None, head_dim: int, head_dim_v: int, *, fp32: bool = False, arch: str | None = None
) -> dict[str, Any]:
    """The forward's config (which may hold BWD_* keys) completed with this head dim's defaults; the
    dq kernel's keys, where not given, from the dk-dv ones (DQ_KEY_DEFAULTS)."""
    cfg: dict[str, Any] = default_backward_config(head_dim, head_dim_v, fp32=fp32, arch=arch)
    for key in BACKWARD_KEYS:
        if config and key in config:
            cfg[key] = config[key]
    cfg.setdefault("BWD_DQ_ATOMIC", False)
    for dq_key, key in DQ_KEY_DEFAULTS.items():
        cfg.setdefault(dq_key, cfg[key])
    if not isinstance(cfg["BWD_DQ_ATOMIC"], bool):
        raise TypeError(f"config['BWD_DQ_ATOMIC']: expected a bool, got {cfg['BWD_DQ_ATOMIC']!r}")
    for key in ("BWD_BLOCK_M", "BWD_BLOCK_N", "BWD_DQ_BLOCK_M", "BWD_DQ_BLOCK_N"):
        val = cfg[key]
        if not isinstance(val, int) or val < 16 or val & (val - 1):
            raise ValueError(f"config[{key!r}]: expected a power of two >= 16, got {val!r}")
    for keys, allowed in ((("BWD_num_warps", "BWD_DQ_num_warps"), (1, 2, 4, 8, 16)),
                          (("BWD_num_stages", "BWD_DQ_num_stages"), (1, 2, 3, 4, 5, 6))):
        for key in keys:
            if cfg[key] not in allowed:
                raise ValueError(f"config[{key!r}]: expected one of {allowed}, got {cfg[key]!r}")
    return cfg
