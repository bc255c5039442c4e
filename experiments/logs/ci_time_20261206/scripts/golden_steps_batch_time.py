"""Time test_golden's step-level run of one architecture at another batch size.

From the repository root (S = experiments/logs/ci_time_20261206/scripts):
python $S/golden_steps_batch_time.py ARCH BATCH.
"""

import sys
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401 - the tests' compile settings, set on import
import test_golden  # noqa: E402

arch, batch = sys.argv[1], int(sys.argv[2])
test_golden.STEP_RUNS[arch] = (test_golden.STEP_RUNS[arch][0], batch)
start = time.time()
got = test_golden.golden_steps(arch)
print(arch, batch, f"{time.time() - start:.1f} s", got["losses"])
