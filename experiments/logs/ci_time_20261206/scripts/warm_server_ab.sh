# Issue 25, eighth slice: the subprocess-heavy test files with the warm server (tests/warm_python.py)
# and with DCFF_TESTS_COLD=1 (every command a cold `python`), one after the other, on two workers.
cd /work/main
export JAX_PLATFORMS=cpu
F="tests/test_experiments.py tests/test_cloud.py tests/test_train.py tests/test_onnx.py tests/test_flops.py tests/test_torch_import.py tests/test_image_folder.py tests/test_download.py tests/test_stablehlo.py tests/test_user_errors.py"
date -u; echo "== warm"; python -m pytest -q -n 2 -m 'not multiprocess' $F --durations=20 2>&1 | tail -25
date -u; echo "== cold"; DCFF_TESTS_COLD=1 python -m pytest -q -n 2 -m 'not multiprocess' $F --durations=20 2>&1 | tail -25
date -u
