"""Time every block the docs test runs, in its order and reader's directory.

From the repository root: python experiments/logs/ci_time_20261206/scripts/docs_blocks_time.py
"""

import os
import pathlib
import pickle
import sys
import tempfile
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401 - the tests' compile settings, set on import
import test_docs  # noqa: E402
from helpers import ROOT, write_cifar_folder  # noqa: E402

home = pathlib.Path(tempfile.mkdtemp())
for name in ("configs", "examples", "experiments"):
    os.symlink(os.path.join(ROOT, name), home / name)
cache = home / "cache"
write_cifar_folder(str(cache / "dcff_jax"), train=128, test=32)
with open(cache / "dcff_jax" / "cifar-10-batches-py" / "batches.meta", "wb") as f:
    pickle.dump({b"label_names": [b"a"] * 10}, f)
env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XDG_CACHE_HOME": str(cache),
    "TFDS_DATA_DIR": str(home / "no_tfds"),
    "PYTHONPATH": ROOT,
}
total = time.time()
for page in test_docs.DOC_ORDER:
    for block in test_docs.blocks(page):
        if block.language in test_docs.COMMAND_LANGUAGES and block.marker is not None:
            start = time.time()
            test_docs.run_block(block, home, env)
            print(f"{time.time() - start:6.1f} s {block}", flush=True)
print(f"{time.time() - total:6.1f} s total")
