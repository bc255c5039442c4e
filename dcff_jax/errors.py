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


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for the CLIs: a bad flag, an unknown `--config.x` field or a config
    file that cannot be loaded is a user error (one line, exit status 2), not a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit(f"{error} (see --helpshort)")
    except (AttributeError, KeyError) as error:  # ml_collections: no such field
        named = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        _exit(
            f"{', '.join(named) or 'a --config override'}: {str(error).strip(chr(34) + chr(39))!r} "
            "is not a field of the config "
            "(the fields are listed in dcff_jax/config.py and the config file)"
        )
    except OSError as error:  # config_flags: the config file cannot be read
        _exit(f"cannot load the config file: {str(error).splitlines()[-1].strip()}")


def no_positional_arguments(argv: list[str]) -> None:
    """Refuse stray words on a command line (a flag without its --, a missing '=')."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}: every setting is a flag, --name=value")


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def cli(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main: a UserError becomes 'error: <message>' on stderr and exit status 2."""

    @functools.wraps(main)
    def run(argv):
        try:
            return main(argv)
        except UserError as error:
            _exit(str(error))

    return run
