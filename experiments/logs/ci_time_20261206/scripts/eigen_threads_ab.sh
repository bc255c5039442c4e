#!/bin/bash
# A/B: XLA:CPU's multi-threaded Eigen on and off, two pytest-xdist workers on 2 cores.
cd "$(git rev-parse --show-toplevel)"
T="tests/test_export.py tests/test_channel_padding.py tests/test_auto.py"
for round in 1 2; do
for v in A B; do
  if [ $v = A ]; then F="--xla_cpu_use_fusion_emitters=false"; else F="--xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false"; fi
  s=$(date +%s.%N)
  XLA_FLAGS="$F" python -m pytest -q -n 2 -p no:cacheprovider $T 2>&1 | tail -1
  e=$(date +%s.%N)
  echo "$v round $round: $(echo "$e - $s" | bc) s  XLA_FLAGS=$F"
done; done
