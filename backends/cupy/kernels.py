"""CUDA source of the cupy backend: entry points per instantiation, compilation, module cache.

The templates live in flash_attn.cuh; `module_source(specs)` appends one extern "C" entry point
per KernelSpec, so the same text compiles under NVRTC (one module per spec at run time) and under
nvcc (every spec in one translation unit, tools/nvcc_check.py).

Compiled modules are cached in this process (dict keyed by spec and device) and on disk under
FLASHDISPATCH_CACHE_DIR (default ~/.cache/flashdispatch), keyed by the hash of source, options,
arch and NVRTC version. CuPy is imported here lazily, only when something is compiled.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

from .configs import KernelSpec

log = logging.getLogger("flashdispatch")

HEADER_NAME = "flash_attn.cuh"
# -std=c++17 for `if constexpr`; no fast-math flag: the kernels call ex2.approx explicitly and the
# rest (1/l, logf) should stay IEEE.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
NVCC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_PTR = "const fd_u16* __restrict__"
_STRIDES3 = "fd_i64 {0}_sb, fd_i64 {0}_sh, fd_i64 {0}_ss"
# Scalars of the attention kernels, in launch order (backends/cupy/ops.py passes them). The window
# bounds are >= 0 (a side without one comes as a bound past the sequence's end) and only read by
# WINDOW kernels; softcap only by SOFTCAP kernels; the forward's sinks pointer only by SINKS ones.
_SCALARS = "int Sq, int Sk, int Hq, int group, float scale, int win_left, int win_right, float softcap"
_SCALAR_ARGS = "Sq, Sk, Hq, group, scale, win_left, win_right, softcap"


@functools.lru_cache(maxsize=1)
def header_text() -> str:
    return resources.files("flashdispatch.backends.cupy").joinpath(HEADER_NAME).read_text(encoding="utf-8")


def _strides(*names: str) -> str:
    return ", ".join(_STRIDES3.format(n) for n in names)


def _args(*names: str) -> str:
    return ", ".join(f"{n}_sb, {n}_sh, {n}_ss" for n in names)


def entry_point(spec: KernelSpec) -> str:
    """The extern "C" kernel that instantiates one template (parameters: see the .cuh)."""
    bf16 = "true" if spec.dtype == "bf16" else "false"
    causal = "true" if spec.causal else "false"
    tpl = f"{spec.head_dim}, {spec.block_m}, {spec.block_n}, {spec.warps}, {causal}, {bf16}"
    flags = (spec.window, spec.softcap) + ((spec.sinks,) if spec.kind == "fwd" else ())
    tpl += "".join(", true" if f else ", false" for f in flags)
    smem = "extern __shared__ __align__(16) unsigned char fd_smem_raw[];\n    fd_u16* smem = reinterpret_cast<fd_u16*>(fd_smem_raw);"
    bounds = f"__launch_bounds__({spec.threads})"
    if spec.kind == "fwd":
        return (
            f'extern "C" __global__ void {bounds} {spec.symbol}(\n'
            f"    {_PTR} Q, {_PTR} K, {_PTR} V, fd_u16* __restrict__ O, float* __restrict__ LSE,\n"
            f"    {_strides('q', 'k', 'v', 'o')},\n"
            f"    {_SCALARS}, const float* __restrict__ sinks) {{\n"
            f"    {smem}\n"
            f"    fd_attn_fwd<{tpl}>(smem, Q, K, V, O, LSE, {_args('q', 'k', 'v', 'o')},\n"
            f"        {_SCALAR_ARGS}, sinks);\n}}\n"
        )
    if spec.kind == "bwd_prep":
        return (
            f'extern "C" __global__ void {bounds} {spec.symbol}(\n'
            f"    {_PTR} O, {_PTR} dO, const float* __restrict__ LSE, float* __restrict__ delta,\n"
            f"    float* __restrict__ lse2, {_strides('o', 'do')}, int Hq, int Sq, fd_i64 rows) {{\n"
            f"    fd_attn_bwd_prep<{spec.head_dim}, {bf16}>(O, dO, LSE, delta, lse2, {_args('o', 'do')},\n"
            "        Hq, Sq, rows);\n}\n"
        )
    if spec.kind == "bwd_dq":
        return (
            f'extern "C" __global__ void {bounds} {spec.symbol}(\n'
            f"    {_PTR} Q, {_PTR} K, {_PTR} V, {_PTR} dO, const float* __restrict__ lse2,\n"
            "    const float* __restrict__ delta, fd_u16* __restrict__ dQ,\n"
            f"    {_strides('q', 'k', 'v', 'do', 'dq')},\n"
            f"    {_SCALARS}) {{\n"
            f"    {smem}\n"
            f"    fd_attn_bwd_dq<{tpl}>(smem, Q, K, V, dO, lse2, delta, dQ,\n"
            f"        {_args('q', 'k', 'v', 'do', 'dq')}, {_SCALAR_ARGS});\n}}\n"
        )
    if spec.kind == "bwd_dkdv":
        return (
            f'extern "C" __global__ void {bounds} {spec.symbol}(\n'
            f"    {_PTR} Q, {_PTR} K, {_PTR} V, {_PTR} dO, const float* __restrict__ lse2,\n"
            "    const float* __restrict__ delta, fd_u16* __restrict__ dK, fd_u16* __restrict__ dV,\n"
            f"    {_strides('q', 'k', 'v', 'do', 'dk', 'dv')},\n"
            f"    {_SCALARS}) {{\n"
            f"    {smem}\n"
            f"    fd_attn_bwd_dkdv<{tpl}>(smem, Q, K, V, dO, lse2, delta, dK, dV,\n"
            f"        {_args('q', 'k', 'v', 'do', 'dk', 'dv')}, {_SCALAR_ARGS});\n}}\n"
        )
    raise ValueError(f"spec.kind: expected one of fwd, bwd_prep, bwd_dq, bwd_dkdv, got {spec.kind!r}")


def module_source(specs: list[KernelSpec]) -> str:
    """Header text plus one entry point per spec: a self-contained translation unit."""
    for s in specs:
        bad = s.problems()
        if bad:
            raise ValueError(f"kernel spec {s}: " + "; ".join(bad))
    return header_text() + "\n// ---- entry points ----\n" + "\n".join(entry_point(s) for s in specs)


# ---------------------------------------------------------------------------------------------
# Run-time compilation (NVRTC through CuPy)
# ---------------------------------------------------------------------------------------------


class CompileError(RuntimeError):
    """NVRTC rejected the generated source (the message carries NVRTC's log)."""


@dataclass
class CompiledKernel:
    spec: KernelSpec
    function: Any  # cupy.RawKernel
    compile_s: float  # 0.0 when loaded from the disk cache
    source: str  # "nvrtc", "disk", or "cupy" (CuPy's own compiler and cache)


_MODULES: dict[tuple[KernelSpec, int], CompiledKernel] = {}
_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple[KernelSpec, int], threading.Lock] = {}


def cache_dir() -> str:
    from flashdispatch.backend import kernel_cache_dir

    return kernel_cache_dir()


def _cache_key(src: str, options: tuple[str, ...], arch: str, nvrtc_version: tuple[int, int]) -> str:
    h = hashlib.sha256()
    for part in (src, "\0".join(options), arch, f"{nvrtc_version}"):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def _nvrtc_compile(src: str, name: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    """Compile with NVRTC; returns (binary, "cubin"|"ptx"). Raises RuntimeError with the log."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(src, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:
            raise CompileError(f"NVRTC failed on {name}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        get_cubin = getattr(nvrtc, "getCUBIN", None)
        if get_cubin is not None:
            data = get_cubin(prog)
            if data:
                return (data if isinstance(data, bytes) else bytes(data)), "cubin"
        return nvrtc.getPTX(prog).encode(), "ptx"
    finally:
        nvrtc.destroyProgram(prog)


def _load(path: str, symbol: str) -> Any:
    import cupy

    return cupy.RawModule(path=path).get_function(symbol)


def compile_kernel(spec: KernelSpec, device_index: int, arch: str) -> CompiledKernel:
    """The kernel for `spec` on one device, compiled at most once per process and per disk cache.

    Thread-safe; different specs compile in parallel (NVRTC runs without the GIL)."""
    key = (spec, device_index)
    hit = _MODULES.get(key)
    if hit is not None:
        return hit
    with _LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        hit = _MODULES.get(key)
        if hit is None:
            hit = _compile_uncached(spec, device_index, arch)
            _MODULES[key] = hit
        return hit


def nvrtc_target(arch: str, supported: Sequence[int] | None) -> str:
    """NVRTC's --gpu-architecture for a device of `arch` ("sm_90"): the device's own when NVRTC
    knows it, else PTX for the newest architecture it does know, which the driver compiles for the
    device (an NVRTC older than the GPU would otherwise fail every compile). None: unknown, try."""
    cc = int(arch[3:])
    if not supported or cc in supported:
        return arch
    older = [a for a in supported if a <= cc]
    return f"compute_{max(older)}" if older else arch


def _supported_archs() -> tuple[int, ...] | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        return tuple(int(a) for a in nvrtc.getSupportedArchs())
    except Exception:  # an older CuPy without the query: compile for the device's own arch
        return None


def _compile_uncached(spec: KernelSpec, device_index: int, arch: str) -> CompiledKernel:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    src = module_source([spec])
    options = NVRTC_OPTIONS + (f"--gpu-architecture={nvrtc_target(arch, _supported_archs())}",)
    t0 = time.perf_counter()
    with cupy.cuda.Device(device_index):
        try:
            ver = tuple(nvrtc.getVersion())
            digest = _cache_key(src, options, arch, ver)  # type: ignore[arg-type]
            folder = os.path.join(cache_dir(), "cupy")
            found = [os.path.join(folder, f"{digest}.{ext}") for ext in ("cubin", "ptx")]
            found = [p for p in found if os.path.isfile(p)]
            fn = _from_disk(found[0], spec.symbol) if found else None
            how = "disk"
            if fn is None:
                binary, ext = _nvrtc_compile(src, f"{spec.symbol}.cu", options)
                path = os.path.join(folder, f"{digest}.{ext}")
                write_atomic(path, binary)
                fn, how = _load(path, spec.symbol), "nvrtc"
        except CompileError:
            raise  # an error in our source: CuPy's path would fail the same way
        except Exception as e:  # our own cache is an optimisation; CuPy's compiler is the fallback
            log.warning("cupy backend: own module cache failed (%s: %s); using CuPy's", type(e).__name__, e)
            fn = cupy.RawModule(code=src, options=NVRTC_OPTIONS).get_function(spec.symbol)
            how = "cupy"
        if spec.smem_bytes() > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = spec.smem_bytes()
    dt = time.perf_counter() - t0
    log.info("cupy backend: %s ready in %.3f s (%s)", spec.symbol, dt, how)
    return CompiledKernel(spec, fn, dt if how != "disk" else 0.0, how)


def _from_disk(path: str, symbol: str) -> Any | None:
    """The cached module's kernel, or None when the file cannot be loaded (then it is removed, so
    that the next process does not trip on it again and the caller writes a good one)."""
    try:
        return _load(path, symbol)
    except Exception as e:
        log.warning("cupy backend: cached module %s unusable (%s: %s); recompiling", path, type(e).__name__, e)
        try:
            os.remove(path)
        except OSError:
            pass
        return None


def write_atomic(path: str, data: bytes) -> None:
    """Write-then-rename, so that a concurrent process never loads half a file; synced before the
    rename (a crash leaves the old file or the new one, not a truncated one), readable by the
    other users of a shared cache directory, and no temporary file left behind on failure."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def loaded() -> list[CompiledKernel]:
    return list(_MODULES.values())
