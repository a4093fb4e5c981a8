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
