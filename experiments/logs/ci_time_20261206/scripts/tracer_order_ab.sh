# Issue 25, eighth slice: the tracer's fusion-state order, compact_variables jitted, test_auto's
# gradient check in NumPy. Before = a worktree of 72ebb89 (PYTHONPATH puts its package first), after =
# the working tree; one after the other, two workers each.
F="tests/test_auto.py tests/test_export.py tests/test_channel_padding.py tests/test_init.py"
export JAX_PLATFORMS=cpu
for side in before after; do
  if [ $side = before ]; then cd /work/before; export PYTHONPATH=/work/before; else cd /work/main; unset PYTHONPATH; fi
  date -u; echo "== $side ($(git log --oneline -1 | cut -c1-7)$(git diff --quiet HEAD -- dcff_jax tests || echo ' + working tree'))"
  python -m pytest -q -n 2 -p no:cacheprovider $F --durations=12 2>&1 | grep -v "Warning\|warner" | tail -15
done
date -u
