"""The interface every backend implements, and its capabilities as data.

A backend is a family ("sdpa", "triton", "cupy") of one or more *implementations* ("sdpa:cudnn",
"triton"). Each implementation declares a frozen `Capabilities`; `capability_reasons` turns a
mismatch between those and a `Problem` into the sentences users read in `explain()` and in
`NoBackendError`. An implementation adds what is special about it in `extra_reasons`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .device import DeviceInfo
from .problem import DTYPE_NAMES, Problem


def _dtype_list(dtypes: frozenset[torch.dtype]) -> str:
    return "{" + ", ".join(sorted(DTYPE_NAMES.get(d, str(d)) for d in dtypes)) + "}"


@dataclass(frozen=True)
class Capabilities:
    device_kinds: frozenset[str]  # subset of {"cuda", "rocm", "cpu"}
    dtypes: frozenset[torch.dtype]
    min_cuda_capability: int = 0  # e.g. 80 for sm_80; checked on kind "cuda"
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
        if p.needs_grad and not self.backward:
            r.append("requires_grad (no backward pass)")
        if p.return_lse and not self.lse:
            r.append("return_lse=True (this kernel does not expose the log-sum-exp)")
        if p.layout not in self.layouts:
            r.append(f"layout={p.layout} (supported: {sorted(self.layouts)})")
        return r


class Implementation(ABC):
    """One selectable implementation (a backend variant)."""

    #: Full name as users write it: "sdpa:cudnn", "triton".
    name: ClassVar[str]
    #: Family: "sdpa", "triton", "cupy".
    backend: ClassVar[str]

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

    @abstractmethod
    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        p: Problem,
        config: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute attention.

        q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): bhsd-indexed *views* of the user's
        tensors (any strides with a unit last dimension; bshd inputs arrive as transposed views).
        Returns out (B, Hq, Sq, Dv) in q's dtype and, when p.return_lse, lse (B, Hq, Sq) float32.
        Gradients must flow to q, k, v when the capabilities declare backward support.
        """
