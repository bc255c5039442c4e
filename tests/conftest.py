import gc
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Tests see the CPU only and import the NumPy transcription beside them.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
# Compile fast: compiles are most of the suite's time (a jitted ResNet-56 init takes 20 s at
# LLVM's default -O2, 3 s at -O0: jax_disable_most_optimizations). The programs are the same
# HLO; only LLVM's code generation differs. Bit-for-bit checks compare runs compiled alike
# (tests/golden records -O0 runs under their own fingerprint). Float32 results are not always as
# accurate at -O0: the tests that measure float32 against float64 over several steps
# (test_parallel.py) compile at -O2, as users do. Set as environment variables, read when jax is
# imported, so that every command a test starts compiles the same way; and compiles of any
# length go to the run-wide cache below (fast -O0 compiles fall under JAX's default 1 s
# threshold). A variable set by the caller wins.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# And XLA:CPU's elemental emitters instead of its fusion emitters: the same HLO programs, compiled
# faster (GoogLeNet's train step 12.7 s -> 6.5 s at -O0; test_export + test_fast_paths 161 s ->
# 133 s). Only where this jaxlib knows the flag (XLA aborts on an unknown one): its name is in
# jaxlib's libraries (read without loading them, ~15 ms), or else a child process tries it (~2 s).
# Done by the first process that imports this file; the pytest-xdist workers and every command a
# test starts inherit XLA_FLAGS. test_golden's fingerprint includes XLA_FLAGS.
from helpers import FAST_COMPILE_FLAG  # noqa: E402


def _jaxlib_names(flag: str) -> bool:
    import glob
    import importlib.util
    import mmap

    name = flag.lstrip("-").split("=")[0].encode()
    folder = os.path.dirname(importlib.util.find_spec("jaxlib").origin)
    for path in glob.glob(os.path.join(folder, "**", "*.so"), recursive=True):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(name) != -1:
                return True
    return False


def _with_fast_compile_flag(flags: str) -> str:
    if "xla_cpu_use_fusion_emitters" in flags:  # set by the caller, or already tried
        return flags
    trial = f"{flags} {FAST_COMPILE_FLAG}".strip()
    if _jaxlib_names(FAST_COMPILE_FLAG):
        return trial
    env = {**os.environ, "XLA_FLAGS": trial, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    known = subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0
    return trial if known else flags


os.environ["XLA_FLAGS"] = _with_fast_compile_flag(os.environ.get("XLA_FLAGS", ""))

# And jax.random's threefry unrolled, as JAX lowers it off the CPU: the same bits, and a jitted
# init compiles in about half the time (tests/fast_threefry.py).
from fast_threefry import lower_threefry_on_cpu  # noqa: E402

lower_threefry_on_cpu()


from dcff_jax import xla_options  # noqa: E402


def pytest_configure(config):
    """One cache directory for the whole run, as $XDG_CACHE_HOME: the pytest-xdist workers and
    every command a test starts inherit it, so a program compiled in one test (in-process or
    through main, whose default --compilation_cache lives there) is loaded by every later compile
    of the same program instead of compiled again. A run starts it empty and removes it, so no
    test reads or writes the user's ~/.cache and no run depends on an earlier one."""
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        config.dcff_cache_root = tempfile.mkdtemp(prefix="dcff_jax_tests_")
        os.environ["XDG_CACHE_HOME"] = config.dcff_cache_root
    xla_options.enable_compilation_cache("auto")
    _one_final_garbage_collection(config)


def _one_final_garbage_collection(config) -> None:
    """pytest ends each process with 5 full garbage collections (to report exceptions raised in
    __del__); in a worker holding a whole run's JAX traces, each takes ~1.5 s, and the run waits
    for the last worker's. One still reports what a collection finds (pytest's own test runner
    sets 0). Where this pytest has no such setting, nothing changes."""
    try:
        from _pytest.unraisableexception import gc_collect_iterations_key
    except ImportError:
        return
    config.stash[gc_collect_iterations_key] = 1


def pytest_unconfigure(config):
    if hasattr(config, "dcff_cache_root"):
        shutil.rmtree(config.dcff_cache_root, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test, its garbage collected and what survives it frozen (gc.freeze): the JAX
    traces and caches a worker accumulates reach millions of objects, and every automatic full
    collection walked all of them again (test_auto + test_export in one process: 36 full
    collections, 18.9-19.9 s; with this, 6.2 s, the per-test collections included). What a test
    leaves behind in a reference cycle and frees later stays until the worker ends (peak memory
    2.80 -> 2.99 GB there)."""
    result = yield
    gc.collect()
    gc.freeze()
    return result


def pytest_collection_modifyitems(config, items):
    """The modules with slow tests first, the others last (a stable sort: each module's tests
    stay together and in order, so a module's fixtures are still set up once per worker). The
    fast modules' short tests then even out the two pytest-xdist workers' ends: in file order,
    a slow module's 20 s test was last on one worker while the other had finished 28 s before."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)


def pytest_ignore_collect(collection_path, config):
    """With `-m multiprocess` (CI's second tier), only the test files that name the marker are
    imported: importing the other 40-odd files took ~4 s of that run's start (collection 7.0-7.2
    s against 2.9-3.0 s). A file that marks a test multiprocess names the marker."""
    if config.getoption("markexpr", "") != "multiprocess":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return True if "multiprocess" not in collection_path.read_text() else None
