"""Launching the cupy backend's kernels on torch tensors: functional forward/backward and autograd.

Zero-copy interop: kernels receive raw pointers (`tensor.data_ptr()`) and element strides, and run
on torch's current stream of the tensors' device. Outputs are allocated by torch (so the calls are
CUDA-graph-capturable once the kernels are compiled: nothing allocates through CuPy), and nothing
here synchronises the host.

Tensors are bhsd-indexed (B, H, S, D) views with any strides, a unit last stride, 16-byte aligned
rows; `_aligned` copies the rare view that is not.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from flashdispatch.alignment import aligned16

from . import configs
from .kernels import CompiledKernel, compile_kernel

DTYPE_NAME: dict[torch.dtype, str] = {torch.float16: "fp16", torch.bfloat16: "bf16"}
PREP_THREADS = 256


def _arch(device: torch.device) -> tuple[int, str]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return idx, f"sm_{major}{minor}"


def _i64(*xs: int) -> list[np.int64]:
    return [np.int64(x) for x in xs]


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _strides3(t: torch.Tensor) -> list[np.int64]:
    return _i64(t.stride(0), t.stride(1), t.stride(2))


# CuPy views of torch's streams, by (stream handle, device): made once, not per launch.
_STREAMS: dict[tuple[int, int], Any] = {}


def _cupy_stream(device_index: int) -> Any:
    """CuPy's handle on torch's current stream of the device (CuPy does not own it)."""
    handle = torch._C._cuda_getCurrentRawStream(device_index)
    st = _STREAMS.get((handle, device_index))
    if st is None:
        import cupy

        with warnings.catch_warnings():
            # CuPy 14 deprecates ExternalStream in favour of a protocol torch streams may lack
            warnings.simplefilter("ignore", DeprecationWarning)
            st = _STREAMS[(handle, device_index)] = cupy.cuda.ExternalStream(handle, device_index)
    return st


def _device_function(k: CompiledKernel, device_index: int) -> Any:
    """The kernel's CUDA function on one device (CuPy's RawKernel resolves it per call otherwise)."""
    import cupy

    with cupy.cuda.Device(device_index):
        return k.function.kernel


def _launch_function(fn: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...],
                     smem: int, device_index: int) -> None:
    """Launch on torch's current stream of the device; pointers go as Python ints (CuPy passes them
    as 64-bit values)."""
    stream = _cupy_stream(device_index)
    if torch.cuda.current_device() == device_index:  # its context is current: no switch needed
        fn(grid, block, args, smem, stream)
        return
    import cupy

    with cupy.cuda.Device(device_index):
        fn(grid, block, args, smem, stream)


def _launch(
    k: CompiledKernel, grid: tuple[int, int, int], args: list[Any], device_index: int, threads: int = 0
) -> None:
    _launch_function(_device_function(k, device_index), grid, (threads or k.spec.threads, 1, 1), tuple(args),
                     k.spec.smem_bytes(), device_index)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if q.dtype not in DTYPE_NAME:
        raise TypeError(f"q.dtype: expected float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k.dtype/v.dtype: expected {q.dtype}, got {k.dtype}/{v.dtype}")
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        raise ValueError(f"q/k/v device: expected one CUDA device, got {q.device}/{k.device}/{v.device}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v: expected 4-d (B, H, S, D) tensors, got {q.dim()}/{k.dim()}/{v.dim()}-d")
    b, hq, sq, d = q.shape
    _, hkv, sk, _ = k.shape
    if tuple(k.shape) != (b, hkv, sk, d) or tuple(v.shape) != (b, hkv, sk, d):
        raise ValueError(
            f"k/v shape: expected ({b}, Hkv, Sk, {d}) each (head_dim_v == head_dim), got "
            f"{tuple(k.shape)}/{tuple(v.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"heads: expected Hq divisible by Hkv, got Hq={hq}, Hkv={hkv}")
    if d not in configs.HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {list(configs.HEAD_DIMS)}, got {d}")
    return b, hq, hkv, sq, sk, d


# A window side without a bound goes to the kernels as a bound this far past the sequence's end
# (more than the largest tile), so that every bound is a plain int >= 0 there.
_UNBOUNDED_MARGIN = 1024
# Window arithmetic in the kernels adds bounds to positions in 32-bit ints.
_MAX_WINDOW_SEQ = 2**30


class _Mask(NamedTuple):
    """What the kernels are told about visibility: the causal and window template flags and the
    window bounds as passed at launch (both >= 0; unused when window is False)."""

    causal: bool
    window: bool
    left: int
    right: int


def _mask(sq: int, sk: int, causal: bool, left: int, right: int) -> _Mask:
    """Canonical form of (causal, window): right = 0 is bottom-right causal (one kernel for both),
    causal with sq <= 1 changes nothing (the one query sees every key), and a window side that
    reaches past the sequence is no bound."""
    for name, val in (("window_left", left), ("window_right", right)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < -1:
            raise ValueError(f"{name}: expected an int >= -1 (-1: unbounded), got {val!r}")
    left, right = int(left), int(right)
    causal = bool(causal) or right == 0
    if causal:
        right = -1  # the causal flag bounds the right side
    causal = causal and sq > 1
    big_left, big_right = sk + _UNBOUNDED_MARGIN, sq + _UNBOUNDED_MARGIN
    left = big_left if left < 0 or left > big_left else left
    right = big_right if right < 0 or right > big_right else right
    window = left < big_left or right < big_right
    if window and sq + sk >= _MAX_WINDOW_SEQ:
        raise ValueError(f"window: supported for Sq + Sk < {_MAX_WINDOW_SEQ}, got Sq={sq}, Sk={sk}")
    return _Mask(causal, window, left, right)


def _check_softcap(softcap: float) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 or softcap == float("inf"):
        raise ValueError(f"softcap: expected a finite float > 0 (0.0: none), got {softcap!r}")
    return float(softcap)


def _check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    if sinks is None:
        return None
    hq = q.shape[1]
    if not isinstance(sinks, torch.Tensor) or sinks.dtype != torch.float32 or tuple(sinks.shape) != (hq,) \
            or sinks.device != q.device:
        got = f"{sinks.dtype} {tuple(sinks.shape)} on {sinks.device}" if isinstance(sinks, torch.Tensor) \
            else type(sinks).__name__
        raise ValueError(f"sinks: expected a float32 tensor of shape ({hq},) on {q.device}, got {got}")
    return sinks.contiguous()


class _ForwardPlan:
    """One forward call signature's launch, made once: the kernel, grid and every scalar argument.
    A repeated call allocates out and lse and launches (small problems are launch-bound)."""

    __slots__ = ("out_shape", "out_bshd", "lse_shape", "device", "dtype", "index", "finished", "kernel", "grid",
                 "block", "smem", "scalars", "in_strides", "sinks")

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
                 config: dict[str, Any], out_bshd: bool, window_left: int = -1, window_right: int = -1,
                 softcap: float = 0.0, sinks: bool = False) -> None:
        b, hq, hkv, sq, sk, d = _check(q, k, v)
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        mask = _mask(sq, sk, causal, window_left, window_right)
        softcap = _check_softcap(softcap)
        self.sinks = sinks
        self.out_bshd = out_bshd
        self.out_shape = (b, sq, hq, d) if out_bshd else (b, hq, sq, d)
        self.lse_shape = (b, hq, sq)
        self.device, self.dtype = q.device, q.dtype
        self.finished = "empty" if b * hq * sq * d == 0 else ("no key" if sk == 0 else None)
        self.index, arch = _arch(q.device)
        if self.finished:
            return
        cfg = configs.runnable_config(config, d, int(arch[3:]))
        spec = configs.fwd_spec(d, DTYPE_NAME[q.dtype], mask.causal, cfg, window=mask.window,
                                softcap=softcap > 0, sinks=sinks)
        kern = compile_kernel(spec, self.index, arch)
        self.kernel = _device_function(kern, self.index)
        self.grid = ((sq + spec.block_m - 1) // spec.block_m, hq, b)
        self.block = (spec.threads, 1, 1)
        self.smem = spec.smem_bytes()
        # the strides of this signature, when every row is 16-byte aligned given an aligned base;
        # otherwise `_aligned` copies per call and the copies' strides go instead
        rows_ok = all(t.stride(-1) == 1 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in (q, k, v))
        self.in_strides = (*_strides3(q), *_strides3(k), *_strides3(v)) if rows_ok else None
        o_strides = (sq * hq * d, d, hq * d) if out_bshd else (hq * sq * d, sq * d, d)
        self.scalars = (*_i64(*o_strides), np.int32(sq), np.int32(sk), np.int32(hq), np.int32(hq // hkv),
                        np.float32(scale), np.int32(mask.left), np.int32(mask.right), np.float32(softcap))

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(self.out_shape, device=self.device, dtype=self.dtype)
        if self.out_bshd:
            out = out.transpose(1, 2)
        lse = torch.empty(self.lse_shape, device=self.device, dtype=torch.float32)
        if self.finished == "empty":
            return out, lse.fill_(float("-inf"))
        if self.finished == "no key":
            if sinks is not None:  # a row that sees no key: lse = its head's sink
                return out.zero_(), lse.copy_(sinks.view(1, -1, 1).expand(self.lse_shape))
            return out.zero_(), lse.fill_(float("-inf"))
        ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        strides = self.in_strides
        if strides is None or (ptrs[0] | ptrs[1] | ptrs[2]) & 15:
            q, k, v = aligned16(q), aligned16(k), aligned16(v)
            ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr())
            strides = (*_strides3(q), *_strides3(k), *_strides3(v))
        args = (*ptrs, out.data_ptr(), lse.data_ptr(), *strides, *self.scalars,
                sinks.data_ptr() if sinks is not None else 0)
        _launch_function(self.kernel, self.grid, self.block, args, self.smem, self.index)
        return out, lse


_FWD_PLANS: dict[tuple[Any, ...], _ForwardPlan] = {}
MAX_PLANS = 1024


def cupy_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    config: dict[str, Any] | None = None,
    out_bshd: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward. q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), fp16/bf16 on CUDA, any
    strides with a unit last one. Returns out (B, Hq, Sq, D) in q's dtype (dense; with out_bshd its
    memory is (B, Sq, Hq, D), written in place by the kernel) and lse (B, Hq, Sq) float32 (natural
    log; -inf for rows that see no key). causal is bottom-right: query i sees key j iff
    j <= i + Sk - Sq.

    Variants (defaults: none): window_left/window_right: query i at p = i + Sk - Sq sees key j iff
    p - left <= j <= p + right (-1: no bound on that side; causal implies right = 0); key blocks
    outside the window are skipped. softcap > 0: the logit scale * q.k becomes
    softcap * tanh(scale * q.k / softcap) before masking. sinks: float32 (Hq,), one logit per query
    head in the softmax denominator with no value; lse includes it and a row that sees no key gives
    zeros and lse = sink."""
    plan = _forward_plan(q, k, v, causal, scale, config, out_bshd, window_left, window_right, softcap,
                         sinks is not None)
    if sinks is not None:
        sinks = _check_sinks(sinks, q)
    return plan.run(q, k, v, sinks)


def _forward_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
                  config: dict[str, Any] | None, out_bshd: bool, window_left: int, window_right: int,
                  softcap: float, has_sinks: bool) -> _ForwardPlan:
    """The launch plan of this call signature, made once and kept in _FWD_PLANS."""
    try:
        key: tuple[Any, ...] | None = (
            q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
            k.device, v.device, causal, scale, out_bshd, tuple(config.items()) if config else None,
            window_left, window_right, softcap, not has_sinks)
        plan = _FWD_PLANS.get(key)  # type: ignore[arg-type]
    except TypeError:  # an unhashable config value: plan every call
        key, plan = None, None
    if plan is None:
        plan = _ForwardPlan(q, k, v, causal, scale, config or {}, out_bshd, window_left, window_right, softcap,
                            has_sinks)
        if key is not None:
            if len(_FWD_PLANS) >= MAX_PLANS:
                _FWD_PLANS.clear()
            _FWD_PLANS[key] = plan
    return plan


def prepare_cupy_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None,
                         config: dict[str, Any] | None = None, out_bshd: bool = False, window_left: int = -1,
                         window_right: int = -1, softcap: float = 0.0, sinks: torch.Tensor | None = None
                         ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """cupy_forward for exactly this call signature, its plan looked up once: f(q, k, v, sinks=None)."""
    plan = _forward_plan(q, k, v, causal, scale, config, out_bshd, window_left, window_right, softcap,
                         sinks is not None)

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> Any:
        return plan.run(q, k, v, None if sinks is None else _check_sinks(sinks, q))

    return launch


def cupy_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    config: dict[str, Any] | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of cupy_forward. do and out (B, Hq, Sq, D), lse (B, Hq, Sq) float32 as returned by
    cupy_forward (called with the same variant arguments). Returns dq, dk, dv contiguous, shaped
    and typed like q, k, v, and with sinks a fourth gradient, dsinks (Hq,) float32. Deterministic:
    the GQA sum over a query group runs inside the dK/dV kernel in a fixed order."""
    b, hq, hkv, sq, sk, d = _check(q, k, v)
    mask = _mask(sq, sk, causal, window_left, window_right)
    softcap = _check_softcap(softcap)
    sinks = _check_sinks(sinks, q)
    if d not in configs.BACKWARD_HEAD_DIMS:
        raise ValueError(f"head_dim: backward supports {list(configs.BACKWARD_HEAD_DIMS)}, got {d}")
    if tuple(do.shape) != (b, hq, sq, d) or tuple(out.shape) != (b, hq, sq, d):
        raise ValueError(f"do/out shape: expected {(b, hq, sq, d)}, got {tuple(do.shape)}/{tuple(out.shape)}")
    if lse.dtype != torch.float32 or tuple(lse.shape) != (b, hq, sq):
        raise ValueError(f"lse: expected float32 {(b, hq, sq)}, got {lse.dtype} {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq = torch.empty((b, hq, sq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, hkv, sk, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((b, hkv, sk, d), device=q.device, dtype=q.dtype)
    if b == 0 or hq == 0 or sk == 0 or sq == 0:
        # (sinks: no key means out = 0, so delta = 0 and the sinks' gradient is 0 too)
        empty = (dq.zero_(), dk.zero_(), dv.zero_())
        return empty if sinks is None else empty + (torch.zeros_like(sinks),)
    do = do.to(q.dtype)
    q, k, v, do, out = (aligned16(t) for t in (q, k, v, do, out))
    lse = lse.contiguous()
    idx, arch = _arch(q.device)
    cc = int(arch[3:])
    cfg = configs.runnable_config(config or {}, d, cc)
    prep, dq_spec, dkdv_spec = configs.bwd_specs(d, DTYPE_NAME[q.dtype], mask.causal, cfg, window=mask.window,
                                                 softcap=softcap > 0)
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    lse2 = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    scal = [np.int32(sq), np.int32(sk), np.int32(hq), np.int32(hq // hkv), np.float32(scale),
            np.int32(mask.left), np.int32(mask.right), np.float32(softcap)]

    # delta = rowsum(dO * O), lse2 = lse * log2(e) (+inf where lse = -inf)
    kern = compile_kernel(prep, idx, arch)
    tpr = d // 8
    rows_per_block = PREP_THREADS // tpr
    rows = b * hq * sq
    prep_threads = rows_per_block * tpr
    args = [_ptr(out), _ptr(do), _ptr(lse), _ptr(delta), _ptr(lse2)] + _strides3(out) + _strides3(do)
    args += [np.int32(hq), np.int32(sq), np.int64(rows)]
    _launch(kern, ((rows + rows_per_block - 1) // rows_per_block, 1, 1), args, idx, threads=prep_threads)

    kern = compile_kernel(dq_spec, idx, arch)
    args = [_ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(lse2), _ptr(delta), _ptr(dq)]
    args += _strides3(q) + _strides3(k) + _strides3(v) + _strides3(do) + _strides3(dq) + scal
    _launch(kern, ((sq + dq_spec.block_m - 1) // dq_spec.block_m, hq, b), args, idx)

    kern = compile_kernel(dkdv_spec, idx, arch)
    args = [_ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(lse2), _ptr(delta), _ptr(dk), _ptr(dv)]
    args += _strides3(q) + _strides3(k) + _strides3(v) + _strides3(do) + _strides3(dk) + _strides3(dv) + scal
    _launch(kern, ((sk + dkdv_spec.block_n - 1) // dkdv_spec.block_n, hkv, b), args, idx)
    if sinks is None:
        return dq, dk, dv
    # The sink's probability in row i is exp(sink - lse_i) and its value is 0, so
    # dL/dsink = sum_i P_sink,i * (0 - delta_i) (lse includes the sink: always finite).
    dsinks = -(torch.exp(sinks.view(1, hq, 1) - lse) * delta).sum(dim=(0, 2))
    return dq, dk, dv, dsinks
