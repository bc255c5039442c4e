#!/bin/bash
# Alternating ONNX export timings: before (1edde5e) and after (working tree), twice each.
cd /work/main
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then pp=/tmp/head_1edde5e; else pp=/work/main; fi
    echo "== round $round $side PYTHONPATH=$pp"
    PYTHONPATH=$pp JAX_PLATFORMS=cpu python experiments/bench_onnx_paths.py write --out /tmp/onnx_time/${side}_$round --repeats 3 | python -c "
import sys, json
for line in sys.stdin:
    arch, rest = line.split(' ', 1); d = json.loads(rest)
    print(arch, d['export_seconds'], d['export_seconds_repeats'], d['metadata'])
"
  done
done
