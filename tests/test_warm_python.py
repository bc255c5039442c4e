"""The tests' warm server (tests/warm_python.py) starts a command as `python` would: the same exit
status, output and files, for the ways a command can end."""

import sys

import pytest
from helpers import run_python

SCRIPT = "import sys\nprint(__name__, sys.argv, sys.path[0])\nraise SystemExit(3)\n"
ENDINGS = {
    "error line, status 2": [
        "-m",
        "dcff_jax.flops",
        "--config=configs/vgg16_cifar.py",
        "--config.cprate=[0.5]*3",
    ],
    "output, status 0": ["-m", "dcff_jax.flops", "--config=configs/vgg16_cifar.py"],
    "uncaught exception, then atexit": [
        "-c",
        "import atexit, sys; atexit.register(print, 'atexit ran'); print(sys.argv[1:]); {}['x']",
        "a",
        "b",
    ],
    "SystemExit with a message, a thread and atexit": [
        "-c",
        "import atexit, sys, threading, time\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done'))).start()\n"
        "sys.exit('stopped')",
    ],
    "a script, its folder first on sys.path": ["SCRIPT", "x"],
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_warm_start_ends_as_a_cold_one(ending, tmp_path, monkeypatch):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, *(str(script) if a == "SCRIPT" else a for a in ENDINGS[ending])]
    warm = run_python(argv, timeout=300)
    monkeypatch.setenv("DCFF_TESTS_COLD", "1")
    cold = run_python(argv, timeout=300)
    assert (warm.returncode, warm.stdout, warm.stderr) == (
        cold.returncode,
        cold.stdout,
        cold.stderr,
    )
    assert cold.returncode in (0, 1, 2, 3) and (cold.stdout or cold.stderr)


def test_a_worker_keeps_few_servers_and_stops_the_least_recently_used(monkeypatch):
    """One server per environment, at most KEEP of them: the least recently used one exits."""
    from helpers import _WarmServer

    monkeypatch.setattr(_WarmServer, "KEEP", 1)
    argv = [sys.executable, "-c", "import os; print(os.environ['DCFF_TEST_ENV'])"]
    monkeypatch.setenv("DCFF_TEST_ENV", "a")
    assert run_python(argv, timeout=300).stdout == "a\n"
    first = _WarmServer._started[next(reversed(_WarmServer._started))]
    monkeypatch.setenv("DCFF_TEST_ENV", "b")
    assert run_python(argv, timeout=300).stdout == "b\n"
    assert first.process.returncode == 0 and len(_WarmServer._started) == 1
