#!/bin/bash
cd /work/main
for side in resnet8 as_is; do
  git checkout -q tests/test_multihost.py tests/test_parallel.py
  if [ $side = resnet8 ]; then python experiments/logs/ci_time_20261206/scripts/mp_tier_resnet8_patch.py; git diff --stat | tail -1; fi
  s=$(date +%s.%N)
  python -m pytest -q -m multiprocess --durations=6 -p no:cacheprovider 2>&1 | grep -E "passed|failed|s call|s setup|Error|assert" | head -12
  e=$(date +%s.%N)
  echo "$side tier $(echo "$e - $s" | bc) s"
done
git checkout -q tests/test_multihost.py tests/test_parallel.py
