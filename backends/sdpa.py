"""torch.nn.functional.scaled_dot_product_attention, plain and with one kernel pinned.

`sdpa` is the call users already make (torch picks its kernel: cuDNN on H100); `sdpa:flash`,
`sdpa:cudnn` and `sdpa:efficient` pin one kernel through torch's switches (what `sdpa_kernel` flips,
`OnlyKernel` below); `sdpa:math` is explicit fp32 math in torch ops. This backend exists everywhere
torch runs and is the fallback that always serves.

The contract's bottom-right causal mask maps onto SDPA in `bottom_right_sdpa` (is_causal for
Sq == Sk, zero rows and a causal square for Sq > Sk, torch's lower-right CausalBias for Sq < Sk,
which flash and cuDNN do not take, so they decline that case), the one "plain SDPA, causal" helper
that the benchmarks and the demo call too.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.backends.cuda as _cuda_switches
from torch.nn.attention import SDPBackend
from torch.nn.attention.bias import causal_lower_right

from flashdispatch.alignment import aligned16
from flashdispatch.backend import Capabilities, Implementation, Inputs
from flashdispatch.device import DeviceInfo
from flashdispatch.problem import Problem, window_key_range
from flashdispatch.reference import visible_mask

ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
EVERYWHERE = frozenset({"cuda", "rocm", "cpu"})
GPUS = frozenset({"cuda", "rocm"})


# torch's switches for the kernels SDPA chooses among, as (kernel, is it on, turn it on or off):
# what `torch.nn.attention.sdpa_kernel` flips (it also turns off the kernel of out-of-tree devices,
# which no GPU this backend serves uses), without its generic machinery: 1.6 us per call on the
# 2-core CPU against 9.6 us, paid on every call of a pinned kernel.
_SWITCHES = (
    (SDPBackend.FLASH_ATTENTION, _cuda_switches.flash_sdp_enabled, _cuda_switches.enable_flash_sdp),
    (SDPBackend.EFFICIENT_ATTENTION, _cuda_switches.mem_efficient_sdp_enabled,
     _cuda_switches.enable_mem_efficient_sdp),
    (SDPBackend.MATH, _cuda_switches.math_sdp_enabled, _cuda_switches.enable_math_sdp),
    (SDPBackend.CUDNN_ATTENTION, _cuda_switches.cudnn_sdp_enabled, _cuda_switches.enable_cudnn_sdp),
)


class OnlyKernel:
    """Only `kernel` on for SDPA while the block runs; every switch as it was after it (also on an
    error). One per call: it keeps the switches it found."""

    __slots__ = ("kernel", "saved")

    def __init__(self, kernel: SDPBackend) -> None:
        self.kernel = kernel
        self.saved: list[bool] = []

    def __enter__(self) -> None:
        self.saved = [on() for _, on, _ in _SWITCHES]
        for k, _, turn in _SWITCHES:
            turn(k == self.kernel)

    def __exit__(self, *exc: object) -> None:
        for (_, _, turn), was in zip(_SWITCHES, self.saved):
            turn(was)


def _causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, kwargs: dict[str, Any]
) -> torch.Tensor:
    if p.has_window:
        return windowed_sdpa(q, k, v, causal=p.effective_causal, window=p.window, kwargs=kwargs)
    return bottom_right_sdpa(q, k, v, causal=p.effective_causal, **kwargs)


def bottom_right_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, **kwargs: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention of bhsd-indexed q, k, v under the contract's bottom-right
    causal mask (query i sees key j iff j <= i + Sk - Sq), with no mask tensor where SDPA has a
    mode for it: the one helper for "plain SDPA, causal" (this backend, the benchmarks' and the
    demo's baseline). kwargs go to SDPA (scale, enable_gqa, ...).

    - not causal, or one query row (it sees every key): no mask.
    - Sq == Sk: is_causal=True.
    - Sq > Sk: the first Sq - Sk rows see no key and are zeros; the last Sk rows are a top-left
      causal square (is_causal=True on that slice of q).
    - Sq < Sk: torch's CausalBias (lower right): the efficient kernel's own causal mode or a
      materialised mask (flash and cuDNN take no mask).
    """
    sq, sk = q.shape[2], k.shape[2]
    if not causal or sq <= 1:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if sq == sk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    if sq > sk:
        blind = sq - sk
        tail = F.scaled_dot_product_attention(q[:, :, blind:], k, v, is_causal=True, **kwargs)
        # the zero rows join in the memory order SDPA gave the tail (bshd storage for bshd q), so
        # that the output's strides do not depend on whether the mask hides whole rows
        order = sorted(range(4), key=lambda d: -tail.stride(d))
        full = torch.cat([tail.new_zeros(*(tail.shape[d] if d != 2 else blind for d in order)),
                          tail.permute(*order)], dim=order.index(2))
        return full.permute(*[order.index(d) for d in range(4)])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk), **kwargs)


def blind_rows(sq: int, sk: int, causal: bool, window: tuple[int, int]) -> int:
    """How many leading query rows see no key (bottom-right alignment: only leading rows can)."""
    if sk == 0:
        return sq
    right = 0 if causal else window[1]
    if right < 0:
        return 0
    return max(0, min(sq, sq - sk - right))


def windowed_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: tuple[int, int],
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """SDPA with a sliding window, over the keys some query sees (`window_key_range`: views of K
    and V, no copy). One query row (decode) sees exactly that range: no mask, SDPA's own kernels
    (cuDNN or flash on a GPU) at the cost of a cache as long as the window. More rows take a boolean
    mask over the range: O(Sq * range) memory, and the kernels that take a mask (efficient, math,
    cuDNN's masked path) still compute every pair of it.

    Rows that see no key (the leading Sq - Sk - right under bottom-right alignment) are left out
    of the call and given zeros: a fully masked row would be NaN in some kernels, and NaN in the
    backward.
    """
    sq, sk = q.shape[2], k.shape[2]
    blind = blind_rows(sq, sk, causal, window)
    lo, hi = window_key_range(sq, sk, window)
    if blind == 0 and sq == 1:  # it sees keys lo..hi-1, all of them
        return F.scaled_dot_product_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], **kwargs)
    mask = visible_mask(sq, sk, causal=causal, window=window, device=q.device, rows=(blind, sq), cols=(lo, hi))
    k, v = k[:, :, lo:hi], v[:, :, lo:hi]
    if blind == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    tail = F.scaled_dot_product_attention(q[:, :, blind:], k, v, attn_mask=mask, **kwargs)
    head = tail.new_zeros(q.shape[0], q.shape[1], blind, v.shape[3])
    return torch.cat([head, tail], dim=2)


def variant_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
    window: tuple[int, int] | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention in fp32 (fp64 for fp64 inputs) that also yields the log-sum-exp, with any
    variant (window, softcap, sinks), which no SDPA kernel computes. q (B, Hq, Sq, D), k/v
    (B, Hkv, Sk, D/Dv), GQA by head groups; returns out in q's dtype and lse float32 (no gradient).

    Masks are applied with masked_fill, so a NaN or Inf in a key reaches only the rows that see it
    (adding a -inf bias, as torch's math kernel does, turns NaN + -inf into NaN for every row). The
    softmax shifts by a detached row maximum and guards rows that see no key, so their output and
    gradients are exactly 0 (a logsumexp backward would give 0 * NaN there). A sink is one more
    term of the denominator (and of the maximum), differentiable, with no value. O(Sq * Sk) memory.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1] if k.shape[1] else 1
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    s = torch.matmul(q.to(acc), kk.to(acc).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    causal = causal and sq > 1  # one query row under bottom-right causal sees every key
    if causal or (window is not None and tuple(window) != (-1, -1)):
        keep = visible_mask(sq, sk, causal=causal, window=window, device=q.device)
        s = s.masked_fill(~keep, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True) if sk else s.new_full((*s.shape[:-1], 1), float("-inf"))
    sink = sinks.to(acc).view(1, -1, 1, 1) if sinks is not None else None
    if sink is not None:
        m = torch.maximum(m, sink.detach())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    probs = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(probs, vv.to(acc)).to(q.dtype)
    lse = (torch.log(denom) + m).squeeze(-1)
    return out, lse.detach().float()


def math_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, sinks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`variant_math` with the Problem's options."""
    return variant_math(q, k, v, scale=p.scale, causal=p.effective_causal, window=p.window if p.has_window else None,
                        softcap=p.softcap, sinks=sinks)


class _Sdpa(Implementation):
    backend: ClassVar[str] = "sdpa"
    kernel: ClassVar[SDPBackend | None] = None
    gqa_native: ClassVar[bool] = True
    takes_lower_right_mask: ClassVar[bool] = True

    def extra_reasons(self, p: Problem, dev: DeviceInfo) -> list[str]:
        if p.effective_causal and 1 < p.seqlen_q < p.seqlen_k and not self.takes_lower_right_mask:
            return [
                f"causal with Sq={p.seqlen_q} < Sk={p.seqlen_k} needs a bottom-right mask, "
                "which this kernel does not take"
            ]
        return []

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        notes = []
        if p.softcap or p.sinks:
            what = " and ".join(x for x, on in (("softcap", p.softcap), ("sinks", p.sinks)) if on)
            notes.append(f"{what} through explicit fp32 math in torch ops (no SDPA kernel computes this): "
                         "a correct fallback, O(Sq*Sk) memory, not a fast path")
            return notes
        if self._repeats_kv(p):
            notes.append(f"K/V repeated {p.gqa_ratio}x in memory (this kernel has no GQA)")
        if p.has_window and p.seqlen_q == 1:
            notes.append(f"window={p.window}: the one row's keys as a view of K and V, no mask")
            return notes
        if p.has_window:
            notes.append(f"window={p.window} through a boolean mask over the keys some query sees: every pair "
                         "of it is still computed (a correct fallback, not a fast path)")
            return notes
        if p.effective_causal and p.seqlen_q > p.seqlen_k:
            notes.append(f"first {p.seqlen_q - p.seqlen_k} query rows see no key: zeros")
        if p.effective_causal and p.seqlen_q < p.seqlen_k:
            notes.append("bottom-right causal through torch CausalBias (lower right)")
        return notes

    def _repeats_kv(self, p: Problem) -> bool:
        """Whether p's K/V heads are repeated in memory for this kernel (GQA where it has none)."""
        return p.heads_q != p.heads_kv and not self.gqa_native

    def _keywords(self, p: Problem) -> dict[str, Any]:
        """SDPA's keyword arguments for p: the scale, and enable_gqa where this kernel reads grouped
        K/V heads itself (the others get K/V repeated)."""
        kwargs: dict[str, Any] = {"scale": p.scale}
        if p.heads_q != p.heads_kv and self.gqa_native:
            kwargs["enable_gqa"] = True
        return kwargs

    def _call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> torch.Tensor:
        kwargs = self._keywords(p)
        if self._repeats_kv(p):
            k = k.repeat_interleave(p.gqa_ratio, dim=1)
            v = v.repeat_interleave(p.gqa_ratio, dim=1)
        if self.kernel is None:
            return _causal_sdpa(q, k, v, p, kwargs)
        with OnlyKernel(self.kernel):
            return _causal_sdpa(q, k, v, p, kwargs)

    def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
        """A call without a mask tensor and without a variant, its keyword arguments fixed once per
        signature: a repeated call goes straight to torch (a pinned kernel inside its switches)."""
        causal = p.effective_causal and p.seqlen_q > 1
        if p.softcap or p.sinks or p.has_window or (causal and p.seqlen_q != p.seqlen_k) or self._repeats_kv(p):
            return None
        kwargs = self._keywords(p)
        if causal:
            kwargs["is_causal"] = True
        sdpa, kernel, cuda = F.scaled_dot_product_attention, self.kernel, inp.q.is_cuda
        if kernel is None and cuda:
            return lambda x: (sdpa(aligned16(x[0]), aligned16(x[1]), aligned16(x[2]), **kwargs), None)
        if kernel is None:
            return lambda x: (sdpa(x[0], x[1], x[2], **kwargs), None)

        def pinned(x: Inputs) -> tuple[torch.Tensor, None]:
            q, k, v = (aligned16(x[0]), aligned16(x[1]), aligned16(x[2])) if cuda else (x[0], x[1], x[2])
            with OnlyKernel(kernel):
                return sdpa(q, k, v, **kwargs), None

        return pinned

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        q, k, v = inp.q, inp.k, inp.v
        if p.softcap or p.sinks:  # only implementations that declare them get here (sdpa, sdpa:math)
            out, lse = math_with_lse(q, k, v, p, inp.extras.get("sinks"))
            return out, (lse if p.return_lse else None)
        if q.is_cuda:
            q, k, v = aligned16(q), aligned16(k), aligned16(v)
        return self._call(q, k, v, p), None


class SdpaPlain(_Sdpa):
    """What users get today: torch chooses the kernel."""

    name: ClassVar[str] = "sdpa"
    default_rank: ClassVar[int | None] = 0
    pin: ClassVar[str | None] = "sdpa:plain"  # "sdpa" lets the family choose among torch's kernels

    def serving_module(self) -> Any:
        from . import sdpa_serving  # torch's varlen_attn or a loop over sequences; paged through a gather

        return sdpa_serving

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=EVERYWHERE, dtypes=ALL_DTYPES, max_head_dim=1 << 16, lse=False,
                            deterministic=False, window=True, softcap=True, sinks=True, fuses_variants=False,
                            variants_run_as=(("window", "sdpa:efficient"), ("softcap", "sdpa:math"),
                                             ("sinks", "sdpa:math")),
                            notes="torch picks flash/cuDNN/efficient/math; window through a boolean mask, "
                                  "softcap and sinks through explicit fp32 math")


class SdpaFlash(_Sdpa):
    name: ClassVar[str] = "sdpa:flash"
    default_rank: ClassVar[int | None] = 40
    kernel = SDPBackend.FLASH_ATTENTION
    takes_lower_right_mask = False

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        if dev.kind == "cpu":  # torch's CPU flash kernel
            return Capabilities(device_kinds=EVERYWHERE, dtypes=ALL_DTYPES, max_head_dim=1 << 16,
                                different_v_head_dim=False, lse=False)
        return Capabilities(device_kinds=GPUS, dtypes=HALF_DTYPES, min_cuda_capability=80,
                            rocm_archs=frozenset({"gfx90a", "gfx942"}), max_head_dim=256,
                            head_dim_multiple=8, different_v_head_dim=False, lse=False)


class SdpaCudnn(_Sdpa):
    name: ClassVar[str] = "sdpa:cudnn"
    default_rank: ClassVar[int | None] = 30
    kernel = SDPBackend.CUDNN_ATTENTION
    takes_lower_right_mask = False

    def lse_pair(self) -> Implementation | None:
        # torch's private cuDNN ops with lse (backends/sdpa_cudnn.py); the public call has none
        from .sdpa_cudnn import LSE_PAIR

        return LSE_PAIR

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        # torch 2.11 on an H100: "cudnn SDPA does not support key/value sequence length 1", for
        # every Sq, head dim, dtype and with or without gradients
        return Capabilities(device_kinds=frozenset({"cuda"}), dtypes=HALF_DTYPES, min_cuda_capability=80,
                            max_head_dim=128, head_dim_multiple=8, different_v_head_dim=False,
                            lse=False, deterministic=False, min_seqlen_k=2)


class SdpaEfficient(_Sdpa):
    name: ClassVar[str] = "sdpa:efficient"
    default_rank: ClassVar[int | None] = 50
    kernel = SDPBackend.EFFICIENT_ATTENTION
    gqa_native = False

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=GPUS, dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
                            min_cuda_capability=50, max_head_dim=256, head_dim_multiple=8, lse=False,
                            deterministic=False, window=True, fuses_variants=False,
                            variants_run_as=(("window", "sdpa:efficient"),),
                            notes="window through a boolean mask")


class SdpaMath(_Sdpa):
    name: ClassVar[str] = "sdpa:math"
    default_rank: ClassVar[int | None] = 60
    kernel = SDPBackend.MATH

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=EVERYWHERE, dtypes=ALL_DTYPES, max_head_dim=1 << 16,
                            window=True, softcap=True, sinks=True, fuses_variants=False,
                            variants_run_as=(("window", "sdpa:math"), ("softcap", "sdpa:math"), ("sinks", "sdpa:math")),
                            notes="explicit fp32 math in torch ops (fp64 for fp64); O(S^2) memory")

    def plan_notes(self, p: Problem, dev: DeviceInfo, config: dict[str, Any]) -> list[str]:
        notes = super().plan_notes(p, dev, config)
        notes.append("explicit fp32 math in torch ops (K/V repeated for GQA), not torch's math kernel")
        return notes

    def prepare(self, inp, p, config):  # type: ignore[no-untyped-def]
        return None  # forward() is the explicit math below, never torch's call

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        # Always the explicit fp32 math, never torch's math kernel: that one adds the causal mask as
        # a -inf bias (a NaN key then reaches rows that do not see it) and keeps fp16 scores and
        # gradients in fp16 (values near the fp16 range overflow to inf in the backward).
        out, lse = math_with_lse(inp.q, inp.k, inp.v, p, inp.extras.get("sinks"))
        return out, (lse if p.return_lse else None)


IMPLEMENTATIONS: list[Implementation] = [SdpaPlain(), SdpaFlash(), SdpaCudnn(), SdpaEfficient(), SdpaMath()]
