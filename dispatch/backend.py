"""The interface every backend implements, and its capabilities as data.

A backend is a family ("sdpa", "triton", "cupy") of one or more *implementations* ("sdpa:cudnn",
"triton"). Each implementation declares a frozen `Capabilities`; `Capabilities.reasons` turns a
mismatch between those and a `Problem` into the sentences users read in `explain()` and in
`NoBackendError`. An implementation adds what is special about it in `extra_reasons`.

An implementation computes attention as a pair of operations with one contract:

    forward(inp: Inputs, p: Problem, config)               -> (out, lse | None)
    backward(inp: Inputs, out, lse, do, p: Problem, config) -> Gradients      (optional)

`Inputs` holds the call's tensors (q, k, v and any extra per-call tensors by name); the `Problem`
holds every scalar option (causal, scale, ...). An implementation that defines `backward` computes
gradients from the forward's out and lse; one generic autograd Function (dispatch/autograd.py) and
one pair of torch.library custom ops (dispatch/ops.py) join the two for every such backend, and
ring attention calls the same pair block by block. An implementation without `backward` (sdpa)
records its forward in torch's autograd instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import torch

from . import envs
from .device import DeviceInfo
from .problem import DTYPE_NAMES, Problem

# What a backend may know of the environment, read by dispatch/envs.py (backends never read it
# themselves): whether Triton runs its CPU interpreter, and where compiled kernels are cached.
triton_interpreter_on = envs.triton_interpreter_on
kernel_cache_dir = envs.kernel_cache_dir


NO_EXTRAS: Mapping[str, torch.Tensor] = MappingProxyType({})
_new_tuple = tuple.__new__


class Inputs(NamedTuple):
    """The tensors of one call: bhsd-indexed views q (B, Hq, Sq, D), k (B, Hkv, Sk, D),
    v (B, Hkv, Sk, Dv) with any strides but a unit last one (bshd inputs arrive transposed).

    `extras` holds further per-call tensors by name (an option that needs a tensor, such as
    per-head attention sinks, adds its name here; the Problem says whether it is in use). Gradients
    flow to the extras that require grad, through `Gradients.extras`.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    extras: Mapping[str, torch.Tensor] = NO_EXTRAS


class Gradients(NamedTuple):
    """What `Implementation.backward` returns: dq, dk, dv shaped and typed like q, k, v (dk, dv
    summed over each kv head's query group), and the gradient of each extra tensor by name
    (None or absent: no gradient)."""

    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    extras: Mapping[str, torch.Tensor | None] = NO_EXTRAS


def kernel_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensors an implementation takes (Inputs) from a call's q, k, v: a tensor whose last
    dimension is not unit-strided copied (p.contiguous: none is), bshd views transposed to bhsd."""
    if not p.contiguous:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if p.layout == "bshd":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


# An implementation's forward bound to one call signature (Implementation.prepare): f(inp) -> (out, lse).
Prepared = Callable[[Inputs], "tuple[torch.Tensor, torch.Tensor | None]"]


def on_inputs(launch: Callable[..., Any], extra: str | None = None) -> Prepared:
    """A Prepared from a launch function launch(q, k, v) (or launch(q, k, v, extras[extra]))."""
    if extra is None:
        return lambda inp: launch(inp[0], inp[1], inp[2])
    return lambda inp: launch(inp[0], inp[1], inp[2], inp[3][extra])


def bound_forward(impl: Implementation, inp: Inputs, p: Problem, config: dict[str, Any]) -> Prepared | None:
    """impl.prepare() for the signature of `inp`, made fit for every call under a plan cache key:
    that key holds shapes, dtypes, devices and options but only the last stride, so a call whose
    q, k, v come with other strides runs impl.forward() instead (three stride tuples compared, in
    place of the backend's own lookup of its launch by a whole key). None when impl has no prepare."""
    launch = impl.prepare(inp, p, config)
    if launch is None:
        return None
    strides = (inp[0].stride(), inp[1].stride(), inp[2].stride())

    def call(inp2: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (inp2[0].stride(), inp2[1].stride(), inp2[2].stride()) == strides:
            return launch(inp2)
        return impl.forward(inp2, p, config)

    return call


def _dtype_list(dtypes: frozenset[torch.dtype]) -> str:
    return "{" + ", ".join(sorted(DTYPE_NAMES.get(d, str(d)) for d in dtypes)) + "}"


@dataclass(frozen=True)
class Capabilities:
    device_kinds: frozenset[str]  # subset of {"cuda", "rocm", "cpu"}
    dtypes: frozenset[torch.dtype]
    min_cuda_capability: int = 0  # e.g. 80 for sm_80; checked on kind "cuda"
    cuda_archs: frozenset[str] = frozenset()  # non-empty: exactly these (a kernel for one generation)
    rocm_archs: frozenset[str] = frozenset()  # empty: any; checked on kind "rocm"
    max_head_dim: int = 256
    head_dim_multiple: int = 1  # D and Dv must be multiples of this
    head_dims: frozenset[int] = frozenset()  # non-empty: exactly these (templated kernels)
    different_v_head_dim: bool = True  # Dv != D
    gqa: bool = True  # Hq != Hkv without expanding K/V
    causal: bool = True
    bottom_right_causal: bool = True  # causal with Sq != Sk (KV-cache alignment)
    seqlen_q_ne_k: bool = True
    backward: bool = True
    lse: bool = True
    deterministic: bool = True
    layouts: frozenset[str] = frozenset({"bhsd", "bshd"})
    max_seqlen_q: int | None = None  # decode-only kernels
    min_seqlen_k: int = 1  # cuDNN's attention has no kernel for a single key
    # A decode step (few query rows against a long cache) reads each K/V head once for its whole
    # query group and splits the keys over the SMs: its time follows the K/V bytes whatever the
    # query heads per K/V head, so its model holds beyond the GQA ratios the profile measured.
    decode_shares_kv: bool = False
    # the variants (flash_attn's conventions; docs/variants.md): a sliding window, tanh logit
    # softcapping, attention sinks (the float32 (Hq,) "sinks" tensor of Inputs.extras)
    window: bool = False
    softcap: bool = False
    sinks: bool = False
    # True: the kernel applies the variants itself and skips the blocks a window hides (its time
    # follows the visible work); False: it computes every (query, key) pair and masks, or runs
    # explicit math (the cost model predicts it at the whole score matrix plus the mask it reads)
    fuses_variants: bool = True
    # when it does not: the implementation whose kernel really runs each variant it serves, as
    # (variant, implementation) pairs, e.g. (("window", "sdpa:efficient"), ("softcap", "sdpa:math"))
    variants_run_as: tuple[tuple[str, str], ...] = ()
    # runs in an interpreter or emulator on this device (Triton on a CPU): correct but slow, last in
    # the built-in order
    emulated: bool = False
    notes: str = ""
    # appended to the reason when the device kind is not served (how to make it served, if any)
    device_hint: str = ""

    def device_reasons(self, dev: DeviceInfo) -> list[str]:
        """Why this capability set cannot serve any problem on `dev` (empty list: it can serve some)."""
        if dev.kind not in self.device_kinds:
            hint = f"; {self.device_hint}" if self.device_hint else ""
            return [f"device={dev.kind} (supported: {sorted(self.device_kinds)}{hint})"]
        if dev.kind == "cuda" and dev.cuda_capability < self.min_cuda_capability:
            return [f"compute capability {dev.arch} (needs sm_{self.min_cuda_capability} or newer)"]
        if dev.kind == "cuda" and self.cuda_archs and dev.arch not in self.cuda_archs:
            return [f"arch={dev.arch} (supported: {sorted(self.cuda_archs)})"]
        if dev.kind == "rocm" and self.rocm_archs and dev.arch not in self.rocm_archs:
            return [f"arch={dev.arch} (supported: {sorted(self.rocm_archs)})"]
        return []

    def reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        """Why this capability set cannot serve `p` on `dev` (empty list: it can)."""
        r: list[str] = self.device_reasons(dev)
        if p.dtype not in self.dtypes:
            r.append(f"dtype={p.dtype_name} (supported: {_dtype_list(self.dtypes)})")
        for label, d in (("head_dim", p.head_dim), ("head_dim_v", p.head_dim_v)):
            if self.head_dims and d not in self.head_dims:
                r.append(f"{label}={d} (supported: {sorted(self.head_dims)})")
            elif d > self.max_head_dim:
                r.append(f"{label}={d} (max {self.max_head_dim})")
            elif d % self.head_dim_multiple:
                r.append(f"{label}={d} (must be a multiple of {self.head_dim_multiple})")
        if p.head_dim_v != p.head_dim and not self.different_v_head_dim:
            r.append(f"head_dim_v={p.head_dim_v} != head_dim={p.head_dim} (not supported)")
        if p.heads_q != p.heads_kv and not self.gqa:
            r.append(f"GQA/MQA Hq={p.heads_q}, Hkv={p.heads_kv} (not supported)")
        if p.effective_causal and not self.causal:
            r.append("causal=True (not supported)")
        if p.seqlen_q != p.seqlen_k:
            if not self.seqlen_q_ne_k:
                r.append(f"Sq={p.seqlen_q} != Sk={p.seqlen_k} (not supported)")
            elif p.effective_causal and not self.bottom_right_causal:
                r.append(
                    f"causal with Sq={p.seqlen_q} != Sk={p.seqlen_k} needs bottom-right alignment "
                    "(this kernel aligns top-left)"
                )
        if self.max_seqlen_q is not None and p.seqlen_q > self.max_seqlen_q:
            r.append(f"Sq={p.seqlen_q} (max {self.max_seqlen_q})")
        if p.seqlen_k < self.min_seqlen_k:
            r.append(f"Sk={p.seqlen_k} (min {self.min_seqlen_k})")
        if p.needs_grad and not self.backward:
            r.append("requires_grad (no backward pass)")
        if p.return_lse and not self.lse:
            r.append("return_lse=True (this kernel does not expose the log-sum-exp)")
        if p.layout not in self.layouts:
            r.append(f"layout={p.layout} (supported: {sorted(self.layouts)})")
        if p.has_window and not self.window:
            r.append(f"window={p.window} (no sliding window)")
        if p.softcap and not self.softcap:
            r.append(f"softcap={p.softcap:g} (no logit softcapping)")
        if p.sinks and not self.sinks:
            r.append("sinks (no attention sinks)")
        return r


class Implementation(ABC):
    """One selectable implementation (a backend variant): capabilities, configs, and the
    forward/backward pair."""

    #: Full name as users write it: "sdpa:cudnn", "triton".
    name: ClassVar[str]
    #: Family: "sdpa", "triton", "cupy".
    backend: ClassVar[str]
    #: For an implementation named like its family (whose name, forced, lets the family choose
    #: among its members): a second name that forces this implementation alone ("triton:tl").
    pin: ClassVar[str | None] = None
    #: Place in the built-in order, used where no profile decides (lower first): plain SDPA, the
    #: user's own baseline, first; then our kernels; then the pinned SDPA kernels. None: after
    #: every ranked one (an implementation that should run only when measured faster).
    default_rank: ClassVar[int | None] = None
    #: True when the class defines `backward` (set for every subclass at class creation): its
    #: gradients come from (out, lse, do), and its forward need not record autograd.
    has_backward: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_backward = cls.backward is not Implementation.backward

    def availability(self) -> str | None:
        """None when usable in this process, else the reason (import or compile failure)."""
        return None

    @abstractmethod
    def capabilities(self, dev: DeviceInfo) -> Capabilities: ...

    def extra_reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        """Reasons beyond the generic capability checks."""
        return []

    def not_supported_reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        return self.capabilities(dev).reasons(p, dev) + self.extra_reasons(p, dev)

    def default_config(self, p: Problem, dev: DeviceInfo) -> dict[str, Any]:
        """Config used when the profile has none for this problem."""
        return {}

    def config_space(self, p: Problem, dev: DeviceInfo) -> list[dict[str, Any]]:
        """Configs the tuner may try for `p` on `dev`, already pruned to what fits the device.

        [] or [{}] means the implementation has nothing to tune.
        """
        return [self.default_config(p, dev)]

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        """Human notes for explain(): copies, expansions, which kernel path runs."""
        return []

    def forward(self, inp: Inputs, p: Problem, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute attention: out (B, Hq, Sq, Dv) in q's dtype, and lse (B, Hq, Sq) float32 (natural
        log, -inf on rows that see no key) or None.

        lse must be given when p.return_lse, and when p.needs_grad for an implementation with a
        `backward` (its backward consumes it). With `backward`, the forward records no autograd
        (the generic Function does); without it, gradients must flow to q, k, v through torch's
        autograd when the capabilities declare backward support.

        Every built-in implementation defines it. (An implementation written against the older
        contract overrides `run` instead; attention() and the custom ops call `run`, so it works.)
        """
        raise NotImplementedError(f"{type(self).__name__} defines neither forward() nor run()")

    def prepare(self, inp: Inputs, p: Problem, config: dict[str, Any]) -> Prepared | None:
        """forward() bound to the call signature of `inp` (shapes, strides, dtypes, devices), `p`
        and `config`: a callable f(inp2) that returns what forward(inp2, p, config) returns for any
        inputs of exactly that signature, without the lookups a forward() does per call to find
        its launch. The plan cache keeps it beside its plan (bound_forward: inputs with other
        strides take forward()). None, the default: no such shortcut, run() calls forward()."""
        return None

    def backward(
        self, inp: Inputs, out: torch.Tensor, lse: torch.Tensor, do: torch.Tensor, p: Problem,
        config: dict[str, Any],
    ) -> Gradients:
        """Gradients from the forward's out and lse (which may be the whole row's, as in ring
        attention's blocks) and the gradient of out. Implementations that have one override it."""
        raise NotImplementedError(f"{self.name} has no backward of its own: torch differentiates its forward")

    def serving_module(self) -> Any | None:
        """The module holding this implementation's packed-batch and KV-cache calls, or None when it
        has none; imported when first asked for. What dispatch/serving.py reads of it:
        `varlen_forward(q, k, v, cu_q, cu_k, sp, sinks)` and `kvcache_forward(q, k_cache, v_cache,
        cache_seqlens, block_table, sp, sinks, out)` (sp: the call's ServingProblem); optionally
        `serving_reasons(impl, sp, dev)` (why it cannot serve sp; none: it serves every call),
        `serving_notes(impl, sp, dev)` (what explain() says), `varlen_backward(...)` (for the
        compiled path's gradient), and FUSES_VARIANTS / VARIANTS_RUN_AS / FALLBACK (how it runs
        window, softcap and sinks, and whether it is a fallback, for the cost model and the order)."""
        return None

    def lse_pair(self) -> Implementation | None:
        """This implementation's forward that returns lse and backward that takes a given (whole
        row's) out and lse, for callers that merge blocks by their lse (ring attention); None when
        it has none. An implementation with a backward of its own is its own pair."""
        return self if self.has_backward else None

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        p: Problem,
        config: dict[str, Any],
        extras: Mapping[str, torch.Tensor] = NO_EXTRAS,
        prepared: Prepared | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What attention() calls: forward, joined to backward by the generic autograd Function
        when a gradient is needed. Returns (out, lse) with lse None unless p.return_lse. `extras`:
        the call's further tensors by name (Inputs.extras). `prepared`: this implementation's
        prepare() for the call's signature (the plan cache keeps it), run in forward()'s place."""
        inp = _new_tuple(Inputs, (q, k, v, extras))  # Inputs(q, k, v, extras) without its Python __new__
        if p.needs_grad and self.has_backward:
            out, lse = _autograd.apply_pair(self, inp, p, config, prepared)
        elif prepared is not None:
            out, lse = prepared(inp)
        else:
            out, lse = self.forward(inp, p, config)
        return out, (lse if p.return_lse else None)


# Last: autograd.py builds on the classes above. A module reference, read at call time, serves
# either import order (an import statement inside run() cost 0.6 us per call with autograd).
from . import autograd as _autograd  # noqa: E402
