"""The validated, hashable description of one attention call.

`Problem` is the cache key of selection, so it holds only what can change the choice of backend or
its result: never a tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

LAYOUTS: tuple[str, ...] = ("bhsd", "bshd")
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
# Sq at or under this is "decode": a few new tokens against a long KV cache.
DECODE_MAX_SEQLEN_Q = 16
# window=(left, right) with -1 unbounded on that side; this is "no window"
NO_WINDOW: tuple[int, int] = (-1, -1)


class Problem(NamedTuple):
    device_kind: str  # "cuda" | "rocm" | "cpu"
    device_index: int
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    causal: bool
    scale: float
    layout: str
    contiguous: bool  # every input has a unit last stride (else attention() copies the odd one)
    needs_grad: bool
    return_lse: bool
    # variants (flash_attn's conventions); defaults: plain attention
    window: tuple[int, int] = NO_WINDOW  # (left, right), normalised: right is 0 under causal
    softcap: float = 0.0  # 0.0: none; c > 0: scores c * tanh(s / c) before masking
    sinks: bool = False  # a float32 (Hq,) sinks tensor comes with the call

    @property
    def has_window(self) -> bool:
        """A window that hides keys beyond what causal does (the record stores it normalised)."""
        return self.window != NO_WINDOW

    @property
    def is_variant(self) -> bool:
        """Window, softcap or sinks: attention that plain SDPA kernels do not compute."""
        return self.has_window or bool(self.softcap) or self.sinks

    @property
    def masked(self) -> bool:
        """Some key is hidden from some query: causal (where it hides anything) or a window."""
        return self.effective_causal or self.has_window

    @property
    def gqa_ratio(self) -> int:
        return self.heads_q // self.heads_kv if self.heads_kv else 1

    @property
    def is_decode(self) -> bool:
        return self.seqlen_q <= DECODE_MAX_SEQLEN_Q and self.seqlen_k > self.seqlen_q

    @property
    def causal_offset(self) -> int:
        """Bottom-right alignment: query i sees key j iff j <= i + causal_offset."""
        return self.seqlen_k - self.seqlen_q

    @property
    def effective_causal(self) -> bool:
        """False when the causal mask hides nothing (every query sees every key)."""
        return self.causal and self.seqlen_q > 1

    @property
    def is_empty(self) -> bool:
        return 0 in (self.batch, self.heads_q, self.seqlen_q, self.head_dim_v) or self.seqlen_k == 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))

    def flops(self, backward: bool = False) -> float:
        """FlashAttention-paper count: 4*B*H*Sq*Sk*D (visible fraction under causal); bwd = 2.5x."""
        visible = self.seqlen_q * self.seqlen_k
        if self.has_window:
            visible = window_visible_pairs(self.seqlen_q, self.seqlen_k, self.window)
        elif self.effective_causal:
            visible = causal_visible_pairs(self.seqlen_q, self.seqlen_k)
        f = 2.0 * self.batch * self.heads_q * visible * (self.head_dim + self.head_dim_v)
        return f * 2.5 if backward else f

    def describe(self) -> str:
        return (
            f"{self.device_kind}:{self.device_index} {self.dtype_name} layout={self.layout} "
            f"B={self.batch} Hq={self.heads_q} Hkv={self.heads_kv} Sq={self.seqlen_q} "
            f"Sk={self.seqlen_k} D={self.head_dim} Dv={self.head_dim_v} causal={self.causal} "
            f"scale={self.scale:.6g} contiguous={self.contiguous} grad={self.needs_grad} "
            f"lse={self.return_lse}{self.describe_variant()}"
        )

    def describe_variant(self) -> str:
        """' window=(l, r) softcap=c sinks' for the variants in use ('' for plain attention)."""
        parts = []
        if self.has_window:
            parts.append(f"window={self.window}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        if self.sinks:
            parts.append("sinks")
        return "".join(" " + x for x in parts)


def causal_visible_pairs(sq: int, sk: int) -> int:
    """(query, key) pairs left by the bottom-right causal mask: row i sees min(sk, i + sk - sq + 1)."""
    first = max(0, sq - sk)  # rows before this see no key
    # row i sees i + sk - sq + 1 keys, rising by one per row up to sk on the last row
    a, b = first + sk - sq + 1, sk
    return 0 if b < a else (a + b) * (b - a + 1) // 2


def window_visible_pairs(sq: int, sk: int, window: tuple[int, int]) -> int:
    """(query, key) pairs a bottom-right window leaves: row i at p = i + Sk - Sq sees keys
    [max(0, p - left), min(Sk - 1, p + right)] (-1: unbounded)."""
    left, right = window
    p = torch.arange(sq, dtype=torch.int64) + (sk - sq)
    lo = torch.clamp(p - left, min=0) if left >= 0 else torch.zeros_like(p)
    hi = torch.clamp(p + right, max=sk - 1) if right >= 0 else torch.full_like(p, sk - 1)
    return int(torch.clamp(hi - lo + 1, min=0).sum())


def window_key_range(sq: int, sk: int, window: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi): the keys some query sees under a bottom-right window, the union of the rows'
    ranges, from max(0, Sk - Sq - left) to min(Sk - 1, Sk - 1 + right) (-1: unbounded). Every key a
    query of the call sees lies inside it; for one query row (decode) it is exactly that row's keys."""
    left, right = window
    lo = min(max(0, sk - sq - left), sk) if left >= 0 else 0
    last = min(sk - 1, sk - 1 + right) if right >= 0 else sk - 1
    return lo, max(lo, last + 1)


def window_visible_keys(sq: int, sk: int, window: tuple[int, int]) -> int:
    """How many keys some query sees under a bottom-right window (window_key_range): what a kernel
    that skips the hidden blocks reads of K and V: a 4k window over a 32k cache reads 4k keys per step."""
    lo, hi = window_key_range(sq, sk, window)
    return hi - lo


def check_scale(scale: object, head_dim: int) -> float:
    """scale as given to attention(): None (1 / sqrt(head_dim)) or a finite float > 0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _fail(TypeError, "scale", "a float or None", type(scale).__name__)
    if not math.isfinite(scale) or scale <= 0:
        raise _fail(ValueError, "scale", "a finite positive float or None", scale)
    return float(scale)


def check_bool(name: str, x: object) -> None:
    """A flag such as causal or return_lse: a bool, not anything truthy."""
    if not isinstance(x, bool):
        raise _fail(TypeError, name, "a bool", type(x).__name__)


def check_window(window: object) -> tuple[int, int] | None:
    """window as given to attention(): None, or (left, right) ints >= -1 (flash_attn's; -1 is
    unbounded). Returns a tuple of ints, or None for None."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise _fail(TypeError, "window", "None or a (left, right) pair of ints", repr(window))
    for side, x in zip(("left", "right"), window):
        if isinstance(x, bool) or not isinstance(x, int):
            raise _fail(TypeError, f"window {side}", "an int (-1 for unbounded)", repr(x))
        if x < -1:
            raise _fail(ValueError, f"window {side}", "an int >= -1 (-1 for unbounded)", x)
    return (int(window[0]), int(window[1]))


def normalised_window(window: tuple[int, int] | None, causal: bool) -> tuple[int, int]:
    """The Problem's window: right = 0 under causal (flash_attn's rule), and NO_WINDOW when what
    is left hides nothing beyond causal."""
    if window is None:
        return NO_WINDOW
    left, right = window
    if causal:
        right = 0
        if left < 0:
            return NO_WINDOW
    elif left < 0 and right < 0:
        return NO_WINDOW
    return (left, right)


def check_softcap(softcap: object) -> float | None:
    """softcap as given to attention(): None, or a finite float > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise _fail(TypeError, "softcap", "None or a float > 0", type(softcap).__name__)
    if not math.isfinite(softcap) or softcap <= 0:
        raise _fail(ValueError, "softcap", "None or a finite float > 0", softcap)
    return float(softcap)


def check_sinks(sinks: object, heads_q: int, device: torch.device) -> None:
    """sinks as given to attention(): None, or a float32 tensor (Hq,) on q's device."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise _fail(TypeError, "sinks", "None or a torch.Tensor", type(sinks).__name__)
    if sinks.dtype != torch.float32:
        raise _fail(TypeError, "sinks.dtype", "torch.float32 (one logit per query head)", sinks.dtype)
    if tuple(sinks.shape) != (heads_q,):
        raise _fail(ValueError, "sinks shape", f"(Hq,) = ({heads_q},)", tuple(sinks.shape))
    if sinks.device != device:
        raise _fail(ValueError, "sinks.device", f"q's device {device}", sinks.device)


def _fail(kind: type[Exception], arg: str, expected: str, got: object) -> Exception:
    return kind(f"{arg}: expected {expected}, got {got}")


def _dense_rows(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1


def device_kind_of(device: torch.device) -> str:
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return device.type


def problem_from_tensors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None,
    layout: str,
    return_lse: bool,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> Problem:
    """Validate the inputs against the attention contract and describe them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            raise _fail(
                ValueError, name, f"a 4-d tensor in layout {layout!r}", f"{t.dim()}-d shape {tuple(t.shape)}"
            )
    if layout == "bhsd":
        b, hq, sq, d = q.shape
        bk, hkv, sk, dk = k.shape
        bv, hv, sv, dv = v.shape
    elif layout == "bshd":
        b, sq, hq, d = q.shape
        bk, sk, hkv, dk = k.shape
        bv, sv, hv, dv = v.shape
    else:
        raise _fail(ValueError, "layout", f"one of {LAYOUTS}", repr(layout))
    dtype = q.dtype
    if dtype not in DTYPE_NAMES:
        raise _fail(TypeError, "q.dtype", "float16, bfloat16, float32 or float64", dtype)
    if k.dtype != dtype or v.dtype != dtype:
        raise _fail(TypeError, "k.dtype/v.dtype", f"q's dtype {dtype}", f"{k.dtype}/{v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise _fail(ValueError, "k.device/v.device", f"q's device {q.device}", f"{k.device}/{v.device}")
    if bk != b or bv != b:
        raise _fail(ValueError, "batch size of k/v", f"q's batch {b}", f"{bk}/{bv}")
    if dk != d:
        raise _fail(ValueError, "k head dim", f"q's head dim {d}", dk)
    if hv != hkv or sv != sk:
        raise _fail(ValueError, "v heads/seqlen", f"k's ({hkv}, {sk})", f"({hv}, {sv})")
    if hkv == 0 and hq != 0 or hkv and hq % hkv:
        raise _fail(ValueError, "heads", "q heads divisible by kv heads (GQA/MQA)", f"Hq={hq}, Hkv={hkv}")
    if d == 0:
        raise _fail(ValueError, "head dim", "at least 1", 0)
    scale = check_scale(scale, d)
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    win = normalised_window(check_window(window), causal)
    cap = check_softcap(softcap)
    check_sinks(sinks, hq, q.device)
    contiguous = _dense_rows(q) and _dense_rows(k) and _dense_rows(v)
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad))
    idx = q.device.index if q.device.index is not None else 0
    return Problem(
        device_kind_of(q.device), idx, dtype, b, hq, hkv, sq, sk, d, dv, causal, scale, layout,
        contiguous, needs_grad, return_lse, win, cap or 0.0, sinks is not None,
    )


def problem_from_shape(
    shape: Sequence[int],
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    device_kind: str = "cuda",
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    return_lse: bool = False,
    needs_grad: bool = False,
    head_dim_v: int | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: bool = False,
) -> Problem:
    """A Problem for planning without tensors: shape = (B, Hq, Hkv, Sq, Sk, D); sinks=True plans
    for a call that passes sinks."""
    if len(shape) != 6:
        raise _fail(ValueError, "shape", "(B, Hq, Hkv, Sq, Sk, D)", tuple(shape))
    b, hq, hkv, sq, sk, d = (int(x) for x in shape)
    if isinstance(dtype, str):
        if dtype not in DTYPES_BY_NAME:
            raise _fail(ValueError, "dtype", f"one of {sorted(DTYPES_BY_NAME)}", repr(dtype))
        dtype = DTYPES_BY_NAME[dtype]
    meta = torch.device("meta")
    if layout == "bhsd":
        q = torch.empty(b, hq, sq, d, device=meta, dtype=dtype)
        k = torch.empty(b, hkv, sk, d, device=meta, dtype=dtype)
        v = torch.empty(b, hkv, sk, head_dim_v or d, device=meta, dtype=dtype)
    else:
        q = torch.empty(b, sq, hq, d, device=meta, dtype=dtype)
        k = torch.empty(b, sk, hkv, d, device=meta, dtype=dtype)
        v = torch.empty(b, sk, hkv, head_dim_v or d, device=meta, dtype=dtype)
    p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                             window=window, softcap=softcap)
    return p._replace(device_kind=device_kind, device_index=0, needs_grad=needs_grad, sinks=bool(sinks))
