"""What every command line of lag_ds shares: bad input is one line on stderr and exit code 2.

Why: argparse answers a usage error with the whole usage block plus the error (several lines) and
``sys.exit(2)``; a script that wraps our tools, or a person reading a launcher log, should get the
one line that names the argument, like every other bad-input error (``error: ...``), and an
in-process caller of ``main(argv)`` should get the exit code back instead of ``SystemExit``.

    parser = OneLineParser(prog="python -m lag_ds.train")
    args = parse_or_exit_code(parser, argv)
    if isinstance(args, int):
        return args          # 2 after a usage error (message printed), 0 after --help
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one ``error: ...`` line naming the argument."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message.splitlines()[0]}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_or_exit_code(parser: argparse.ArgumentParser,
                       argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed namespace, or the exit code argparse asked for (``--help``: 0, bad usage: 2)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as done:
        return int(done.code or 0)


def bad_input(exc: BaseException) -> int:
    """Print ``error: <first line of exc>`` on stderr; return the bad-input exit code."""
    text = str(exc).strip() or type(exc).__name__
    print(f"error: {text.splitlines()[0]}", file=sys.stderr)
    return EXIT_BAD_INPUT
