# Issue 25, eighth slice: test_train's signal tests with their victims started warm (start_python) and
# with DCFF_TESTS_COLD=1 (every command cold), one after the other, on two workers.
cd /work/main
export JAX_PLATFORMS=cpu
K="sigkill or stop_signal or stopped_on_one_device"
for mode in warm cold; do
  date -u; echo "== $mode"
  if [ $mode = cold ]; then export DCFF_TESTS_COLD=1; fi
  python -m pytest -q -n 2 -p no:cacheprovider tests/test_train.py -k "$K" --durations=4 2>&1 | grep -v "Warning\|warner" | tail -7
done
date -u
