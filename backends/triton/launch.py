"""Kernel launches with less host time than Triton's JIT dispatch.

Why: decode-shaped calls are launch-bound. Measured on H100 (tools/bench_triton.py --diag,
docs/triton.md): one split-KV decode call cost 162 us of host time per call through
`kernel[grid](...)` for 12.6 us of GPU time; Triton's JIT dispatch specialises each of the ~40
arguments on every call. A launch through the compiled kernel's own launcher costs a fraction.

How: the first launch of a specialisation goes through the JIT (which compiles and returns the
compiled kernel); it is cached under a key that holds everything the JIT specialises on (each int
argument's "== 1" and "divisible by 16", each pointer's 16-byte alignment, dtypes, constexprs,
compiler options, device). Later launches with the same key call the compiled kernel's launcher
with the arguments in the kernel's signature order, as the JIT itself does.

Gluon kernels take host TMA descriptors: the key holds each descriptor's dtype, box and shared
layout (what Triton specialises them on), and BoundDescriptorLaunch hands the compiled launcher
light HostDescriptor records once a specialisation is checked (Triton's TensorDescriptor validates
every field each time one is built).

Safety: the first cached launch of every key is checked: the direct launch and a JIT launch run on
the same inputs and their outputs must agree bit for bit (the kernels are deterministic); any
disagreement or error turns direct launches off for that kernel, with a warning, and the JIT
result is what the caller gets. Launch hooks (profilers) and the interpreter always take the JIT
path, and so does a CUDA graph capture until the key has been checked (the check syncs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, NamedTuple, Sequence

import torch

log = logging.getLogger("flashdispatch")

# Entries per kernel; a key is a shape *class* (divisibility), not a shape, so few are needed.
MAX_CACHED = 512
_I32_MAX = 2**31 - 1


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _runtime_knobs() -> Any:
    from triton import knobs

    return knobs.runtime


@functools.cache
def _current_stream() -> Callable[[int], int]:
    """The raw CUDA/HIP stream getter that Triton's own launches use (a C function of torch)."""
    from triton.runtime import driver

    return driver.active.get_current_stream


def cuda_index(t: torch.Tensor) -> int | None:
    """t's CUDA device index, or None for a tensor off CUDA (interpreter runs on the CPU)."""
    return (t.device.index or 0) if t.is_cuda else None


def _is_current(index: int | None) -> bool:
    """Nothing to switch: a CPU call (None), or CUDA device `index` is already current."""
    return index is None or torch._C._cuda_getDevice() == index


def on_device(index: int | None) -> contextlib.AbstractContextManager[Any]:
    """A context with CUDA device `index` current (nothing to do for None or when it already is)."""
    return contextlib.nullcontext() if _is_current(index) else torch.cuda.device(index)


def run_on_device(index: int | None, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with CUDA device `index` current (None: a CPU call, run as is).

    Why: Triton's launchers, the CUDA driver and torch's allocator act on the current device, not
    the tensors' one; a call on cuda:1 while cuda:0 is current would launch on the wrong device.
    """
    if _is_current(index):  # the common case, without a context manager's enter and exit
        return fn(*args)
    with torch.cuda.device(index):
        return fn(*args)


def _hooks_installed() -> bool:
    """A launch hook someone installed (a profiler): only the JIT path calls it."""
    runtime = _runtime_knobs()
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is None:
            continue
        calls = getattr(hook, "calls", None)  # Triton 3.6: an (often empty) HookChain
        if calls is None or calls:
            return True
    return False


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, a NaN matching a NaN (a call whose inputs hold NaN writes NaN in
    both launches; torch.equal would call them different)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def run_compiled(kernel: Any, grid: tuple[int, int, int], stream: int, args: Sequence[Any]) -> None:
    """Launch a compiled kernel the way Triton's JIT does after its dispatch: every argument of
    the kernel's signature in order (constexprs included), no launch metadata, no hooks."""
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *args)


class DirectLauncher:
    """Launch one @triton.jit kernel, through its compiled launcher once the JIT has built it."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.names: tuple[str, ...] = tuple(getattr(fn, "arg_names", ()))
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.verified: set[tuple[Any, ...]] = set()
        self.enabled = True

    def _key(self, args: Sequence[Any], constexprs: dict[str, Any], options: dict[str, Any],
             device: int) -> tuple[Any, ...]:
        parts: list[Any] = []
        for a in args:
            kind = type(a)
            if kind is int:  # what Triton specialises on (1, divisible by 16, 64-bit); inline: ~40 args per launch
                parts.append(1 if a == 1 else (2 if a & 15 == 0 else 0) + (4 if a > _I32_MAX or a < -_I32_MAX else 0))
            elif kind is float:  # floats are never specialised
                parts.append(-1)
            elif isinstance(a, torch.Tensor):
                parts.append((a.dtype, a.data_ptr() & 15 == 0))
            elif isinstance(getattr(a, "base", None), torch.Tensor):
                # a host TMA descriptor: Triton specialises on its dtype, box and shared layout
                # (its base is 16-byte aligned by construction; shape and strides are arguments)
                parts.append(("desc", a.base.dtype, tuple(a.block_shape), a.layout, a.padding))
            else:  # anything else (bool, None, ...) by value
                parts.append((kind, a))
        return (device, tuple(parts), tuple(constexprs.items()), tuple(options.items()))

    def _jit(self, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any],
             options: dict[str, Any]) -> Any:
        return self.fn[grid](*args, **constexprs, **options)

    def __call__(self, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any],
                 options: dict[str, Any], outputs: Sequence[torch.Tensor]) -> Any:
        """Launch fn[grid](*args, **constexprs, **options); `outputs` are the tensors it writes
        (all of their elements), used by the first-launch check. Returns the compiled kernel once
        this specialisation's direct launch has been checked (BoundLaunch keeps it), else None."""
        t0 = args[0] if isinstance(args[0], torch.Tensor) else getattr(args[0], "base", None)
        if (not self.enabled or not isinstance(t0, torch.Tensor) or t0.device.type == "cpu"
                or _hooks_installed()):
            self._jit(grid, args, constexprs, options)
            return None
        device = t0.device.index or 0
        key = self._key(args, constexprs, options, device)
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self._jit(grid, args, constexprs, options)
            if hasattr(kernel, "result"):  # asynchronous compilation hands back a future
                kernel = kernel.result()
            if kernel is not None and len(self.cache) < MAX_CACHED:
                self.cache[key] = kernel
            return None
        if key not in self.verified and _capturing():
            # the first direct launch is checked with a host sync, which a CUDA graph capture forbids
            self._jit(grid, args, constexprs, options)
            return None
        tail = [constexprs[n] for n in self.names[len(args):]]
        g = tuple(grid) + (1,) * (3 - len(grid))
        try:
            run_compiled(kernel, g, self._stream(device), (*args, *tail))
        except Exception as e:  # an internal interface that moved: the JIT path always works
            self._disable(f"{type(e).__name__}: {e}")
            self._jit(grid, args, constexprs, options)
            return None
        if key not in self.verified:
            self._verify(key, grid, args, constexprs, options, outputs)
            return None
        return kernel

    @staticmethod
    def _stream(device: int) -> int:
        return _current_stream()(device)

    def _verify(self, key: tuple[Any, ...], grid: tuple[int, ...], args: Sequence[Any],
                constexprs: dict[str, Any], options: dict[str, Any], outputs: Sequence[torch.Tensor]) -> None:
        if self.agrees_with_jit(grid, args, constexprs, options, outputs):
            self.verified.add(key)

    def agrees_with_jit(self, grid: tuple[int, ...], args: Sequence[Any], constexprs: dict[str, Any],
                        options: dict[str, Any], outputs: Sequence[torch.Tensor]) -> bool:
        """After a direct launch that wrote `outputs`: run the same launch through the JIT (the
        caller gets its result) and compare bit for bit; a disagreement turns direct launches off."""
        direct = [o.clone() for o in outputs]
        for o in outputs:
            o.fill_(float("nan"))
        self._jit(grid, args, constexprs, options)
        if all(_same_values(d, o) for d, o in zip(direct, outputs)):
            return True
        self._disable("direct launch disagreed with the JIT launch")
        return False

    def _disable(self, why: str) -> None:
        self.enabled = False
        log.warning("flashdispatch triton: direct launches of %s turned off (%s); using Triton's JIT dispatch",
                    getattr(self.fn, "__name__", self.fn), why)


class BoundLaunch:
    """One launch of a DirectLauncher kernel whose grid, scalar arguments, constexprs and options
    are fixed (a caller's per-shape plan): per call only the tensors change.

    Why: with everything but the pointers known, a call costs one `data_ptr()` per tensor and the
    compiled launcher, instead of the ~40-argument specialisation key of DirectLauncher (which
    still does the first launches: compile, then the checked direct launch). Pointers go to the
    launcher as ints, which also skips its per-pointer driver query. Only launches whose pointers
    are all 16-byte aligned take the bound kernel; any other goes through the DirectLauncher,
    whose key holds each pointer's alignment.
    """

    __slots__ = ("launcher", "grid", "scalars", "constexprs", "options", "device", "tail", "kernel", "n_tensors")

    def __init__(self, launcher: DirectLauncher, grid: tuple[int, ...], n_tensors: int, scalars: Sequence[Any],
                 constexprs: dict[str, Any], options: dict[str, Any], device: int) -> None:
        self.launcher = launcher
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.n_tensors = n_tensors
        self.scalars = tuple(scalars)
        self.constexprs = constexprs
        self.options = options
        self.device = device
        self.tail = tuple(constexprs[n] for n in launcher.names[n_tensors + len(self.scalars):])
        self.kernel: Any = None

    def scalar(self, name: str) -> Any:
        """The bound value of the kernel's scalar argument `name` (KeyError if it has none)."""
        names = self.launcher.names[self.n_tensors:self.n_tensors + len(self.scalars)]
        if name not in names:
            raise KeyError(f"name: expected one of the kernel's scalar arguments {list(names)}, got {name!r}")
        return self.scalars[names.index(name)]

    def __call__(self, tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        ptrs = [t.data_ptr() for t in tensors]
        aligned = not functools.reduce(int.__or__, ptrs) & 15
        kernel = self.kernel
        if kernel is None or not aligned or not self.launcher.enabled or _hooks_installed():
            got = self.launcher(self.grid, (*tensors, *self.scalars), self.constexprs, self.options, outputs)
            if got is not None and aligned:
                self.kernel = got
            return
        try:
            run_compiled(kernel, self.grid, _current_stream()(self.device), (*ptrs, *self.scalars, *self.tail))
        except Exception as e:  # as in DirectLauncher: the JIT path always works
            self.kernel = None
            self.launcher._disable(f"{type(e).__name__}: {e}")
            self.launcher._jit(self.grid, (*tensors, *self.scalars), self.constexprs, self.options)


class HostDescriptor(NamedTuple):
    """The fields of a host TMA descriptor that a compiled launcher reads (it encodes the CUDA
    tensor map from them on every launch): what a checked launch passes instead of Triton's
    TensorDescriptor, whose construction re-validates every field."""

    base: torch.Tensor
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str = "zero"


class BoundDescriptorLaunch(BoundLaunch):
    """BoundLaunch for kernels whose leading arguments are host TMA descriptors (Gluon's): grid,
    scalar arguments, constexprs and options fixed by a caller's per-shape plan (n_tensors counts
    the descriptors and the tensor arguments that follow them).

    Per call the caller gives a function that builds Triton's TensorDescriptors (what the JIT and
    DirectLauncher's checked launches take) and, where the call may take the bound kernel, the same
    boxes as HostDescriptor records. The first launches go through the DirectLauncher (compile,
    then the checked direct launch); after that a call costs the records and the compiled
    launcher, instead of the TensorDescriptors and Triton's JIT dispatch.
    """

    __slots__ = ("checked",)

    def __init__(self, launcher: DirectLauncher, grid: tuple[int, ...], n_tensors: int, scalars: Sequence[Any],
                 constexprs: dict[str, Any], options: dict[str, Any], device: int) -> None:
        super().__init__(launcher, grid, n_tensors, scalars, constexprs, options, device)
        self.checked = False  # the first launch with records is compared with the JIT's

    def __call__(  # type: ignore[override]
        self, descriptors: Callable[[], Sequence[Any]], records: Sequence[HostDescriptor] | None,
        tensors: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
    ) -> None:
        """Launch with (*descriptors(), *tensors, *scalars); `records` None keeps this call on the
        checked path (and never hands it the bound kernel)."""
        kernel = self.kernel
        if (kernel is not None and records is not None and self.launcher.enabled and not _hooks_installed()
                and (self.checked or not _capturing())):
            try:
                run_compiled(kernel, self.grid, _current_stream()(self.device),
                             (*records, *tensors, *self.scalars, *self.tail))
            except Exception as e:  # as in DirectLauncher: the JIT path always works
                self.kernel = None
                self.launcher._disable(f"{type(e).__name__}: {e}")
            else:
                if not self.checked:  # records, not TensorDescriptors: checked once on their own
                    self.checked = self.launcher.agrees_with_jit(
                        self.grid, (*descriptors(), *tensors, *self.scalars), self.constexprs, self.options,
                        outputs)
                return
        got = self.launcher(self.grid, (*descriptors(), *tensors, *self.scalars), self.constexprs, self.options,
                            outputs)
        if got is not None and records is not None:
            self.kernel = got
