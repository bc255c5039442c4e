#!/bin/bash
# A/B: the multi-process tier as it is (LLVM -O0 from tests/conftest.py) and compiled at -O2.
cd "$(git rev-parse --show-toplevel)"
for v in O2 O0; do
  s=$(date +%s.%N)
  if [ $v = O2 ]; then export JAX_DISABLE_MOST_OPTIMIZATIONS=0; else unset JAX_DISABLE_MOST_OPTIMIZATIONS; fi
  python -m pytest -q -m multiprocess -p no:cacheprovider --durations=6 2>&1 | grep -E "s call|s setup|passed|failed"
  e=$(date +%s.%N)
  echo "$v tier: $(echo "$e - $s" | bc) s"
done
