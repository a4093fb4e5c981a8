"""The argument parser of every `flashdispatch` command: a user error is one line and exit code 2.

argparse prints the whole usage block before its error; a new user then reads a screen of options
to find the one line that matters. This parser prints only that line (naming the command and what
was wrong) and where to read more. The number types below check the range of a number option in
the parser, so that a bad value is that one line (naming the option), never a later traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Callable, NoReturn, Sequence

USAGE_ERROR = 2  # exit status of a user error, as argparse and the shell tools use it


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def user_error(prog: str, e: BaseException) -> int:
    """Print `e` as the one line of a user error of command `prog`; returns the exit status."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)
    return USAGE_ERROR


class _CommandLogs(logging.StreamHandler):
    """The handler show_logs puts on the "flashdispatch" logger (told apart from a program's own)."""


def show_logs(level: int) -> None:
    """A command's logging: the "flashdispatch" loggers' records at `level` and above on stderr,
    as "<logger>: <message>". Only that logger is configured, never the root logger, so other
    libraries' INFO records (matplotlib's) stay as their own defaults have them. Where the program
    (or a test harness) has set up logging already, its set-up is left as it is."""
    log = logging.getLogger("flashdispatch")
    ours = [h for h in log.handlers if isinstance(h, _CommandLogs)]
    if not ours:
        if log.hasHandlers():
            return
        handler = _CommandLogs()  # stderr
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def int_at_least(low: int, what: str, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high], described as `what` in the error (argparse puts
    the option's name before it: "argument --jobs: expected a positive integer, got 0")."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n
    return parse


def float_at_least(low: float, what: str) -> Callable[[str], float]:
    """An argparse type: a finite float >= low, described as `what` in the error."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(x) or x < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return x
    return parse


positive_int = int_at_least(1, "a positive integer")
# torch.Generator.manual_seed's range, from 0 (the tools draw their fresh seeds there too)
seed = int_at_least(0, "a seed from 0 to 2**64 - 1", 2**64 - 1)
milliseconds = float_at_least(0.0, "milliseconds >= 0 (0: the fewest repetitions)")
seconds = float_at_least(0.0, "seconds >= 0")


def read_json(path: str, option: str, writer: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in the file `path`, given as `option`, that `flashdispatch <writer>` wrote
    (holding `keys`). Anything else is a ValueError naming the option, the file and what went
    wrong: "--plot-from x.txt: expected a JSON file written by flashdispatch bench (not JSON: ...)"."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{option} {path}: expected a JSON file written by flashdispatch {writer} ({why})")

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise bad(e.strerror or type(e).__name__) from None
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise bad(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise bad(f"a JSON {type(doc).__name__}, not an object")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise bad("it has no " + ", ".join(repr(k) for k in missing))
    return doc
