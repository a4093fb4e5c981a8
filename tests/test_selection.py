"""Selection: forcing (argument > context > env), no silent fallback, simulated devices, explain."""

from __future__ import annotations

import logging
import pathlib
import re
import threading

import pytest
import torch

import flashdispatch as fd
from flashdispatch import envs, selection
from flashdispatch.backend import Capabilities, Implementation
from flashdispatch.device import DEVICE_KEYS
from flashdispatch.registry import REGISTRY
from inputs import check_forward, make_qkv

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_env_vars_live_in_one_module():
    offenders = []
    for folder in ("dispatch", "backends", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "envs.py":
                continue
            text = path.read_text()
            if re.search(r"os\.environ|os\.getenv|getenv\(", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"environment read outside dispatch/envs.py: {offenders}"


@pytest.mark.parametrize(
    "var, value",
    [("FLASHDISPATCH_BACKEND", "flash3"), ("FLASHDISPATCH_DEVICE", "tpu"), ("FLASHDISPATCH_LOG", "verbose")],
)
def test_bad_env_value_lists_valid_ones(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(envs.EnvError) as ei:
        fd.attention(q, k, v)
    msg = str(ei.value)
    assert var in msg and repr(value) in msg and "expected one of" in msg


def test_env_forces_backend_and_is_case_insensitive(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "SDPA:Math")
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    d = fd.explain(q, k, v)
    assert (d.variant, d.source) == ("sdpa:math", "env")


def test_forced_backend_never_falls_back(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)  # CPU tensors: cuDNN cannot serve
    with pytest.raises(fd.NoBackendError) as ei:
        fd.attention(q, k, v, backend="sdpa:cudnn")
    msg = str(ei.value)
    assert "forced backend 'sdpa:cudnn' (set by argument) cannot serve" in msg
    assert "`sdpa:cudnn` is not supported because:" in msg and "device=cpu" in msg
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "sdpa:efficient")
    fd.refresh()
    with pytest.raises(fd.NoBackendError, match="set by env"):
        fd.attention(q, k, v)


def test_forced_family_picks_a_variant_of_that_family():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    d = fd.explain(q, k, v, backend="sdpa", return_lse=True)
    assert d.variant == "sdpa:math" and d.source == "argument"


def test_precedence_argument_over_context_over_env(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "sdpa:flash")
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    assert fd.explain(q, k, v).source == "env"
    with fd.use_backend("sdpa:math"):
        d = fd.explain(q, k, v)
        assert (d.variant, d.source) == ("sdpa:math", "context")
        d = fd.explain(q, k, v, backend="sdpa")
        assert (d.variant, d.source) == ("sdpa", "argument")


def test_use_backend_nests_and_restores():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    assert fd.explain(q, k, v).source == "default"
    with fd.use_backend("sdpa:math"):
        with fd.use_backend("sdpa:flash"):
            assert fd.explain(q, k, v).variant == "sdpa:flash"
            with fd.use_backend("auto"):
                assert fd.explain(q, k, v).source == "default"
        assert fd.explain(q, k, v).variant == "sdpa:math"
        fd.attention(q, k, v)  # hot path sees the context too
    assert fd.explain(q, k, v).source == "default"
    with pytest.raises(ValueError, match="unknown backend"):
        with fd.use_backend("nope"):
            pass


def test_use_backend_is_thread_local():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    seen: dict[str, str] = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with fd.use_backend("sdpa:math"):
            seen["worker"] = fd.explain(q, k, v).variant
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen["main"] = fd.explain(q, k, v).source
    release.set()
    t.join()
    assert seen == {"worker": "sdpa:math", "main": "default"}


EXPECTED_KIND = {"a100": "cuda", "h100": "cuda", "h200": "cuda", "mi250x": "rocm", "mi300x": "rocm", "cpu": "cpu"}


@pytest.mark.parametrize("key", DEVICE_KEYS)
def test_simulated_device_selection(monkeypatch, key):
    monkeypatch.setenv("FLASHDISPATCH_DEVICE", key)
    fd.refresh()
    d = fd.explain(shape=(2, 8, 2, 512, 512, 128), dtype="bf16", causal=True)
    assert d.device.simulated and d.device.profile_key == key and d.device.kind == EXPECTED_KIND[key]
    assert d.problem.device_kind == EXPECTED_KIND[key]
    if key in ("mi250x", "mi300x", "cpu"):
        assert "sdpa:cudnn" in d.rejected and "device=" in " ".join(d.rejected["sdpa:cudnn"])
    else:
        assert "sdpa:cudnn" in d.candidates
    if key != "cpu":
        assert "sdpa:efficient" in d.candidates
    # same answer through the argument, without the env var
    monkeypatch.delenv("FLASHDISPATCH_DEVICE")
    fd.refresh()
    d2 = fd.explain(shape=(2, 8, 2, 512, 512, 128), dtype="bf16", causal=True, device=key)
    assert d2.candidates == d.candidates


def test_explain_report_text():
    q, k, v = make_qkv(1, 8, 2, 17, 33, 64)
    d = fd.explain(q, k, v, causal=True)
    text = str(d)
    assert text.startswith("flashdispatch decision: sdpa  (source: default)")
    for part in ("problem:", "Hq=8 Hkv=2 Sq=17 Sk=33", "device:", "eligible:", "rejected:",
                 "sdpa:flash: causal with Sq=17 < Sk=33 needs a bottom-right mask",
                 "bottom-right causal through torch CausalBias"):
        assert part in text, part


class _Wrong(Implementation):
    """A fast but wrong backend: the checks must catch it."""

    name = "wrong"
    backend = "wrong"

    def capabilities(self, dev):
        return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))

    def run(self, q, k, v, p, config):
        out = fd.attention(q, k, v, causal=p.causal, backend="sdpa:math")
        return out * 1.001, None


def test_checks_catch_a_wrong_backend():
    REGISTRY.register(_Wrong())
    try:
        fd.refresh()
        q, k, v = make_qkv(1, 2, 2, 16, 16, 32)
        out = fd.attention(q, k, v, backend="wrong")
        with pytest.raises(AssertionError, match="forward error"):
            check_forward(out, q, k, v, causal=False)
        assert "wrong" in [b.name for b in fd.backends()]
    finally:
        REGISTRY.unregister("wrong")


class _Broken(Implementation):
    name = "broken"
    backend = "broken"

    def availability(self):
        return "libfoo.so not found"

    def capabilities(self, dev):
        raise AssertionError("never asked: unavailable backends are not checked")

    def run(self, q, k, v, p, config):
        raise AssertionError


def test_unavailable_backend_is_reported_and_skipped():
    REGISTRY.register(_Broken())
    try:
        fd.refresh()
        q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
        d = fd.explain(q, k, v)
        assert d.rejected["broken"] == ["unavailable: libfoo.so not found"]
        status = {b.name: b for b in fd.backends()}
        assert not status["broken"].available and status["broken"].reason == "libfoo.so not found"
        with pytest.raises(fd.NoBackendError, match="unavailable: libfoo.so not found"):
            fd.attention(q, k, v, backend="broken")
    finally:
        REGISTRY.unregister("broken")


def test_decision_is_cached_and_logged_once(monkeypatch, caplog):
    monkeypatch.setenv("FLASHDISPATCH_LOG", "decisions")
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    with caplog.at_level(logging.INFO, logger="flashdispatch"):
        for _ in range(3):
            fd.attention(q, k, v)
    logged = [r for r in caplog.records if "flashdispatch decision" in r.getMessage()]
    assert len(logged) == 1 and "source: default" in logged[0].getMessage()
    assert fd.explain(q, k, v) is fd.explain(q, k, v)  # cached object


def test_no_backend_error_lists_inputs_and_reasons(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_DEVICE", "mi300x")
    fd.refresh()
    with pytest.raises(fd.NoBackendError) as ei:
        fd.explain(shape=(1, 2, 2, 4, 4, 64), dtype="bf16", backend="sdpa:cudnn")
    text = str(ei.value)
    assert "inputs: rocm:0 bf16" in text and "AMD Instinct MI300X" in text and "device=rocm" in text


def test_device_without_profile_borrows_its_architecture_family(tmp_path, monkeypatch):
    """An H200 with no h200.yaml uses h100.yaml (both sm_90) and says so."""
    (tmp_path / "h100.yaml").write_text(
        "schema: 1\ndevice: {key: h100}\nmeasured: false\nentries:\n"
        "  - match: {dtype: bf16, head_dim: 128, causal: true, gqa: 1, pass: fwd, seqlen: 4096}\n"
        "    ranking: [sdpa:flash, sdpa]\n"
    )
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    from flashdispatch.profile_store import load_profile

    monkeypatch.setattr("flashdispatch.selection.load_profile",
                        lambda key, user_dir: load_profile(key, user_dir) if key == "h100" else (None, []))
    d = fd.explain(shape=(1, 8, 8, 4096, 4096, 128), dtype="bf16", causal=True, device="h200")
    assert d.variant == "sdpa:flash" and "h100.yaml" in d.source
    assert any("no profile for 'h200': using 'h100'" in n for n in d.notes)


def test_hot_path_reads_no_env_file_or_device_after_the_first_call(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 9, 9, 16)
    fd.attention(q, k, v, causal=True)  # first call: snapshot, profile, decision

    def forbidden(*args, **kwargs):
        raise AssertionError("read on the hot path")

    monkeypatch.setattr(envs.EnvVar, "read", forbidden)
    monkeypatch.setattr("flashdispatch.profile_store.load_profile", forbidden)
    monkeypatch.setattr("flashdispatch.selection.load_profile", forbidden)
    monkeypatch.setattr("flashdispatch.device.real_device", forbidden)
    monkeypatch.setattr("flashdispatch.selection.real_device", forbidden)
    monkeypatch.setattr(torch.cuda, "get_device_properties", forbidden)
    monkeypatch.setattr("builtins.open", forbidden)
    for _ in range(3):
        out = fd.attention(q, k, v, causal=True)
    check_forward(out, q, k, v, causal=True)


def test_hot_path_key_tells_cpu_from_meta():
    # get_device() reads -1 for both: a cached cpu decision must not serve meta inputs (or back)
    for order in (("cpu", "meta"), ("meta", "cpu")):
        selection.state().fast.clear()
        for device in order:
            q, k, v = make_qkv(1, 2, 2, 5, 5, 16, device=device)
            out = fd.attention(q, k, v)
            assert out.device.type == device
        problems = [p for p, _, _ in selection.state().fast.values()]
        assert sorted(p.device_kind for p in problems) == ["cpu", "meta"], problems


def test_host_cost_tool_measures_the_dispatcher_alone_and_restores_the_cache():
    from flashdispatch.tools import host_cost

    rows = list(host_cost.measure("sdpa", grad=False, device="cpu", calls=20, rounds=2))
    with_backend, alone = rows
    assert alone.backend == with_backend.backend + " alone"
    # a stand-in run() costs next to nothing, so the dispatcher's own path is what is left; the
    # bound is loose (CI machines are shared) but catches a hot path that went slow (> 10x)
    assert alone.run_us < alone.attention_us < 20.0, alone
    assert all(impl.name == with_backend.backend and type(impl).__name__ != "_Immediate"
               for _, impl, _ in selection.state().fast.values() if impl is not None)
