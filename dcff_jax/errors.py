"""Errors in what a user gave (a flag, a file, the data), and how the CLIs report them.

Each is also the builtin type callers already catch (ValueError, FileNotFoundError, ...). The
CLIs print a UserError's message without a traceback and exit with status 2; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A bad config field or flag (rate string, schedule, batch size, changed run definition)."""


class MissingFileError(UserError, FileNotFoundError):
    """A config file, data directory or export that is not there."""


class DataError(UserError, ValueError):
    """Data or an export that is present but unreadable or inconsistent."""


class CheckpointError(UserError, RuntimeError):
    """No checkpoint of the workdir can be restored."""


class DivergedError(UserError, FloatingPointError):
    """The loss or a parameter became NaN/inf; the last good checkpoint is kept."""


def cli(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main: a UserError becomes 'error: <message>' on stderr and exit status 2."""

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run
