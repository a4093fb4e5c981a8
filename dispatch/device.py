"""What device are we on, and which profile describes it.

The device table below is the one source of truth for device names, architectures and profile keys.
Detection is a pure function of the device properties (so tests can feed fake ones); reading them
from torch happens once per device and is cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@functools.lru_cache(maxsize=64)  # read by every capability check of every new problem
def _cuda_capability(kind: str, arch: str) -> int:
    if kind == "cuda" and arch.startswith("sm_"):
        digits = "".join(ch for ch in arch[3:] if ch.isdigit())
        return int(digits) if digits else 0
    return 0


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" | "rocm" | "cpu"
    name: str
    arch: str  # "sm_90", "gfx942", "cpu"
    sm_count: int
    memory: int  # bytes
    profile_key: str | None  # None: no profile family; the built-in default order applies
    simulated: bool = False
    index: int = 0

    @property
    def cuda_capability(self) -> int:
        """80 for sm_80, 90 for sm_90; 0 on anything else."""
        return _cuda_capability(self.kind, self.arch)

    def describe(self) -> str:
        sim = " (simulated)" if self.simulated else ""
        mem = f", {self.memory / 2**30:.0f} GiB" if self.memory else ""
        sms = f", {self.sm_count} SMs/CUs" if self.sm_count else ""
        return f"{self.name} [{self.kind} {self.arch}{sms}{mem}] profile={self.profile_key}{sim}"


@dataclass(frozen=True)
class KnownDevice:
    key: str
    kind: str
    arch: str
    name: str
    sm_count: int
    memory_gib: int
    name_hints: tuple[str, ...]  # substrings of torch's device name, upper-cased


# One row per device that has a profile key. Hints are checked in order (H200 before H100).
DEVICE_TABLE: tuple[KnownDevice, ...] = (
    KnownDevice("h200", "cuda", "sm_90", "NVIDIA H200", 132, 141, ("H200",)),
    KnownDevice("h100", "cuda", "sm_90", "NVIDIA H100 80GB HBM3", 132, 80, ("H100", "H800", "GH200")),
    KnownDevice("a100", "cuda", "sm_80", "NVIDIA A100-SXM4-80GB", 108, 80, ("A100", "A800")),
    KnownDevice("mi300x", "rocm", "gfx942", "AMD Instinct MI300X", 304, 192, ("MI300",)),
    KnownDevice("mi250x", "rocm", "gfx90a", "AMD Instinct MI250X", 110, 64, ("MI250", "MI210")),
    KnownDevice("cpu", "cpu", "cpu", "CPU", 0, 0, ()),
)
DEVICE_KEYS: tuple[str, ...] = tuple(d.key for d in DEVICE_TABLE)

# An unknown GPU borrows the profile of its architecture family.
ARCH_FAMILY: dict[str, str] = {
    "sm_80": "a100",
    "sm_86": "a100",
    "sm_87": "a100",
    "sm_89": "a100",
    "sm_90": "h100",
    "gfx90a": "mi250x",
    "gfx940": "mi300x",
    "gfx941": "mi300x",
    "gfx942": "mi300x",
}


def _by_key(key: str) -> KnownDevice:
    for d in DEVICE_TABLE:
        if d.key == key:
            return d
    raise ValueError(f"device key: expected one of {DEVICE_KEYS}, got {key!r}")


def simulated_device(key: str) -> DeviceInfo:
    d = _by_key(key)
    return DeviceInfo(d.kind, d.name, d.arch, d.sm_count, d.memory_gib * 2**30, d.key, True)


def detect_from_properties(
    name: str,
    major: int,
    minor: int,
    *,
    is_hip: bool = False,
    gcn_arch: str = "",
    sm_count: int = 0,
    memory: int = 0,
    index: int = 0,
) -> DeviceInfo:
    """Map raw GPU properties onto a DeviceInfo (pure: the tests feed fake properties)."""
    if is_hip:
        arch = gcn_arch.split(":")[0] if gcn_arch else f"gfx{major}{minor}"
        kind = "rocm"
    else:
        arch = f"sm_{major}{minor}"
        kind = "cuda"
    upper = name.upper()
    key: str | None = None
    for d in DEVICE_TABLE:
        if d.kind == kind and any(h in upper for h in d.name_hints):
            key = d.key
            break
    if key is None:
        key = ARCH_FAMILY.get(arch)
    return DeviceInfo(kind, name, arch, sm_count, memory, key, False, index)


@functools.lru_cache(maxsize=None)
def real_device(device_type: str, index: int) -> DeviceInfo:
    """Read the properties of a real device (cached: never on the hot path after the first call)."""
    if device_type != "cuda":
        return DeviceInfo("cpu", "CPU", "cpu", 0, 0, "cpu", False, 0)
    props: Any = torch.cuda.get_device_properties(index)
    return detect_from_properties(
        props.name,
        props.major,
        props.minor,
        is_hip=bool(torch.version.hip),
        gcn_arch=getattr(props, "gcnArchName", ""),
        sm_count=props.multi_processor_count,
        memory=props.total_memory,
        index=index,
    )


def current_device(simulate: str = "auto") -> DeviceInfo:
    """The device that selection answers for when no tensor says otherwise."""
    if simulate != "auto":
        return simulated_device(simulate)
    if torch.cuda.is_available():
        return real_device("cuda", torch.cuda.current_device())
    return real_device("cpu", 0)
