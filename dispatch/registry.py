"""The registry: which implementations exist, and whether each is usable in this process."""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass

from . import envs
from .backend import Capabilities, Implementation
from .device import DeviceInfo
from .problem import Problem

log = logging.getLogger("flashdispatch")

# Backend modules, in registration order. Each exposes IMPLEMENTATIONS: list[Implementation] and
# imports its heavy dependency (triton, cupy) lazily, inside `availability()`.
BUILTIN_MODULES: tuple[str, ...] = (
    "flashdispatch.backends.sdpa",
    "flashdispatch.backends.triton",
    "flashdispatch.backends.cupy",
)


class _Broken(Implementation):
    """Stand-in for a backend module that failed to import: unavailable, with the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self._name = name
        self._reason = reason

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return self._name

    @property  # type: ignore[override]
    def backend(self) -> str:  # type: ignore[override]
        return self._name

    def availability(self) -> str | None:
        return self._reason

    def capabilities(self, dev: DeviceInfo) -> Capabilities:
        return Capabilities(device_kinds=frozenset(), dtypes=frozenset())

    def forward(self, inp, p: Problem, config):  # type: ignore[no-untyped-def]
        raise RuntimeError(self._reason)


@dataclass(frozen=True)
class BackendStatus:
    """Whether an implementation can serve problems on a device: importable here, and built for
    that device (kind, architecture). `reason` says why not; `device` is the device it answers for."""

    name: str
    backend: str
    available: bool
    reason: str | None
    device: str = ""

    def __str__(self) -> str:
        return f"{self.name}: " + ("available" if self.available else f"unavailable ({self.reason})")


class Registry:
    def __init__(self) -> None:
        self._impls: dict[str, Implementation] = {}
        self._availability: dict[str, str | None] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            for mod_name in BUILTIN_MODULES:
                short = mod_name.rsplit(".", 1)[-1]
                try:
                    mod = importlib.import_module(mod_name)
                    impls: list[Implementation] = list(mod.IMPLEMENTATIONS)
                except Exception as e:  # a broken backend must not take the others down
                    log.warning("backend module %s failed to import: %s", mod_name, e)
                    impls = [_Broken(short, f"import of {mod_name} failed: {type(e).__name__}: {e}")]
                for impl in impls:
                    self._impls[impl.name] = impl
            self._loaded = True

    def register(self, impl: Implementation) -> None:
        """Add (or replace) an implementation; used by plug-ins and tests."""
        self._load()
        self._impls[impl.name] = impl
        self._availability.pop(impl.name, None)
        _forget_decisions()

    def unregister(self, name: str) -> None:
        self._load()
        self._impls.pop(name, None)
        self._availability.pop(name, None)
        _forget_decisions()

    def all(self) -> dict[str, Implementation]:
        self._load()
        return dict(self._impls)

    def get(self, name: str) -> Implementation:
        self._load()
        return self._impls[name]

    def availability(self, name: str) -> str | None:
        """Cached: the first check may import triton/cupy, later ones are a dict lookup."""
        if name not in self._availability:
            try:
                self._availability[name] = self.get(name).availability()
            except Exception as e:
                self._availability[name] = f"{type(e).__name__}: {e}"
        return self._availability[name]

    def families(self) -> dict[str, list[str]]:
        fam: dict[str, list[str]] = {}
        for impl in self.all().values():
            fam.setdefault(impl.backend, []).append(impl.name)
        return fam

    def pins(self) -> dict[str, str]:
        """Pin name -> implementation name, for implementations named like their family."""
        return {impl.pin: impl.name for impl in self.all().values() if impl.pin}

    def forced_pool(self, forced: str) -> list[str]:
        """The implementations a forced name lets the dispatcher choose from: a family's members, one
        implementation (its name or its pin), or none for a name it does not know."""
        fams = self.families()
        if forced in fams:
            return fams[forced]
        name = self.pins().get(forced, forced)
        return [name] if name in self.all() else []

    def status(self, dev: DeviceInfo | None = None) -> list[BackendStatus]:
        """Every implementation and whether it can serve problems on `dev` (default: this
        machine's device), with the reason when it cannot."""
        if dev is None:
            from .device import current_device

            dev = current_device()
        out = []
        for name, impl in self.all().items():
            reason = self.availability(name)
            if reason is None:
                try:
                    why = impl.capabilities(dev).device_reasons(dev)
                except Exception as e:  # a buggy capability declaration must not hide the others
                    why = [f"capability check failed: {type(e).__name__}: {e}"]
                reason = "; ".join(why) or None
            out.append(BackendStatus(name, impl.backend, reason is None, reason, dev.describe()))
        return out


REGISTRY = Registry()
# FLASHDISPATCH_BACKEND accepts what is registered (implementations, their families, their pins)
envs.provide_backend_names(lambda: [*REGISTRY.all(), *REGISTRY.families(), *REGISTRY.pins()])


def _forget_decisions() -> None:
    """Cached decisions may name (or miss) a changed implementation: drop them."""
    from . import plans  # here: plans imports this module

    plans.refresh()
