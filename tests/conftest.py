"""Shared fixtures: a clean dispatcher state per test, and input factories."""

from __future__ import annotations

import pytest
import torch

import flashdispatch
from flashdispatch import envs

ENV_NAMES = [v.name for v in envs.ALL]


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no FLASHDISPATCH_* variables and an empty decision cache."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    flashdispatch.refresh()
    yield
    flashdispatch.refresh()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -------------------------------------------------------------------------------------------------
# Shared fixtures: poisoned outputs, the Triton interpreter on CPU-only machines
# -------------------------------------------------------------------------------------------------

@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs start as NaN, so that an element a kernel never writes fails the check
    (tests/inputs.py: poison_outputs)."""
    from inputs import poison_outputs

    poison_outputs(monkeypatch)


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
