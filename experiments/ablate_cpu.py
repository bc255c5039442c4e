"""The two CPU fast paths switched on and off, side by side in one process (issue 5).

  python experiments/ablate_cpu.py --config=configs/resnet56_cifar.py --batch_size=64 --repeats=7

Times jit(value_and_grad) of a train-mode forward (loss = mean(logits^2)) of the model at four
settings: {nn.relu, common.residual_relu} x {XLA's default options, dcff_jax.compiler_options()}.
Every setting is compiled first, then the timed calls rotate through the settings, so machine
noise hits all four alike. Prints a table and, as the LAST line, a JSON object.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from dcff_jax import compiler_options, models
from dcff_jax.models import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/resnet56_cifar.py", "Model config.")
_VARIANT = flags.DEFINE_enum("variant", "compact", ["fused", "compact", "original"], "Model.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per setting (median reported).")


def plain_relu(y, shortcut):
    return nn.relu(y + shortcut)


def compile_setting(config, variant: str, batch: int, residual, options: dict):
    saved = common.residual_relu
    common.residual_relu = residual  # the models call common.residual_relu at trace time
    try:
        model = models.create_model(config.model, config.cprate or None, variant)
        shape = models.input_shape(config.model, batch)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        variables = model.init(jax.random.key(0), x[:1])

        def loss(params):
            out, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(out**2)

        compiled = jax.jit(jax.value_and_grad(loss)).lower(variables["params"]).compile(options)
    finally:
        common.residual_relu = saved
    return lambda: compiled(variables["params"])


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    settings = {
        ("nn.relu", "xla defaults"): (plain_relu, {}),
        ("nn.relu", "compiler_options"): (plain_relu, compiler_options()),
        ("residual_relu", "xla defaults"): (common.residual_relu, {}),
        ("residual_relu", "compiler_options"): (common.residual_relu, compiler_options()),
    }
    calls = {
        key: compile_setting(config, _VARIANT.value, _BATCH.value, *value)
        for key, value in settings.items()
    }
    for call in calls.values():
        jax.block_until_ready(call())
    times = {key: [] for key in calls}
    for _ in range(_REPEATS.value):
        for key, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[key].append(time.perf_counter() - start)
    base = statistics.median(times[("nn.relu", "xla defaults")])
    print("| ReLU at block ends | compile options | fwd+bwd ms (median) | speed-up |")
    print("|---|---|---|---|")
    rows = []
    for (relu, options), ts in times.items():
        median = statistics.median(ts)
        print(f"| {relu} | {options} | {1e3 * median:.1f} | {base / median:.2f}x |")
        rows.append({"relu": relu, "options": options, "ms": 1e3 * median})
    result = {"model": config.model, "variant": _VARIANT.value, "batch_size": _BATCH.value}
    print(json.dumps({**result, "rows": rows, "device": str(jax.devices()[0])}))


if __name__ == "__main__":
    app.run(main)
