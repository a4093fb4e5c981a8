"""Shared fixtures: a clean dispatcher state per test, and input factories."""

from __future__ import annotations

import pytest
import torch

import flashdispatch
from flashdispatch import envs

ENV_NAMES = [v.name for v in envs.ALL]


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no FLASHDISPATCH_* variables and an empty decision cache, and hands the
    GPU memory it cached back when it ends (pytest -n runs a dozen processes on one GPU: memory one
    test's allocator keeps is memory another's large reference cannot have)."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    flashdispatch.refresh()
    yield
    flashdispatch.refresh()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The slow tests first (a stable sort): under -n, each worker then starts on a long compile or
    # spawn while the many short tests fill in behind, instead of one worker finishing alone on the
    # long ones collected last (the ahead-of-time compiles sit near the end of the alphabet). Tests
    # that share a costly module fixture (a spawned process group, an nvcc run) all carry `slow`,
    # so that they stay together and a worker builds the fixture once.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -------------------------------------------------------------------------------------------------
# Shared fixtures: poisoned outputs, a virtual clock, the Triton interpreter on CPU-only machines
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as NaN, so that an element a kernel never writes fails the check
    (tests/inputs.py: poison_outputs)."""
    from inputs import poison_outputs

    poison_outputs(monkeypatch)


class VirtualClock:
    """Time that moves only when the test says: `sleep(s)` advances it by s, and every reading by
    `tick` (so work that does not sleep still takes a small, fixed, positive time). Installed as the
    `time` module of the code under test, a budget or a timing is exact whatever the machine's load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tick: float = 1e-6) -> None:
        self.now, self.tick, self._monkeypatch = 0.0, tick, monkeypatch

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now

    monotonic = perf_counter
    time = perf_counter

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def drive(self, *modules: object) -> "VirtualClock":
        """Make each module's `time` this clock for the test (the modules must `import time`)."""
        for m in modules:
            self._monkeypatch.setattr(m, "time", self)
        return self


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> VirtualClock:
    """A VirtualClock for the test; `virtual_clock.drive(module)` hands it to the code under test."""
    return VirtualClock(monkeypatch)


TRITON_MODULE_PREFIX = "flashdispatch.backends.triton"


def _reload_triton_modules() -> None:
    """(Re)define the Triton kernels under the current TRITON_INTERPRET (triton.jit reads it when a
    kernel is defined): every loaded module of the Triton backend, in import order."""
    import importlib
    import sys

    importlib.import_module(TRITON_MODULE_PREFIX + ".forward")
    for name in [n for n in list(sys.modules) if n.startswith(TRITON_MODULE_PREFIX + ".")]:
        importlib.reload(sys.modules[name])


@pytest.fixture(scope="module")
def triton_interpreter_state() -> object:
    """On a machine without a GPU, Triton's kernels run under its interpreter for the tests of the
    module (fp16/fp32; bf16 `tl.dot` is wrong there); afterwards the variable is restored and the
    kernels redefined compiled. On a GPU machine nothing changes."""
    import os

    if torch.cuda.is_available():
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _reload_triton_modules()
        flashdispatch.refresh()
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
        _reload_triton_modules()
        flashdispatch.refresh()
