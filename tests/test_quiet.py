"""What a user sees from the CLIs: their own lines, other libraries' errors and warnings (not
orbax's bookkeeping), and everything else only with --verbosity=1."""

import logging
import os
import subprocess
import sys

import pytest
from absl import logging as absl_logging
from helpers import ROOT

import dcff_jax
from dcff_jax import errors


def record(pathname: str, level: int, name: str = "absl") -> logging.LogRecord:
    try:
        raise RuntimeError("from a background thread")
    except RuntimeError:
        exc_info = sys.exc_info()
    return logging.LogRecord(name, level, pathname, 1, "message", (), exc_info)


@pytest.fixture
def verbosity():
    before = absl_logging.get_verbosity()
    yield absl_logging.set_verbosity
    absl_logging.set_verbosity(before)


SITE = "/usr/lib/python3/site-packages"
OURS = f"{ROOT}/dcff_jax/training/train.py"
ORBAX = f"{SITE}/orbax/checkpoint/_src/checkpointers/checkpointer.py"
JAX = f"{SITE}/jax/_src/xla_bridge.py"


@pytest.mark.parametrize(
    ("pathname", "level", "shown"),
    [
        (OURS, logging.INFO, True),
        (OURS, logging.DEBUG, True),
        (ORBAX, logging.INFO, False),  # a line per file it writes
        (ORBAX, logging.WARNING, False),  # "Metadata file does not exist" on every resume
        (ORBAX, logging.ERROR, True),
        (JAX, logging.INFO, False),  # "Unable to initialize backend 'tpu'"
        (JAX, logging.WARNING, True),
    ],
)
def test_the_filter_keeps_our_lines_and_other_libraries_warnings(pathname, level, shown, verbosity):
    verbosity(absl_logging.INFO)
    item = record(pathname, level)
    assert errors._QuietLibraries().filter(item) is shown
    if pathname == ORBAX and shown:
        assert item.exc_info is None  # its background thread's traceback: the error reaches main
    verbosity(absl_logging.DEBUG)  # --verbosity=1
    assert errors._QuietLibraries().filter(record(pathname, level)) is True


def test_a_cli_prints_its_result_and_nothing_else():
    """No runpy warning (the package imports its modules lazily) and no backend-probe lines, on
    whatever accelerator the machine has (JAX_PLATFORMS unset, as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    argv = [sys.executable, "-m", "dcff_jax.flops", "--config=configs/resnet56_cifar.py"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[-1].startswith('{"flops": ')


def test_importing_the_package_imports_no_module_until_a_name_is_used():
    code = (
        "import sys, dcff_jax; "
        "before = sorted(m for m in sys.modules if m.startswith('dcff_jax.')); "
        "dcff_jax.count_flops; dcff_jax.steps; "
        "print(before, 'dcff_jax.flops' in sys.modules, 'dcff_jax.steps' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "True", "True"]
    # __all__ stays a literal (static tools read it); it must name exactly the lazy names.
    assert sorted(dcff_jax.__all__) == sorted(dcff_jax._PUBLIC)
