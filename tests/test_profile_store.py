"""Profile loading: schema validation with path and line, nearest-bucket lookup, user override."""

from __future__ import annotations

import logging
import textwrap

import pytest

import flashdispatch as fd
from flashdispatch.profile_store import ProfileError, load_profile, parse_profile
from flashdispatch.problem import problem_from_shape

GOOD = textwrap.dedent(
    """\
    schema: 1
    device: {key: cpu, name: "test CPU", arch: cpu}
    generated: {date: 2026-11-25, tool: "flashdispatch tune", card: "test CPU"}
    measured: true
    entries:
      - match: {dtype: fp32, head_dim: 64, causal: false, gqa: 1, pass: fwd, seqlen: 128}
        ranking: [sdpa:math, sdpa]
        ms: {sdpa:math: 0.1, sdpa: 0.2}
      - match: {dtype: fp32, head_dim: 64, causal: false, gqa: 1, pass: fwd, seqlen: 4096}
        ranking: [sdpa:flash, sdpa]
        config: {sdpa:flash: {note: big}}
      - match: {dtype: fp32, head_dim: 64, causal: false, gqa: 4, pass: fwd, seqlen: 128}
        ranking: [sdpa, sdpa:math]
      - match: {dtype: fp32, head_dim: 64, causal: true, gqa: 1, pass: fwd_bwd, seqlen: 128}
        ranking: [sdpa:flash]
      - match: {dtype: fp32, head_dim: 64, causal: false, gqa: 1, pass: decode, seqlen: 1024}
        ranking: [cupy, sdpa:math]
    """
)


def _p(b=1, hq=4, hkv=4, sq=128, sk=128, d=64, **kw):
    kw.setdefault("dtype", "fp32")
    return problem_from_shape((b, hq, hkv, sq, sk, d), device_kind="cpu", **kw)


def test_lookup_nearest_bucket():
    prof = parse_profile(GOOD, "good.yaml")
    assert prof.lookup(_p(sq=100, sk=100)).index == 0
    assert prof.lookup(_p(sq=3000, sk=3000)).index == 1
    assert prof.lookup(_p(hkv=1, sq=100, sk=100)).index == 2  # nearest gqa first
    assert prof.lookup(_p(causal=True, needs_grad=True)).index == 3
    assert prof.lookup(_p(causal=True)) is None  # no causal fwd entry
    assert prof.lookup(_p(sq=1, sk=2000)).index == 4  # decode pass
    assert prof.lookup(_p(d=128)) is None
    assert prof.lookup(_p(dtype="bf16")) is None


@pytest.mark.parametrize(
    "edit, line, words",
    [
        (lambda t: t.replace("schema: 1", "schema: 7"), 1, "schema must be 1"),
        (lambda t: t.replace("measured: true", "measured: yes please"), 1, "measured"),
        (lambda t: t.replace('card: "test CPU"', "x: 1"), 3, "generated.card"),
        (lambda t: t.replace("pass: decode", "pass: backward"), 16, "pass must be one of"),
        (lambda t: t.replace("dtype: fp32, head_dim: 64, causal: true", "dtype: fp8, head_dim: 64, causal: true"), 14, "dtype"),
        (lambda t: t.replace("seqlen: 4096", "seqlen: -4"), 9, "positive int"),
        (lambda t: t.replace("ranking: [sdpa, sdpa:math]", "ranking: []"), 12, "ranking"),
        (lambda t: t.replace("gqa: 4,", "gqa: 4, window: 3,"), 12, "unknown keys"),
        (lambda t: t + "  - {match: [1, 2]\n", None, "YAML syntax"),
    ],
)
def test_invalid_profiles_name_path_and_line(edit, line, words):
    with pytest.raises(ProfileError) as ei:
        parse_profile(edit(GOOD), "/x/bad.yaml")
    msg = str(ei.value)
    assert msg.startswith("invalid profile /x/bad.yaml") and words in msg, msg
    if line is not None:
        assert ei.value.line == line, msg


def test_broken_user_profile_is_reported_and_ignored(tmp_path, monkeypatch, caplog):
    (tmp_path / "cpu.yaml").write_text("schema: 1\nentries: [\n")
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    with caplog.at_level(logging.WARNING, logger="flashdispatch"):
        d = fd.explain(shape=(1, 4, 4, 128, 128, 64), dtype="fp32", device="cpu")
    assert d.source == "default"
    assert any("cpu.yaml" in n and "invalid profile" in n for n in d.notes)
    assert any("invalid profile" in r.getMessage() for r in caplog.records)


def test_user_profile_wins_and_reorders_only_eligible(tmp_path, monkeypatch):
    (tmp_path / "cpu.yaml").write_text(GOOD)
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    d = fd.explain(shape=(1, 4, 4, 128, 128, 64), dtype="fp32", device="cpu")
    assert d.variant == "sdpa:math" and d.source.startswith(f"profile:{tmp_path}")
    assert "entries[0]" in d.source and d.ms == {"sdpa:math": 0.1, "sdpa": 0.2}
    # entries[4] ranks cupy first: not available here, so the next eligible one wins
    d = fd.explain(shape=(1, 4, 4, 1, 1000, 64), dtype="fp32", device="cpu")
    assert d.variant == "sdpa:math" and "entries[4]" in d.source
    # config from the profile reaches the decision
    d = fd.explain(shape=(1, 4, 4, 4096, 4096, 64), dtype="fp32", device="cpu")
    assert d.variant == "sdpa:flash" and d.config == {"note": "big"}
    # provenance is shown
    assert "measured on test CPU" in str(d)


def test_missing_profile_means_default_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path))
    fd.refresh()
    prof, problems = load_profile(None, str(tmp_path))
    assert prof is None and problems == []
    d = fd.explain(shape=(1, 4, 4, 128, 128, 64), dtype="fp32", device="cpu")
    assert d.source == "default" and d.variant == "sdpa"


def test_indexed_lookup_equals_a_scan_of_every_entry() -> None:
    import math
    import random

    import torch

    from flashdispatch.problem import problem_from_shape
    from flashdispatch.profile_store import LONG_CACHE_RATIO, load_profile, problem_pass

    def scan(prof, p):  # the definition: exact keys, then nearest gqa, then nearest lengths (log)
        cands = [e for e in prof.entries if e.match["dtype"] == p.dtype_name and e.match["head_dim"] == p.head_dim
                 and bool(e.match["causal"]) == p.effective_causal and e.match["pass"] == problem_pass(p)]
        if p.effective_causal:  # long-cache causal problems: long-cache entries where there are some
            long_p = p.seqlen_k >= LONG_CACHE_RATIO * p.seqlen_q
            same = [e for e in cands
                    if (e.match["seqlen"] >= LONG_CACHE_RATIO * e.match.get("seqlen_q", e.match["seqlen"])) == long_p]
            cands = same or cands

        def distance(e):
            m = e.match
            g = abs(math.log2(m["gqa"]) - math.log2(max(1, p.gqa_ratio)))
            d = abs(math.log2(m["seqlen"]) - math.log2(max(1, p.seqlen_k)))
            d += abs(math.log2(m.get("seqlen_q", m["seqlen"])) - math.log2(max(1, p.seqlen_q)))
            if "batch" in m:
                d += abs(math.log2(m["batch"]) - math.log2(max(1, p.batch)))
            return (g, d)

        return min(cands, key=distance) if cands else None

    rng = random.Random(0)
    for key in ("h100", "h200", "a100", "mi300x"):
        prof, _ = load_profile(key, None)
        assert prof is not None
        for _ in range(300):
            hkv = rng.choice([1, 2, 8, 32])
            sq = rng.choice([1, 4, 17, 512, 4096])
            shape = (rng.choice([1, 4, 64]), hkv * rng.choice([1, 4]), hkv, sq, rng.randint(1, 40000),
                     rng.choice([64, 96, 128, 256]))
            p = problem_from_shape(shape, dtype=rng.choice([torch.bfloat16, torch.float16]), device_kind="cuda",
                                   causal=rng.random() < 0.5, needs_grad=rng.random() < 0.3)
            assert prof.lookup(p) is scan(prof, p), (key, shape)
