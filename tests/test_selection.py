"""Selection: forcing (argument > context > env), no silent fallback, simulated devices, explain."""

from __future__ import annotations

import logging
import pathlib
import re
import threading

import pytest
import torch

import flashdispatch as fd
from flashdispatch import envs, plans, selection
from flashdispatch.plans import PLANS
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
    assert fd.explain(q, k, v) == fd.explain(q, k, v)  # the cached decision, as copies


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
        PLANS.by_key.clear()
        PLANS.recent.clear()
        for device in order:
            q, k, v = make_qkv(1, 2, 2, 5, 5, 16, device=device)
            out = fd.attention(q, k, v)
            assert out.device.type == device
        problems = [entry[0] for entry in PLANS.by_key.values()]
        assert sorted(p.device_kind for p in problems) == ["cpu", "meta"], problems


def test_host_cost_tool_measures_the_dispatcher_alone_and_restores_the_cache():
    from flashdispatch.tools import host_cost

    rows = list(host_cost.measure("sdpa", grad=False, device="cpu", calls=20, rounds=2))
    with_backend, alone = rows
    assert alone.backend == with_backend.backend + " alone"
    # the tool reports a time for both rows (no wall-clock bound here: a unit test never asserts a
    # time; tools/host_cost.py is the measurement, on the GPU host)
    assert alone.run_us >= 0.0 and alone.attention_us > 0.0 and with_backend.attention_us > 0.0, alone
    cached = [*PLANS.by_key.values(), *PLANS.recent.values()]
    assert all(entry[1].name == with_backend.backend and type(entry[1]).__name__ != "_Immediate"
               for entry in cached if entry[1] is not None)


def test_explain_hands_out_copies_that_cannot_change_what_attention_runs():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    fd.attention(q, k, v)
    d = fd.explain(q, k, v)
    d.config["poison"] = 1
    d.rejected.setdefault("x", []).append("y")
    hit = [entry for entry in PLANS.by_key.values() if entry[0].seqlen_q == 5]
    assert hit and all("poison" not in entry[2] for entry in hit)
    assert "poison" not in fd.explain(q, k, v).config


def test_register_and_unregister_forget_cached_decisions():
    class Fake(Implementation):
        name = "fake"
        backend = "fake"

        def capabilities(self, dev):
            return Capabilities(device_kinds=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                max_head_dim=256, lse=False)

        def run(self, q, k, v, p, config):
            return torch.full_like(q, 7.0), None

    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    REGISTRY.register(Fake())
    try:
        assert float(fd.attention(q, k, v, backend="fake")[0, 0, 0, 0]) == 7.0
    finally:
        REGISTRY.unregister("fake")
    with pytest.raises(ValueError, match="unknown backend"):  # not the stale cached decision
        fd.attention(q, k, v, backend="fake")


def test_a_malformed_profile_is_ignored_not_fatal(tmp_path, monkeypatch, caplog):
    (tmp_path / "cpu.yaml").write_text(
        "schema: 1\ndevice: {key: cpu, name: cpu, arch: cpu}\n"
        'generated: {date: "2026-11-26", tool: test, card: cpu, command: test}\nmeasured: true\nentries:\n'
        "  - match: {dtype: fp32, head_dim: 16, causal: false, gqa: 1, pass: fwd, seqlen: 5}\n"
        "    shape: {B: 1, Hq: 2, Hkv: 2, Sq: 5, Sk: 5, D: 16}\n"
        "    ranking: [sdpa]\n    ms: {sdpa: null}\n"
    )
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    with caplog.at_level(logging.WARNING, logger="flashdispatch"):
        check_forward(fd.attention(q, k, v), q, k, v, causal=False)
    assert any("ignoring it" in r.getMessage() and "ms.sdpa must be a positive number" in r.getMessage()
               for r in caplog.records)


def test_decision_caches_are_bounded(monkeypatch):
    monkeypatch.setattr(selection, "MAX_CACHED", 3)
    for sk in range(5, 12):  # a decode loop whose KV cache grows: a new signature every step
        q, k, v = make_qkv(1, 2, 2, 1, sk, 16)
        fd.attention(q, k, v)
    assert len(PLANS.by_key) <= 3 and len(selection.state().cache) <= 3


def test_a_decision_made_across_a_refresh_is_not_cached(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 6, 6, 16)
    real_select = selection.select

    def select_then_refresh(*args, **kwargs):
        d = real_select(*args, **kwargs)
        fd.refresh()  # another thread re-read the environment meanwhile
        return d

    monkeypatch.setattr("flashdispatch.plans.select", select_then_refresh)
    fd.attention(q, k, v)
    assert not any(entry[0].seqlen_q == 6 for entry in PLANS.by_key.values())


def test_empty_keys_with_grad_give_zero_gradients_in_fp16():
    q = torch.full((1, 8, 128, 128), 1.0, dtype=torch.float16, requires_grad=True)  # q.sum() overflows fp16
    k = torch.ones((1, 8, 0, 128), dtype=torch.float16, requires_grad=True)
    v = torch.ones((1, 8, 0, 128), dtype=torch.float16, requires_grad=True)
    out = fd.attention(q, k, v)
    assert out.shape == (1, 8, 128, 128) and not out.isnan().any() and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_use_backend_is_per_asyncio_task():
    import asyncio

    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    seen: list[str] = []

    async def a(entered: asyncio.Event, b_inside: asyncio.Event, a_left: asyncio.Event) -> None:
        with fd.use_backend("sdpa:math"):
            entered.set()
            await b_inside.wait()
        a_left.set()  # left its block while b is still inside b's

    async def b(entered: asyncio.Event, b_inside: asyncio.Event, a_left: asyncio.Event) -> None:
        await entered.wait()
        with fd.use_backend("sdpa"):
            b_inside.set()
            await a_left.wait()
            seen.append(fd.explain(q, k, v).variant)
        seen.append(fd.explain(q, k, v).source)

    async def main() -> None:
        events = (asyncio.Event(), asyncio.Event(), asyncio.Event())
        await asyncio.gather(a(*events), b(*events))

    asyncio.run(main())
    assert seen == ["sdpa", "default"], seen


# --- the hot path's guard in front of the key (dispatch/guards.py) --------------------------------


def test_the_guard_is_available_and_rejects_every_change_the_decision_depends_on():
    from flashdispatch import guards

    # torch 2.13 (CI) and 2.11 (the GPU machines) both have it; a torch without it runs the Python
    # key alone, which the next tests also cover
    assert guards.AVAILABLE
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16)
    g = guards.make(q, k, v)
    assert g.check(q, k, v) and g.check(*make_qkv(1, 2, 2, 5, 7, 16))  # fresh data, same metadata
    assert not g.check(q, k, v[..., :8])  # Dv
    assert not g.check(q, k.transpose(2, 3).contiguous().transpose(2, 3), v)  # strides
    assert not g.check(q.half(), k, v)
    assert not g.check(q, k, v.detach().requires_grad_())


@pytest.mark.parametrize("guarded", [True, False])
def test_repeated_calls_that_change_one_fact_each_get_the_right_answer(monkeypatch, guarded):
    from flashdispatch import api

    monkeypatch.setattr(plans, "_guards_on", guarded)
    fd.refresh()
    base = make_qkv(1, 2, 2, 5, 7, 16)
    variants = {
        "base": base,
        "fresh data": make_qkv(1, 2, 2, 5, 7, 16),
        "other Sk": make_qkv(1, 2, 2, 5, 9, 16),
        "strided k": (base[0], base[1].transpose(2, 3).contiguous().transpose(2, 3), base[2]),
        "fp64": tuple(t.double() for t in base),
        "meta": make_qkv(1, 2, 2, 5, 7, 16, device="meta"),
        "grad": tuple(t.detach().clone().requires_grad_() for t in base),
    }
    for _ in range(2):
        for name, (q, k, v) in variants.items():
            for causal in (False, True):
                out = fd.attention(q, k, v, causal=causal)
                assert out.dtype == q.dtype and out.device == q.device, name
                assert out.requires_grad == q.requires_grad, name
                if q.device.type != "meta":
                    check_forward(out, q, k, v, causal=causal)
    assert bool(PLANS.recent) == guarded


def test_refresh_forgets_the_guarded_decisions_too():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    fd.attention(q, k, v)
    assert PLANS.recent
    fd.refresh()
    assert not PLANS.recent and not PLANS.by_key


def test_a_cached_decision_read_across_a_refresh_is_not_put_in_front(monkeypatch):
    from flashdispatch import api

    q, k, v = make_qkv(1, 2, 2, 6, 6, 16)
    fd.attention(q, k, v)  # now in FAST (and RECENT)
    PLANS.recent.clear()

    class RefreshingDict(dict):
        def get(self, key, default=None):
            hit = super().get(key, default)
            fd.refresh()  # another thread re-reads the environment right after this lookup
            return hit

    monkeypatch.setattr(PLANS, "by_key", RefreshingDict(PLANS.by_key))
    fd.attention(q, k, v)
    assert not PLANS.recent


def test_a_nested_tensor_after_a_cached_call_raises_instead_of_ending_the_process():
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    fd.attention(q, k, v)
    fd.attention(q, k, v)  # now in front, behind a guard
    nested = torch.nested.nested_tensor([torch.randn(2, 5, 16), torch.randn(2, 3, 16)])
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        fd.attention(nested, k, v)


def test_aliased_inputs_skip_the_guard_and_do_not_displace_its_entry():
    class Spy:  # a guard never passes a tensor given twice: asking it would only cost time
        def __init__(self, guard):
            self.guard, self.calls = guard, 0

        def check(self, *tensors):
            self.calls += 1
            return self.guard.check(*tensors)

    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    fd.attention(q, k, v)
    (opts, entry), = PLANS.recent.items()
    spy = Spy(entry.guard)
    PLANS.recent[opts] = entry._replace(guard=spy)
    for _ in range(2):
        check_forward(fd.attention(q, q, q), q, q, q, causal=False)  # self-attention on one tensor
        check_forward(fd.attention(q, k, k), q, k, k, causal=False)
    assert spy.calls == 0 and PLANS.recent[opts][3] is spy
    fd.attention(q, k, v)
    assert spy.calls == 1


def test_a_key_hit_with_other_strides_gets_a_guard_of_its_own():
    # the key reads contiguity, not every stride: a size-1 dim may carry any stride
    q1 = torch.randn(1, 2, 1, 16)
    q2 = torch.randn(2, 1, 16).unsqueeze(0).transpose(1, 2).contiguous()
    q2 = q2.as_strided((1, 2, 1, 16), (32, 16, 7, 1))  # contiguous by torch's rule, other strides
    assert q2.is_contiguous() and q1.stride() != q2.stride()
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    fd.attention(q1, k, v)
    fd.attention(q2, k, v)
    (entry,) = [e for o, e in PLANS.recent.items() if o[0] is False and o[4] is None]
    assert entry[3].check(q2, k, v)
    check_forward(fd.attention(q2, k, v), q2, k, v, causal=False)


def _cpu_profile(tmp_path, monkeypatch, ms: dict[str, float]) -> None:
    ranking = sorted(ms, key=ms.__getitem__)
    (tmp_path / "cpu.yaml").write_text(
        "schema: 1\ndevice: {key: cpu, name: cpu, arch: cpu}\n"
        'generated: {date: "2026-11-26", tool: test, card: cpu, command: test}\nmeasured: true\nentries:\n'
        "  - match: {dtype: fp32, head_dim: 16, causal: false, gqa: 1, pass: fwd, seqlen: 5}\n"
        "    shape: {B: 1, Hq: 2, Hkv: 2, Sq: 5, Sk: 5, D: 16}\n"
        f"    ranking: [{', '.join(ranking)}]\n"
        f"    ms: {{{', '.join(f'{k}: {v}' for k, v in ms.items())}}}\n"
    )
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()


@pytest.mark.parametrize("winner_ms, expected", [(0.99, "sdpa"), (0.96, "sdpa"), (0.95, "sdpa:math"),
                                                   (0.94, "sdpa:math"), (1.2, "sdpa")])
def test_a_winner_inside_the_margin_yields_to_plain_sdpa(tmp_path, monkeypatch, winner_ms, expected):
    # sdpa:math is a pinned kernel of plain SDPA's own family: it must lead by PIN_MARGIN (5%)
    _cpu_profile(tmp_path, monkeypatch, {"sdpa:math": winner_ms, "sdpa": 1.0})
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    d = fd.explain(q, k, v)
    assert d.variant == expected and d.source.startswith("profile:")
    kept = [n for n in d.notes if "not 0.95 or less" in n and "at this very shape" in n]
    assert bool(kept) == (winner_ms in (0.99, 0.96)) == d.source.endswith("(baseline margin)"), (d.notes, d.source)
    assert fd.explain(q, k, v, backend="sdpa:math").variant == "sdpa:math"  # forcing still wins


def test_a_pinned_sdpa_kernel_needs_a_larger_lead_than_another_family():
    from flashdispatch.selection import BASELINE_MARGIN, PIN_MARGIN, baseline_margin, lead_needed

    assert PIN_MARGIN > BASELINE_MARGIN
    assert [lead_needed(n) for n in ("sdpa:cudnn", "sdpa:flash", "sdpa:math")] == [PIN_MARGIN] * 3
    assert [lead_needed(n) for n in ("triton", "triton:gluon", "cupy", "")] == [BASELINE_MARGIN] * 4
    assert baseline_margin(0.04, 0.03, name="sdpa:cudnn") == pytest.approx(0.07)  # fit errors still count
    assert baseline_margin(0.01, name="sdpa:cudnn") == PIN_MARGIN


def test_a_symbolic_trace_after_a_fake_one_never_reuses_the_fake_decision():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        return fd.attention(q, k, v, causal=True)

    square = make_qkv(1, 2, 2, 4, 4, 16)
    make_fx(f, tracing_mode="fake")(*square)
    try:
        graph = make_fx(f, tracing_mode="symbolic")(*square)
    except TypeError:
        return  # symbolic sizes cannot key the cache: refusing is fine, a baked-in Sq == Sk is not
    q, k, v = make_qkv(1, 2, 2, 3, 6, 16)
    check_forward(graph(q, k, v), q, k, v, causal=True)


def test_a_subclass_is_served_without_a_guard():
    class Marked(torch.Tensor):
        pass

    q, k, v = (t.as_subclass(Marked) for t in make_qkv(1, 2, 2, 5, 5, 16))
    for _ in range(2):
        out = fd.attention(q, k, v)
    check_forward(out.as_subclass(torch.Tensor), *(t.as_subclass(torch.Tensor) for t in (q, k, v)), causal=False)
    assert not PLANS.recent


def test_calls_alternating_strides_under_one_key_build_few_guards(monkeypatch):
    from flashdispatch import api

    built = []

    def counting_make(q, k, v):
        built.append(q.stride())
        return guards.make(q, k, v)

    from flashdispatch import guards
    monkeypatch.setattr(plans, "make_guard", counting_make)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    qa = torch.randn(1, 2, 1, 16)
    qb = torch.randn(64).as_strided((1, 2, 1, 16), (32, 16, 7, 1))  # same key: contiguous by torch's rule
    for _ in range(10):
        for q in (qa, qb):
            fd.attention(q, k, v)
    assert len(built) <= 1 + plans.MAX_GUARD_REBUILDS, built


def test_a_fast_entry_from_before_a_refresh_is_not_used(monkeypatch):
    from flashdispatch import api

    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    fd.attention(q, k, v)
    (key, entry), = [(key, e) for key, e in PLANS.by_key.items() if key[0] != "ops"]
    stale = entry._replace(config={"poison": 1}, generation=entry.generation - 1)
    PLANS.recent.clear()
    PLANS.by_key[key] = stale  # as if a call that decided before a refresh() wrote it after
    calls = []
    real = plans.select
    monkeypatch.setattr(plans, "select", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_forward(fd.attention(q, k, v), q, k, v, causal=False)
    assert calls and PLANS.by_key[key].config != {"poison": 1}


@pytest.mark.parametrize("key, variant, want", [
    ("h100", False, ("sdpa", "triton", "cupy", "sdpa:cudnn", "sdpa:flash", "sdpa:efficient", "sdpa:math")),
    ("mi300x", False, ("sdpa", "triton", "sdpa:flash", "sdpa:efficient", "sdpa:math")),
    ("cpu", False, ("sdpa", "sdpa:flash", "sdpa:math", "triton")),
    ("h100", True, ("triton", "cupy", "sdpa", "sdpa:efficient", "sdpa:math")),
    ("mi300x", True, ("triton", "sdpa", "sdpa:efficient", "sdpa:math")),
    ("cpu", True, ("sdpa", "sdpa:math", "triton")),
])
def test_the_built_in_order_comes_from_the_implementations_data(key, variant, want):
    """default_rank, Capabilities.fuses_variants and .emulated give the order the dispatcher used
    to keep as tables by hand (plain SDPA first; fused variants first on GPUs; Triton's CPU
    interpreter last)."""
    from flashdispatch.device import simulated_device
    from flashdispatch.problem import problem_from_shape

    dev = simulated_device(key)
    p = problem_from_shape((1, 4, 4, 64, 64, 64), device_kind=dev.kind, causal=True,
                           window=(16, 0) if variant else None)
    assert tuple(selection._default_order(p, dev, list(want)[::-1])) == want
    assert tuple(selection._default_order(p, dev, sorted(want))) == want


def test_a_poorly_fitted_leader_does_not_hold_back_a_well_fitted_winner():
    # speculative verification: "noisy" is predicted fastest, far ahead of plain SDPA, but one of its
    # measured points is 4x slower than the rest say, and its model misses that point by more than a
    # factor of two; "steady", well fitted, is predicted 2x ahead: "steady" runs, the baseline
    # second, the noisy leader behind it, and the decision says it is unsure. "close", well fitted
    # but only 1% ahead of SDPA, stays behind the baseline too (the 2% margin).
    from flashdispatch.costmodel import Group, GroupKey, Point, features, point_problem
    from flashdispatch.profile_store import Profile
    from flashdispatch.selection import UNRELIABLE_FIT, rank_by_model

    sms, key = 132, GroupKey("fwd", "speculative", "plain", "bf16", 128)
    pts = []
    for i, (b, sk) in enumerate([(16, 4096), (1, 131072), (8, 8192), (2, 65536), (4, 16384)]):
        pt = Point(b, 32, 8, 8, sk)
        gb = features(point_problem(key, pt), sms)[2]
        pts.append(pt._replace(ms={"steady": (5 + 750 * gb) / 1e3, "sdpa": (10 + 1500 * gb) / 1e3,
                                   "noisy": (3 + 420 * gb) * (4.0 if i == 1 else 1.0) / 1e3,
                                   "close": (9.9 + 1485 * gb) / 1e3}))
    g = Group(key, pts)
    g.refit(sms)
    assert g.worst_error("noisy", sms) > UNRELIABLE_FIT >= g.worst_error("steady", sms)
    prof = Profile("t.yaml", "h200", True, {"key": "h200", "name": "H200", "arch": "sm_90", "sm_count": sms},
                   {"date": "2026-12-05", "card": "synthetic", "tool": "test"}, [g])
    p = point_problem(key, Point(2, 32, 8, 4, 6000))

    def rank(names):
        return rank_by_model(p, key, names, prof, variant_path=lambda n: (True, ""), default_order=lambda n: n)

    rk = rank(["noisy", "steady", "close", "sdpa"])
    assert rk is not None and [pr.name for pr in rk.predictions] == ["noisy", "steady", "close", "sdpa"], rk.predicted
    assert rk.ordered == ["steady", "sdpa", "noisy", "close"] and not rk.kept_baseline, (rk.ordered, rk.notes)
    assert any(n.startswith("noisy's model misses one of its own measured points by a factor of")
               and n.endswith("not preferred to steady's") for n in rk.notes), rk.notes
    assert any(n.startswith("close is predicted") and "less than 2% apart" in n for n in rk.notes), rk.notes
    assert "noisy is predicted faster by a model that misses one of its own measured points" in rk.uncertain
    assert rk.margin is not None and rk.margin > 0  # against the runner-up not held back: sdpa
    # with no trusted contender the baseline runs and says so
    rk = rank(["noisy", "close", "sdpa"])
    assert rk.ordered == ["sdpa", "close", "noisy"] and rk.kept_baseline
    assert any("plain SDPA, the baseline, runs" in n for n in rk.notes), rk.notes
    # without the baseline among the eligible (a forced family, a call SDPA cannot serve), the noisy
    # model still does not lead a trusted one
    assert rank(["noisy", "steady"]).ordered == ["steady", "noisy"]


def test_a_pin_forces_the_implementation_named_like_its_family():
    """"triton" lets the family choose (the Gluon forward for a Hopper prefill); "triton:tl" forces
    the portable kernel alone, also through FLASHDISPATCH_BACKEND; a pin is no family."""

    assert REGISTRY.pins() == {"triton:tl": "triton", "sdpa:plain": "sdpa"}
    assert REGISTRY.forced_pool("triton:tl") == ["triton"]
    assert set(REGISTRY.forced_pool("triton")) == {"triton", "triton:gluon"}
    assert REGISTRY.forced_pool("triton:gluon") == ["triton:gluon"]
    assert REGISTRY.forced_pool("nope") == []
    shape = dict(shape=(1, 32, 8, 8192, 8192, 128), dtype=torch.bfloat16, causal=True, device="h100")
    assert fd.explain(**shape, backend="triton").variant == "triton:gluon"
    d = fd.explain(**shape, backend="triton:tl")
    assert (d.variant, d.backend, d.source) == ("triton", "triton", "argument")
    assert "not the forced backend 'triton:tl'" in " ".join(d.rejected["triton:gluon"])
    assert "triton:tl" in envs.backend_choices() and "sdpa:plain" in envs.backend_choices()


def test_a_pin_in_the_environment_forces_plain_sdpa(monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "sdpa:plain")
    fd.refresh()
    try:
        q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
        d = fd.explain(q, k, v)
        assert (d.variant, d.source) == ("sdpa", "env")
        assert set(d.rejected) >= {"sdpa:math", "sdpa:efficient"}
    finally:
        monkeypatch.delenv("FLASHDISPATCH_BACKEND")
        fd.refresh()
