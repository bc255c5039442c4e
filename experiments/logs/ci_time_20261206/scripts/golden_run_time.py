"""Time test_golden's whole-trainer run of one model, in-process with the tests' settings.

From the repository root: python experiments/logs/ci_time_20261206/scripts/golden_run_time.py
ARCH RATES (e.g. resnet8 "[0.5]*6").
"""

import sys
import tempfile
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401 - the tests' compile settings, set on import
import test_golden  # noqa: E402

arch, rates = sys.argv[1], sys.argv[2]
start = time.time()
got = test_golden.golden_run(arch, rates, tempfile.mkdtemp())
print(arch, f"{time.time() - start:.1f} s", got["losses"])
