"""Every environment variable flashdispatch reads, in one place.

Nothing else in the package touches ``os.environ`` (a test greps for it). Values are read lazily,
validated against their choices, and snapshotted by the dispatcher on the first call so that the
hot path never reads the environment; :func:`flashdispatch.refresh` takes a new snapshot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

from .device import DEVICE_KEYS

# Names accepted by FLASHDISPATCH_BACKEND: "auto" (let the dispatcher choose) and every
# implementation, family and pin name. Family names ("sdpa") pick the best variant of that family;
# full names pin one, pin names ("sdpa:plain") the member named like its family. The registry
# supplies the names when it is created (provide_backend_names), so no list of them is kept here.
_backend_names: Callable[[], Iterable[str]] = tuple


def provide_backend_names(names: Callable[[], Iterable[str]]) -> None:
    global _backend_names
    _backend_names = names


def backend_choices() -> tuple[str, ...]:
    return tuple(dict.fromkeys(("auto", *_backend_names())))


# Simulated device keys: the device table's keys, which are the profile keys.
DEVICE_CHOICES: tuple[str, ...] = ("auto", *DEVICE_KEYS)

LOG_CHOICES: tuple[str, ...] = ("off", "decisions")


class EnvError(ValueError):
    """An environment variable holds a value flashdispatch does not accept."""


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    help: str
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    # Lower-case before validating: backend and device names are case-insensitive.
    normalize: Callable[[str], str] = str.strip

    def read(self) -> str:
        raw = os.environ.get(self.name)
        if raw is None or raw.strip() == "":
            return self.default
        value = self.normalize(raw)
        choices = self.choices() if callable(self.choices) else self.choices
        if choices is not None and value not in choices:
            raise EnvError(
                f"{self.name}={raw!r} is not valid; expected one of: {', '.join(choices)}"
            )
        return value


def _lower(s: str) -> str:
    return s.strip().lower()


FLASHDISPATCH_BACKEND = EnvVar(
    "FLASHDISPATCH_BACKEND",
    "auto",
    "Force one backend (family or variant) for every call; a forced backend that cannot serve a "
    "problem raises NoBackendError instead of falling back.",
    backend_choices,
    _lower,
)
FLASHDISPATCH_DEVICE = EnvVar(
    "FLASHDISPATCH_DEVICE",
    "auto",
    "Simulate a device for explain() and the CLI (planning for hardware that is not present).",
    DEVICE_CHOICES,
    _lower,
)
FLASHDISPATCH_PROFILE_DIR = EnvVar(
    "FLASHDISPATCH_PROFILE_DIR",
    "",
    "Directory of <device>.yaml profiles that win over the shipped ones.",
)
FLASHDISPATCH_LOG = EnvVar(
    "FLASHDISPATCH_LOG",
    "off",
    "'decisions' logs every new dispatch decision once (logger 'flashdispatch', level INFO).",
    LOG_CHOICES,
    _lower,
)
FLASHDISPATCH_CACHE_DIR = EnvVar(
    "FLASHDISPATCH_CACHE_DIR",
    "",
    "Where compiled CUDA modules of the cupy backend are cached on disk "
    "(default: ~/.cache/flashdispatch).",
)
FLASHDISPATCH_AUTOTUNE = EnvVar(
    "FLASHDISPATCH_AUTOTUNE",
    "0",
    "'1' turns on autotune on first use (like torch.backends.cudnn.benchmark): the first eager call "
    "of a forward problem the cost model is unsure of times the eligible implementations on the "
    "call's own inputs (at most 200 ms, each output checked against plain SDPA and a float64 "
    "reference), records the times in <profile dir>/<device>.autotune.yaml (FLASHDISPATCH_PROFILE_DIR, "
    "else ~/.cache/flashdispatch) and decides from them in this and later processes. Off by default; "
    "never under torch.compile tracing, CUDA-graph capture or a forced backend.",
    ("0", "1"),
    _lower,
)
FLASHDISPATCH_VALIDATE = EnvVar(
    "FLASHDISPATCH_VALIDATE",
    "on",
    "'off' skips the checks of attention_varlen / attention_kvcache that read device values "
    "(cu_seqlens, cache_seqlens, block_table): no host sync on a serving hot path. They are always "
    "skipped while a CUDA graph is captured or torch.compile traces.",
    ("on", "off"),
    _lower,
)
# Triton's own switch; read here so that the triton backend can offer CPU execution under it.
TRITON_INTERPRET = EnvVar(
    "TRITON_INTERPRET", "0", "Triton's interpreter mode (runs Triton kernels on the CPU).", None
)


def triton_interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read at each call: triton
    decides when a kernel is defined, and tests switch it)."""
    return TRITON_INTERPRET.read().strip().lower() not in ("", "0", "false", "off", "no")


def kernel_cache_dir() -> str:
    """Where compiled kernels are cached on disk: FLASHDISPATCH_CACHE_DIR, else ~/.cache/flashdispatch."""
    return FLASHDISPATCH_CACHE_DIR.read() or home_cache_dir()

ALL: tuple[EnvVar, ...] = (
    FLASHDISPATCH_BACKEND,
    FLASHDISPATCH_DEVICE,
    FLASHDISPATCH_PROFILE_DIR,
    FLASHDISPATCH_LOG,
    FLASHDISPATCH_CACHE_DIR,
    FLASHDISPATCH_AUTOTUNE,
    FLASHDISPATCH_VALIDATE,
)


@dataclass(frozen=True)
class Settings:
    """One validated snapshot of the environment."""

    backend: str
    device: str
    profile_dir: str
    log: str
    autotune: bool = False

    @property
    def autotune_dir(self) -> str:
        """Where autotune on first use reads and writes its `<device>.autotune.yaml` files: the user
        profile directory (FLASHDISPATCH_PROFILE_DIR), else the per-user cache directory."""
        return self.profile_dir or home_cache_dir()


def read_settings() -> Settings:
    """The environment's settings; EnvError for the first variable that holds a bad value."""
    return _settings(EnvVar.read)


def read_settings_reporting() -> tuple[Settings, dict[str, EnvError]]:
    """The settings with every invalid variable taken at its default, and each invalid variable's
    error by name: for `flashdispatch info`, which shows a bad environment instead of stopping at
    it (attention() and the other commands raise read_settings' EnvError)."""
    values: dict[str, str] = {}
    bad: dict[str, EnvError] = {}
    for var in ALL:
        try:
            values[var.name] = var.read()
        except EnvError as e:
            bad[var.name] = e
            values[var.name] = var.default
    return _settings(lambda var: values[var.name]), bad


def _settings(read: Callable[[EnvVar], str]) -> Settings:
    return Settings(
        backend=read(FLASHDISPATCH_BACKEND),
        device=read(FLASHDISPATCH_DEVICE),
        profile_dir=read(FLASHDISPATCH_PROFILE_DIR),
        log=read(FLASHDISPATCH_LOG),
        autotune=read(FLASHDISPATCH_AUTOTUNE) == "1",
    )


def home_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "flashdispatch")
