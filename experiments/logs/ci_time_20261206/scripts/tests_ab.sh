#!/bin/bash
# Alternated, twice: the tests of an older commit (a git worktree at /tmp/wt_old) and those of the
# working tree, on two pytest-xdist workers as CI runs them; the package is the installed one (the
# same code for both). Usage, from the repository root:
#   git worktree add /tmp/wt_old OLD_COMMIT
#   bash experiments/logs/ci_time_20261206/scripts/tests_ab.sh tests/test_a.py tests/test_b.py ...
#   git worktree remove /tmp/wt_old
# gc_freeze_ab.log: OLD_COMMIT 3480717, test_auto, test_export, test_channel_padding, test_models.
# warm_freeze_ab.log: OLD_COMMIT 0fbdcf6, test_user_errors, test_train, test_image_folder,
# test_stablehlo.
new=$(pwd)
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then dir=/tmp/wt_old; else dir=$new; fi
    cd "$dir"
    s=$(date +%s.%N)
    out=$(python -m pytest -q -n 2 -p no:cacheprovider "$@" 2>&1 | tail -1)
    e=$(date +%s.%N)
    echo "$v $(echo "$e - $s" | bc) s  | $out"
  done
done
