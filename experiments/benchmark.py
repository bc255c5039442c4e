"""Benchmarks. Prints a table and, as the LAST line of stdout, one JSON object.

  python experiments/benchmark.py --config=configs/vgg16_cifar.py --variant=fused|compact|original \
      --mode=train|infer --batch_size=64 --steps=10
      the jitted train step (or eval forward) on synthetic input
  python experiments/benchmark.py --mode=loop --config=configs/resnet56_cifar.py \
      --batch_size=256 --per_call=1,65 --steps=10 [--config.half_precision=True]
      the device path's ceiling: K train steps per call on device-resident synthetic data

  python experiments/benchmark.py --mode=fusion --config=configs/resnet50_imagenet.py
      the fusion update of every fused layer of a model (one jitted call), after compilation
  python experiments/benchmark.py --mode=fusion_scaling --widths=256,512,1024
      one layer's importance: ours O(c^2) against the published O(c^3) formula
  python experiments/benchmark.py --mode=input --config=configs/resnet56_cifar.py \
      --config.dataset=cifar10_folder --config.data_dir=DIR
      the input pipeline alone (host batches; host + device augmentation), images/s

Timings: median of --repeats runs after one warm-up, blocking on results. Memory: XLA's own
accounting of the compiled program (temporary buffers, what the update needs beyond its inputs
and outputs) and the process's peak RSS growth across the timed runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dcff_jax import compiler_options, models
from dcff_jax.method import fusion

_CONFIG = config_flags.DEFINE_config_file("config", "configs/resnet50_imagenet.py", "Model config.")
_MODE = flags.DEFINE_enum(
    "mode",
    "fusion",
    ["train", "infer", "loop", "fusion", "fusion_scaling", "input", "conv_layers"],
    "What to measure.",
)
_VARIANT = flags.DEFINE_enum(
    "variant", "fused", ["fused", "compact", "original"], "train/infer: model."
)
_BATCH = flags.DEFINE_integer("batch_size", 64, "train/infer/input: global batch size.")
_STEPS = flags.DEFINE_integer("steps", 10, "train/infer/input: steps (batches) timed.")
_PER_CALL = flags.DEFINE_list("per_call", ["1", "65"], "loop: steps per call, compared.")
_LOOP_FORM = flags.DEFINE_enum(
    "loop_form", "default", ["default", "rolled", "stepwise"], "loop: steps.make_train_loop's form."
)
_PROFILE = flags.DEFINE_string("profile_dir", "", "loop: a jax.profiler trace of one call.")
_SHAPES_OUT = flags.DEFINE_string("shapes_out", "", "conv_layers: also write the shapes as JSON.")
_TFDS_MOCK = flags.DEFINE_integer(
    "tfds_mock_examples", 0, "input: > 0 serves tfds datasets from tfds' mock data of this size."
)
_CRITERION = flags.DEFINE_enum("criterion", "reference", list(fusion.CRITERIA), "Importance.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs (median reported).")
_WIDTHS = flags.DEFINE_list("widths", ["256", "512", "1024"], "fusion_scaling: layer widths c.")
_DIM = flags.DEFINE_integer("dim", 1152, "fusion_scaling: filter length d = c_in * kh * kw.")
_XLA_DEFAULTS = flags.DEFINE_bool(
    "xla_defaults",
    False,
    "train/infer/conv_layers: compile with XLA's defaults, not dcff_jax.compiler_options().",
)


def bench_loop(
    config,
    batch_size: int,
    per_call: list[int],
    calls: int,
    options: dict,
    profile_dir: str = "",
    form: str = "default",
) -> dict:
    """The ceiling of the device path: steps.make_train_loop on a device-resident synthetic
    split (CIFAR-10's 50,000 images), K steps per call for each K in `per_call`, side by side.

    Per K: median seconds per call over `calls` calls after one warm-up call, each call blocking
    on its metrics (as the train loop reads them), and the train images/s that gives.
    """
    from dcff_jax import input_pipeline
    from dcff_jax.training import optim, steps

    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = models.create_model(config.model, config.cprate or None, "fused", dtype=dtype)
    size = models.input_shape(config.model)[1]
    mesh = steps.make_mesh()
    rng = np.random.default_rng(0)
    num_examples = 50_000
    images = rng.integers(0, 256, (num_examples, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, config.num_classes, (num_examples,)).astype(np.int32)
    split = steps.place_split(mesh, images, labels)
    order = steps.place_replicated(mesh, rng.permutation(num_examples), np.int32)
    spec = steps.InputSpec(
        input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, augment=size == 32, dtype=dtype
    )
    tx = optim.make_optimizer(config, num_examples // batch_size)
    state = steps.create_train_state(model, tx, size, 0, mesh)
    rolled = {"default": None, "rolled": True, "stepwise": False}[form]
    loop = steps.make_train_loop(model, tx, spec, mesh, batch_size, 0, options, rolled=rolled)
    start = time.perf_counter()
    compiled = loop.lower(state, split, order, jnp.int32(0), jnp.int32(1)).compile()
    rows = {"compile_s": time.perf_counter() - start}
    for k in per_call:
        times = []
        for call in range(calls + 1):
            first = (call * k) % max(num_examples // batch_size - k, 1)
            start = time.perf_counter()
            state, sums = compiled(state, split, order, jnp.int32(first), jnp.int32(k))
            jax.device_get(sums)
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        rows[f"k{k}_call_ms"] = 1e3 * median
        rows[f"k{k}_images_per_sec"] = k * batch_size / median
    if profile_dir:  # e.g. whether a GPU runs the loop body as one command buffer (CUDA graph)
        with jax.profiler.trace(profile_dir):
            state, sums = compiled(state, split, order, jnp.int32(0), jnp.int32(per_call[-1]))
            jax.device_get(sums)
    return {
        "mode": "loop",
        "model": config.model,
        "dtype": jnp.dtype(dtype).name,
        "batch_size": batch_size,
        "form": "stepwise" if isinstance(loop, steps.StepwiseLoop) else "rolled",
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        **rows,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_call(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call, after one warm-up call; blocks on every result."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def device_name() -> str:
    d = jax.devices()[0]
    host = platform.processor() or platform.machine()
    return f"{d.platform}:{getattr(d, 'device_kind', '')} ({host}, {os.cpu_count()} cores)"


def bench_model_fusion(config, criterion: str, repeats: int) -> dict:
    model = models.create_model(config.model, config.cprate or None, "fused")
    shape = models.input_shape(config.model, 1)
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))()
    params, state = variables["params"], variables["fusion"]
    widths = [v.shape[1] for v in jax.tree.leaves(state) if v.ndim == 2]
    args = (params, state, jnp.int32(0), jnp.int32(config.num_epochs))
    start = time.perf_counter()
    compiled = fusion._update_fusion_jit.lower(*args, criterion, 1.0, 1e4, 1.0).compile()
    compile_s = time.perf_counter() - start
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    rss_before = peak_rss_mb()
    epochs = iter(range(10**6))

    def run():
        return fusion.update_fusion(
            params, state, next(epochs) % 3, config.num_epochs, criterion=criterion
        )

    times = time_call(run, repeats)
    return {
        "mode": "fusion",
        "model": config.model,
        "criterion": criterion,
        "fused_layers": len(widths),
        "max_width": max(widths),
        "update_s_median": statistics.median(times),
        "update_s_min": min(times),
        "compile_s": compile_s,
        "xla_temp_mb": temp_mb,
        "peak_rss_growth_mb": peak_rss_mb() - rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "device": device_name(),
    }


def published_importance_cubic(distances, temperature):
    """The published formula as written: the (c, c, c) KL tensor, O(c^3) time.

    XLA fuses the tensor away, so this measures the published arithmetic at its best; the eager
    NumPy run below allocates the (c, c, c) intermediates as PyTorch does.
    """
    p = jax.nn.softmax(-distances * temperature, axis=1)
    kl = jnp.mean(p[:, None, :] * jnp.log(p[:, None, :] / (p[None, :, :] + 1e-7)), axis=2)
    return jnp.sum(kl, axis=1)


def published_importance_eager(distances: np.ndarray, temperature: float) -> np.ndarray:
    """The published formula, eager, materialising (c, c, c) tensors as the PyTorch code does."""
    logits = -distances * np.float32(temperature)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    kl = np.mean(p[:, None, :] * np.log(p[:, None, :] / (p[None, :, :] + np.float32(1e-7))), axis=2)
    return kl.sum(axis=1)


def bench_scaling(widths: list[int], dim: int, repeats: int, eager_max_width: int = 512) -> dict:
    rows = []
    ours = jax.jit(lambda d: fusion.importance(d, 1.0, "reference"))
    fused_cubic = jax.jit(lambda d: published_importance_cubic(d, 1.0))
    for c in widths:
        w = np.random.default_rng(c).standard_normal((c, dim)).astype(np.float32) * np.sqrt(2 / dim)
        d = fusion.pairwise_distances(w)
        row = {"c": c, "cubic_tensor_mb": c**3 * 4 / 2**20}
        for name, fn in (("ours", ours), ("published_xla", fused_cubic)):
            compiled = fn.lower(d).compile()
            row[f"{name}_temp_mb"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            times = time_call(lambda f=fn, x=d: f(x), repeats)
            row[f"{name}_ms"] = 1e3 * statistics.median(times)
        np.testing.assert_allclose(ours(d), fused_cubic(d), rtol=2e-3, atol=1e-4)
        if c <= eager_max_width:
            d_np = np.asarray(d)
            tracemalloc.start()
            start = time.perf_counter()
            published_importance_eager(d_np, 1.0)
            row["published_eager_ms"] = 1e3 * (time.perf_counter() - start)
            row["published_eager_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        row["speedup_vs_xla"] = row["published_xla_ms"] / row["ours_ms"]
        rows.append(row)
    return {"mode": "fusion_scaling", "dim": dim, "rows": rows, "device": device_name()}


def bench_step(
    config, variant: str, mode: str, batch_size: int, num_steps: int, options: dict
) -> dict:
    """The jitted train step (SGD, batch stats, fusion applied) or eval forward on synthetic input.

    Median over `num_steps` steps after compilation; every step blocks on its result.
    """
    from dcff_jax import input_pipeline
    from dcff_jax.training import optim, steps

    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = models.create_model(config.model, config.cprate or None, variant, dtype=dtype)
    size = models.input_shape(config.model)[1]
    mesh = steps.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, config.num_classes, (batch_size,)).astype(np.int32)
    spec = steps.InputSpec(
        input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, augment=size == 32, dtype=dtype
    )
    tx = optim.make_optimizer(config, 100)
    state = steps.create_train_state(model, tx, size, 0, mesh)
    batch = steps.to_global(mesh, images, labels)
    if mode == "train":
        step = steps.make_train_step(model, tx, spec, mesh, 0, options)
        args = (state, *batch)
    else:
        step = steps.make_eval_step(model, spec, mesh, options)
        args = (state, *batch, *steps.to_global(mesh, np.ones((batch_size,), bool)))
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(num_steps + 1):
        start = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
        if mode == "train":
            args = (out[0], *batch)  # the state was donated
    median = statistics.median(times[1:])
    return {
        "mode": mode,
        "model": config.model,
        "variant": variant,
        "batch_size": batch_size,
        "images_per_sec": batch_size / median,
        "step_ms_median": 1e3 * median,
        "compile_s": compile_s,
        "peak_rss_mb": peak_rss_mb(),
        "compiler_options": options,
        "device": device_name(),
    }


def compact_conv_shapes(config, batch_size: int) -> list[dict]:
    """Every conv of the compact model: input shape, filters, kernel, stride, padding, bias."""
    from flax import linen as nn

    model = models.create_model(config.model, config.cprate or None, "compact")
    calls, _ = models.trace_calls(model, models.input_shape(config.model, 1))
    return [
        {
            "path": c.path,
            "input": [batch_size, *c.input_shape[1:]],
            "filters": c.module.features,
            "kernel": c.module.kernel_size[0],
            "stride": c.module.strides
            if isinstance(c.module.strides, int)
            else c.module.strides[0],
            "padding": c.module.padding if isinstance(c.module.padding, int) else 0,
            "groups": c.module.feature_group_count,
            "bias": c.module.use_bias,
        }
        for c in calls
        if isinstance(c.module, nn.Conv)
    ]


def bench_conv_layers(config, batch_size: int, steps: int, options: dict) -> dict:
    """Forward + backward (input and kernel grads) of each compact conv shape, alone, jitted."""
    rows = []
    for spec in compact_conv_shapes(config, batch_size):
        n, h, w, c = spec["input"]
        k = spec["kernel"]
        x = jnp.asarray(np.random.default_rng(0).standard_normal((n, h, w, c)), jnp.float32)
        kernel = jnp.asarray(
            np.random.default_rng(1).standard_normal((k, k, c // spec["groups"], spec["filters"])),
            jnp.float32,
        )
        pad = [(spec["padding"], spec["padding"])] * 2

        def conv(x, kernel, spec=spec, pad=pad):
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                (spec["stride"],) * 2,
                pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=spec["groups"],
            )

        step = jax.jit(
            jax.grad(lambda x, kern: jnp.sum(conv(x, kern) ** 2) / 2, argnums=(0, 1)),
            compiler_options=options,
        )
        times = time_call(lambda s=step, a=x, b=kernel: s(a, b), steps)
        rows.append({**spec, "fwd_bwd_ms": 1e3 * statistics.median(times)})
    total = sum(r["fwd_bwd_ms"] for r in rows)
    return {
        "mode": "conv_layers",
        "model": config.model,
        "rows": rows,
        "total_ms": total,
        "compiler_options": options,
        "device": device_name(),
    }


def bench_input(config, batch_size: int, steps: int) -> dict:
    """The input pipeline alone: host batches, then host batches + the device augmentation."""
    from dcff_jax import input_pipeline

    data = input_pipeline.load_data(config)
    steps = min(steps, input_pipeline.steps_per_epoch(data.train, batch_size))

    @jax.jit
    def device_side(images, key):
        if data.device_augment:
            images = input_pipeline.augment_cifar(images, key)
        return input_pipeline.normalize(images, data.mean, data.std)

    def host_only():
        for _ in input_pipeline.train_batches(data.train, batch_size, 0, 0, 0, steps):
            pass

    def host_and_device():
        out = None
        batches = input_pipeline.train_batches(data.train, batch_size, 0, 0, 0, steps)
        for i, (images, _) in enumerate(batches):
            out = device_side(images, jax.random.key(i))
        return out

    jax.block_until_ready(host_and_device())  # compile
    result = {"mode": "input", "dataset": config.dataset, "batch_size": batch_size, "steps": steps}
    for name, fn in (("host", host_only), ("host_and_device_augment", host_and_device)):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        result[f"{name}_images_per_sec"] = steps * batch_size / (time.perf_counter() - start)
    result["device"] = device_name()
    return result


def print_table(result: dict) -> None:
    if result["mode"] in ("fusion", "input", "train", "infer", "loop"):
        for key, value in result.items():
            print(f"{key:<40}{value:.4f}" if isinstance(value, float) else f"{key:<40}{value}")
        return
    columns = (
        "c",
        "ours_ms",
        "published_xla_ms",
        "published_eager_ms",
        "ours_temp_mb",
        "published_eager_peak_mb",
        "cubic_tensor_mb",
    )
    print("".join(f"{name:>{len(name) + 2}}" for name in columns))
    for row in result["rows"]:
        cells = []
        for name in columns:
            value = row.get(name, float("nan"))
            cells.append(
                f"{value:>{len(name) + 2}.2f}"
                if isinstance(value, float)
                else f"{value:>{len(name) + 2}}"
            )
        print("".join(cells))


def main(argv) -> None:
    del argv
    options = {} if _XLA_DEFAULTS.value else compiler_options()
    if _MODE.value == "conv_layers":
        result = bench_conv_layers(_CONFIG.value, _BATCH.value, _STEPS.value, options)
        if _SHAPES_OUT.value:
            with open(_SHAPES_OUT.value, "w") as f:
                json.dump(
                    [{k: v for k, v in r.items() if k != "fwd_bwd_ms"} for r in result["rows"]], f
                )
        for r in result["rows"]:
            print(
                f"{r['path']:<32}{str(r['input']):<22}{r['filters']:>6}{r['fwd_bwd_ms']:>10.2f} ms"
            )
        print(json.dumps(result))
        return
    if _MODE.value in ("train", "infer"):
        result = bench_step(
            _CONFIG.value, _VARIANT.value, _MODE.value, _BATCH.value, _STEPS.value, options
        )
    elif _MODE.value == "loop":
        per_call = [int(k) for k in _PER_CALL.value]
        result = bench_loop(
            _CONFIG.value,
            _BATCH.value,
            per_call,
            _STEPS.value,
            options,
            _PROFILE.value,
            _LOOP_FORM.value,
        )
    elif _MODE.value == "fusion":
        result = bench_model_fusion(_CONFIG.value, _CRITERION.value, _REPEATS.value)
    elif _MODE.value == "input" and _TFDS_MOCK.value:
        import tensorflow_datasets as tfds

        with tfds.testing.mock_data(num_examples=_TFDS_MOCK.value):
            result = bench_input(_CONFIG.value, _BATCH.value, _STEPS.value)
        result["tfds_mock_examples"] = _TFDS_MOCK.value
    elif _MODE.value == "input":
        result = bench_input(_CONFIG.value, _BATCH.value, _STEPS.value)
    else:
        result = bench_scaling([int(c) for c in _WIDTHS.value], _DIM.value, _REPEATS.value)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
