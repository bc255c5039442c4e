# Measured and not kept: the run-wide cache's 0 s compile-time threshold against JAX's default 1 s, alternated, on seven compile-heavy files.
cd /work/main
export JAX_PLATFORMS=cpu
F="tests/test_fusion.py tests/test_layers.py tests/test_models.py tests/test_init.py tests/test_flops.py tests/test_legacy.py tests/test_feeds.py"
for mode in threshold0 default1s threshold0 default1s; do
  if [ $mode = threshold0 ]; then unset JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS; else export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1; fi
  /usr/bin/time -o /tmp/t.txt -f "%e" python -m pytest -q -n 2 -p no:cacheprovider $F > /tmp/ab/cache_$mode.out 2>&1
  echo "$mode $(cat /tmp/t.txt) s $(tail -1 /tmp/ab/cache_$mode.out)"
done
