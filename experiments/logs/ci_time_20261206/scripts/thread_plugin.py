"""A pytest plugin: at each process's unconfigure, its threads; then every 1.5 s until it exits,
the stacks of its non-daemon threads and main thread, in /tmp/thread_dump.txt."""

import atexit
import os
import sys
import threading
import time
import traceback

import pytest

OUT = "/tmp/thread_dump.txt"


def _log(text):
    with open(OUT, "a") as f:
        f.write(f"{time.time():.3f} {os.environ.get('PYTEST_XDIST_WORKER', 'ctl')} {text}\n")


def _watch():
    while True:
        time.sleep(1.5)
        frames = sys._current_frames()
        lines = []
        for t in threading.enumerate():
            if t.daemon or t is threading.current_thread():
                continue
            stack = (
                "".join(traceback.format_stack(frames.get(t.ident))[-4:])
                if t.ident in frames
                else ""
            )
            lines.append(f"  thread {t.name} daemon={t.daemon}\n{stack}")
        main = frames.get(threading.main_thread().ident)
        ms = "".join(traceback.format_stack(main)[-6:]) if main else "(main gone)"
        _log("watch\n" + "".join(lines) + "  MAIN:\n" + ms)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    names = [(t.name, t.daemon) for t in threading.enumerate()]
    _log(f"unconfigure threads {names}")
    threading.Thread(target=_watch, daemon=True).start()


def pytest_configure(config):
    atexit.register(_log, "atexit (last)")
