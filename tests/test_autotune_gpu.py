"""Autotune on first use on a GPU: a chunked prefill (1k query rows against a 16k cache, Llama-3 8B's
heads) that the profile is unsure of is measured within the budget and decided from the measurement;
the Triton family wins it (no SDPA flash/cuDNN kernel takes the bottom-right mask).

    python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_autotune_gpu.py

Three runs, each on a fresh overlay:
  borrowed  a profile that measured only square causal problems: the chunked problem borrows that
            class, whose model prefers plain SDPA; every candidate was called once before (warm).
  shipped   the shipped profile of this card, warm (asserted only when that profile is unsure).
  cold      the shipped profile, fp16, nothing called before: first calls that compile are skipped
            (reported, the bound still holds).
Prints a table last and writes $OUT/autotune_gpu.json when OUT is set.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
import torch.nn.functional as F

import flashdispatch
from flashdispatch import autotune
from flashdispatch.tools import timing

pytestmark = pytest.mark.gpu

SHAPE = (1, 32, 8, 1024, 16384, 128)  # B, Hq, Hkv, Sq, Sk, D; causal (bottom-right)

# square causal bf16 D=128 only, SDPA fastest there (as cuDNN is on square causal problems)
BORROWED_PROFILE = """\
schema: 2
device: {{key: {key}, name: "{name}"}}
generated: {{card: "{name}", date: "2026-12-04", tool: "test: square causal only"}}
measured: true
groups:
  - key: {{pass: fwd, class: causal, variant: plain, dtype: bf16, head_dim: 128}}
    points:
      - {{B: 1, Hq: 32, Hkv: 8, Sq: 2048, Sk: 2048, ms: {{sdpa: 0.060, triton: 0.075, "sdpa:efficient": 0.110}}}}
      - {{B: 4, Hq: 32, Hkv: 8, Sq: 8192, Sk: 8192, ms: {{sdpa: 3.60, triton: 4.10, "sdpa:efficient": 6.40}}}}
"""


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    b, hq, hkv, sq, sk, d = SHAPE
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(b, hq, sq, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype, generator=g))


def _run(label: str, directory: pathlib.Path, dtype: torch.dtype, warm: bool,
         monkeypatch: pytest.MonkeyPatch) -> dict:
    directory.mkdir(exist_ok=True)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(directory))
    monkeypatch.setattr(autotune, "_attempted", set())
    flashdispatch.refresh()
    q, k, v = _inputs(dtype)
    before = flashdispatch.explain(q, k, v, causal=True)
    if warm:  # every candidate once, forced (compiles Triton, builds cuDNN plans): a warm process
        for name in before.candidates:
            flashdispatch.attention(q, k, v, causal=True, backend=name)
        torch.cuda.synchronize()
    n = len(autotune.history)
    out = flashdispatch.attention(q, k, v, causal=True)
    after = flashdispatch.explain(q, k, v, causal=True)
    rep = autotune.history[-1] if len(autotune.history) > n else None
    sq, sk = SHAPE[3], SHAPE[4]
    ref = F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
        attn_mask=torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq))
    return {
        "run": label, "dtype": str(dtype), "unsure_before": before.uncertain, "model_choice": before.variant,
        "autotuned": rep is not None, "elapsed_ms": rep.elapsed_s * 1e3 if rep else None,
        "longest_step_ms": rep.longest_step_s * 1e3 if rep else None,
        "measured_ms": rep.measured if rep else {}, "reps": rep.reps if rep else {},
        "skipped": rep.skipped if rep else {}, "failed": rep.failed if rep else {},
        "choice": after.variant, "family": after.backend, "source": after.source,
        "max_err_vs_fp32": float((out.float() - ref).abs().max()),
    }


@pytest.mark.alone
def test_autotune_picks_triton_for_an_unsure_chunked_prefill(tmp_path: pathlib.Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASHDISPATCH_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "history", [])
    dev = flashdispatch.explain(*_inputs(torch.bfloat16), causal=True).device
    borrowed = tmp_path / "borrowed"
    rows = []
    borrowed.mkdir()
    (borrowed / f"{dev.profile_key}.yaml").write_text(BORROWED_PROFILE.format(key=dev.profile_key, name=dev.name))
    rows.append(_run("borrowed", borrowed, torch.bfloat16, True, monkeypatch))
    rows.append(_run("shipped", tmp_path / "shipped", torch.bfloat16, True, monkeypatch))
    rows.append(_run("cold", tmp_path / "cold", torch.float16, False, monkeypatch))
    out_dir = os.environ.get("OUT")
    if out_dir:
        pathlib.Path(out_dir, "autotune_gpu.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "shape": SHAPE, "budget_ms": autotune.BUDGET_S * 1e3,
             "rows": rows}, indent=1))
    print(f"\nautotune on first use, {torch.cuda.get_device_name()}, B,Hq,Hkv,Sq,Sk,D={SHAPE} causal, "
          f"budget {autotune.BUDGET_S * 1e3:.0f} ms")
    for r in rows:
        meas = ", ".join(f"{n}={ms:.3f}x{r['reps'][n]}" for n, ms in r["measured_ms"].items())
        print(f"  {r['run']:<8} {r['dtype']:<14} model {r['model_choice']:<8} -> {r['choice']:<13} "
              f"autotune {r['elapsed_ms'] or 0:5.0f} ms (longest step {r['longest_step_ms'] or 0:4.0f} ms) "
              f"measured ms: {meas}; skipped: {list(r['skipped'])}; failed: {list(r['failed'])}; "
              f"err {r['max_err_vs_fp32']:.2g}")
    b = rows[0]
    assert b["unsure_before"] and b["model_choice"] == "sdpa", b
    assert b["autotuned"] and b["source"].startswith("autotune:"), b
    assert {"triton", "sdpa"} <= set(b["measured_ms"]) and not b["failed"], b
    assert b["family"] == "triton", b
    s = rows[1]
    if s["unsure_before"]:
        assert s["autotuned"] and s["family"] == "triton", s
    for r in rows:
        assert r["max_err_vs_fp32"] < 0.05, r
        if r["autotuned"]:
            assert r["elapsed_ms"] <= autotune.BUDGET_S * 1e3 + r["longest_step_ms"], r


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_autotune_times_the_calls_on_the_inputs_device_not_the_current_one() -> None:
    """Inputs on cuda:1 while cuda:0 is current: the events and syncs of the measurement must be
    cuda:1's (on cuda:0's stream they timed nothing: a few microseconds for a call of a
    millisecond)."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    b, hq, hkv, sq, sk, d = SHAPE
    q = torch.randn(b, hq, sq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, sk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, sk, d, device=dev, dtype=torch.bfloat16)
    dec = flashdispatch.explain(q, k, v, causal=True)
    p = dec.problem
    i = autotune.ident(p)
    assert i is not None
    rep = autotune.Report("test", i[0], i[1])
    autotune._measure(q, k, v, p, dec, None, None, rep)
    assert "sdpa" in rep.measured, rep.describe()
    with torch.cuda.device(dev):
        call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)  # noqa: E731
        for _ in range(3):
            call()
        eager_ms = timing.estimate_ms(call, dev, calls=10)  # events on dev's stream, no host sync inside
    print(f"\ncuda:1 inputs, cuda:0 current: autotune measured sdpa {rep.measured['sdpa']:.3f} ms, "
          f"eager non-causal {eager_ms:.3f} ms")
    assert rep.measured["sdpa"] > 0.2 * eager_ms, (rep.measured, eager_ms)
