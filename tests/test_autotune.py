"""Autotune on first use (dispatch/autotune.py) on the CPU: what it measures, records and decides,
its bounds, and the overlay file shared by processes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, ClassVar

import pytest
import torch
import torch.nn.functional as F

import flashdispatch
from flashdispatch import autotune
from flashdispatch.backend import Capabilities, Implementation
from flashdispatch.cli import main as cli_main
from flashdispatch.profile_store import parse_profile
from flashdispatch.registry import REGISTRY

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A measured CPU profile that knows fp32 at D=16 only: an fp32 problem at D=32 borrows D=16's models,
# so its decision is unsure (what autotune measures).
CPU_PROFILE = """\
schema: 2
device: {key: cpu, name: CPU}
generated: {card: test CPU, date: "2026-12-04", tool: test}
measured: true
groups:
  - key: {pass: fwd, class: dense, variant: plain, dtype: fp32, head_dim: 16}
    points:
      - {B: 1, Hq: 2, Hkv: 2, Sq: 64, Sk: 64, ms: {sdpa: 0.05, "sdpa:math": 0.08}}
      - {B: 2, Hq: 4, Hkv: 4, Sq: 256, Sk: 256, ms: {sdpa: 0.5, "sdpa:math": 0.9}}
"""
CPU_ELIGIBLE = {"sdpa", "sdpa:flash", "sdpa:math"}  # plain fp32 on a CPU (no Triton interpreter)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared CI machine, torch's thread pool makes a tiny op wait on busy
    cores (100 ms for a 32 x 128 product), which measures the machine, not the budget's logic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def profile_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    (tmp_path / "cpu.yaml").write_text(CPU_PROFILE)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_attempted", set())
    monkeypatch.setattr(autotune, "history", [])
    flashdispatch.refresh()
    return tmp_path


@pytest.fixture
def on(profile_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Autotune on, with a budget that a loaded CI machine cannot exhaust (the bound has its own test)."""
    monkeypatch.setenv("FLASHDISPATCH_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "BUDGET_S", 5.0)
    flashdispatch.refresh()
    return profile_dir


def qkv(b: int = 2, h: int = 2, s: int = 64, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g) for _ in range(3))


def overlay_points(directory: pathlib.Path) -> dict[tuple[int, ...], dict[str, float]]:
    path = directory / "cpu.autotune.yaml"
    prof = parse_profile(path.read_text(), str(path))
    return {pt.dims(): dict(pt.ms) for g in prof.groups for pt in g.points}


class _Fake(Implementation):
    """A CPU fp32 implementation that computes plain SDPA, after `delay_s`, plus `error`."""

    backend: ClassVar[str] = "fake"

    def __init__(self, name: str, delay_s: float = 0.0, error: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._name, self.delay_s, self.error, self.calls = name, delay_s, error, 0
        self.sleep = sleep

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return self._name

    def capabilities(self, dev):  # type: ignore[no-untyped-def]
        return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), lse=False)

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.delay_s:
            self.sleep(self.delay_s)
        return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, scale=p.scale) + self.error, None


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    added: list[str] = []

    def add(impl: Implementation) -> Implementation:
        REGISTRY.register(impl)
        added.append(impl.name)
        return impl

    yield add
    for n in added:
        REGISTRY.unregister(n)


# --- in one process --------------------------------------------------------------------------------


def test_off_by_default(profile_dir: pathlib.Path) -> None:
    q, k, v = qkv()
    d = flashdispatch.explain(q, k, v)
    assert d.uncertain, "the fixture's profile must leave this problem unsure"
    flashdispatch.attention(q, k, v)
    assert autotune.history == []
    assert not (profile_dir / "cpu.autotune.yaml").exists()
    assert flashdispatch.explain(q, k, v).source.startswith("profile:")


def test_cpu_autotune_measures_records_and_decides(on: pathlib.Path) -> None:
    q, k, v = qkv()
    before = flashdispatch.explain(q, k, v)
    assert before.uncertain and before.source.startswith("profile:")
    out = flashdispatch.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert len(autotune.history) == 1
    rep = autotune.history[0]
    assert set(rep.measured) == CPU_ELIGIBLE, rep.describe()
    assert not rep.failed, rep.describe()
    assert rep.path == str(on / "cpu.autotune.yaml")
    assert overlay_points(on) == {(2, 2, 2, 64, 64): pytest.approx(rep.measured, rel=1e-3)}
    after = flashdispatch.explain(q, k, v)
    assert after.source.startswith(f"autotune:{rep.path}#fwd dense fp32 D=32"), after.source
    assert not after.uncertain
    assert any(n.startswith("autotuned: measured on this problem") for n in after.notes), after.notes
    fastest = min(rep.measured, key=rep.measured.get)
    if fastest != "sdpa" and rep.measured[fastest] > rep.measured["sdpa"] * 0.98:
        fastest = "sdpa"  # the baseline keeps its place inside the margin
    assert after.variant == fastest
    assert after.predicted == pytest.approx({n: rep.measured[n] for n in after.predicted}, rel=1e-3)
    # the plan is cached: a second call and a new snapshot measure nothing again
    flashdispatch.attention(q, k, v)
    flashdispatch.refresh()
    flashdispatch.attention(*qkv(seed=1))
    assert len(autotune.history) == 1
    assert flashdispatch.explain(q, k, v).source.startswith("autotune:")  # the overlay, read again


@pytest.mark.parametrize("kwargs", [{"layout": "bshd"}, {"causal": True, "window": (23, 0)}, {"softcap": 5.0}],
                         ids=["bshd", "window", "softcap"])
def test_layouts_and_variants_are_measured_as_attention_runs_them(on: pathlib.Path, kwargs: dict[str, Any]) -> None:
    q, k, v = qkv(s=72)
    if kwargs.get("layout") == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = flashdispatch.attention(q, k, v, **kwargs)
    rep = autotune.history[-1]
    assert rep.measured and not rep.failed, rep.describe()
    assert flashdispatch.explain(q, k, v, **kwargs).source.startswith("autotune:")
    if kwargs.get("window"):
        assert "window: 23" in (on / "cpu.autotune.yaml").read_text()
    with flashdispatch.use_backend("sdpa:math"):
        torch.testing.assert_close(out, flashdispatch.attention(q, k, v, **kwargs))


def test_the_group_is_refitted_in_memory(on: pathlib.Path) -> None:
    flashdispatch.attention(*qkv())
    # another problem of the same group is now predicted from the group's own (measured) model
    other = flashdispatch.explain(*qkv(b=1, s=80))
    assert other.source.startswith("profile:") and "fwd dense fp32 D=32" in other.source, other.source
    assert all("borrows D=16" not in m for m in other.models), other.models


def test_never_twice_in_one_process_even_after_nothing_was_recorded(on: pathlib.Path) -> None:
    q, k, v = (torch.zeros(1, 2, 48, 32) for _ in range(3))
    flashdispatch.attention(q, k, v)
    assert len(autotune.history) == 1 and "all zeros" in autotune.history[0].reason
    flashdispatch.refresh()
    flashdispatch.attention(*qkv(b=1, s=48))
    assert len(autotune.history) == 1
    assert not (on / "cpu.autotune.yaml").exists()


def test_not_with_a_forced_backend(on: pathlib.Path) -> None:
    q, k, v = qkv()
    flashdispatch.attention(q, k, v, backend="sdpa:math")
    with flashdispatch.use_backend("sdpa"):
        flashdispatch.attention(q, k, v)
    assert autotune.history == []
    # and autotune's own check, for a decision that is unsure
    d = flashdispatch.explain(q, k, v)
    assert d.uncertain
    assert autotune.after_select(q, k, v, d.problem, d, "sdpa:math", None) is d
    assert autotune.history == []


def test_not_under_torch_compile_tracing(on: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # attention() took its eager path before this patch (bound at import): only autotune's own
    # check stands between the traced call and the timing
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    d = flashdispatch.explain(*qkv())
    flashdispatch.attention(*qkv())
    assert autotune.history == []
    assert flashdispatch.explain(*qkv()).source == d.source


def test_not_during_cuda_graph_capture(on: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    flashdispatch.attention(*qkv())
    assert autotune.history == []


def test_a_wrong_candidate_is_never_recorded(on: pathlib.Path, register, caplog: pytest.LogCaptureFixture) -> None:
    wrong = register(_Fake("fake:wrong", error=0.25))  # fast (no delay) and wrong
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, logger="flashdispatch"):
        out = flashdispatch.attention(q, k, v)
    assert wrong.calls >= 1, "the fake must have been tried"
    rep = autotune.history[-1]
    assert "fake:wrong" in rep.failed and "fake:wrong" not in rep.measured, rep.describe()
    assert "fake:wrong" not in overlay_points(on)[(2, 2, 2, 64, 64)]
    assert any("fake:wrong fails the accuracy check" in r.getMessage() for r in caplog.records)
    d = flashdispatch.explain(q, k, v)
    assert d.variant != "fake:wrong" and d.source.startswith("autotune:")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_a_refusal_is_kept_in_the_overlay(on: pathlib.Path, register) -> None:
    register(_Fake("fake:wrong", error=0.25))
    q, k, v = qkv()
    flashdispatch.attention(q, k, v)
    assert "rejected:" in (on / "cpu.autotune.yaml").read_text()
    flashdispatch.refresh()  # read back from the file, as a later process does
    d = flashdispatch.explain(q, k, v)
    assert d.source.startswith("autotune:") and not d.uncertain, d
    assert d.candidates[-1] == "fake:wrong"
    assert any(n.startswith("fake:wrong failed autotune's accuracy check") for n in d.notes), d.notes


class _Cold(_Fake):
    """Slow on its first call (a compile), then fast: it returns the output it computed for the
    same inputs (exact)."""

    def forward(self, inp, p, config):  # type: ignore[no-untyped-def]
        self.calls += 1
        key = (inp.q.data_ptr(), inp.k.data_ptr(), inp.v.data_ptr())
        if self.calls == 1:
            self.sleep(self.delay_s)
        if getattr(self, "memo", (None,))[0] != key:
            self.memo = (key, F.scaled_dot_product_attention(inp.q, inp.k, inp.v, scale=p.scale))
        return self.memo[1].clone(), None


def test_a_skipped_candidate_predicted_faster_is_measured_by_a_later_process(
        on: pathlib.Path, register, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "BUDGET_S", 1.0)
    (on / "cpu.yaml").write_text(CPU_PROFILE.replace('"sdpa:math": 0.08}', '"sdpa:math": 0.08, "fake:cold": 0.001}'))
    flashdispatch.refresh()
    cold = register(_Cold("fake:cold", delay_s=0.6))  # over its share: 1 s / 4 candidates
    q, k, v = qkv()
    flashdispatch.attention(q, k, v)
    first = autotune.history[-1]
    assert "fake:cold" in first.skipped and "fake:cold" not in first.measured, first.describe()
    d = flashdispatch.explain(q, k, v)
    assert d.source.startswith("autotune:") and "autotune did not time fake:cold" in d.uncertain, d
    flashdispatch.attention(*qkv(seed=3))
    assert len(autotune.history) == 1  # not twice in one process
    # a later process: the overlay read back, the problem measured again (now warm), the times merged
    flashdispatch.refresh()
    monkeypatch.setattr(autotune, "_attempted", set())
    flashdispatch.attention(*qkv(seed=4))
    second = autotune.history[-1]
    assert len(autotune.history) == 2 and "fake:cold" in second.measured, second.describe()
    assert set(overlay_points(on)[(2, 2, 2, 64, 64)]) == CPU_ELIGIBLE | {"fake:cold"}
    d = flashdispatch.explain(q, k, v)
    assert d.variant == "fake:cold" and not d.uncertain, d
    assert cold.calls > 2


@pytest.mark.parametrize("delay_s", [0.04, 0.15])
def test_the_budget_bounds_the_total(profile_dir: pathlib.Path, register, monkeypatch: pytest.MonkeyPatch,
                                     virtual_clock, delay_s: float) -> None:
    # the default budget: a slow implementation (0.04 s fits its share and is timed until the budget
    # ends; 0.15 s does not and is skipped after its first call) overruns it by one call at most.
    # autotune reads a virtual clock that only the slow implementation's calls advance: the bound is
    # checked exactly, whatever the machine's load
    # the profile predicts it fastest (and well inside its share), so it is tried right after sdpa
    (profile_dir / "cpu.yaml").write_text(CPU_PROFILE.replace('"sdpa:math": 0.08}', '"sdpa:math": 0.08, "fake:slow": 0.01}'))
    monkeypatch.setenv("FLASHDISPATCH_AUTOTUNE", "1")
    virtual_clock.drive(autotune)
    slow = register(_Fake("fake:slow", delay_s=delay_s, sleep=virtual_clock.sleep))
    assert flashdispatch.explain(*qkv()).candidates[0] == "fake:slow"
    flashdispatch.attention(*qkv())
    rep = autotune.history[-1]
    assert slow.calls >= 1
    assert rep.longest_step_s >= delay_s
    assert rep.elapsed_s <= autotune.BUDGET_S + rep.longest_step_s, rep.describe()
    if delay_s > autotune.BUDGET_S / 4:  # its share: four candidates
        assert "fake:slow" in rep.skipped and slow.calls == 1, rep.describe()
    else:  # timed until the next call no longer fits
        assert rep.elapsed_s > autotune.BUDGET_S - delay_s and rep.reps["fake:slow"] > 1, rep.describe()


def test_a_corrupt_overlay_is_ignored_with_a_warning(on: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    path = on / "cpu.autotune.yaml"
    path.write_text("schema: 2\ngroups: [{key: nonsense\n")
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, logger="flashdispatch"):
        d = flashdispatch.explain(q, k, v)
        out = flashdispatch.attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert d.source.startswith("profile:")
    assert any(str(path) in r.getMessage() and "ignoring it" in r.getMessage() for r in caplog.records), caplog.text
    # the measurement replaced it (the invalid file kept beside it)
    assert (2, 2, 2, 64, 64) in overlay_points(on)
    assert (on / "cpu.autotune.yaml.corrupt").exists()


def test_info_shows_the_overlay(on: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    flashdispatch.attention(*qkv())
    assert cli_main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"autotune: on, overlay {on / 'cpu.autotune.yaml'} (1 autotuned points in 1 groups)" in text, text
    assert "FLASHDISPATCH_AUTOTUNE='1'" in text


def test_unsure_without_a_profile_only_on_a_gpu() -> None:
    from flashdispatch.device import real_device, simulated_device
    from flashdispatch.selection import Decision

    p = flashdispatch.explain(*qkv()).problem
    gpu = Decision("sdpa", "sdpa", {}, "default", {}, p, simulated_device("h200"))
    cpu = Decision("sdpa", "sdpa", {}, "default", {}, p, real_device("cpu", 0))
    assert autotune.unsure(gpu) == "no profile for this device"
    assert autotune.unsure(cpu) == ""
    assert autotune.unsure(dataclasses.replace(gpu, profile="x")) == ""


# --- across processes ----------------------------------------------------------------------------

CHILD = """
import json, os, sys, time
import torch
import flashdispatch
from flashdispatch import autotune
autotune.BUDGET_S = 5.0
autotune._merge_delay_s = {delay}
b, s = {b}, {s}
g = torch.Generator().manual_seed(7)
q, k, v = (torch.randn(b, 2, s, 32, generator=g) for _ in range(3))
flashdispatch.explain(q, k, v)  # imports and loads the profile before the barrier
barrier = {barrier!r}
if barrier:
    open(barrier + "." + str(os.getpid()), "w").close()
    while not os.path.exists(barrier):
        time.sleep(0.01)
flashdispatch.attention(q, k, v)
d = flashdispatch.explain(q, k, v)
print(json.dumps({{"timed": len(autotune.history), "source": d.source, "variant": d.variant}}))
"""


def _child(profile_dir: pathlib.Path, b: int, s: int, *, barrier: str = "", delay: float = 0.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDISPATCH_")}
    env.update(FLASHDISPATCH_AUTOTUNE="1", FLASHDISPATCH_PROFILE_DIR=str(profile_dir), OMP_NUM_THREADS="1")
    code = textwrap.dedent(CHILD.format(b=b, s=s, barrier=barrier, delay=delay))
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_a_later_process_decides_from_the_point_without_timing(on: pathlib.Path) -> None:
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 96, 32, generator=g) for _ in range(3))
    flashdispatch.attention(q, k, v)
    here = flashdispatch.explain(q, k, v)
    assert here.source.startswith("autotune:")
    res = _result(_child(on, 1, 96))
    assert res == {"timed": 0, "source": here.source, "variant": here.variant}


def test_two_processes_autotuning_at_once_both_keep_their_point(profile_dir: pathlib.Path) -> None:
    # both read the overlay, wait 0.5 s, then write: without the lock the second write drops the
    # first one's point
    barrier = str(profile_dir / "go")
    procs = [_child(profile_dir, 1, 40, barrier=barrier, delay=0.5),
             _child(profile_dir, 1, 56, barrier=barrier, delay=0.5)]
    deadline = time.monotonic() + 200
    while sum(1 for f in os.listdir(profile_dir) if f.startswith("go.")) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child did not start"
        time.sleep(0.05)
    pathlib.Path(barrier).touch()
    results = [_result(p) for p in procs]
    assert [r["timed"] for r in results] == [1, 1], results
    assert all(r["source"].startswith("autotune:") for r in results), results
    assert set(overlay_points(profile_dir)) == {(1, 2, 2, 40, 40), (1, 2, 2, 56, 56)}
