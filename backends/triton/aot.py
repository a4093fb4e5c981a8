"""What tools/aot_triton.py compiles ahead of time: every Triton kernel of the backend by name,
and the backward kernels' signatures and constexprs per (config, dtype, head dims, causal).

The kernels stay in the files that launch them (forward.py, decode.py, backward.py); this module
only describes them for `triton.compile(ASTSource(fn, signature, constexprs), target=...)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable, NamedTuple

from . import configs

# Kernels are read from their modules when asked for, not bound here at import: triton.jit decides
# between compiler and interpreter when a kernel is defined, and tests reload those modules.


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def forward_kernel(tma: bool = False) -> Any:
    """The forward kernel (pointer, or Hopper tensor-descriptor with tma=True)."""
    m = _module("forward")
    return m._fwd_kernel_tma if tma else m._fwd_kernel


def varlen_forward_kernel(tma: bool = False) -> Any:
    """The packed (varlen) forward kernel (pointer, or Hopper tensor-descriptor with tma=True)."""
    m = _module("varlen")
    return m._varlen_fwd_kernel_tma if tma else m._varlen_fwd_kernel


def paged_kernel() -> Any:
    """The KV-cache split kernel (paged or contiguous cache; merge: decode_kernels()[1])."""
    return _module("paged")._paged_split_kernel


def decode_kernels() -> tuple[Any, Any]:
    """The split-KV decode kernel and its lse merge kernel."""
    m = _module("decode")
    return m._decode_split_kernel, m._decode_merge_kernel


# The backward kernels (tools/aot_triton.py compiles these for sm_80, sm_90, gfx90a, gfx942).


class AotSpec(NamedTuple):
    signature: dict[str, str]  # every argument: "*fp16", "*fp32", "i32", "fp32" or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


class AotKernel(NamedTuple):
    name: str
    fn: Any  # the triton JITFunction
    # spec(config, dtype "fp16" | "bf16" | "fp32", head_dim, head_dim_v, causal[, arch]) -> AotSpec
    # (arch: the arch family whose default tiles fill what the config leaves out)
    spec: Callable[..., AotSpec]


# tensors whose element type is the input dtype; LSE and DELTA are fp32
_DATA_POINTERS = frozenset({"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"})
_FP32_POINTERS = frozenset({"LSE", "DELTA", "DQA"})
_FLOAT_ARGS = frozenset({"sm_scale", "qk_scale2", "softcap_in"})
# the variant switches (window, softcap) off: the plain kernels are what ships compiled
_PLAIN_BWD = {"WINDOW": False, "SOFTCAP": 0}


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    sig: dict[str, str] = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _DATA_POINTERS:
            sig[name] = f"*{dtype}"
        elif name in _FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _unit_strides(fn: Any) -> dict[str, int]:
    # the launcher specialises the unit last strides to the constant 1; AOT builds do the same
    return {n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")}


def _aot_common(head_dim: int, head_dim_v: int) -> dict[str, Any]:
    block_d, block_dv = configs.block_dim(head_dim), configs.block_dim(head_dim_v)
    return {"BLOCK_D": block_d, "BLOCK_DV": block_dv, "EVEN_D": head_dim == block_d,
            "EVEN_DV": head_dim_v == block_dv}


def _ieee(dtype: str) -> dict[str, bool]:
    return {"IEEE": dtype == "fp32"}


def _preprocess_spec(config: dict[str, Any], dtype: str, head_dim: int, head_dim_v: int, causal: bool,
                     arch: str | None = None) -> AotSpec:
    b = _module("backward")
    _bwd_preprocess_kernel = b._bwd_preprocess_kernel
    c = _aot_common(head_dim, head_dim_v)
    ce: dict[str, Any] = {"BLOCK_M": configs.PREPROCESS_BLOCK_M, "BLOCK_DV": c["BLOCK_DV"], "EVEN_M": True,
                          "EVEN_DV": c["EVEN_DV"], **_unit_strides(_bwd_preprocess_kernel)}
    return AotSpec(_signature(_bwd_preprocess_kernel, dtype, ce), ce, 4, 1)


def _dkdv_spec(config: dict[str, Any], dtype: str, head_dim: int, head_dim_v: int, causal: bool,
               arch: str | None = None) -> AotSpec:
    b = _module("backward")
    _bwd_dkdv_kernel = b._bwd_dkdv_kernel
    cfg = configs.resolve_backward_config(config, head_dim, head_dim_v, fp32=dtype == "fp32", arch=arch)
    ce: dict[str, Any] = {"CAUSAL": causal, **_PLAIN_BWD, "DQ_ATOMIC": cfg["BWD_DQ_ATOMIC"], "BLOCK_M": cfg["BWD_BLOCK_M"],
                          "BLOCK_N": cfg["BWD_BLOCK_N"], "EVEN_M": True, "EVEN_N": True, **_aot_common(head_dim, head_dim_v), **_ieee(dtype),
                          **_unit_strides(_bwd_dkdv_kernel)}
    return AotSpec(_signature(_bwd_dkdv_kernel, dtype, ce), ce, cfg["BWD_num_warps"], cfg["BWD_num_stages"])


def _dq_spec(config: dict[str, Any], dtype: str, head_dim: int, head_dim_v: int, causal: bool,
             arch: str | None = None) -> AotSpec:
    b = _module("backward")
    _bwd_dq_kernel = b._bwd_dq_kernel
    cfg = configs.resolve_backward_config(config, head_dim, head_dim_v, fp32=dtype == "fp32", arch=arch)
    ce: dict[str, Any] = {"CAUSAL": causal, **_PLAIN_BWD, "BLOCK_M": cfg["BWD_DQ_BLOCK_M"],
                          "BLOCK_N": cfg["BWD_DQ_BLOCK_N"], "EVEN_M": True, **_aot_common(head_dim, head_dim_v),
                          **_ieee(dtype), **_unit_strides(_bwd_dq_kernel)}
    return AotSpec(_signature(_bwd_dq_kernel, dtype, ce), ce, cfg["BWD_DQ_num_warps"], cfg["BWD_DQ_num_stages"])


def backward_kernels() -> list[AotKernel]:
    """The backward's three kernels, each with its AOT spec."""
    b = _module("backward")
    return [
        AotKernel("bwd_preprocess", b._bwd_preprocess_kernel, _preprocess_spec),
        AotKernel("bwd_dkdv", b._bwd_dkdv_kernel, _dkdv_spec),
        AotKernel("bwd_dq", b._bwd_dq_kernel, _dq_spec),
    ]
