"""Precompile every kernel the current profile (and the defaults) can choose.

`warmup()` is what `flashdispatch warmup` runs (the CLI calls `warmup_main`). Compiling ahead
keeps NVRTC off the first real call and out of CUDA-graph capture.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from flashdispatch.backends.cupy import configs
from flashdispatch.backends.cupy.configs import KernelSpec
from flashdispatch.cliargs import ArgumentParser, int_at_least, positive_int, user_error
from flashdispatch.costmodel import CAUSAL_CLASSES, SERVING_CLASSES

DEFAULT_JOBS = 4


@dataclass
class WarmupReport:
    device: str
    compiled: list[tuple[str, float, str]] = field(default_factory=list)  # symbol, seconds, source
    failed: list[tuple[str, str]] = field(default_factory=list)  # symbol, error
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        fresh = [c for c in self.compiled if c[2] != "disk"]
        lines = [
            f"cupy warmup on {self.device}: {len(self.compiled)} kernels ready "
            f"({len(fresh)} compiled, {len(self.compiled) - len(fresh)} from the disk cache), "
            f"{len(self.failed)} failed, {self.wall_s:.1f} s wall",
        ]
        if fresh:
            secs = sorted(c[1] for c in fresh)
            lines.append(f"  compile time per kernel: median {secs[len(secs) // 2]:.2f} s, max {secs[-1]:.2f} s")
        for sym, err in self.failed:
            lines.append(f"  FAILED {sym}: {err.splitlines()[0] if err else ''}")
        return "\n".join(lines)


def specs_from_profile(profile: Any, cuda_capability: int) -> list[KernelSpec]:
    """Instantiations a profile can select: the cupy config of every group and of every point of
    it (Group.config_for picks the nearest point's), and each group's defaults."""
    seen: dict[KernelSpec, None] = {}
    for g in getattr(profile, "groups", []):
        k = g.key
        d = int(k.head_dim)
        if d not in configs.HEAD_DIMS or k.dtype not in configs.DTYPE_NAMES or k.cls in SERVING_CLASSES:
            continue  # (cupy serves no varlen or KV-cache call)
        causal = k.cls in CAUSAL_CLASSES
        raw = [g.config.get("cupy", {})] + [pt.config.get("cupy", {}) for pt in g.points if "cupy" in pt.config]
        for c in raw:
            cfg = configs.parse_config(dict(c), d, cuda_capability)
            for s in configs.specs_for([cfg], [d], [k.dtype], [causal], backward=k.pass_ == "fwd_bwd"):
                seen.setdefault(s)
    return list(seen)


def default_specs(cuda_capability: int, head_dims: Iterable[int] = configs.HEAD_DIMS) -> list[KernelSpec]:
    """Every default instantiation: each head dim, dtype, causal value, forward and backward."""
    out: list[KernelSpec] = []
    for d in head_dims:
        out += configs.specs_for([configs.default_config(d, cuda_capability)], [d])
    return list(dict.fromkeys(out))


def specs_from_items(items: Iterable[KernelSpec | dict[str, int]], cc: int) -> list[KernelSpec]:
    """Kernel specs of explicit items: specs as given; a config dict overlaid on each head dim's
    defaults first, as the runtime does (parse_config), so that a partial dict warms the kernels
    that will run (its dQ tiles included)."""
    specs: list[KernelSpec] = []
    for item in items:
        if isinstance(item, KernelSpec):
            specs.append(item)
        else:
            for d in configs.HEAD_DIMS:
                specs += configs.specs_for([configs.parse_config(item, d, cc)], [d])
    return specs


def warmup(
    profile_or_configs: Any = None, *, device_index: int | None = None, jobs: int = DEFAULT_JOBS
) -> WarmupReport:
    """Compile (or load from the disk cache) every kernel that selection can launch here.

    `profile_or_configs`: None (the current device's profile plus every default), a
    `flashdispatch.profile_store.Profile`, or an iterable of KernelSpec / config dicts (config dicts
    are expanded over every head dim, dtype and causal value).
    """
    import torch

    from flashdispatch.backends.cupy.kernels import compile_kernel
    from flashdispatch.registry import REGISTRY

    reason = REGISTRY.availability("cupy")
    if reason is not None:
        raise RuntimeError(f"cupy backend unavailable: {reason}")
    idx = torch.cuda.current_device() if device_index is None else device_index
    major, minor = torch.cuda.get_device_capability(idx)
    cc, arch = major * 10 + minor, f"sm_{major}{minor}"
    specs: list[KernelSpec] = []
    if profile_or_configs is None:
        from flashdispatch import envs
        from flashdispatch.device import real_device
        from flashdispatch.profile_store import load_profile

        prof, _ = load_profile(real_device("cuda", idx).profile_key, envs.FLASHDISPATCH_PROFILE_DIR.read())
        if prof is not None:
            specs += specs_from_profile(prof, cc)
        specs += default_specs(cc)
    elif hasattr(profile_or_configs, "groups"):
        specs += specs_from_profile(profile_or_configs, cc)
    else:
        specs += specs_from_items(profile_or_configs, cc)
    specs = [s for s in dict.fromkeys(specs) if configs.fits(s, cc)]

    report = WarmupReport(device=f"{torch.cuda.get_device_name(idx)} ({arch})")
    t0 = time.perf_counter()

    def one(spec: KernelSpec) -> None:
        try:
            k = compile_kernel(spec, idx, arch)
            report.compiled.append((spec.symbol, k.compile_s, k.source))
        except Exception as e:  # report every failure, keep compiling the rest
            report.failed.append((spec.symbol, f"{type(e).__name__}: {e}"))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, specs))
    report.wall_s = time.perf_counter() - t0
    return report


def warmup_main(argv: list[str]) -> int:
    """`flashdispatch warmup [--jobs N] [--defaults-only]`: 0 when every kernel compiled."""
    ap = ArgumentParser(
        prog="flashdispatch warmup",
        description="Compile now the CUDA kernels of the cupy backend that this GPU's profile can choose, so "
        "that the first attention() call (or a CUDA-graph capture) does not wait for the compiler. Compiled "
        "kernels are cached on disk (FLASHDISPATCH_CACHE_DIR). Needs an NVIDIA GPU and CuPy.",
    )
    ap.add_argument("--jobs", type=positive_int, default=DEFAULT_JOBS, help="compilations in parallel")
    ap.add_argument("--device-index", type=int_at_least(0, "a CUDA device index >= 0"), default=None, help="CUDA device (default: current)")
    args = ap.parse_args(argv)
    try:
        report = warmup(None, device_index=args.device_index, jobs=args.jobs)
    except (RuntimeError, ValueError) as e:
        return user_error("flashdispatch warmup", e)
    sys.stdout.write(str(report) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(warmup_main(sys.argv[1:]))
