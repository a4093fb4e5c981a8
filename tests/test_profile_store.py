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


def test_schema_1_entries_become_the_points_of_their_groups():
    prof = parse_profile(GOOD, "good.yaml")
    assert prof.schema == 1 and not prof.measured is False
    by_key = {g.key.label(): g for g in prof.groups}
    # entries 0-2: fwd dense fp32 D=64 (three points); 3: fwd_bwd causal; 4: a decode shape
    assert sorted(by_key) == ["fwd decode fp32 D=64", "fwd dense fp32 D=64", "fwd_bwd causal fp32 D=64"]
    assert len(by_key["fwd dense fp32 D=64"].points) == 3
    assert by_key["fwd dense fp32 D=64"].points[1].config == {"sdpa:flash": {"note": "big"}}


@pytest.mark.parametrize(
    "edit, line, words",
    [
        (lambda t: t.replace("schema: 1", "schema: 7"), 1, "schema must be 2 (or 1"),
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
    # an entry without `shape` stands at a nominal B=1, Hq=32 (x gqa) point
    d = fd.explain(shape=(1, 32, 32, 128, 128, 64), dtype="fp32", device="cpu")
    assert d.variant == "sdpa:math" and d.source.startswith(f"profile:{tmp_path}")
    assert "fwd dense fp32 D=64" in d.source and d.predicted["sdpa:math"] == pytest.approx(0.1, rel=1e-3)
    assert d.predicted["sdpa"] == pytest.approx(0.2, rel=1e-3)
    # the decode point ranks cupy first, without times: an argued order in a measured file has no
    # model, so the eligible implementations the dense group measured decide (borrowed class)
    d = fd.explain(shape=(1, 4, 4, 1, 1000, 64), dtype="fp32", device="cpu")
    assert d.variant in ("sdpa:math", "sdpa") and d.source.startswith("profile:")
    # the nearest point's config reaches the decision
    d = fd.explain(shape=(1, 4, 4, 4096, 4096, 64), dtype="fp32", device="cpu", backend="sdpa:flash")
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
