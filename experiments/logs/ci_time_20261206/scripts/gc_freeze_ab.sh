#!/bin/bash
# Alternated: the tests as of 3480717 (worktree) and HEAD, same package code; -n 2 as CI.
FILES="tests/test_auto.py tests/test_export.py tests/test_channel_padding.py tests/test_models.py"
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then dir=/tmp/wt_old; else dir=/work/main; fi
    cd $dir
    s=$(date +%s.%N)
    out=$(python -m pytest -q -n 2 -p no:cacheprovider $FILES 2>&1 | tail -1)
    e=$(date +%s.%N)
    echo "$v $(echo "$e - $s" | bc) s  | $out"
  done
done
