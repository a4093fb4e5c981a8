"""Device detection from (fake) device properties, for every device kind in the table."""

from __future__ import annotations

import pytest

from flashdispatch.device import DEVICE_KEYS, detect_from_properties, simulated_device

GIB = 2**30


@pytest.mark.parametrize(
    "props, kind, arch, key",
    [
        (dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0), "cuda", "sm_80", "a100"),
        (dict(name="NVIDIA A100-PCIE-40GB", major=8, minor=0), "cuda", "sm_80", "a100"),
        (dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0), "cuda", "sm_90", "h100"),
        (dict(name="NVIDIA H100 PCIe", major=9, minor=0), "cuda", "sm_90", "h100"),
        (dict(name="NVIDIA H200", major=9, minor=0), "cuda", "sm_90", "h200"),
        (dict(name="AMD Instinct MI250X", major=9, minor=0, is_hip=True, gcn_arch="gfx90a:sramecc+:xnack-"),
         "rocm", "gfx90a", "mi250x"),
        (dict(name="AMD Instinct MI300X", major=9, minor=4, is_hip=True, gcn_arch="gfx942:sramecc+:xnack-"),
         "rocm", "gfx942", "mi300x"),
        # unknown GPUs: the architecture family's profile, else none (built-in default order)
        (dict(name="NVIDIA L40S", major=8, minor=9), "cuda", "sm_89", "a100"),
        (dict(name="NVIDIA GeForce RTX 4090", major=8, minor=9), "cuda", "sm_89", "a100"),
        (dict(name="Some Hopper board", major=9, minor=0), "cuda", "sm_90", "h100"),
        (dict(name="AMD Instinct MI325X", major=9, minor=4, is_hip=True, gcn_arch="gfx942"), "rocm", "gfx942", "mi300x"),
        (dict(name="NVIDIA GeForce RTX 5090", major=12, minor=0), "cuda", "sm_120", None),
        (dict(name="Tesla V100-SXM2-16GB", major=7, minor=0), "cuda", "sm_70", None),
        (dict(name="AMD Radeon RX 7900 XTX", major=11, minor=0, is_hip=True, gcn_arch="gfx1100"), "rocm", "gfx1100", None),
    ],
)
def test_detect_from_properties(props, kind, arch, key):
    info = detect_from_properties(sm_count=100, memory=80 * GIB, **props)
    assert (info.kind, info.arch, info.profile_key) == (kind, arch, key)
    assert not info.simulated


def test_cuda_capability():
    assert detect_from_properties("x", 8, 0).cuda_capability == 80
    assert detect_from_properties("x", 9, 0).cuda_capability == 90
    assert detect_from_properties("x", 9, 4, is_hip=True, gcn_arch="gfx942").cuda_capability == 0


@pytest.mark.parametrize("key", DEVICE_KEYS)
def test_simulated_devices(key):
    d = simulated_device(key)
    assert d.simulated and d.profile_key == key
    assert key in d.describe() and "(simulated)" in d.describe()


def test_unknown_simulated_key():
    with pytest.raises(ValueError, match="device key: expected one of"):
        simulated_device("v100")
