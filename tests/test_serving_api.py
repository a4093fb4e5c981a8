"""attention_varlen / attention_kvcache on the CPU: validation that names the argument, the sdpa
fallbacks against the float64 per-sequence reference (forward and backward), selection (explain,
forcing, the env override, cupy's reasons), the value-check switch (env and block), torch.compile
fullgraph through the custom ops and their opcheck, and the paged-decode example on the CPU. The
Triton paths of these calls run in test_serving_triton_cpu.py."""

from __future__ import annotations

import pytest
import torch

import flashdispatch as fd
from flashdispatch import serving
from flashdispatch.problem import Problem
from flashdispatch.backends import sdpa_serving
from flashdispatch.errors import NoBackendError
from flashdispatch.serving_reference import kvcache_math, varlen_math
from flashdispatch.tolerances import within_budget

from inputs import cu_seqlens, make_cache


def _packed(lq: list[int], lk: list[int] | None = None, hq: int = 4, hkv: int = 2, d: int = 16,
            dtype: torch.dtype = torch.float32, grad: bool = False):
    lk = lk or lq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), hq, d, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v, cu_seqlens(lq), cu_seqlens(lk), max(lq), max(lk)


# --- validation ----------------------------------------------------------------------------------


def test_varlen_validation_names_the_argument() -> None:
    q, k, v, cq, ck, mq, mk = _packed([3, 5, 0, 2])
    call = fd.attention_varlen
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype torch.int32"):
        call(q, k, v, cq.long(), ck, mq, mk)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected a first entry of 0"):
        call(q, k, v, cq + 1, ck, mq, mk)
    bad = cq.clone()
    bad[2] = 1
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing entries"):
        call(q, k, v, bad, ck, mq, mk)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected a last entry equal to the 10 packed rows"):
        call(q, k, v, cq, ck.clamp(max=9), mq, mk)
    with pytest.raises(ValueError, match="max_seqlen_q: expected at least the longest sequence, 5"):
        call(q, k, v, cq, ck, 4, mk)
    with pytest.raises(ValueError, match="max_seqlen_k: expected a non-negative int"):
        call(q, k, v, cq, ck, mq, -1)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 5 entries like cu_seqlens_q"):
        call(q, k, v, cq, ck[:-1], mq, mk)
    with pytest.raises(ValueError, match="k: expected a number of heads that divides q's 4"):
        call(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cq, ck, mq, mk)
    with pytest.raises(TypeError, match="k: expected dtype torch.float32 like q"):
        call(q, k.half(), v, cq, ck, mq, mk)
    _check_shared_arguments(lambda **kw: call(q, k, v, cq, ck, mq, mk, **kw), heads_q=4)


def _check_shared_arguments(call, heads_q: int) -> None:
    """The arguments the serving calls share with attention() fail by attention()'s rules, with
    its messages (nothing truthy stands in for a bool, no NaN or negative scale runs)."""
    with pytest.raises(ValueError, match=rf"sinks shape: expected \(Hq,\) = \({heads_q},\)"):
        call(sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks.dtype: expected torch.float32"):
        call(sinks=torch.zeros(heads_q, dtype=torch.float64))
    with pytest.raises(TypeError, match="window: expected None or a .left, right. pair"):
        call(window=(3,))
    with pytest.raises(ValueError, match="window left: expected an int >= -1"):
        call(window=(-2, 0))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap: expected None or a finite float > 0"):
            call(softcap=bad)
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale: expected a finite positive float or None"):
            call(scale=bad)
    with pytest.raises(TypeError, match="scale: expected a float or None, got str"):
        call(scale="0.1")
    with pytest.raises(TypeError, match="causal: expected a bool, got str"):
        call(causal="no")
    with pytest.raises(TypeError, match="return_lse: expected a bool, got int"):
        call(return_lse=1)


def test_kvcache_validation_names_the_argument() -> None:
    q, k, v, lens, table = make_cache([20, 5], 2, 4, 2, 16, 16, torch.float32)
    call = fd.attention_kvcache
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype torch.int32"):
        call(q, k, v, cache_seqlens=lens.long(), block_table=table)
    with pytest.raises(TypeError, match="block_table: expected dtype torch.int32"):
        call(q, k, v, cache_seqlens=lens, block_table=table.long())
    cap = table.shape[1] * 16
    with pytest.raises(ValueError, match=rf"cache_seqlens: expected lengths in \[0, {cap}\].*got {cap + 1} for sequence 1"):
        call(q, k, v, cache_seqlens=torch.tensor([3, cap + 1], dtype=torch.int32), block_table=table)
    bad = table.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(ValueError, match=r"block_table: expected entries in \[0, .*at \[0, 1\]"):
        call(q, k, v, cache_seqlens=lens, block_table=bad)
    bad[0, 1] = -1
    with pytest.raises(ValueError, match="block_table: expected entries"):
        call(q, k, v, cache_seqlens=lens, block_table=bad)
    unused = table.clone()
    unused[1, -1] = -1  # a page no sequence uses may hold anything
    call(q, k.nan_to_num(), v.nan_to_num(), cache_seqlens=lens, block_table=unused)
    with pytest.raises(ValueError, match="k_cache: expected a number of heads that divides q's 4"):
        call(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), cache_seqlens=lens,
             block_table=table)
    with pytest.raises(TypeError, match="v_cache: expected dtype"):
        call(q, k, v.half(), cache_seqlens=lens, block_table=table)
    with pytest.raises(ValueError, match="k_cache: expected batch 2 like q"):
        call(q, k, v, cache_seqlens=lens)
    _check_shared_arguments(lambda **kw: call(q, k, v, cache_seqlens=lens, block_table=table, **kw), heads_q=4)


def test_value_checks_switch_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLASHDISPATCH_VALIDATE=off: the value checks (device reads) are skipped, in one place."""
    q, k, v, cq, ck, mq, mk = _packed([3, 5])
    calls = []
    real = serving.check_values
    monkeypatch.setattr(serving, "check_values", lambda **kw: calls.append(kw) or real(**kw))
    fd.attention_varlen(q, k, v, cq, ck, mq, mk)
    assert len(calls) == 1
    monkeypatch.setenv("FLASHDISPATCH_VALIDATE", "off")
    fd.refresh()
    fd.attention_varlen(q, k, v, cq, ck, mq, mk)
    qc, kc, vc, lens, table = make_cache([20, 5], 1, 4, 2, 16, 16, torch.float32)
    fd.attention_kvcache(qc, kc.nan_to_num(), vc.nan_to_num(), cache_seqlens=lens, block_table=table)
    assert len(calls) == 1
    monkeypatch.setenv("FLASHDISPATCH_VALIDATE", "maybe")
    fd.refresh()
    with pytest.raises(ValueError, match="FLASHDISPATCH_VALIDATE"):
        fd.attention_varlen(q, k, v, cq, ck, mq, mk)


def test_validation_block_overrides_the_setting_in_this_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """`with serving.validation(False)` skips the value checks of both calls inside the block only,
    over FLASHDISPATCH_VALIDATE, nested blocks included; another thread keeps the setting."""
    import threading

    q, k, v, cq, ck, mq, mk = _packed([3, 5])
    qc, kc, vc, lens, table = make_cache([20, 5], 1, 4, 2, 16, 16, torch.float32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    calls: list[str] = []
    real = serving.check_values
    monkeypatch.setattr(serving, "check_values", lambda **kw: calls.append(threading.current_thread().name)
                        or real(**kw))

    def both() -> int:
        before = len(calls)
        fd.attention_varlen(q, k, v, cq, ck, mq, mk)
        fd.attention_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table)
        return len(calls) - before

    assert both() == 2  # the default: on
    with serving.validation(False):
        assert both() == 0
        other = threading.Thread(target=both, name="other")
        other.start()
        other.join()
        assert calls[-2:] == ["other", "other"]  # the block is this thread's
        with serving.validation(True):
            assert both() == 2
        assert both() == 0
    assert both() == 2
    monkeypatch.setenv("FLASHDISPATCH_VALIDATE", "off")
    fd.refresh()
    assert both() == 0
    with serving.validation(True):
        assert both() == 2
    assert both() == 0


def test_kvcache_reads_no_device_value_with_validation_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sdpa fallback's gather: no .tolist()/.item() on any tensor when validation is off."""
    monkeypatch.setenv("FLASHDISPATCH_VALIDATE", "off")
    fd.refresh()
    q, k, v, lens, table = make_cache([20, 5, 0], 3, 4, 2, 16, 16, torch.float32)
    k, v = k.nan_to_num(), v.nan_to_num()

    def forbidden(*a, **kw):  # noqa: ANN002, ANN003
        raise AssertionError("a device value was read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="sdpa")
    fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="sdpa", softcap=3.0, return_lse=True)


# --- the sdpa fallbacks, exact ---------------------------------------------------------------------

VARLEN = [
    ([3, 0, 17, 1], None, True, None, None, False),
    ([3, 0, 17, 1], None, False, None, None, False),
    ([4, 9], [11, 9], True, (3, 0), None, False),
    ([6, 8], [2, 0], True, None, 2.0, True),       # Sq > Sk, a sequence without keys, softcap, sinks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0]}-{c[1]}-c{c[2]}-w{c[3]}-cap{c[4]}-s{c[5]}")
def test_varlen_sdpa_fallback_exact(case: tuple, dtype: torch.dtype) -> None:
    lq, lk, causal, window, softcap, with_sinks = case
    q, k, v, cq, ck, mq, mk = _packed(lq, lk, dtype=dtype, grad=True)
    sinks = torch.randn(4).requires_grad_(True) if with_sinks else None
    kw = dict(causal=causal, window=window, softcap=softcap, sinks=sinks)
    out, lse = fd.attention_varlen(q, k, v, cq, ck, mq, mk, return_lse=True, backend="sdpa", **kw)
    ref, ref_lse = varlen_math(q, k, v, cq, ck, upcast=True, **kw)
    base, _ = varlen_math(q, k, v, cq, ck, upcast=False, **kw)
    assert within_budget(out.detach(), base.detach(), ref.detach(), dtype)[0]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 2e-2
    do = torch.randn_like(out)
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    got = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(ref, leaves, do.double())
    basegrads = torch.autograd.grad(base, leaves, do, allow_unused=True)
    for g, w, b in zip(got, want, basegrads):
        assert within_budget(g, torch.zeros_like(w) if b is None else b, w, torch.float32 if g.dtype == torch.float32 else dtype,
                             grad=True)[0]


@pytest.mark.parametrize("variant", ["plain", "window", "softcap_sinks_lse", "contiguous"])
def test_kvcache_sdpa_fallback_exact(variant: str) -> None:
    page = 0 if variant == "contiguous" else 16
    q, k, v, lens, table = make_cache([37, 1, 0, 50], 3, 4, 2, 16, page, torch.float32)
    kw: dict = {}
    if variant == "window":
        kw = dict(window=(5, 0))
    if variant == "softcap_sinks_lse":
        kw = dict(softcap=2.0, sinks=torch.randn(4))
    out, lse = fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="sdpa", return_lse=True,
                                    **kw)
    ref, ref_lse = kvcache_math(q, k, v, lens, table, **kw)
    base, _ = kvcache_math(q, k, v, lens, table, upcast=False, **kw)
    assert within_budget(out, base, ref, torch.float32)[0]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-4
    plain = fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="sdpa", **kw)
    assert within_budget(plain, base, ref, torch.float32)[0]


# --- selection -------------------------------------------------------------------------------------


def test_explain_forcing_and_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cq, ck, mq, mk = _packed([3, 5])
    d = fd.explain_varlen(q, k, v, cq, ck, mq, mk, causal=True)
    assert d.variant == "sdpa" and d.source == "default"
    assert any("cupy kernels" in r for r in d.rejected["cupy"])
    assert "varlen B=2" in str(d) and "fallback" in str(d)
    with pytest.raises(NoBackendError, match="cupy"):
        fd.attention_varlen(q, k, v, cq, ck, mq, mk, backend="cupy")
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "cupy")
    fd.refresh()
    with pytest.raises(NoBackendError, match="set by env"):
        fd.attention_varlen(q, k, v, cq, ck, mq, mk)
    assert fd.explain_varlen(q, k, v, cq, ck, mq, mk, backend="sdpa").source == "argument"
    monkeypatch.setenv("FLASHDISPATCH_BACKEND", "sdpa")
    fd.refresh()
    qc, kc, vc, lens, table = make_cache([20, 5], 1, 4, 2, 16, 16, torch.float32)
    d = fd.explain_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table)
    assert d.variant == "sdpa" and d.source == "env" and "gathers" in " ".join(d.notes)
    with fd.use_backend("sdpa:math"):
        with pytest.raises(NoBackendError, match="pins one dense kernel"):
            fd.attention_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table)


def test_triton_reasons_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qc, kc, vc, lens, table = make_cache([20, 5], 1, 4, 2, 16, 16, torch.float32)
    with pytest.raises(NoBackendError, match="device=cpu"):
        fd.attention_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table, backend="triton")


# --- torch.compile ---------------------------------------------------------------------------------


def test_compile_fullgraph_no_break() -> None:
    torch._dynamo.reset()
    q, k, v, cq, ck, mq, mk = _packed([3, 0, 9], hq=4, hkv=2, grad=True)
    qc, kc, vc, lens, table = make_cache([20, 5], 2, 4, 2, 16, 16, torch.float32)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()

    def step(q, k, v, qc, kc, vc, lens, table):  # noqa: ANN001, ANN202
        a = fd.attention_varlen(q, k, v, cq, ck, mq, mk, causal=True)
        b = fd.attention_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table)
        return a.square().sum() + b.square().sum()

    ex = torch._dynamo.explain(step)(q, k, v, qc, kc, vc, lens, table)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(r.reason) for r in ex.break_reasons]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v, qc, kc, vc, lens, table)
    want = step(q, k, v, qc, kc, vc, lens, table)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(got, (q, k, v))
    g2 = torch.autograd.grad(want, (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_serving_ops_pass_opcheck(poisoned: None) -> None:
    """torch.library.opcheck of both serving custom ops (schema, fake tensors, autograd registration,
    AOT dispatch): plain and with window, softcap and sinks; paged and contiguous caches; with and
    without lse. Outputs start as NaN (poisoned), so an output left unwritten (an lse nobody asked
    for) differs between eager and compiled runs and fails."""
    from flashdispatch import serving_ops as sops
    from flashdispatch.ops import NOT_FORCED

    q, k, v, cq, ck, mq, mk = _packed([3, 0, 9], [5, 2, 9], grad=True)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for extra, window, softcap in ((None, (-1, -1), 0.0), (sinks, (4, 0), 5.0)):
        torch.library.opcheck(sops.attention_varlen_fwd,
                              (q, k, v, cq, ck, extra, mq, mk, NOT_FORCED, True, 0.3, *window, softcap, True, True))
    torch.library.opcheck(sops.attention_varlen_fwd,
                          (q, k, v, cq, ck, None, mq, mk, NOT_FORCED, False, 0.25, -1, -1, 0.0, False, False))
    for page in (16, 0):
        qc, kc, vc, lens, table = make_cache([20, 5, 0], 2, 4, 2, 16, page, torch.float32)
        kc, vc = kc.nan_to_num(), vc.nan_to_num()
        for extra, window, softcap in ((None, (-1, -1), 0.0), (sinks.detach(), (6, 0), 5.0)):
            for return_lse in (True, False):
                torch.library.opcheck(sops.attention_kvcache_fwd, (qc, kc, vc, lens, table, extra, NOT_FORCED, True,
                                                                   0.3, *window, softcap, return_lse))


def test_torch_varlen_reasons_follow_the_installed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = serving.ServingProblem("varlen", Problem("cuda", 0, torch.bfloat16, 2, 32, 8, 64, 64, 128, 128, True,
                                                  128 ** -0.5, "bshd", True, False, False), 0, 128, 128)
    monkeypatch.setattr(sdpa_serving, "torch_varlen_params", lambda: frozenset({"is_causal", "return_aux"}))  # 2.10
    assert serving.torch_varlen_reasons(sp) == ["this torch's varlen_attn has no enable_gqa"]
    assert serving.torch_varlen_reasons(sp.evolve(heads_kv=32)) == []
    # a causal window that hides nothing beyond causal is plain causal: is_causal serves it
    assert serving.torch_varlen_reasons(sp.evolve(heads_kv=32, window=(-1, 5))) == []
    assert "no scale argument" in " ".join(serving.torch_varlen_reasons(sp.evolve(heads_kv=32, scale=0.5)))
    assert "no window_size" in " ".join(serving.torch_varlen_reasons(sp.evolve(heads_kv=32, window=(8, 0))))
    monkeypatch.setattr(sdpa_serving, "torch_varlen_params",
                        lambda: frozenset({"return_aux", "scale", "window_size", "enable_gqa"}))
    assert serving.torch_varlen_reasons(sp.evolve(window=(8, 0), scale=0.5)) == []
    assert serving.torch_varlen_reasons(sp.evolve(device_kind="cpu", sinks=True)) == [
        "varlen_attn runs on CUDA only (device=cpu)", "varlen_attn has no softcap or sinks"]
    monkeypatch.setattr(sdpa_serving, "torch_varlen_params", lambda: frozenset())
    assert serving.torch_varlen_reasons(sp) == ["torch.nn.attention.varlen.varlen_attn is not in this torch"]


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (3, 0)), (False, (2, 1)),
                                            (False, (-1, 2))])
def test_cache_mask_is_the_dense_mask_of_each_sequence(causal, window) -> None:
    """The KV-cache fallback's device-built mask (reference.cache_visible_mask) is visible_mask of
    each sequence's own (Sq, L_b), padded with hidden slots up to the capacity."""
    from flashdispatch.reference import cache_visible_mask, visible_mask

    sq, cap, lens = 4, 11, [4, 9, 11, 2, 0]
    got = cache_visible_mask(sq, cap, torch.tensor(lens, dtype=torch.int32), causal=causal, window=window)
    got = got.expand(len(lens), sq, cap)  # (B, 1, cap) when no rule depends on the query
    for b, n in enumerate(lens):
        assert torch.equal(got[b, :, :n], visible_mask(sq, n, causal=causal, window=window)), b
        assert not got[b, :, n:].any()


# --- the serving example ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_paged_decode_example_runs_on_the_cpu() -> None:
    """examples/serving_paged_decode.py as a user runs it, on the CPU (eager, the sdpa fallback, a
    few steps): it exits 0 and its own check holds (cache_seqlens on the device == the host's
    lengths after every step's page allocation)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "serving_paged_decode.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on a GPU machine too
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "decode steps of 8 sequences" in res.stdout and "on cpu" in res.stdout, res.stdout


def test_kvcache_sinks_that_require_grad_make_a_gradient_call() -> None:
    """Sinks that take a gradient count like q, k, v: the forward-only kernel declines with its
    reason instead of returning a result that silently carries no gradient to the sinks."""
    qc, kc, vc, lens, table = make_cache([20, 5], 1, 4, 2, 16, 16, torch.float32)
    sinks = torch.zeros(4, requires_grad=True)
    d = fd.explain_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table, sinks=sinks)
    assert d.problem.needs_grad
    with pytest.raises(NoBackendError, match="forward only"):
        fd.attention_kvcache(qc, kc, vc, cache_seqlens=lens, block_table=table, sinks=sinks, backend="triton")
