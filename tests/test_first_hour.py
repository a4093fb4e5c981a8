"""What a new user meets first: the command line's errors, --version, backends() and info,
FLASHDISPATCH_LOG / FLASHDISPATCH_PROFILE_DIR, the Triton-on-CPU hint, strict arguments and
output strides."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import flashdispatch as fd
from flashdispatch.cli import main
from flashdispatch.registry import REGISTRY

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLASHDISPATCH_") and k != "TRITON_INTERPRET"}


def _run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "flashdispatch.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**CLEAN_ENV, **(env or {})})


# --- the command line: a user error is one line and exit code 2 ----------------------------------


def _user_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; it must end with exit code 2 (returned, or argparse's SystemExit) and one
    line on stderr, no traceback. Returns that line."""
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["explain", "--shape", "1,30,8,16,16,64"], "Hq=30, Hkv=8"),
    (["explain", "--shape", "1,32,8,16,16,64", "--backend", "foo"], "unknown backend 'foo'"),
    (["explain", "--shape", "1,2,3"], "B,Hq,Hkv,Sq,Sk,D"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--seqlen", "0"], "--seqlen"),
    (["demo", "--device", "tpu"], "--device"),
    (["info", "--device", "v100"], "--device"),
    (["tune", "--dtypes", "fp8"], "--dtypes"),
    (["bench", "--bogus"], "--bogus"),
    (["bench", "--plot-from", "/nonexistent/bench.json"], "/nonexistent/bench.json"),
])
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys):
    err = _user_error(argv, capsys)
    assert needle in err and err.startswith(f"flashdispatch {argv[0]}: error:"), err


# Each number option out of its range, with something that ends the command at once if the
# option were accepted (--list, --plot-from a missing file): the parser, not a later step or a
# traceback, must refuse it, naming the option once.
@pytest.mark.parametrize("argv, option", [
    (["explain", "--shape", "1,8,8,64,64,64", "--head-dim-v", "-3"], "--head-dim-v"),
    (["explain", "--shape", "1,8,8,64,64,64", "--head-dim-v", "0"], "--head-dim-v"),
    (["explain", "--shape", "1,8,8,64,64,64", "--window", "5"], "--window"),
    (["tune", "--list", "--max-configs", "0"], "--max-configs"),
    (["tune", "--list", "--warmup-ms", "-5"], "--warmup-ms"),
    (["tune", "--list", "--rep-ms", "-0.5"], "--rep-ms"),
    (["tune", "--list", "--time-budget", "-1"], "--time-budget"),
    (["tune", "--list", "--seed", "-1"], "--seed"),
    (["tune", "--list", "--seed", str(2**64)], "--seed"),
    (["tune", "--list", "--head-dims", "64,0"], "--head-dims"),
    (["tune", "--list", "--seqlens", "x"], "--seqlens"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--max-tokens", "0"], "--max-tokens"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--limit", "0"], "--limit"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--warmup-ms", "nan"], "--warmup-ms"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--rep-ms", "-1"], "--rep-ms"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--time-budget", "-1"], "--time-budget"),
    (["bench", "--plot-from", "/nonexistent/b.json", "--seed", "-1"], "--seed"),
    (["warmup", "--jobs", "0"], "--jobs"),
    (["warmup", "--device-index", "-1"], "--device-index"),
])
def test_number_options_out_of_range_are_refused_by_the_parser(argv, option, capsys):
    err = _user_error(argv, capsys)
    assert err.startswith(f"flashdispatch {argv[0]}: error: argument {option}: expected"), err
    assert err.count(option) == 1, err


_TUNE = ["tune", "--shapes", "tiny", "--backends", "sdpa", "--device", "cpu", "--resume"]


# A file given where a command reads back its own JSON: not JSON, JSON of another kind, missing.
@pytest.mark.parametrize("argv, writer, content, why", [
    (["bench", "--plot-from"], "bench", "not json\n", "(not JSON: Expecting value: line 1 column 1 (char 0))"),
    (["bench", "--rescore"], "bench", "not json\n", "(not JSON: Expecting value"),
    (["bench", "--serving", "--plot-from"], "bench --serving", "<html>", "(not JSON: Expecting value"),
    ([*_TUNE, "--state"], "tune", "not json\n", "(not JSON: Expecting value"),
    (["bench", "--plot-from"], "bench", "[1, 2]", "(a JSON list, not an object)"),
    (["bench", "--rescore"], "bench", '{"schema": 1, "meta": {}, "results": []}', "(it has no 'rows', 'summary')"),
    ([*_TUNE, "--state"], "tune", '{"meta": {}, "rows": []}', "(it has no 'schema')"),
    ([*_TUNE, "--state"], "tune", '{"schema": 1, "results": [{"no": "id"}]}', "a result flashdispatch tune cannot"),
    (["bench", "--plot-from"], "bench", None, "(No such file or directory)"),
    (["bench", "--rescore"], "bench", b"\xff\xfe", "(not UTF-8 text)"),
])
def test_a_file_that_is_not_the_commands_json_names_the_option_and_the_file(argv, writer, content, why, tmp_path,
                                                                             capsys):
    path = tmp_path / "given.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    argv = [*argv, str(path), "--out", str(tmp_path / "out")]
    err = _user_error(argv, capsys)
    option = argv[argv.index(str(path)) - 1]
    assert err.startswith(f"flashdispatch {argv[0]}: error: {option} {path}: "), err
    if "cannot" not in why:
        assert f": expected a JSON file written by flashdispatch {writer} {why}" in err, err
    else:
        assert why in err, err
    assert not (tmp_path / "out").exists()  # nothing measured or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine does not have")
def test_demo_on_a_missing_gpu_is_a_user_error(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine does not have")
@pytest.mark.parametrize("section", ["--serving", "--variants"])
def test_a_gpu_only_bench_section_on_a_cpu_is_a_user_error(section, tmp_path, capsys):
    assert main(["bench", section, "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert err.startswith(f"flashdispatch bench: error: {section}: ") and "no CUDA GPU" in err, err


@pytest.mark.parametrize("env, argv, needle", [
    ({"FLASHDISPATCH_LOG": "foo"}, [], "FLASHDISPATCH_LOG='foo'"),
    ({"FLASHDISPATCH_BACKEND": "foo"}, [], "FLASHDISPATCH_BACKEND='foo'"),
    ({}, ["--json", "/nonexistent/dir/demo.json"], "--json"),
])
def test_demo_says_what_would_stop_it_before_it_starts(env, argv, needle, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["demo", "--device", "cpu", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err and len(err.strip().splitlines()) == 1, (out, err)


@pytest.mark.parametrize("cmd", ["info", "explain", "demo"])
def test_each_command_help_says_what_it_does(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    usage, _, rest = capsys.readouterr().out.partition("\n\n")
    assert not rest.lstrip().startswith("options:"), rest  # a description comes before the options


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip().startswith(f"flashdispatch {fd.__version__}")


# --- backends() and info say the same, for this machine ------------------------------------------


def test_backends_and_info_agree_on_what_can_serve_here(capsys):
    status = {b.name: b for b in fd.backends()}
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name, st in status.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert ("unavailable" not in line) == st.available, (line, st)
    if not torch.cuda.is_available():
        # a CPU-only machine: what cannot run here is not "available", and says why
        assert not status["sdpa:cudnn"].available and "device=cpu" in status["sdpa:cudnn"].reason
        assert status["sdpa"].available and status["sdpa:math"].available
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            assert not status["triton"].available and "TRITON_INTERPRET=1" in status["triton"].reason


def test_backends_answer_for_a_simulated_device():
    h100 = {b.name: b for b in REGISTRY.status(fd.DeviceInfo("cuda", "H100", "sm_90", 132, 0, "h100", True))}
    assert h100["sdpa:cudnn"].available
    old = {b.name: b for b in REGISTRY.status(fd.DeviceInfo("cuda", "V100", "sm_70", 80, 0, None, True))}
    assert not old["sdpa:cudnn"].available and "sm_70" in old["sdpa:cudnn"].reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's message")
def test_triton_on_cpu_names_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 4, 16, dtype=torch.float16)
    with pytest.raises(fd.NoBackendError, match="TRITON_INTERPRET=1"):
        fd.attention(q, q.clone(), q.clone(), backend="triton")


def test_bf16_under_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fd.refresh()
    d = fd.explain(shape=(1, 2, 2, 8, 8, 16), dtype="bf16", device="cpu")
    assert any("interpreter computes bf16" in r for r in d.rejected.get("triton", [])), d.rejected


# --- environment: decisions visible without logging set-up; a missing profile dir is said --------


def test_log_and_profile_dir_speak_on_stderr_without_logging_setup(tmp_path):
    """A fresh process that set up no logging: FLASHDISPATCH_LOG=decisions prints the decision, a
    FLASHDISPATCH_PROFILE_DIR that is not a directory is warned about."""
    missing = str(tmp_path / "nope")
    code = ("import torch, flashdispatch as fd; q = torch.randn(1, 2, 4, 8); "
            "fd.attention(q, q.clone(), q.clone()); print('ok')")
    r = _run(code=code, env={"FLASHDISPATCH_LOG": "decisions", "FLASHDISPATCH_PROFILE_DIR": missing})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert "flashdispatch decision: sdpa" in r.stderr
    assert "flashdispatch: flashdispatch" not in r.stderr, r.stderr  # the logger's name once
    assert "is not a directory" in r.stderr and missing in r.stderr, r.stderr
    assert any(line.startswith("flashdispatch: ") and "is not a directory" in line for line in r.stderr.splitlines())


def test_the_commands_log_their_own_progress_and_leave_other_libraries_logs_alone():
    """A fresh process: a tool's INFO progress reaches stderr, another library's INFO record (as
    matplotlib writes while it finds its fonts) does not, and the root logger is not touched."""
    code = ("import logging, sys\n"
            "from flashdispatch.cli import main\n"
            "rc = main(['tune', '--list', '--shapes', 'tiny', '--device', 'cpu'])\n"
            "logging.getLogger('matplotlib.font_manager').info('third-party INFO record')\n"
            "logging.getLogger('flashdispatch.tools.bench').info('our INFO record')\n"
            "root = logging.getLogger()\n"
            "print('root', logging.getLevelName(root.level), len(root.handlers), rc)\n")
    r = _run(code=code)
    assert r.returncode == 0, r.stderr
    assert "flashdispatch.tools.tune: " in r.stderr and "flashdispatch.tools.bench: our INFO record" in r.stderr, r.stderr
    assert "third-party INFO record" not in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "root WARNING 0 0", r.stdout


def test_a_missing_profile_dir_is_warned_about_once(tmp_path, caplog):
    """Each device key's profile is looked up in the directory (the demo reads the CPU's and an
    H100's): the warning is said once, every lookup still reports it."""
    from flashdispatch.profile_store import load_profile

    missing = str(tmp_path / "nope")
    with caplog.at_level(logging.WARNING, logger="flashdispatch"):
        for key in ("cpu", "h100", "cpu"):
            _, problems = load_profile(key, missing)
            assert any("is not a directory" in p for p in problems)
    assert sum("is not a directory" in r.getMessage() for r in caplog.records) == 1


def test_missing_profile_dir_shows_in_explain(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHDISPATCH_PROFILE_DIR", str(tmp_path / "nope"))
    fd.refresh()
    d = fd.explain(shape=(1, 2, 2, 8, 8, 16), device="h100")
    assert any("is not a directory" in n for n in d.notes), d.notes


# --- arguments checked strictly; output strides that do not depend on the mask -------------------


@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_return_lse_must_be_a_bool(value):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="return_lse: expected a bool"):
        fd.attention(q, q.clone(), q.clone(), return_lse=value)


def _cpu_backends() -> list[str]:
    return [b.name for b in fd.backends() if b.available]


@pytest.mark.parametrize("sq, sk", [(8, 8), (4, 8), (8, 4), (3, 5)])
def test_bshd_output_strides_do_not_depend_on_causal(sq, sk):
    q = torch.randn(2, sq, 4, 16)
    k, v = torch.randn(2, sk, 2, 16), torch.randn(2, sk, 2, 16)
    for name in _cpu_backends():
        try:
            fd.explain(q, k, v, layout="bshd", causal=True, backend=name)
        except fd.NoBackendError:
            continue
        full = fd.attention(q, k, v, layout="bshd", backend=name)
        causal = fd.attention(q, k, v, layout="bshd", causal=True, backend=name)
        assert full.shape == causal.shape == (2, sq, 4, 16)
        assert full.stride() == causal.stride(), (name, full.stride(), causal.stride())
