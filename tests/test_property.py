"""Property-based: any valid shape, strides and options give the reference's answer (CPU, sdpa)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashdispatch as fd
from inputs import check_forward, make_qkv


@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 3))
    return dict(
        b=draw(st.integers(1, 2)),
        hkv=hkv,
        hq=hkv * draw(st.sampled_from([1, 2, 4])),
        sq=draw(st.integers(1, 40)),
        sk=draw(st.integers(1, 40)),
        d=draw(st.sampled_from([8, 16, 24, 40])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        causal=draw(st.booleans()),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
        noncontiguous=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 2.0))),
        backend=draw(st.sampled_from([None, "sdpa", "sdpa:math", "sdpa:flash"])),
        lse=draw(st.booleans()),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference(c):
    q, k, v = make_qkv(c["b"], c["hq"], c["hkv"], c["sq"], c["sk"], c["d"], dtype=c["dtype"],
                       layout=c["layout"], noncontiguous=c["noncontiguous"])
    try:
        res = fd.attention(q, k, v, causal=c["causal"], scale=c["scale"], layout=c["layout"],
                           return_lse=c["lse"], backend=c["backend"])
    except fd.NoBackendError as e:
        # only acceptable when forced, and the reasons must say why
        assert c["backend"] not in (None, "sdpa") and e.reasons
        return
    out, lse = res if c["lse"] else (res, None)
    check_forward(out, q, k, v, causal=c["causal"], layout=c["layout"], scale=c["scale"], lse=lse)
