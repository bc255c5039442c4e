#!/bin/bash
# Alternated: tests/warm_python.py as of 0fbdcf6 (a worktree: git worktree add /tmp/wt_old 0fbdcf6)
# and with its imports frozen before the first fork (the working tree); the same package; -n 2.
FILES="tests/test_user_errors.py tests/test_train.py tests/test_image_folder.py tests/test_stablehlo.py"
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
