"""Applied to a scratch copy of the tests by mp_tier_ab.sh (never committed to tests/): the
multi-process tier's main runs and its two-process run_steps test on ResNet-8."""

MULTIHOST, PARALLEL = "tests/test_multihost.py", "tests/test_parallel.py"
with open(MULTIHOST) as f:
    s = f.read()
s = s.replace(
    '"--config.cprate=[0.75]*13",', '"--config.cprate=[0.75]*6", "--config.model=resnet8",'
)
s = s.replace("assert len(ref_params) == 4 * 13 + 2", "assert len(ref_params) > 10")
with open(MULTIHOST, "w") as f:
    f.write(s)
with open(PARALLEL) as f:
    s = f.read()
s = s.replace('4, 1, ("--float64",))', '4, 1, ("--float64", *SMALL))')
s = s.replace(
    "                outs[i],\n            ),",
    "                outs[i],\n                *SMALL,\n            ),",
)
with open(PARALLEL, "w") as f:
    f.write(s)
