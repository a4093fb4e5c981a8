"""The command line: info, explain (simulated devices), demo."""

from __future__ import annotations

import pytest

from flashdispatch.cli import main


def test_explain_for_a_device_that_is_not_present(capsys):
    assert main(["explain", "--device", "mi300x", "--shape", "1,32,8,1,8192,128", "--dtype", "bf16", "--causal"]) == 0
    out = capsys.readouterr().out
    assert "flashdispatch decision:" in out and "AMD Instinct MI300X" in out and "(simulated)" in out
    assert "sdpa:cudnn: device=rocm" in out


def test_explain_forced_backend_that_cannot_serve(capsys):
    assert main(["explain", "--device", "cpu", "--shape", "1,2,2,8,8,64", "--backend", "sdpa:cudnn"]) == 1
    assert "forced backend 'sdpa:cudnn'" in capsys.readouterr().out


def test_explain_bad_shape(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--shape", "1,2,3"])
    assert "B,Hq,Hkv,Sq,Sk,D" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part in ("device:", "profile:", "backends:", "sdpa:math", "versions:", "torch", "FLASHDISPATCH_BACKEND"):
        assert part in out, part


def test_info_simulated(capsys):
    assert main(["info", "--device", "h100"]) == 0
    assert "H100" in capsys.readouterr().out


def test_bad_env_is_an_error_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("FLASHDISPATCH_DEVICE", "v100")
    import flashdispatch

    flashdispatch.refresh()
    assert main(["explain", "--shape", "1,2,2,8,8,64"]) == 2
    assert "expected one of" in capsys.readouterr().err


@pytest.mark.parametrize("name, value", [("FLASHDISPATCH_DEVICE", "v100"), ("FLASHDISPATCH_LOG", "verbose"),
                                         ("FLASHDISPATCH_BACKEND", "flash"), ("FLASHDISPATCH_AUTOTUNE", "yes"),
                                         ("FLASHDISPATCH_VALIDATE", "maybe")])
def test_info_shows_a_bad_variable_with_what_is_expected_and_exits_2(name, value, monkeypatch, capsys):
    monkeypatch.setenv(name, value)
    import flashdispatch

    flashdispatch.refresh()
    assert main(["info"]) == 2
    out, err = capsys.readouterr()
    # the whole report, the bad variable's line in it (name, value, what is expected)
    for part in ("device:", "profile:", "backends:", "sdpa:math", "versions:", "environment:"):
        assert part in out, (part, out)
    line = next(ln for ln in out.splitlines() if name in ln and "INVALID" in ln)
    assert line.strip().startswith(f"INVALID: {name}={value!r} is not valid; expected one of: "), line
    others = [ln for ln in out.splitlines() if ln.strip().startswith("FLASHDISPATCH_")]
    from flashdispatch import envs

    assert len(others) == len(envs.ALL) - 1 and not any(ln.strip().startswith(name + "=") for ln in others), others
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"flashdispatch info: error: {name}={value!r}"), err


def test_explain_variants(capsys):
    argv = ["explain", "--device", "h200", "--shape", "1,32,8,16384,16384,128", "--causal", "--window", "4095,0",
            "--softcap", "50", "--sinks"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "window=(4095, 0)" in out and "softcap=50" in out and "sinks" in out and "flashdispatch decision: triton" in out


def test_explain_bad_variant_values(capsys):
    assert main(["explain", "--shape", "1,2,2,8,8,64", "--softcap", "0"]) == 2
    assert "softcap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", "--shape", "1,2,2,8,8,64", "--window", "4095"])
    assert "--window" in capsys.readouterr().err


def test_readme_lists_the_environment_as_envs_and_the_tables_define_it():
    """README's environment table is written by hand for readers; the accepted values come from the
    registry (backends) and the device table (devices) through envs.py. A backend or device added
    there and not here fails."""
    import pathlib
    import re

    from flashdispatch import envs

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = {m.group(1): set(re.findall(r"`([^`]+)`", m.group(2)))
            for m in re.finditer(r"^\| `(FLASHDISPATCH_\w+)` \| ([^|]*) \|", readme, re.M)}
    assert set(rows) == {v.name for v in envs.ALL}
    assert rows["FLASHDISPATCH_BACKEND"] == set(envs.backend_choices())
    assert rows["FLASHDISPATCH_DEVICE"] == set(envs.DEVICE_CHOICES)
    assert rows["FLASHDISPATCH_LOG"] == set(envs.LOG_CHOICES)
    assert rows["FLASHDISPATCH_VALIDATE"] == set(envs.FLASHDISPATCH_VALIDATE.choices)
