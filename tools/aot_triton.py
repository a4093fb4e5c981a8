"""Ahead-of-time compile checks of the Triton kernels, for GPUs this machine does not have.

`triton.compile(ASTSource(...), target=GPUTarget(...))` runs the whole compiler (down to cubin or
hsaco) on a CPU-only machine. That proves every kernel with every config the defaults (and the
shipped profiles) can choose compiles for A100, H100, MI250X and MI300X, and that its shared memory
(the compiler's own figure, metadata.shared) fits the target. It also reads the register spills
(NVIDIA: `ptxas -v` on the PTX; AMD: the VGPR spill count of the kernel's metadata): a tile that
spills kilobytes per thread runs several times slower, and only a GPU would otherwise show it.

    python -m flashdispatch.tools.aot_triton            # every default and profile config
    python -m flashdispatch.tools.aot_triton --target hip:gfx942 --head-dim 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

log = logging.getLogger("flashdispatch")


def _targets() -> dict[str, tuple[str, int | str, int, str]]:
    """name -> (backend, arch, warp size, configs.py arch family) for every GPU architecture of the
    device table (dispatch/device.py): the kernels compile for each device that can select them."""
    from flashdispatch.backends.triton import configs
    from flashdispatch.device import DEVICE_TABLE, simulated_device

    out: dict[str, tuple[str, int | str, int, str]] = {}
    for row in DEVICE_TABLE:
        dev = simulated_device(row.key)
        if dev.kind == "cpu":
            continue
        family = configs.arch_family(dev.kind, dev.arch)
        if dev.kind == "rocm":
            out[f"hip:{dev.arch}"] = ("hip", dev.arch, configs.WARP_SIZE[family], family)
        else:
            out[f"cuda:{dev.arch}"] = ("cuda", dev.cuda_capability, configs.WARP_SIZE[family], family)
    return dict(sorted(out.items()))


TARGETS: dict[str, tuple[str, int | str, int, str]] = _targets()
FORWARD_KERNELS: tuple[str, ...] = ("forward", "forward_tma", "varlen_forward", "varlen_forward_tma", "decode",
                                     "paged_decode", "decode_merge")
# backends/triton/aot.py's backward_kernels(), by name (each brings its own AOT spec)
BACKWARD_KERNEL_NAMES: tuple[str, ...] = ("bwd_preprocess", "bwd_dkdv", "bwd_dq")
KERNELS: tuple[str, ...] = FORWARD_KERNELS + BACKWARD_KERNEL_NAMES
_TRITON_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
# the kernels' variant switches (window, softcap, sinks) off: the plain kernels
_PLAIN = {"WINDOW": False, "SOFTCAP": 0, "HAS_SINKS": False}


def _variant_flags(case: "KernelCase", arch: str) -> dict[str, Any]:
    """The variant constexprs of a case: all off, or (case.variants) a sliding window, softcap with
    the tanh the launcher picks (forward.softcap_mode: NVIDIA's tanh.approx for bf16, else the
    portable form) and sinks, so that every variant path compiles for the target."""
    if not case.variants:
        return dict(_PLAIN)
    from flashdispatch.backends.triton.forward import softcap_mode

    # forward.fast_tanh_on's rule, for a target instead of a tensor: bf16 on NVIDIA
    fast_tanh = arch.startswith("sm_") and case.dtype == "bf16"
    return {"WINDOW": True, "SOFTCAP": softcap_mode(1.0, fast_tanh), "HAS_SINKS": True}


@dataclass(frozen=True)
class KernelCase:
    """One kernel specialisation: which kernel, its tile config and the problem traits it bakes in."""

    kernel: str  # one of KERNELS
    config: tuple[tuple[str, Any], ...]  # sorted items of the config dict (hashable)
    dtype: str = "fp16"
    head_dim: int = 128
    head_dim_v: int = 128
    causal: bool = False
    origin: str = "default"  # where the config comes from: "default" or a profile path
    variants: bool = False  # window + softcap + sinks compiled in (_variant_flags)

    @property
    def cfg(self) -> dict[str, Any]:
        return dict(self.config)

    def without_origin(self) -> "KernelCase":
        """The same specialisation with the origin left out (what the compiler sees)."""
        return dataclasses.replace(self, origin="")

    def describe(self) -> str:
        c = " ".join(f"{k}={v}" for k, v in self.config)
        return (f"{self.kernel}{'+window+softcap+sinks' if self.variants else ''} {self.dtype} D={self.head_dim}"
                f"{'' if self.head_dim_v == self.head_dim else f'/{self.head_dim_v}'}"
                f" causal={self.causal} [{c}]")


@dataclass
class CompileResult:
    target: str
    case: KernelCase
    ok: bool  # compiled and fits
    compiled: bool
    shared: int | None  # bytes, the compiler's figure
    limit: int  # bytes available on the target
    seconds: float
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        status = "ok  " if self.ok else ("FAIL" if not self.compiled else "OVER")
        shared = f"{self.shared / 1024:6.1f} KiB" if self.shared is not None else "     -    "
        spill = self.extra.get("spill_bytes")
        spill_s = f"spill {spill:5d} B" if spill is not None else "spill     - "
        err = f"  ({self.error})" if self.error else ""
        return (f"{status} {self.target:11s} {shared} / {self.limit // 1024} KiB  {spill_s}  {self.seconds:5.1f}s  "
                f"{self.case.describe()}{err}")


def make_case(kernel: str, config: dict[str, Any], *, dtype: str = "fp16", head_dim: int = 128,
              head_dim_v: int | None = None, causal: bool = False, origin: str = "default",
              variants: bool = False) -> KernelCase:
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_TRITON_DTYPES)}, got {dtype!r}")
    if variants and kernel == "bwd_preprocess":
        raise ValueError("variants: bwd_preprocess has no variant switches")
    return KernelCase(kernel, tuple(sorted(config.items())), dtype, head_dim,
                      head_dim if head_dim_v is None else head_dim_v, causal, origin, variants)


def _source(case: KernelCase, arch: str) -> tuple[Any, dict[str, Any]]:
    """(ASTSource, compile options) of a case, specialised the way a real launch would be:
    unit last strides as constants, pointers and the other strides 16-divisible."""
    import triton

    from flashdispatch.backends.triton import aot, configs, forward

    cfg = dict(case.config)
    if case.kernel in BACKWARD_KERNEL_NAMES:
        (kern,) = [k for k in aot.backward_kernels() if k.name == case.kernel]
        spec = kern.spec(cfg, case.dtype, case.head_dim, case.head_dim_v, case.causal, arch)
        constexprs = dict(spec.constexprs)
        if case.variants:  # the backward kernels take window and softcap (sinks' gradient is torch's)
            flags = _variant_flags(case, arch)
            constexprs.update(WINDOW=flags["WINDOW"], SOFTCAP=flags["SOFTCAP"])
        src = triton.compiler.ASTSource(fn=kern.fn, signature=spec.signature, constexprs=constexprs)
        return src, {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    dt = _TRITON_DTYPES[case.dtype]
    bd, bdv = configs.block_dim(case.head_dim), configs.block_dim(case.head_dim_v)
    pad_d, pad_dv = bd != case.head_dim, bdv != case.head_dim_v
    ieee = case.dtype == "fp32"
    consts: dict[str, Any]
    if case.kernel in ("forward", "forward_tma", "varlen_forward", "varlen_forward_tma"):
        fcfg = configs.resolve_forward(cfg, arch, case.head_dim, case.causal)
        varlen = case.kernel.startswith("varlen")
        if case.kernel in ("forward", "varlen_forward"):
            fn = aot.varlen_forward_kernel() if varlen else aot.forward_kernel()
            consts = dict(BLOCK_M=fcfg["BLOCK_M"], BLOCK_N=fcfg["BLOCK_N"], BLOCK_D=bd, BLOCK_DV=bdv,
                          CAUSAL=case.causal, PAD_D=pad_d, PAD_DV=pad_dv, IEEE=ieee,
                          sqd=1, skd=1, svd=1, sod=1, **_variant_flags(case, arch))
            if not varlen:
                consts["OFFS64"] = False
        else:
            fn = aot.varlen_forward_kernel(tma=True) if varlen else aot.forward_kernel(tma=True)
            consts = dict(BLOCK_M=fcfg["BLOCK_M"], BLOCK_N=fcfg["BLOCK_N"], BLOCK_D=bd, BLOCK_DV=bdv,
                          CAUSAL=case.causal, IEEE=ieee, WS=bool(fcfg.get("WS", False)),
                          **_variant_flags(case, arch))
        if varlen:
            consts["slm"] = 1  # lse is (Hq, total_q): unit row stride, a head stride of any size
        opts = forward.launch_options(fcfg)
    elif case.kernel == "decode":
        # BLOCK_M of decode follows the query group size, not the config: check the largest
        block_m = int(cfg.pop("BLOCK_M", configs.DECODE_MAX_BLOCK_M))
        dcfg = configs.resolve_decode(cfg, arch, case.head_dim)
        fn = aot.decode_kernels()[0]
        consts = dict(BLOCK_M=block_m, BLOCK_N=dcfg["BLOCK_N"], BLOCK_D=bd, BLOCK_DV=bdv,
                      CAUSAL=case.causal, PAD_D=pad_d, PAD_DV=pad_dv, IEEE=ieee, DIRECT=False,
                      OFFS64=False, sqd=1, skd=1, svd=1, sod=1, **_variant_flags(case, arch))
        opts = forward.launch_options(dcfg)
    elif case.kernel == "paged_decode":
        # a paged cache of 16-token pages (the smallest the kernel takes), the most rows a program holds
        block_m = int(cfg.pop("BLOCK_M", configs.DECODE_MAX_BLOCK_M))
        dcfg = configs.resolve_decode(cfg, arch, case.head_dim)
        fn = aot.paged_kernel()
        consts = dict(PAGE=16, PAGED=True, BLOCK_M=block_m, BLOCK_N=dcfg["BLOCK_N"], BLOCK_D=bd, BLOCK_DV=bdv,
                      CAUSAL=case.causal, PAD_D=pad_d, PAD_DV=pad_dv, IEEE=ieee, DIRECT=False,
                      sqd=1, skd=1, svd=1, sod=1, stn=1, **_variant_flags(case, arch))
        opts = forward.launch_options(dcfg)
    else:
        from flashdispatch.backends.triton import decode

        fn = aot.decode_kernels()[1]
        # the launcher's own constexprs and warps for the most splits a decode launch can have
        consts, opts = decode.merge_meta(int(cfg.get("BLOCK_S", configs.DECODE_MAX_SPLITS)), bdv, case.head_dim_v,
                                         case.variants)
        consts["sod"] = 1
    pointers = {"Q": dt, "K": dt, "V": dt, "O": dt, "LSE": "fp32", "PO": "fp32", "PL": "fp32", "SINKS": "fp32",
                "CU_Q": "i32", "CU_K": "i32", "SEQLENS": "i32", "TABLE": "i32"}
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "softcap_in"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("s") and len(name) == 3 and name not in ("stb", "slh"):
                # strides: multiples of 16 elements (a block table's row stride is its width, and
                # the varlen lse's head stride the packed row count: any number)
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs), opts


def _ptxas() -> str | None:
    """Triton's own ptxas (the one that builds the cubin), else one on PATH."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return str(path)
    except Exception:  # the knob moved: fall back to PATH
        pass
    return shutil.which("ptxas")


def ptxas_spill_bytes(ptx: str, capability: int | str) -> int | None:
    """Bytes of register spill stores per thread over the PTX's kernels (ptxas -v), or None when
    no ptxas is at hand or it fails (the compile itself has already succeeded)."""
    exe = _ptxas()
    if exe is None:
        return None
    arch = f"sm_{capability}a" if int(capability) >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        try:
            r = subprocess.run([exe, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "kernel.cubin")],
                               capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
    found = re.findall(r"(\d+) bytes spill stores", r.stdout + r.stderr)
    return sum(int(x) for x in found) if r.returncode == 0 and found else None


def amdgcn_spill_bytes(amdgcn: str) -> int | None:
    """Bytes of VGPR spills per lane (4 per spilled register) from the AMDGCN code's kernel
    metadata, or None when it carries no such field."""
    found = re.findall(r"\.vgpr_spill_count:\s*(\d+)", amdgcn)
    return 4 * sum(int(x) for x in found) if found else None


def check_one(target: str, case: KernelCase) -> CompileResult:
    """Compile one case for one target and compare its shared memory with the target's."""
    import triton
    from triton.backends.compiler import GPUTarget

    from flashdispatch.backends.triton import configs

    if target not in TARGETS:
        raise ValueError(f"target: expected one of {sorted(TARGETS)}, got {target!r}")
    backend, arch_id, warp, arch = TARGETS[target]
    limit = configs.SHARED_MEMORY_BYTES[arch]
    t0 = time.perf_counter()
    try:
        src, opts = _source(case, arch)
        compiled = triton.compile(src, target=GPUTarget(backend, arch_id, warp), options=opts)
    except Exception as e:  # a compile failure is a result to report, not a crash of the check
        msg = str(e).strip().splitlines()
        return CompileResult(target, case, False, False, None, limit, time.perf_counter() - t0,
                             f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300])
    shared = int(compiled.metadata.shared)
    extra: dict[str, Any] = {"num_warps": compiled.metadata.num_warps}
    if backend == "cuda":
        spills = ptxas_spill_bytes(compiled.asm["ptx"], arch_id)
    else:
        spills = amdgcn_spill_bytes(compiled.asm.get("amdgcn", ""))
    if spills is not None:
        extra["spill_bytes"] = spills
    fits = shared <= limit
    return CompileResult(target, case, fits, True, shared, limit, time.perf_counter() - t0,
                         None if fits else f"shared {shared} B > {limit} B", extra)


def check_configs(targets: Iterable[str], configs: Iterable[KernelCase]) -> list[CompileResult]:
    """Compile every case for every target; one CompileResult each (ok = compiled and fits)."""
    cases = list(configs)
    results = []
    for target in targets:
        for case in cases:
            r = check_one(target, case)
            log.info("%s", r)
            results.append(r)
    return results


def _group_cases(k: Any, cfg: dict[str, Any], arch: str, origin: str) -> list[KernelCase]:
    """The kernels a triton config of a profile group launches (forward or decode; the backward's)."""
    from flashdispatch.backends.triton import configs
    from flashdispatch.costmodel import CAUSAL_CLASSES

    cases: list[KernelCase] = []
    causal = k.cls in CAUSAL_CLASSES
    # a variant group's kernels compile with the variant switches on (all three: a superset)
    common = dict(dtype=k.dtype, head_dim=k.head_dim, causal=causal, origin=origin, variants=k.variant != "plain")
    if k.cls in ("decode", "speculative") and cfg.get("PATH", "split_kv") == "split_kv":
        cases.append(make_case("decode", cfg, **common))
    else:
        fwd = {kk: v for kk, v in cfg.items() if kk in configs.FORWARD_KEYS}
        kernel = "forward_tma" if fwd.get("TMA") and arch == "sm_90" else "forward"
        cases.append(make_case(kernel, fwd, **common))
    if k.pass_ == "fwd_bwd":
        bwd = {kk: v for kk, v in cfg.items() if kk.startswith("BWD_")}
        cases.extend(make_case(name, bwd, **{**common, "variants": common["variants"] and name != "bwd_preprocess"})
                     for name in BACKWARD_KERNEL_NAMES)
    return cases


def _profile_cases(arch: str) -> list[KernelCase]:
    """Triton configs of the shipped profiles (profiles/*.yaml) whose device has this arch family."""
    from importlib import resources

    from flashdispatch.backends.triton import configs
    from flashdispatch.costmodel import SERVING_CLASSES
    from flashdispatch.profile_store import ProfileError, parse_profile

    cases: list[KernelCase] = []
    try:
        files = [f for f in resources.files("flashdispatch.profiles").iterdir() if f.name.endswith(".yaml")]
    except (ModuleNotFoundError, FileNotFoundError):
        return cases
    for f in files:
        try:
            prof = parse_profile(f.read_text(encoding="utf-8"), str(f))
        except ProfileError as e:
            log.warning("%s", e)
            continue
        dev_arch = str(prof.device.get("arch", ""))
        kind = "rocm" if dev_arch.startswith("gfx") else "cuda"
        if not dev_arch or configs.arch_family(kind, dev_arch) != arch:
            continue
        for g in prof.groups:
            if g.key.cls in SERVING_CLASSES:  # the serving kernels take no tuned config
                continue
            # the group's config and every point's: what selection can pick (Group.config_for)
            cfgs = [g.config.get("triton")] + [pt.config.get("triton") for pt in g.points]
            for cfg in dict.fromkeys(json.dumps(c, sort_keys=True) for c in cfgs if c):
                cases.extend(_group_cases(g.key, json.loads(cfg), arch, str(f)))
    return cases


def default_cases(target: str, head_dims: Sequence[int] = (64, 128, 256)) -> list[KernelCase]:
    """Every kernel/config the defaults (and shipped profiles) can choose on `target`'s arch."""
    from flashdispatch.backends.triton import configs

    arch = TARGETS[target][3]
    cases: list[KernelCase] = []
    # one problem per shape class (configs.tile_class): base, short, chunked prefill
    classes = ((4096, 4096), (512, 512), (1024, 1024 * configs.CHUNK_RATIO))
    for d in head_dims:
        for causal in (False, True):
            for sq, sk in classes:
                cfg = configs.forward_defaults(arch, d, causal, sq, sk)
                tma = bool(cfg.get("TMA")) and arch == "sm_90"
                cases.append(make_case("forward_tma" if tma else "forward", cfg, head_dim=d, causal=causal))
                if tma:  # views the copy engine cannot address run the pointer tiles
                    cases.append(make_case("forward", configs.pointer_config(cfg, arch, d), head_dim=d,
                                           causal=causal))
            # packed sequences: the launcher's choice for a long batch (varlen.varlen_forward)
            cfg = configs.forward_defaults(arch, d, causal, 4096, 4096)
            if cfg.get("TMA") and arch == "sm_90":
                cases.append(make_case("varlen_forward_tma", cfg, head_dim=d, causal=causal))
            cases.append(make_case("varlen_forward", configs.pointer_config(cfg, arch, d), head_dim=d,
                                   causal=causal))
        dec = configs.decode_defaults(arch, d)
        cases.append(make_case("decode", {**dec, "BLOCK_M": configs.DECODE_MAX_BLOCK_M}, head_dim=d,
                               causal=True))
        cases.append(make_case("paged_decode", {**dec, "BLOCK_M": configs.DECODE_MAX_BLOCK_M}, head_dim=d,
                               causal=True))
        cases.append(make_case("decode_merge", {}, head_dim=d))
        # window + softcap + sinks at the causal defaults (bf16: NVIDIA's tanh.approx where it runs):
        # every kernel at D=128, the forward and the dk/dv kernel (the most registers) at the others
        cfg = configs.forward_defaults(arch, d, True, 4096, 4096)
        tma = bool(cfg.get("TMA")) and arch == "sm_90"
        variant = dict(dtype="bf16", head_dim=d, causal=True, variants=True)
        cases.append(make_case("forward_tma" if tma else "forward", cfg, **variant))
        cases.append(make_case("bwd_dkdv", {}, **variant))
        if d == 128:
            if tma:  # the pointer fallback's tiles with the variants too
                cases.append(make_case("forward", configs.pointer_config(cfg, arch, d), **variant))
            cases.append(make_case("varlen_forward_tma" if tma else "varlen_forward", cfg, **variant))
            for kernel in ("decode", "paged_decode"):
                cases.append(make_case(kernel, {**dec, "BLOCK_M": configs.DECODE_MAX_BLOCK_M}, **variant))
            cases.append(make_case("decode_merge", {}, **variant))
            cases.append(make_case("bwd_dq", {}, **variant))
        # backward defaults: 16-bit tiles for every head-dim bucket; fp32 has its own smaller tiles
        for causal in (False, True):
            for dtype in ("fp16", "fp32") if d == 64 else ("fp16",):
                cases.extend(make_case(name, {}, dtype=dtype, head_dim=d, causal=causal)
                             for name in BACKWARD_KERNEL_NAMES)
    cases.extend(_profile_cases(arch))
    # one compile per specialisation: a profile entry equal to a default is the default's case
    seen: set[KernelCase] = set()
    return [c for c in cases
            if not (c.without_origin() in seen or seen.add(c.without_origin()))]  # type: ignore[func-returns-value]


def check_defaults(targets: Sequence[str] = tuple(TARGETS),
                   head_dims: Sequence[int] = (64, 128, 256)) -> list[CompileResult]:
    results: list[CompileResult] = []
    for t in targets:
        results.extend(check_configs([t], default_cases(t, head_dims)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.aot_triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="target to compile for (repeatable; default: all)")
    ap.add_argument("--head-dim", type=int, action="append", help="head-dim bucket (repeatable)")
    args = ap.parse_args(argv)
    results = check_defaults(args.target or tuple(TARGETS), tuple(args.head_dim or (64, 128, 256)))
    for r in results:
        sys.stdout.write(f"{r}\n")
    bad = [r for r in results if not r.ok]
    sys.stdout.write(f"{len(results) - len(bad)}/{len(results)} ok\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
