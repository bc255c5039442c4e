"""A Python that has imported the heavy libraries once and forks a child per command.

The tests start many `python -m dcff_jax.<cli>` commands; ~2 s of each is importing jax, flax,
optax and orbax (RESULTS.md, issue 25). This server (one per pytest-xdist worker, started by
helpers.run_python) imports them once, before any backend exists (so forking is safe: no XLA
threads yet), and then serves requests from stdin, one JSON line each:
    {"argv": [sys.executable, "-m" module | "-c" code | script, *args], "cwd": str,
     "env": {...}, "stdout": path, "stderr": path}
It forks; the child becomes that command as the interpreter would start it (working directory,
environment, argv, sys.path[0], __main__, stdin from /dev/null, stdout and stderr into the files,
the exit status the interpreter would give) and the server answers {"pid": n}, then
{"returncode": n} once the child has exited. Whatever the imports printed is written at the top
of each child's streams, as a cold start would print it.

A server serves the environment it was started with only (helpers.run_python starts one per
environment: the libraries read some variables when imported), except XLA_FLAGS, which XLA reads
when a backend starts, in the child, and pytest's PYTEST_CURRENT_TEST. Its children lower
jax.random's threefry as the tests' own processes do (tests/fast_threefry.py: the same bits)."""

import json
import os
import runpy
import sys
import tempfile

# What every command of the package imports first. Project modules are not imported here: each
# child imports them as a cold start does, so that the tests run the files as they are.
PRELOAD = (
    "numpy",
    "jax",
    "jax.numpy",
    "flax.linen",
    "optax",
    "orbax.checkpoint",
    "ml_collections",
    "absl.app",
    "absl.flags",
    "absl.logging",
    "PIL.Image",
)


def _preload() -> tuple[bytes, bytes]:
    """Imports PRELOAD; what they printed to fds 1 and 2."""
    import importlib

    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            for name in PRELOAD:
                importlib.import_module(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read()


def _exit_status(exit: SystemExit) -> int:
    """The status `python` exits with on an uncaught SystemExit."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    print(exit.code, file=sys.stderr)
    return 1


def _print_uncaught(error: BaseException) -> None:
    """As the interpreter prints it, from the command's first frame on (none of this file's)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_frame.f_code.co_filename == __file__:
        traceback = traceback.tb_next
    error = error.with_traceback(traceback)
    sys.excepthook(type(error), error, traceback)


def _become(request: dict, prelude: tuple[bytes, bytes]) -> int:
    """Runs the request's command in this (forked) process; its exit status."""
    import signal
    import threading

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # not the server's read-ahead
    for fd, path, text in ((1, request["stdout"], prelude[0]), (2, request["stderr"], prelude[1])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
        os.write(fd, text)
    if "numpy" in sys.modules:  # a cold start seeds NumPy's global generator afresh
        sys.modules["numpy"].random.seed()
    command = request["argv"][1:]
    interrupted = False
    try:
        if command[0] == "-m":
            sys.argv = command[1:]  # runpy puts the module's file in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        elif command[0] == "-c":
            import types

            sys.argv = ["-c", *command[2:]]
            sys.path[0] = ""
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(command[1], "<string>", "exec"), main.__dict__)
        else:  # a script's path
            sys.argv = command
            sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
            runpy.run_path(command[0], run_name="__main__")
        status = 0
    except SystemExit as exit:
        status = _exit_status(exit)
    except BaseException as error:  # printed, then the interpreter still finalises
        _print_uncaught(error)
        interrupted, status = isinstance(error, KeyboardInterrupt), 1
    # As the interpreter ends: join non-daemon threads, then the atexit functions (which print
    # their own errors).
    import atexit

    threading._shutdown()
    atexit._run_exitfuncs()
    if interrupted:  # an uncaught Ctrl-C: `python` dies by the signal
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


def serve() -> None:
    prelude = _preload()
    # As in the tests' own processes (conftest.py): the same random bits, compiled faster.
    from fast_threefry import lower_threefry_on_cpu

    lower_threefry_on_cpu()
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                replies.close()
                status = _become(request, prelude)
            finally:
                os._exit(status)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, wait_status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}) + "\n")


if __name__ == "__main__":
    serve()
