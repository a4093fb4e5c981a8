"""`CupyAttention`: the cupy backend as the dispatcher sees it (capabilities, configs, run)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, ClassVar

import torch

from flashdispatch.backend import Capabilities, Gradients, Implementation, on_inputs
from flashdispatch.device import DeviceInfo
from flashdispatch.problem import Problem

from . import configs

MIN_CUDA_CAPABILITY = 80
MAX_GRID_YZ = 65535


@functools.lru_cache(maxsize=1)
def _availability() -> str | None:
    """Why the backend cannot run in this process (None: it can). Imports CuPy: called lazily.
    The GPU comes first: on a machine without an NVIDIA GPU, installing CuPy would not help."""
    if torch.version.hip:
        return "this torch is a ROCm build: the cupy kernels are CUDA C++ for NVIDIA GPUs"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch: the cupy kernels are CUDA C++ for NVIDIA GPUs"
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # ImportError, or a CuPy built for another CUDA failing at import
        return f"CuPy is not importable ({type(e).__name__}: {e}); install the extra: pip install 'flashdispatch[cupy]'"
    try:
        nvrtc.getVersion()
    except Exception as e:
        return f"NVRTC (CUDA's run-time compiler) is not usable through CuPy ({type(e).__name__}: {e})"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
        drv = cupy.cuda.runtime.driverGetVersion()
        rt = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as e:
        return f"CuPy cannot talk to the CUDA driver ({type(e).__name__}: {e})"
    # CUDA's minor-version compatibility: a 13.0 driver runs a 13.x runtime; only a major
    # version ahead of the driver fails.
    if drv // 1000 < rt // 1000:
        return f"the CUDA driver ({drv}) is older than CuPy's CUDA runtime major version ({rt})"
    return None


class CupyAttention(Implementation):
    """Own FlashAttention-2 CUDA kernels (mma.sync, ldmatrix, cp.async) compiled by NVRTC."""

    name: ClassVar[str] = "cupy"
    default_rank: ClassVar[int | None] = 20
    backend: ClassVar[str] = "cupy"

    def availability(self) -> str | None:
        return _availability()

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(
            device_kinds=frozenset({"cuda"}),
            dtypes=frozenset({torch.float16, torch.bfloat16}),
            min_cuda_capability=MIN_CUDA_CAPABILITY,
            max_head_dim=max(configs.HEAD_DIMS),
            head_dims=frozenset(configs.HEAD_DIMS),
            different_v_head_dim=False,
            gqa=True,
            causal=True,
            bottom_right_causal=True,
            seqlen_q_ne_k=True,
            backward=True,
            lse=True,
            deterministic=True,
            layouts=frozenset({"bhsd", "bshd"}),
            window=True,
            softcap=True,
            sinks=True,
            notes="FlashAttention-2 in CUDA C++ (mma.sync m16n8k16, ldmatrix, cp.async), NVRTC via CuPy; "
                  "window, softcap and sinks as template flags",
        )

    def extra_reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        r: list[str] = []
        if p.needs_grad and p.head_dim not in configs.BACKWARD_HEAD_DIMS:
            r.append(
                f"requires_grad with head_dim={p.head_dim} (backward supports {list(configs.BACKWARD_HEAD_DIMS)})"
            )
        r += configs.no_fit_reasons(p.head_dim, dev.cuda_capability or 90, p.needs_grad)
        if max(p.seqlen_q, p.seqlen_k) >= 2**31:
            r.append(f"seqlen={max(p.seqlen_q, p.seqlen_k)} (kernel row indices are 32-bit)")
        # heads and batch are grid dimensions y and z, which CUDA caps at 65535
        if p.heads_q > MAX_GRID_YZ or p.batch > MAX_GRID_YZ:
            r.append(f"Hq={p.heads_q}, B={p.batch} (each at most {MAX_GRID_YZ}: CUDA grid limit)")
        return r

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        return configs.default_config(p.head_dim, dev.cuda_capability or 90)

    def config_space(self, p: Problem, dev: DeviceInfo) -> list[dict[str, Any]]:
        return list(configs.config_space(p.head_dim, dev.cuda_capability or 90, backward=p.needs_grad))

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        notes = []
        if p.heads_q != p.heads_kv:
            notes.append(f"GQA in the kernel: query head h reads kv head h // {p.gqa_ratio}, no K/V copy")
        if p.effective_causal:
            notes.append("bottom-right causal with block skipping")
        if p.has_window:
            notes.append(f"window={p.window}: key blocks outside the window are skipped")
        if p.softcap:
            notes.append(f"softcap={p.softcap:g} in the kernel")
        if p.sinks:
            notes.append("sinks in the kernel's softmax; dsinks from lse and delta")
        notes.append("first call per config compiles with NVRTC (cached on disk); `flashdispatch warmup` precompiles")
        return notes

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        # api.py transposes a bshd result back: writing bshd memory here hands the user a dense
        # tensor in the layout they asked for, without a copy.
        return _ops().cupy_forward(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale, config=config,
                                   out_bshd=p.layout == "bshd", **_variant_kwargs(p, inp))

    def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
        launch = _ops().prepare_cupy_forward(inp.q, inp.k, inp.v, causal=p.causal, scale=p.scale, config=config,
                                             out_bshd=p.layout == "bshd", **_variant_kwargs(p, inp))
        return on_inputs(launch, "sinks" if p.sinks else None)

    def backward(self, inp, out, lse, do, p, config):  # type: ignore[no-untyped-def]
        grads = _ops().cupy_backward(do, inp.q, inp.k, inp.v, out, lse, causal=p.causal, scale=p.scale,
                                     config=config, **_variant_kwargs(p, inp))
        if p.sinks:
            return Gradients(grads[0], grads[1], grads[2], {"sinks": grads[3]})
        return Gradients(*grads)


@functools.cache
def _ops() -> ModuleType:
    """ops.py (the launch code, which reaches CuPy), imported on first use; read here (about 50 ns)
    rather than through an import statement per call (about 0.8 us on a CPU)."""
    return importlib.import_module(f"{__package__}.ops")


def _variant_kwargs(p: Problem, inp: Any) -> dict[str, Any]:
    """The launch functions' variant keywords ({} for plain attention: the plain kernels)."""
    if not p.is_variant:
        return {}
    return {"window_left": p.window[0], "window_right": p.window[1], "softcap": float(p.softcap),
            "sinks": inp.extras["sinks"] if p.sinks else None}
