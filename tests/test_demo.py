"""The demo shows what flashdispatch is for: each kind of call a decoder makes, what runs and why,
its time beside plain SDPA (a ratio only outside the spread), its error; on a CPU also the plan for
a simulated H100; on an H100/H200 our kernel on the chunked and speculative calls, measurably faster."""

from __future__ import annotations

import json

import pytest
import torch

from flashdispatch.demo import plan_steps, run_demo


def test_the_session_has_every_kind_of_call():
    steps = plan_steps(8192, 512, 8, 2048, 3)
    kinds = [(st.sq, st.sk, st.grad) for st in steps]
    assert kinds[:5] == [(2048, 2048, True), (7680, 7680, False), (512, 8192, False), (8, 8200, False),
                         (1, 8201, False)]
    assert len(steps) == 7 and steps[-1].sk == 8203


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's demo")
def test_demo_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert run_demo("cpu", steps=1, seqlen=64, json_out=str(out)) == 0
    text = capsys.readouterr().out
    for needle in ("[training step (fwd+bwd)]", "[prefill]", "[chunked prefill]", "[speculative verify",
                   "[decode]", "(source: default)", "plain SDPA", "accuracy: OK"):
        assert needle in text, needle
    # the plan for a GPU, from the shipped H100 profile
    sim = text[text.index("simulated with explain"):]
    spec = next(ln for ln in sim.splitlines() if "[speculative verify" in ln)
    chunk = next(ln for ln in sim.splitlines() if "[chunked prefill]" in ln)
    # our kernels: the tl one for the speculative step, it or the Gluon one (Hopper) for the chunk
    assert "triton (source: profile h100.yaml" in spec
    assert "triton (source: profile h100.yaml" in chunk or "triton:gluon (source: profile h100.yaml" in chunk
    # what this machine cannot load is named, not silently ranked out (cupy: no CUDA device here)
    assert "left out of this simulation" in sim and "    cupy: unavailable" in sim
    result = json.loads(out.read_text())
    for row in result["calls"]:
        # a ratio is printed only when the two timings differ beyond their spread
        verdict = text.split(f"[{row['call']}]")[1].splitlines()[1]
        assert (row["speedup"] is None) == ("same speed" in verdict), verdict


def test_demo_rejects_a_too_short_cache():
    with pytest.raises(ValueError, match="seqlen: expected at least"):
        run_demo("cpu", steps=1, seqlen=8)


@pytest.mark.gpu
@pytest.mark.alone
def test_demo_on_a_hopper_gpu_runs_our_kernel_where_it_wins(tmp_path):
    name = torch.cuda.get_device_name()
    if not any(h in name for h in ("H100", "H200")):
        pytest.skip(f"the shipped measured profiles are for H100/H200, this is {name}")
    out = tmp_path / "demo.json"
    assert run_demo("cuda", steps=2, json_out=str(out)) == 0
    calls = {r["call"].split(" (")[0]: r for r in json.loads(out.read_text())["calls"]}
    for call in ("chunked prefill", "speculative verify"):
        r = calls[call]
        # our kernels: the Triton family (the Gluon forward serves chunked prefill on Hopper)
        assert r["variant"].split(":")[0] == "triton" and r["source"].startswith("profile:"), r
        assert r["speedup"] is not None and r["speedup"] > 1.0, r
