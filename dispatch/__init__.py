"""flashdispatch: one attention() call, the fastest correct backend for the device at hand."""

from __future__ import annotations

from . import backends  # the package, callable: flashdispatch.backends()
from .api import attention, explain
from .backend import Capabilities, Implementation
from .device import DeviceInfo
from .errors import NoBackendError
from .problem import Problem
from .registry import REGISTRY, BackendStatus
from .plans import refresh
from .selection import Decision, use_backend
from .serving import attention_kvcache, attention_varlen, explain_kvcache, explain_varlen

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # flashdispatch.nn and flashdispatch.hf load on first use (hf reaches for transformers only
    # when asked to register), so `import flashdispatch` stays light
    if name in ("nn", "hf"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention",
    "explain",
    "attention_varlen",
    "attention_kvcache",
    "explain_varlen",
    "explain_kvcache",
    "use_backend",
    "backends",
    "refresh",
    "NoBackendError",
    "Decision",
    "Problem",
    "DeviceInfo",
    "Capabilities",
    "Implementation",
    "BackendStatus",
    "__version__",
]
