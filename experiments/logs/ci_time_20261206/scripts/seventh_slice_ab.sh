#!/bin/bash
# A/B of this slice's test changes: before = e68ceee's tests and docs (a worktree), after = the
# checkout at 37a9073; the same package (unchanged). Two pytest-xdist workers, as in CI, alternated.
# BEFORE: git worktree add BEFORE e68ceee; AFTER: a checkout of 37a9073 (default: this one).
BEFORE=${BEFORE:?a worktree of the commit before} AFTER=${AFTER:-$(git rev-parse --show-toplevel)}
T="tests/test_docs.py tests/test_init.py tests/test_models.py tests/test_auto.py"
for round in 1 2; do
for v in before after; do
  if [ $v = before ]; then cd "$BEFORE"; else cd "$AFTER"; fi
  s=$(date +%s.%N)
  python -m pytest -q -n 2 -p no:cacheprovider --durations=12 $T 2>&1 | grep -E "s call|s setup|passed|failed"
  e=$(date +%s.%N)
  echo "$v round $round: $(echo "$e - $s" | bc) s"
done; done
