"""What every implementation must compute, and what each is expected to decline: the data of the
conformance suite (tests/test_conformance.py).

The expectations are written here by hand, apart from the capabilities the backends declare, so that
a capability lost by mistake fails a test (the implementation declines a case this table says it
serves) instead of turning into a skip; and a case served where this table expects a refusal fails
too, until the table is brought up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

import flashdispatch
from flashdispatch.envs import triton_interpreter_on

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPE_IDS = {FP16: "fp16", BF16: "bf16", FP32: "fp32", FP64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One attention problem: sizes, options and the value distribution of its inputs."""

    name: str
    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int
    dv: int | None = None
    causal: bool = False
    layout: str = "bhsd"
    strided: bool = False
    values: str = "normal"  # a key of VALUES
    scale: float | None = None

    @property
    def head_dim_v(self) -> int:
        return self.dv or self.d

    def id(self) -> str:
        return "-".join(filter(None, (
            self.name, f"b{self.b}h{self.hq}x{self.hkv}", f"sq{self.sq}sk{self.sk}",
            f"d{self.d}" + (f"v{self.dv}" if self.dv else ""), "causal" if self.causal else "",
            self.layout, "strided" if self.strided else "", self.values if self.values != "normal" else "",
            f"scale{self.scale:g}" if self.scale is not None else "",
        )))


def implementations() -> list[str]:
    """Every registered implementation, available here or not (an unavailable one must say why)."""
    return [s.name for s in flashdispatch.backends()]


def pinned_implementations() -> list[str]:
    """Pins that the GPU grid forces besides the implementations' names: "triton:tl", since forcing
    "triton" lets the family choose and on Hopper it may run "triton:gluon" instead (the tl kernel
    would go untested there). A pin's refusals are its implementation's. ("sdpa:plain" is left out:
    the family-forced "sdpa" is what users write, and plain SDPA alone is what it runs wherever
    the table expects "sdpa" to serve without the lse.)"""
    from flashdispatch.registry import REGISTRY

    return [pin for pin in ("triton:tl",) if pin in REGISTRY.pins()]


def implementation_of(name: str) -> str:
    """The implementation a forced name stands for (a pin's implementation; else the name)."""
    from flashdispatch.registry import REGISTRY

    return REGISTRY.pins().get(name, name)


# -------------------------------------------------------------------------------------------------
# Shapes. GPU sizes are awkward on purpose (odd S and H, partial tiles); the CPU runs the same
# classes of problem at sizes the Triton interpreter gets through in CI time.
# -------------------------------------------------------------------------------------------------

def shapes(device: str) -> list[Case]:
    if device == "cpu":
        base = [
            Case("square", 2, 2, 2, 32, 32, 32),
            Case("odd", 1, 3, 3, 17, 17, 40, layout="bshd", strided=True),
            Case("gqa", 1, 4, 2, 23, 23, 32, layout="bshd"),
            Case("mqa", 1, 4, 1, 16, 16, 64, strided=True),
            Case("sq_gt_sk", 1, 2, 2, 29, 11, 32),
            Case("sq_lt_sk", 1, 2, 1, 9, 41, 32, layout="bshd"),
            Case("decode", 2, 4, 2, 1, 37, 64),
            Case("spec", 1, 4, 2, 5, 33, 32, strided=True),
            Case("dv", 1, 2, 2, 16, 16, 32, dv=64),
            Case("one_key", 1, 2, 1, 3, 1, 32),
            # one batch, head, query and key, each a view at an odd address that torch calls
            # contiguous (its other dims have extent 1): contiguous() hands it back unaligned
            Case("single", 1, 1, 1, 1, 1, 64, strided=True),
        ]
        dims = [Case(f"d{d}", 1, 2, 2, 16, 16, d) for d in (16, 72, 96, 128)]
    else:
        base = [
            Case("square", 2, 4, 4, 256, 256, 64),
            Case("odd", 1, 3, 3, 113, 113, 64, layout="bshd", strided=True),
            Case("gqa", 2, 8, 2, 203, 203, 128, layout="bshd"),
            Case("mqa", 1, 8, 1, 130, 130, 64, strided=True),
            Case("sq_gt_sk", 1, 4, 4, 300, 77, 64),
            Case("sq_lt_sk", 2, 8, 2, 67, 1000, 128, layout="bshd"),
            Case("decode", 3, 8, 2, 1, 1111, 128),
            Case("decode_long", 1, 32, 8, 1, 8197, 128, layout="bshd"),
            Case("spec", 2, 8, 2, 7, 515, 64, strided=True),
            Case("dv", 1, 4, 4, 128, 128, 64, dv=128),
            Case("one_key", 2, 4, 2, 5, 1, 64),
            Case("single", 1, 1, 1, 1, 1, 64, strided=True),
        ]
        dims = [Case(f"d{d}", 1, 4, 2, 129, 129, d) for d in (32, 40, 72, 96, 128, 256)]
    return [replace(c, causal=causal) for c in base + dims for causal in (False, True)]


# -------------------------------------------------------------------------------------------------
# Value distributions: where kernels break. Each maps fresh N(0, 1) inputs (float64, bhsd) to the
# inputs of the case, and may set the scale.
# -------------------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, ...]]


def _one_hot(t: torch.Tensor, g: torch.Generator, magnitude: float) -> torch.Tensor:
    idx = torch.randint(0, t.shape[-1], t.shape[:-1], generator=g)
    return torch.nn.functional.one_hot(idx, t.shape[-1]).to(t.dtype) * magnitude


def _outlier(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[..., 0] *= 100.0
    return t


def _constant_keys(k: torch.Tensor) -> torch.Tensor:
    return k[:, :, :1, :].expand_as(k).clone()


VALUES: dict[str, tuple[Transform, float | None]] = {
    # name: (transform, scale or None for 1/sqrt(D))
    "normal": (lambda q, k, v, g: (q, k, v), None),
    "scale4": (lambda q, k, v, g: (q, k, v), 4.0),
    "scale8": (lambda q, k, v, g: (q, k, v), 8.0),
    "scale30": (lambda q, k, v, g: (q, k, v), 30.0),
    "scale100": (lambda q, k, v, g: (q, k, v), 100.0),
    "x30": (lambda q, k, v, g: (q * 30, k * 30, v * 30), None),
    "x100": (lambda q, k, v, g: (q * 100, k * 100, v), None),
    "outlier_channel": (lambda q, k, v, g: (_outlier(q), _outlier(k), v), None),
    "one_hot": (lambda q, k, v, g: (_one_hot(q, g, 8.0), _one_hot(k, g, 8.0), v), None),
    "constant_keys": (lambda q, k, v, g: (q, _constant_keys(k), v), None),
    # |v| near the fp16 maximum (65504): an fp16 accumulator or an unscaled sum overflows
    "fp16_range": (lambda q, k, v, g: (q * 4, k * 4, (v.clamp(-4, 4) * 15000)), None),
    # the first keys get a large negative logit: rows whose first visible block is all negative
    "negative_logits": (lambda q, k, v, g: (q.abs() + 1, -(k.abs() + 1), v), 8.0),
}


# -------------------------------------------------------------------------------------------------
# Expected refusals: (implementations, devices, predicate, text the reason must contain)
# -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    impls: frozenset[str]
    devices: frozenset[str]
    applies: Callable[[Case, torch.dtype, str], bool]  # (case, dtype, call kind) -> refused?
    text: str  # alternatives separated by " || ": one of them must appear


def _r(impls: str, devices: str, applies: Callable[[Case, torch.dtype, str], bool], text: str) -> Refusal:
    return Refusal(frozenset(impls.split()), frozenset(devices.split()), applies, text)


# the GPU of this run is a Hopper (sm_90): what triton:gluon is written for
_SM90 = torch.cuda.is_available() and not torch.version.hip and torch.cuda.get_device_capability() == (9, 0)
ALWAYS: Callable[[Case, torch.dtype, str], bool] = lambda c, dt, kind: True

REFUSALS: list[Refusal] = [
    # devices
    _r("sdpa:cudnn sdpa:efficient", "cpu", ALWAYS, "device=cpu"),
    # on a machine without an NVIDIA GPU cupy is unavailable before any device check; with one, it is an
    # optional extra (a CPU tensor on a GPU machine is refused by its device)
    _r("cupy", "cpu", ALWAYS, "device=cpu || no CUDA device visible || CuPy is not importable"),
    # triton serves CPU tensors only under its interpreter (the fixture turns it on where no GPU
    # is; a GPU machine runs the CPU cases with it off)
    _r("triton", "cpu", lambda c, dt, kind: torch.cuda.is_available() and not triton_interpreter_on(), "device=cpu"),
    # dtypes
    _r("triton", "cpu", lambda c, dt, kind: dt in (BF16, FP64), "dtype="),
    _r("triton", "cuda", lambda c, dt, kind: dt == FP64, "dtype="),
    _r("cupy", "cuda", lambda c, dt, kind: dt in (FP32, FP64), "dtype="),
    _r("sdpa:flash sdpa:cudnn", "cuda", lambda c, dt, kind: dt in (FP32, FP64), "dtype="),
    _r("sdpa:efficient", "cuda", lambda c, dt, kind: dt == FP64, "dtype="),
    # head dims
    _r("sdpa:cudnn", "cuda", lambda c, dt, kind: max(c.d, c.head_dim_v) > 128, "head_dim"),
    _r("sdpa:flash sdpa:cudnn sdpa:efficient", "cuda", lambda c, dt, kind: c.d % 8 != 0, "head_dim"),
    _r("cupy", "cuda", lambda c, dt, kind: c.d not in (32, 64, 96, 128, 256), "head_dim"),
    _r("cupy", "cuda", lambda c, dt, kind: kind == "grad" and c.d not in (32, 64, 96, 128), "backward"),
    _r("sdpa:flash sdpa:cudnn", "cpu cuda", lambda c, dt, kind: c.dv is not None and c.dv != c.d, "head_dim_v"),
    _r("cupy", "cuda", lambda c, dt, kind: c.dv is not None and c.dv != c.d, "head_dim_v"),
    # a single key: cuDNN has no kernel for it
    _r("sdpa:cudnn", "cuda", lambda c, dt, kind: c.sk < 2, "Sk=1"),
    # the log-sum-exp: only the explicit math and our kernels expose it
    _r("sdpa:flash sdpa:cudnn sdpa:efficient", "cpu cuda", lambda c, dt, kind: kind == "lse", "return_lse"),
    # the Gluon forward: Hopper (sm_90) only, 16-bit, D = Dv in {64, 128, 256}
    _r("triton:gluon", "cpu", ALWAYS, "device=cpu"),
    _r("triton:gluon", "cuda", lambda c, dt, kind: not _SM90, "arch="),
    _r("triton:gluon", "cuda", lambda c, dt, kind: dt in (FP32, FP64), "dtype="),
    _r("triton:gluon", "cuda", lambda c, dt, kind: c.d not in (64, 128, 256) or c.head_dim_v != c.d, "head_dim"),
    # bottom-right causal with Sq < Sk: kernels that take no lower-right mask
    _r("sdpa:flash sdpa:cudnn", "cpu cuda",
       lambda c, dt, kind: c.causal and 1 < c.sq < c.sk, "bottom-right mask"),
]


def expected_refusals(impl: str, device: str, case: Case, dtype: torch.dtype, kind: str) -> list[str]:
    """Texts that the reasons of `impl` must contain for this call (empty: it must serve it)."""
    impl = implementation_of(impl)
    return [r.text for r in REFUSALS if impl in r.impls and device in r.devices and r.applies(case, dtype, kind)]
