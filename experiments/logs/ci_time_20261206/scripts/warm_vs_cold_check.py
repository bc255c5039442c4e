"""Five commands started from the tests' warm server (tests/warm_python.py) and cold
(DCFF_TESTS_COLD=1), each timed warm, cold, warm; "SAME" when the cold and the second warm run
gave the same exit status and output. From the repository root:
    python experiments/logs/ci_time_20261206/scripts/warm_vs_cold_check.py
"""

import os
import sys
import time

sys.path.insert(0, "tests")
import helpers  # noqa: E402

MAIN = [sys.executable, "-m", "dcff_jax.main", "--config=configs/resnet56_cifar.py"]
COMMANDS = [
    [*MAIN, "--workdir=/tmp/ue", "--config.foo=1"],
    [*MAIN, "--workdir=/tmp/ue", "--config.learning_rate=0"],
    [sys.executable, "-m", "dcff_jax.flops", "--config=configs/vgg16_cifar.py"],
    [
        sys.executable,
        "-c",
        "import sys, jax; print(jax.devices(), sys.argv); raise SystemExit('bye')",
    ],
    [sys.executable, "-c", "raise ValueError('x')"],
]

for command in COMMANDS:
    results = {}
    for mode in ("0", "1", "0"):
        os.environ["DCFF_TESTS_COLD"] = mode
        start = time.time()
        proc = helpers.run_python(command)
        seconds = time.time() - start
        results.setdefault(mode, []).append((proc.returncode, proc.stdout, proc.stderr))
        print(mode, round(seconds, 2), proc.returncode, repr(proc.stderr[-120:]))
    print("SAME" if results["0"][-1] == results["1"][0] else "DIFF")
