"""Lower and compile one architecture's fused train step (the golden steps' configuration) in
the tests' environment (-O0, elemental emitters, threefry unrolled); prints both times.

    python experiments/logs/ci_time_20261207b/compile_one.py googlenet [--profile DIR]

--profile: the compile under jax.profiler, with a Perfetto trace in DIR; profile_summary.py sums
its events by name."""

import os
import sys
import time

sys.path.insert(0, "tests")
import conftest  # noqa: E402, F401  (the tests' environment)
import jax  # noqa: E402
import numpy as np  # noqa: E402
from helpers import paper_config  # noqa: E402

from dcff_jax import input_pipeline, models  # noqa: E402
from dcff_jax.training import optim, steps  # noqa: E402


def main():
    arch = sys.argv[1]
    trace_dir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--profile" else None
    size, batch = (224, 2) if arch == "resnet50" else (32, 4)
    config = paper_config(arch)
    model = models.create_model(arch, config.cprate, "fused", num_classes=10)
    mesh = steps.make_mesh()
    tx = optim.make_optimizer(config, 3)
    state = steps.create_train_state(model, tx, size, config.seed, mesh)
    mean, std = input_pipeline.normalization(config.dataset)
    step = steps.make_train_step(model, tx, steps.InputSpec(mean, std), mesh, config.seed)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (batch, size, size, 3), np.uint8), np.arange(batch) % 10
    start = time.perf_counter()
    lowered = step.lower(state, *steps.to_global(mesh, images, labels))
    lowered_at = time.perf_counter()
    if trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    lowered.compile()
    if trace_dir:
        jax.profiler.stop_trace()
    print(f"lower {lowered_at - start:.2f}s compile {time.perf_counter() - lowered_at:.2f}s")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
