"""Compile the cupy backend's CUDA sources with nvcc, without a GPU (CI's check of the .cu/.cuh).

Every instantiation that defaults, the tuner's space and the shipped profiles can choose, plus a
representative set of the variant kernels (sliding window, softcap, sinks), is put into one
translation unit per architecture and compiled with `nvcc --cubin -Xptxas -v`; the
ptxas report gives registers, spills and stack per kernel. The sources must also compile under
NVRTC (no host headers), which the GPU run exercises.

    python -m flashdispatch.tools.nvcc_check [--arch sm_80 --arch sm_90] [--space] [--variants] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from flashdispatch.backends.cupy import configs
from flashdispatch.backends.cupy.configs import KernelSpec
from flashdispatch.backends.cupy.kernels import NVCC_OPTIONS, module_source
from flashdispatch.device import DEVICE_TABLE

# the CUDA architectures of the device table (sm_80, sm_90)
DEFAULT_ARCHS: tuple[str, ...] = tuple(sorted({d.arch for d in DEVICE_TABLE if d.kind == "cuda"}))
NVCC_TIMEOUT_S = 600

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class KernelReport:
    symbol: str
    registers: int = 0
    stack_bytes: int = 0
    spill_bytes: int = 0


@dataclass
class NvccResult:
    arch: str
    mode: str  # "cubin" | "object"
    ok: bool
    seconds: float
    log: str
    kernels: dict[str, KernelReport] = field(default_factory=dict)

    def summary(self) -> str:
        spills = [k.symbol for k in self.kernels.values() if k.spill_bytes]
        state = "ok" if self.ok else "FAILED"
        return (
            f"nvcc --{self.mode} {self.arch}: {state}, {len(self.kernels)} kernels in {self.seconds:.1f} s"
            + (f", spilling: {spills}" if spills else "")
        )


def find_nvcc() -> str | None:
    """Path of nvcc, or None when this machine has none (the check is then skipped)."""
    return shutil.which("nvcc")


def parse_ptxas(log: str) -> dict[str, KernelReport]:
    out: dict[str, KernelReport] = {}
    cur: KernelReport | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), KernelReport(m.group(1)))
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur.stack_bytes = int(m.group(1))
            cur.spill_bytes = int(m.group(2)) + int(m.group(3))
        m = _REGS.search(line)
        if m:
            cur.registers = int(m.group(1))
    return out


def nvcc_compile(source: str, arch: str, *, mode: str = "cubin", nvcc: str | None = None) -> NvccResult:
    """Compile one translation unit for one architecture ("sm_80", "sm_90"); never raises for a
    compile error (see .ok and .log)."""
    if mode not in ("cubin", "object"):
        raise ValueError(f"mode: expected 'cubin' or 'object', got {mode!r}")
    exe = nvcc or find_nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc: not found on PATH")
    with tempfile.TemporaryDirectory(prefix="fd_nvcc_") as tmp:
        src = os.path.join(tmp, "flash_attn_check.cu")
        with open(src, "w", encoding="utf-8") as f:
            f.write(source)
        out = os.path.join(tmp, "out.cubin" if mode == "cubin" else "out.o")
        flag = "--cubin" if mode == "cubin" else "-c"
        cmd = [exe, *NVCC_OPTIONS, flag, f"-arch={arch}", "-Xptxas", "-v", src, "-o", out]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S, check=False)
        dt = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and "error" not in log.lower().replace("0 errors", "")
    return NvccResult(arch, mode, ok, dt, log, parse_ptxas(log))


def selectable_specs(archs: Sequence[str] = DEFAULT_ARCHS, include_space: bool = False) -> list[KernelSpec]:
    """Instantiations the defaults (and, with include_space, the tuner's space) can choose on the
    given archs, plus every cupy config of the shipped profiles."""
    ccs = [int(a[3:]) for a in archs]
    cfgs: list[tuple[int, dict[str, int]]] = []
    for d in configs.HEAD_DIMS:
        for cc in ccs:
            cfgs.append((d, configs.default_config(d, cc)))
            if include_space:
                cfgs += [(d, c) for c in configs.config_space(d, cc, backward=True)]
    specs: dict[KernelSpec, None] = {}
    for d, c in cfgs:
        for s in configs.specs_for([c], [d]):
            specs.setdefault(s)
    for s in _profile_specs(ccs):
        specs.setdefault(s)
    return [s for s in specs if not s.problems()]


# Variant instantiations CI compiles (the whole matrix is many more kernels of the same code):
# every flag on and the window alone, causal and not, at the default tiles of D = 128 (the most
# registers; tools/nvcc_check.py --variants compiles the whole matrix).
VARIANT_HEAD_DIMS: tuple[int, ...] = (128,)


def variant_specs(archs: Sequence[str] = DEFAULT_ARCHS, full: bool = False) -> list[KernelSpec]:
    """Window / softcap / sinks instantiations at the default tiles (bf16): the forward with every
    flag (causal) and with the window alone (not causal), the backward kernels likewise with window
    and softcap. full: every head dim, dtype and causal value, each flag alone and all together."""
    specs: dict[KernelSpec, None] = {}
    fwd_flags = ((True, True, True), (True, False, False)) if not full else (
        (True, False, False), (False, True, False), (False, False, True), (True, True, True))
    for cc in (int(a[3:]) for a in archs):
        for d in configs.HEAD_DIMS if full else VARIANT_HEAD_DIMS:
            cfg = configs.default_config(d, cc)
            for dt in configs.DTYPE_NAMES if full else ("bf16",):
                for i, (w, c, s) in enumerate(fwd_flags):
                    for causal in (False, True) if full else (i == 0,):
                        specs.setdefault(configs.fwd_spec(d, dt, causal, cfg, window=w, softcap=c, sinks=s))
                        if d in configs.BACKWARD_HEAD_DIMS and (w or c):
                            for spec in configs.bwd_specs(d, dt, causal, cfg, window=w, softcap=c)[1:]:
                                specs.setdefault(spec)
    return [s for s in specs if not s.problems()]


def _profile_specs(ccs: Iterable[int]) -> list[KernelSpec]:
    from flashdispatch.tools.warmup import specs_from_profile
    from flashdispatch.device import DEVICE_TABLE
    from flashdispatch.profile_store import load_profile

    out: list[KernelSpec] = []
    for dev in DEVICE_TABLE:
        if dev.kind != "cuda":
            continue
        prof, _ = load_profile(dev.key)
        if prof is not None:
            cc = int(dev.arch[3:])
            out += specs_from_profile(prof, cc)
    return out


def check(
    archs: Sequence[str] = DEFAULT_ARCHS, *, include_space: bool = False, jobs: int = 2, mode: str = "cubin",
    all_variants: bool = False,
) -> list[NvccResult]:
    """Compile every selectable instantiation and the variant set for each arch (one nvcc per arch,
    run in parallel)."""
    specs = _specs(archs, include_space, all_variants)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda arch: _compile_fitting(arch, specs, mode), archs))


def check_arch(arch: str, spec_archs: Sequence[str] = DEFAULT_ARCHS, *, include_space: bool = False,
               mode: str = "cubin", all_variants: bool = False) -> NvccResult:
    """One nvcc for `arch`: the selectable instantiations and the variant set of `spec_archs` that fit it."""
    return _compile_fitting(arch, _specs(spec_archs, include_space, all_variants), mode)


def _specs(archs: Sequence[str], include_space: bool, all_variants: bool) -> list[KernelSpec]:
    return list(dict.fromkeys(selectable_specs(archs, include_space) + variant_specs(archs, all_variants)))


def _compile_fitting(arch: str, specs: Sequence[KernelSpec], mode: str) -> NvccResult:
    cc = int(arch[3:])
    return nvcc_compile(module_source([s for s in specs if configs.fits(s, cc)]), arch, mode=mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flashdispatch nvcc-check", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help="sm_80, sm_90 (repeatable; default both)")
    ap.add_argument("--space", action="store_true", help="also every config of the tuner's space")
    ap.add_argument("--variants", action="store_true",
                    help="every window/softcap/sinks instantiation of the defaults (about 100 kernels more per arch)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print registers and spills per kernel")
    args = ap.parse_args(argv)
    if find_nvcc() is None:
        sys.stderr.write("nvcc-check: nvcc not found on PATH\n")
        return 2
    results = check(tuple(args.arch or DEFAULT_ARCHS), include_space=args.space, jobs=args.jobs,
                    all_variants=args.variants)
    for r in results:
        sys.stdout.write(r.summary() + "\n")
        if args.verbose:
            for k in sorted(r.kernels.values(), key=lambda k: k.symbol):
                sys.stdout.write(f"  {k.symbol}: {k.registers} regs, {k.spill_bytes} B spilled\n")
        if not r.ok:
            sys.stdout.write(r.log[-4000:] + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
