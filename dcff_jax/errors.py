"""Errors in what a user gave (a flag, a file, the data), and how the CLIs report them.

Each is also the builtin type callers already catch (ValueError, FileNotFoundError, ...). The
CLIs print a UserError's message without a traceback and exit with status 2; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import pickle
import struct
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


# What unpickling damaged bytes raises (besides the readers' own UnpicklingError): a truncated or
# flipped opcode stream (EOFError, ValueError, IndexError, KeyError from the memo, TypeError and
# AttributeError from objects called with the wrong arguments, OverflowError, MemoryError,
# RecursionError, UnicodeDecodeError, NotImplementedError; struct.error from Python's unpickler
# on a truncated argument).
DAMAGED_PICKLE = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
    UnicodeDecodeError,
    NotImplementedError,
    struct.error,
)


def expect(value, kind: type, name: str, low: float | None = None, high: float | None = None):
    """`value` from a file, if it is a `kind` (never a bool where a number belongs; an int is a
    float) within [low, high]; else TypeError or ValueError saying what `name` is instead."""
    allowed = (int, float) if kind is float else kind
    if not isinstance(value, allowed) or (kind in (int, float) and isinstance(value, bool)):
        raise TypeError(f"{name} is {value!r}, expected a {kind.__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low}, {high if high is not None else 'inf'}]"
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} is {value!r}, expected {what} in {bounds}")
    return value


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for the CLIs: a bad flag, an unknown `--config.x` field or a config
    file that cannot be loaded is a user error (one line, exit status 2), not a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _exit(f"{error} (see --helpshort)")
    except (AttributeError, KeyError) as error:  # ml_collections: no such field
        field = str(error).strip("\"'")
        named = [a.split("=")[0] for a in argv if a.split("=")[0].endswith(f".{field}")]
        _exit(
            f"{', '.join(named) or 'a --config override'}: {field!r} is not a field of the "
            "config (the fields are listed in dcff_jax/config.py and the config file)"
        )
    except OSError as error:  # config_flags: the config file cannot be read
        _exit(f"cannot load --config: {str(error).splitlines()[-1].strip()}")


# errno values of a full disk, a quota and a file-size limit, as OSError or as tensorstore text.
_FULL = {28: "the disk is full", 122: "the disk quota is exceeded", 27: "a file-size limit was hit"}


def disk_full(error: BaseException) -> tuple[str, str] | None:
    """(path, what happened) when `error` (or an error it was raised from) is a write that ran
    out of space; None otherwise. Orbax's tensorstore reports these as text, Python as OSError."""
    import re

    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return str(error.filename or "?"), _FULL[error.errno]
        code = re.search(r"os_error_code='(\d+)'", str(error))
        if code and int(code.group(1)) in _FULL:
            path = re.search(r'Failed writing: "([^"]+)"', str(error))
            return (path.group(1) if path else "?"), _FULL[int(code.group(1))]
        error = error.__cause__ or error.__context__
    return None


def loaded_config(config):
    """The value of a --config flag, checked: config_flags defers a failed load (a missing or
    unreadable file) to the first field access, which would otherwise be a traceback."""
    try:
        config.model  # noqa: B018
    except OSError as error:
        message = str(error).strip().splitlines()[-1].strip()
        raise MissingFileError(f"cannot load --config: {message}") from error
    return config


def no_positional_arguments(argv: list[str]) -> None:
    """Refuse stray words on a command line (a flag without its --, a missing '=')."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}: every setting is a flag, --name=value")


def _exit(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


class _QuietLibraries(logging.Filter):
    """What the CLIs print of other libraries' logs: their errors, and their warnings except
    orbax's (about its own bookkeeping of the checkpoints we write: read-only managers, metadata
    files), with no traceback from orbax's background threads (the same error reaches the CLI,
    and there a bug keeps its traceback). Their INFO lines (jax's "Unable to initialize backend
    'tpu'", a line per file orbax writes) show with --verbosity=1, as does everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        from absl import logging as absl_logging

        ours = "/dcff_jax/" in record.pathname or "/absl/" in record.pathname
        if ours or absl_logging.get_verbosity() >= 1:
            return True
        orbax = "/orbax/" in record.pathname
        if orbax or record.name == "asyncio":
            # Orbax's background threads, and asyncio's "Task exception was never retrieved"
            # for the sibling tasks of a failed orbax restore.
            record.exc_info, record.exc_text = None, None
        return record.levelno >= (logging.ERROR if orbax else logging.WARNING)


_QUIET = _QuietLibraries()


def quiet_library_logs() -> None:
    """Install _QuietLibraries on absl's handler (every logger reaches it, through the root),
    and drop the unraisable-exception reports of tensorstore writes left behind by a failed
    orbax save (the save's own error is reported where it is raised)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if _QUIET in handler.filters:  # installed by an earlier CLI call in this process
        return
    handler.addFilter(_QUIET)
    default_hook = sys.unraisablehook

    def hook(unraisable):
        if "Event loop is closed" not in str(unraisable.exc_value):
            default_hook(unraisable)

    sys.unraisablehook = hook


def cli(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap an absl main: a UserError becomes 'error: <message>' on stderr and exit status 2;
    other libraries' logs are quieted (quiet_library_logs)."""

    @functools.wraps(main)
    def run(argv):
        quiet_library_logs()
        try:
            return main(argv)
        except UserError as error:
            _exit(str(error))

    return run
