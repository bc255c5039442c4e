#!/bin/bash
# (Records, run from the repository root with /tmp/m1/test_multihost_old.py = git show HEAD:tests/test_multihost.py
# and /tmp/m1/test_multihost_new.py = the same with XLA_FLAGS kept: helpers.with_device_count(env, 1).)
# A/B of the multi-process tier's two longest tests: XLA_FLAGS dropped (HEAD) vs kept (the tests' flags).
cd /work/main
for side in old new; do
  cp /tmp/m1/test_multihost_$side.py tests/test_multihost.py
  s=$(date +%s.%N)
  python -m pytest -q -m multiprocess tests/test_multihost.py -k "sigterm or trains_resumes" --durations=3 -p no:cacheprovider 2>&1 | grep -E "passed|failed|s call"
  e=$(date +%s.%N)
  echo "$side total $(echo "$e - $s" | bc) s"
done
cp /tmp/m1/test_multihost_new.py tests/test_multihost.py
