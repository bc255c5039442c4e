"""python par_dist.py MODEL: tests/run_steps.py on 1 and 8 devices, float32/64; distances."""

import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, "tests")
import numpy as np  # noqa: E402
import test_parallel as tp  # noqa: E402
from helpers import F32_BUDGET, relative_distance, write_cifar_folder  # noqa: E402

tmp = tempfile.mkdtemp()
data = write_cifar_folder(os.path.join(tmp, "cifar"), train=64, test=16)
t = time.time()
runs = {}
for n in (1, 8):
    for kind, extra in (("f64", ("--float64",)), ("f32", ())):
        runs[n, kind] = tp.run_with_params(
            data, pathlib.Path(tmp), f"{n}{kind}", 4, n, ("--model", sys.argv[1], *extra)
        )
print("seconds", time.time() - t)
l1, p1 = tp.losses_and_params(runs[1, "f64"])
for key, r in runs.items():
    losses, p = tp.losses_and_params(r)
    print(
        key,
        "loss rel",
        float(np.max(np.abs(losses - l1) / np.abs(l1))),
        "params rel",
        relative_distance(p, p1),
        "budget",
        F32_BUDGET,
        "losses",
        losses,
    )
