"""The built wheel: one import name, and it carries the profiles and the CUDA sources."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("flashdispatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"flashdispatch"}, top
    for sub in ("flashdispatch/__init__.py", "flashdispatch/backends/sdpa.py", "flashdispatch/tools/__init__.py",
                "flashdispatch/profiles/__init__.py", "flashdispatch/cli.py"):
        assert sub in names, sub
    for path in (ROOT / "profiles").glob("*.yaml"):
        assert f"flashdispatch/profiles/{path.name}" in names, path.name
    for path in list((ROOT / "backends" / "cupy").glob("*.cu")) + list((ROOT / "backends" / "cupy").glob("*.cuh")):
        assert f"flashdispatch/backends/cupy/{path.name}" in names, path.name
