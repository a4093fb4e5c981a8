"""The Triton backend's forward and split-KV decode under Triton's CPU interpreter.

Checked against the float64 reference with the flash-attention budget (tolerances.within_budget)
and the lse contract (-inf exactly where a row sees no key). fp32 and fp16 only: bf16 tl.dot
returns garbage in the interpreter of Triton 3.6 (bf16 runs in tests/test_triton_gpu.py). Outputs
are poisoned (torch.empty hands out NaN) so that an unwritten element fails. Sizes stay small: the
interpreter runs every tile op through numpy.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterator

import pytest
import torch

import flashdispatch
from flashdispatch.device import simulated_device
from flashdispatch.errors import NoBackendError
from flashdispatch.problem import problem_from_shape
from inputs import check_forward, check_grads, make_qkv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests; the GPU runs test_triton_gpu.py"),
]
MODULES = ("flashdispatch.backends.triton.forward", "flashdispatch.backends.triton.decode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
fwd: ModuleType
dec: ModuleType


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels(triton_interpreter_state: None) -> Iterator[None]:
    """Kernels defined under TRITON_INTERPRET=1 for this file (the shared fixture, tests/conftest.py)."""
    global fwd, dec
    fwd, dec = (importlib.import_module(n) for n in MODULES)
    yield


def _id(c: tuple) -> str:
    b, hq, hkv, sq, sk, d, causal = c
    return f"b{b}-h{hq}x{hkv}-sq{sq}-sk{sk}-d{d}{'-causal' if causal else ''}"


# (B, Hq, Hkv, Sq, Sk, D, causal): S in {1, 17, 113}, D in {40, 64, 96}, GQA, Sq < Sk and Sq > Sk
FORWARD_CASES = [
    (1, 2, 2, 1, 1, 64, True),
    (2, 4, 2, 17, 17, 64, True),
    (1, 2, 2, 113, 113, 96, True),
    (1, 4, 1, 17, 113, 40, True),
    (1, 2, 2, 113, 17, 64, True),
    (1, 3, 3, 113, 113, 40, False),
    (2, 2, 1, 17, 113, 96, False),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=_id)
def test_forward(case: tuple, layout: str, dtype: str, poisoned: None) -> None:
    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], layout=layout)
    out, lse = flashdispatch.attention(q, k, v, causal=causal, layout=layout, return_lse=True, backend="triton")
    check_forward(out, q, k, v, causal=causal, layout=layout, lse=lse)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_noncontiguous(dtype: str, poisoned: None) -> None:
    q, k, v = make_qkv(1, 4, 2, 37, 113, 40, dtype=DTYPES[dtype], noncontiguous=True)
    assert not q.is_contiguous()
    out, lse = flashdispatch.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    check_forward(out, q, k, v, causal=True, lse=lse)


def test_head_dim_v_differs(poisoned: None) -> None:
    q, k, v = make_qkv(1, 2, 1, 33, 65, 64, dv=40, dtype=torch.float16)
    out, lse = fwd.attention_forward(q, k, v, causal=True, scale=0.3, config={})
    check_forward(out, q, k, v, causal=True, scale=0.3, lse=lse)


@pytest.mark.parametrize("cfg", [{"TMA": True}, {"TMA": True, "WS": True},
                                 {"BLOCK_M": 16, "BLOCK_N": 64}], ids=["tma", "tma-ws", "m16-n64"])
def test_forward_configs(cfg: dict, poisoned: None) -> None:
    """The Hopper descriptor kernel (emulated by the interpreter) and other tile shapes."""
    q, k, v = make_qkv(2, 4, 2, 50, 113, 96, dtype=torch.float16, layout="bshd")
    qv, kv, vv = (t.transpose(1, 2) for t in (q, k, v))
    out, lse = fwd.attention_forward(qv, kv, vv, causal=True, scale=96**-0.5, config=cfg)
    check_forward(out.transpose(1, 2), q, k, v, causal=True, layout="bshd", lse=lse)


DECODE_CASES = [
    (2, 8, 2, 1, 113, 64, False),
    (1, 4, 4, 5, 77, 40, True),
    (1, 6, 2, 16, 200, 96, True),
]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", DECODE_CASES, ids=_id)
def test_decode(case: tuple, dtype: str, poisoned: None) -> None:
    b, hq, hkv, sq, sk, d, causal = case
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=DTYPES[dtype], layout="bshd")
    decision = flashdispatch.explain(q, k, v, causal=causal, layout="bshd", backend="triton")
    assert any("split-KV decode" in n for n in decision.notes), decision.notes
    out, lse = flashdispatch.attention(q, k, v, causal=causal, layout="bshd", return_lse=True, backend="triton")
    check_forward(out, q, k, v, causal=causal, layout="bshd", lse=lse)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_decode_splits_merge(splits: int, poisoned: None) -> None:
    """One split writes directly; several go through the lse merge (7 leaves empty tail splits
    out: the plan rounds to whole key blocks)."""
    q, k, v = make_qkv(1, 4, 2, 3, 150, 64, dtype=torch.float32)
    out, lse = dec.decode_forward(q, k, v, causal=True, scale=0.125, config={"NUM_SPLITS": splits})
    check_forward(out, q, k, v, causal=True, scale=0.125, lse=lse)


def test_decode_forward_path(poisoned: None) -> None:
    q, k, v = make_qkv(1, 4, 2, 2, 90, 64, dtype=torch.float16)
    out, lse = dec.decode_forward(q, k, v, causal=True, scale=0.125, config={"PATH": "forward"})
    check_forward(out, q, k, v, causal=True, scale=0.125, lse=lse)


def test_gradients_through_the_autograd_function() -> None:
    """attention(backend="triton") with requires_grad runs the one autograd Function over triton's
    pair: forward here, backward from backward.py; gradients within 3x of plain torch's error."""
    q, k, v = make_qkv(1, 4, 2, 17, 33, 40, dtype=torch.float32, requires_grad=True)
    check_grads(lambda a, b, c: flashdispatch.attention(a, b, c, causal=True, backend="triton"), q, k, v, causal=True)


def test_empty_keys_give_zeros_and_minus_inf() -> None:
    q, k, v = make_qkv(1, 2, 2, 5, 0, 64, dtype=torch.float16)
    out, lse = fwd.attention_forward(q, k, v, causal=False, scale=0.125, config={})
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


# --- the Implementation: capabilities, configs, reasons ------------------------------------------


def test_cpu_eligible_only_under_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    impl = flashdispatch.registry.REGISTRY.get("triton")
    cpu = simulated_device("cpu")
    p = problem_from_shape((1, 2, 2, 8, 8, 64), dtype="fp16", device_kind="cpu")
    assert impl.not_supported_reasons(p, cpu) == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert any("device=cpu" in r for r in impl.not_supported_reasons(p, cpu))


def test_reasons_name_the_limit() -> None:
    impl = flashdispatch.registry.REGISTRY.get("triton")
    h100 = simulated_device("h100")
    p = problem_from_shape((1, 2, 2, 8, 8, 320), dtype="bf16")
    assert any("head_dim=320 (max 256)" in r for r in impl.not_supported_reasons(p, h100))
    bf16_cpu = problem_from_shape((1, 2, 2, 8, 8, 64), dtype="bf16", device_kind="cpu")
    assert any("dtype=bf16" in r for r in impl.not_supported_reasons(bf16_cpu, simulated_device("cpu")))
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(NoBackendError, match="dtype=bf16"):
        flashdispatch.attention(q, k, v, backend="triton")


@pytest.mark.parametrize("key", ["h100", "a100", "mi300x", "mi250x"])
def test_config_space_fits_device(key: str) -> None:
    from flashdispatch.backends.triton import configs

    impl = flashdispatch.registry.REGISTRY.get("triton")
    dev = simulated_device(key)
    arch = configs.arch_family(dev.kind, dev.arch)
    for shape in [(4, 32, 8, 4096, 4096, 128), (1, 8, 8, 2048, 2048, 256), (1, 32, 8, 1, 8192, 128)]:
        p = problem_from_shape(shape, dtype="bf16", device_kind=dev.kind, causal=True)
        space = impl.config_space(p, dev)
        assert space, f"empty config space for {shape} on {key}"
        for cfg in space:
            tiles = {**cfg, "BLOCK_M": cfg.get("BLOCK_M", configs.DECODE_MAX_BLOCK_M)}
            assert configs.fits_shared_memory(tiles, arch, p.head_dim, p.head_dim_v), cfg
            assert ("TMA" in cfg) <= (arch == "sm_90"), cfg
            assert ("waves_per_eu" in cfg) <= arch.startswith("gfx"), cfg
        assert impl.default_config(p, dev) in [impl.default_config(p, dev)]


def test_plan_notes_say_which_path() -> None:
    impl = flashdispatch.registry.REGISTRY.get("triton")
    h100 = simulated_device("h100")
    dec_p = problem_from_shape((1, 32, 8, 1, 8192, 128), dtype="bf16")
    notes = impl.plan_notes(dec_p, h100, impl.default_config(dec_p, h100))
    assert "split-KV decode: 4 q heads x 1 queries" in notes[0]
    fwd_p = problem_from_shape((4, 32, 32, 512, 8192, 128), dtype="bf16", causal=True)
    assert "forward" in impl.plan_notes(fwd_p, h100, impl.default_config(fwd_p, h100))[0]


def test_bad_config_names_the_key() -> None:
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="BLOCK_Q"):
        fwd.attention_forward(q, k, v, causal=False, scale=0.1, config={"BLOCK_Q": 64})
    with pytest.raises(ValueError, match="BLOCK_M"):
        fwd.attention_forward(q, k, v, causal=False, scale=0.1, config={"BLOCK_M": 48})


# --- direct launches (the GPU hot path), with stand-ins for the compiled kernel ------------------


class _FakeCompiled:
    function = "fn-handle"
    packed_metadata = "meta"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *a: object) -> None:
        self.calls.append(a)


class _FakeJit:
    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self) -> None:
        self.jit_calls = 0
        self.compiled = _FakeCompiled()

    def __getitem__(self, grid: tuple) -> object:
        def launch(*args: object, **kwargs: object) -> _FakeCompiled:
            self.jit_calls += 1
            return self.compiled
        return launch


def _launcher(monkeypatch: pytest.MonkeyPatch):
    from flashdispatch.backends.triton.launch import DirectLauncher

    fake = _FakeJit()
    la = DirectLauncher(fake)
    monkeypatch.setattr(DirectLauncher, "_stream", staticmethod(lambda device: 1234))
    checked: list[tuple] = []
    monkeypatch.setattr(la, "_verify", lambda key, *rest: (checked.append(key), la.verified.add(key)))
    return fake, la, checked


def test_direct_launch_passes_signature_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, la, checked = _launcher(monkeypatch)
    x = torch.empty(64, device="meta")
    consts = {"FLAG": True, "BLOCK": 32}  # out of signature order on purpose
    la((4,), (x, 48, 0.5), consts, {"num_warps": 4}, (x,))
    assert fake.jit_calls == 1 and not fake.compiled.calls  # first launch: the JIT compiles
    la((5, 2), (x, 96, 0.25), consts, {"num_warps": 4}, (x,))
    assert fake.jit_calls == 1 and len(checked) == 1
    (call,) = fake.compiled.calls
    assert call == (5, 2, 1, 1234, "fn-handle", "meta", None, None, None, x, 96, 0.25, 32, True)
    la((1,), (x, 1, 0.5), consts, {"num_warps": 4}, (x,))  # n == 1 is another specialisation
    assert fake.jit_calls == 2


def test_direct_launch_turns_itself_off_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, la, _ = _launcher(monkeypatch)
    x = torch.empty(64, device="meta")
    la((1,), (x, 48, 0.5), {"BLOCK": 32, "FLAG": False}, {}, (x,))

    def broken(*a: object) -> None:
        raise TypeError("launcher moved")

    monkeypatch.setattr(fake.compiled, "run", broken)
    la((1,), (x, 48, 0.5), {"BLOCK": 32, "FLAG": False}, {}, (x,))
    assert not la.enabled and fake.jit_calls == 2


def test_direct_launch_leaves_hooks_to_the_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton import knobs

    fake, la, _ = _launcher(monkeypatch)
    x = torch.empty(64, device="meta")
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)
    for _ in range(3):
        la((1,), (x, 48, 0.5), {"BLOCK": 32, "FLAG": False}, {}, (x,))
    assert fake.jit_calls == 3 and not fake.compiled.calls


def test_bound_launch_takes_the_checked_kernel_then_launches_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashdispatch.backends.triton import launch

    fake, la, checked = _launcher(monkeypatch)
    monkeypatch.setattr(launch, "_current_stream", lambda: (lambda device: 1234))
    bound = launch.BoundLaunch(la, (4,), 1, (48, 0.5), {"FLAG": True, "BLOCK": 32}, {"num_warps": 4}, 0)
    x = torch.empty(64, device="meta")  # data_ptr() == 0: aligned
    for _ in range(3):  # compile (JIT), checked direct launch, direct launch that hands over the kernel
        bound((x,), (x,))
    assert fake.jit_calls == 1 and len(checked) == 1 and bound.kernel is fake.compiled
    fake.compiled.calls.clear()
    bound((x,), (x,))
    # pointers go as ints, then the plan's scalars, then the constexprs in signature order
    assert fake.compiled.calls == [(4, 1, 1, 1234, "fn-handle", "meta", None, None, None, 0, 48, 0.5, 32, True)]


def test_bound_launch_leaves_misaligned_pointers_to_the_keyed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashdispatch.backends.triton import launch

    fake, la, _ = _launcher(monkeypatch)
    bound = launch.BoundLaunch(la, (1,), 1, (48, 0.5), {"FLAG": False, "BLOCK": 32}, {}, 0)
    x = torch.empty(64, device="meta")
    for _ in range(3):
        bound((x,), (x,))
    keyed = []
    monkeypatch.setattr(launch.DirectLauncher, "__call__",
                        lambda self, *a: keyed.append(a) or None)

    class Misaligned:
        def data_ptr(self) -> int:
            return 8

    bound((Misaligned(),), (x,))  # type: ignore[arg-type]
    assert len(keyed) == 1 and bound.kernel is fake.compiled


def test_inputs_on_two_devices_are_refused() -> None:
    q, k, v = make_qkv(1, 2, 2, 5, 5, 16)
    with pytest.raises(ValueError, match="q/k/v device"):
        fwd.attention_forward(q, k.to("meta"), v.to("meta"), causal=False, scale=0.25, config={})


def test_tma_allocator_is_installed_per_thread_and_spares_the_users() -> None:
    import threading

    from triton.runtime import _allocation

    def user_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        raise AssertionError("not called here")

    seen: dict[str, object] = {}

    def worker() -> None:  # a new thread starts with Triton's null allocator (a ContextVar)
        seen["before"] = _allocation._allocator.get()
        fwd.ensure_tma_allocator()
        seen["ours"] = _allocation._allocator.get()
        _allocation._allocator.set(user_allocator)
        fwd.ensure_tma_allocator()
        seen["user"] = _allocation._allocator.get()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert seen["ours"] is fwd._tma_scratch and seen["user"] is user_allocator


def test_run_on_device_switches_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from flashdispatch.backends.triton import launch

    entered: list[int] = []

    @contextlib.contextmanager
    def device(index: int) -> Iterator[None]:
        entered.append(index)
        yield

    def no_query() -> int:
        raise AssertionError("a CPU call queried the CUDA device")

    monkeypatch.setattr(torch._C, "_cuda_getDevice", no_query, raising=False)
    monkeypatch.setattr(torch.cuda, "device", device)
    assert launch.run_on_device(None, lambda x: x + 1, 1) == 2  # a CPU call: no CUDA query
    with launch.on_device(None):
        pass
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    assert launch.run_on_device(0, lambda x: x + 1, 1) == 2 and entered == []
    assert launch.run_on_device(1, lambda x: x + 1, 1) == 2 and entered == [1]
    with launch.on_device(1):
        pass
    assert entered == [1, 1]


_CPU_PROFILE = """\
schema: 1
device: {key: cpu, name: CPU, arch: cpu}
generated: {date: "2026-12-04", tool: test, card: CPU}
measured: true
entries:
  - match: {dtype: fp16, head_dim: 16, causal: true, gqa: 1, pass: fwd, seqlen: 256, seqlen_q: 32}
    ranking: [triton, sdpa]
    ms: {triton: 1.0, sdpa: 2.0}
    config:
      triton: {BLOCK_M: 32, BLOCK_N: 32, num_warps: 4, num_stages: 1}
"""


def test_speculative_call_runs_split_kv_from_a_forward_entry(monkeypatch, tmp_path, poisoned: None) -> None:
    """End to end under Triton's interpreter: the long-cache (chunked) model ranks triton first for a
    speculative call, and the split-KV kernel runs and is right."""
    from flashdispatch.reference import attention_math

    (tmp_path / "cpu.yaml").write_text(_CPU_PROFILE)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    flashdispatch.refresh()
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 16, dtype=torch.float16)
    k, v = torch.randn(1, 2, 200, 16, dtype=torch.float16), torch.randn(1, 2, 200, 16, dtype=torch.float16)
    d = flashdispatch.explain(q, k, v, causal=True)
    assert d.variant == "triton" and d.source.endswith("#fwd chunked fp16 D=16"), d.source
    out = flashdispatch.attention(q, k, v, causal=True)
    ref = attention_math(q, k, v, causal=True)[0]
    assert (out.double() - ref).abs().max() < 2e-3


def test_the_first_launch_check_counts_nan_as_equal_to_nan() -> None:
    """A checked launch on inputs holding NaN writes NaN in both launches: the same values, so the
    direct launches stay on (torch.equal would call them different)."""
    from flashdispatch.backends.triton.launch import _same_values

    nan = float("nan")
    assert _same_values(torch.tensor([nan, 1.0, float("-inf")]), torch.tensor([nan, 1.0, float("-inf")]))
    assert not _same_values(torch.tensor([nan, 1.0]), torch.tensor([nan, 2.0]))
    assert not _same_values(torch.tensor([nan, 1.0]), torch.tensor([0.0, 1.0]))
    assert not _same_values(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert _same_values(torch.tensor([3, 4]), torch.tensor([3, 4]))


@pytest.mark.parametrize("sq,sk", [(17, 17), (1, 113)], ids=["forward", "decode"])
def test_a_repeated_call_runs_the_launch_its_plan_bound(sq: int, sk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """attention() keeps the backend's launch bound to the signature (Implementation.prepare): the
    second call looks no plan up in the backend, a call with other strides under the same key does
    (and is right), and both match the reference."""
    looked_up: list[str] = []
    for mod in (fwd, dec):
        def counted(*a: object, _real=mod.cached_plan, _m: str = mod.__name__) -> object:
            looked_up.append(_m)
            return _real(*a)

        monkeypatch.setattr(mod, "cached_plan", counted)
    q, k, v = make_qkv(1, 2, 2, sq, sk, 64, dtype=torch.float32, seed=3)
    first = flashdispatch.attention(q, k, v, causal=True, backend="triton:tl")
    made = len(looked_up)
    assert made >= 1  # while the plan was prepared (decode may hand the signature to the forward's plan)
    again = flashdispatch.attention(q, k, v, causal=True, backend="triton:tl")
    assert len(looked_up) == made
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    check_forward(again, q, k, v, causal=True)
    wide = torch.randn(1, 2, sq + 5, 64)[:, :, :sq]  # same shape and last stride, another head stride
    out = flashdispatch.attention(wide, k, v, causal=True, backend="triton:tl")
    assert len(looked_up) > made
    check_forward(out, wide, k, v, causal=True)
