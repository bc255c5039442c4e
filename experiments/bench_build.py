"""Start-up cost of the paper's models, and whether their train step is the same program.

For each architecture at its paper rates: the seconds to build the fused model
(models.create_model, which traces the original model since issue 24), to make its abstract
variables (eval_shape of init), and to lower the train step; and the SHA-256 of the lowered
train step's StableHLO text (no debug locations). Run it on two checkouts side by side: equal
digests mean the same program, so the same step time.

    PYTHONPATH=. python experiments/bench_build.py [--archs vgg16,resnet56] [--batch 8]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import PAPER_CONFIGS, paper_config  # noqa: E402

from dcff_jax import models  # noqa: E402
from dcff_jax.training import optim, steps


def build_times(arch: str, batch: int) -> tuple[float, float, float, str]:
    config = paper_config(arch)
    start = time.perf_counter()
    model = models.create_model(arch, config.cprate, "fused")
    built = time.perf_counter()
    tx = optim.make_optimizer(config, 10)
    size = models.input_shape(arch)[1]
    mesh = steps.make_mesh()
    state = jax.eval_shape(lambda: steps.create_train_state(model, tx, size, 0, mesh))
    initialised = time.perf_counter()
    spec = steps.InputSpec((0.5,) * 3, (0.25,) * 3)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    lowered = jax.jit(steps.train_step_fn(model, tx, spec)).lower(state, images, labels)
    text = lowered.as_text(debug_info=False)
    lowered_at = time.perf_counter()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return built - start, initialised - built, lowered_at - initialised, digest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(PAPER_CONFIGS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"{'model':<12}{'build s':>9}{'init s':>9}{'lower s':>9}  train step StableHLO sha256")
    for arch in args.archs.split(","):
        build, init, lower, digest = build_times(arch, args.batch)
        print(f"{arch:<12}{build:>9.2f}{init:>9.2f}{lower:>9.2f}  {digest}")


if __name__ == "__main__":
    main()
