"""The argument parser of every `flashdispatch` command: a user error is one line and exit code 2.

argparse prints the whole usage block before its error; a new user then reads a screen of options
to find the one line that matters. This parser prints only that line (naming the command and what
was wrong) and where to read more.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

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
