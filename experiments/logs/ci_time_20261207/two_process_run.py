"""A two-process `main` run as tests/test_multihost.py's sigterm test starts its reference, with
each stderr line timestamped (two_process_vgg16_run.log). From the repository root:

    python experiments/logs/ci_time_20261207/two_process_run.py WORKDIR CACHE_DIR
"""

import os
import sys
import threading
import time

sys.path.insert(0, "tests")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as tests/conftest.py sets
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["XDG_CACHE_HOME"] = sys.argv[2]
import test_multihost  # noqa: E402
from helpers import write_cifar_folder  # noqa: E402


def main():
    data = write_cifar_folder(os.path.join(sys.argv[2], "data"), train=64, test=24)
    start = time.time()
    extra = (
        "--config.checkpoint_every_steps=100",
        f"--config.num_epochs={test_multihost.LONG_EPOCHS}",
    )
    procs = test_multihost.start_processes(data, sys.argv[1], extra=extra)

    def pump(i, proc):
        for line in proc.stderr:
            print(f"{time.time() - start:6.1f} p{i} {line.rstrip()[:150]}", flush=True)

    threads = [threading.Thread(target=pump, args=(i, p)) for i, p in enumerate(procs)]
    for thread in threads:
        thread.start()
    for proc in procs:
        proc.wait()
    for thread in threads:
        thread.join()
    print(f"{time.time() - start:6.1f} done", [p.returncode for p in procs])


if __name__ == "__main__":
    main()
