"""The parity fixture's report (experiments/parity_fixture.compare) in one process, timed:
"as_it_is": all of it compiled as users compile (tests/test_parity_fixture.py's fixture);
"O0": the fusion updates and the float64 step at the tests' settings (-O0, elemental emitters),
only the float32 step as users compile. Prints the wall time and every figure the tests check.

    python experiments/logs/ci_time_20261207b/parity_fixture_O0_ab.py as_it_is|O0"""

import sys
import time

sys.path.insert(0, "tests")
sys.path.insert(0, "experiments")
import conftest  # noqa: E402, F401  (the tests' environment)
import jax.numpy as jnp  # noqa: E402
import parity_fixture  # noqa: E402
from helpers import users_compile  # noqa: E402


def float32_step_as_users_compile():
    step = parity_fixture.step

    def patched(model, variables, fusion, images, labels, dtype, compiler_options=None):
        if dtype != jnp.float32:
            return step(model, variables, fusion, images, labels, dtype)
        with users_compile() as options:
            return step(model, variables, fusion, images, labels, dtype, options)

    parity_fixture.step = patched


def main():
    mode = sys.argv[1]
    start = time.perf_counter()
    if mode == "as_it_is":
        with users_compile() as options:
            report = parity_fixture.compare(compiler_options=options)
    else:
        float32_step_as_users_compile()
        report = parity_fixture.compare()
    wall = time.perf_counter() - start
    fusion = report["fusion"].values()
    agree = all(f["sets_agree"] and f["slots_agree"] for f in fusion)
    ulps = max(f["matrix_max_abs_diff"] for f in fusion) / 2**-24
    print(f"{mode} {wall:.1f} s; kept sets and slots agree: {agree}; matrices {ulps:.1f} ulps")
    for (dtype, epoch), m in sorted(report["step"].items()):
        line = f"  {dtype} epoch {epoch}: loss {m['loss']:.1e} grad {m['grad'].max():.1e}"
        line += f" stats {m['batch_stats'].max():.1e}"
        if dtype == "float32":
            line += f" (published float32: grad {m['published_float32_grad'].max():.1e}"
            line += f" stats {m['published_float32_batch_stats'].max():.1e})"
        print(line)


if __name__ == "__main__":
    main()
