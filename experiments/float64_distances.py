"""How far each float32 path is from the same computation in float64 (issue 10).

  XLA_FLAGS=--xla_cpu_max_isa=AVX2 python experiments/float64_distances.py [--models vgg16,resnet56]
      [--devices 1,8] [--run_model vgg16|resnet8] [--smooth] [--batches N]

1. One fused train step (tests/test_fast_paths.py::_one_step) of VGG-16 and ResNet-56 compiled
   with XLA's defaults, with dcff_jax.compiler_options() and with the options before issue 10
   (no YNNPACK fusion at all): relative distance of the update and of the loss to float64.
2. The 4-step tiny VGG-16 run of tests/run_steps.py (--run_model: or ResNet-8) on 1 and 8
   devices, float32 and float64: relative distance of the last loss and of the parameters to
   the 1-device float64 run.

--smooth replaces every ReLU by GELU (as tests/test_fast_paths.py does) and --batches=N repeats
part 1 over N batches: with ReLU a single batch's gradient jumps wherever rounding moves an
activation across the kink (experiments/RESULTS.md).

XLA_FLAGS set outside reach every run (the subprocesses append to them). An ISA cap such as
--xla_cpu_max_isa limits the code XLA generates; library kernels (Eigen, YNNPACK) still pick
theirs at run time. Prints a table, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import test_fast_paths  # noqa: E402
import test_parallel  # noqa: E402
from flax import linen as nn  # noqa: E402
from helpers import SMOKE_CPRATE, SMOKE_MODEL, write_cifar_folder  # noqa: E402

from dcff_jax import xla_options  # noqa: E402
from dcff_jax.models import common  # noqa: E402

MODELS = {"vgg16": "[0.5]*7+[0.8]*6", "resnet56": "[0.5]*27+[0.3]*3"}
RATES = {**MODELS, SMOKE_MODEL: SMOKE_CPRATE}  # --models also takes a smoke run's ResNet-8


def one_step_rows(batches: int, models: list[str]) -> list[dict]:
    option = xla_options.LIBRARY_FUSION_OPTION
    settings = {
        "xla defaults": {},
        "ours": xla_options.compiler_options(),
        "before issue 10": {option: ""},
    }
    rows = []
    for arch in models:
        cprate = RATES[arch]
        for seed in range(batches):
            loss64, updates64, stats64 = test_fast_paths._one_step(
                {}, arch, cprate, jnp.float64, seed
            )
            for name, options in settings.items():
                loss, updates, stats = test_fast_paths._one_step(options, arch, cprate, seed=seed)
                rows.append(
                    {
                        "model": arch,
                        "batch": seed,
                        "options": name,
                        "update": test_fast_paths._relative(updates, updates64),
                        "stats": test_fast_paths._relative(stats, stats64),
                        "loss": abs(loss - loss64) / abs(loss64),
                    }
                )
    return rows


def trajectory_rows(tmp: str, device_counts: list[int], model: str) -> list[dict]:
    data_dir = write_cifar_folder(os.path.join(tmp, "cifar"), train=64, test=16)
    runs = {}
    for devices in device_counts:
        for dtype in ("float32", "float64"):
            extra = ("--model", model, *(("--float64",) if dtype == "float64" else ()))
            out = os.path.join(tmp, f"{devices}_{dtype}.npz")
            result = test_parallel.run_steps(data_dir, 4, devices, (*extra, "--params_out", out))
            runs[devices, dtype] = {**result, "params_out": out}
    ref_losses, ref_params = test_parallel.losses_and_params(runs[1, "float64"])
    rows = []
    for (devices, dtype), result in runs.items():
        losses, params = test_parallel.losses_and_params(result)
        rows.append(
            {
                "devices": devices,
                "dtype": dtype,
                "last_loss": abs(losses[-1] - ref_losses[-1]) / abs(ref_losses[-1]),
                "params": test_parallel.relative_distance(params, ref_params),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smooth", action="store_true")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS), help="part 1's models")
    parser.add_argument("--devices", default="1,8", help="part 2's device counts (1 first)")
    parser.add_argument("--run_model", default="vgg16", choices=("vgg16", SMOKE_MODEL))
    args = parser.parse_args()
    if args.smooth:
        nn.relu = jax.nn.gelu
        common.residual_relu = lambda y, shortcut: jax.nn.gelu(y + shortcut)
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"XLA_FLAGS={flags!r}, smooth={args.smooth}, jax {jax.__version__}")
    steps = one_step_rows(args.batches, args.models.split(","))
    print("| model | batch | options | update | batch stats | loss |\n|---|---|---|---|---|---|")
    for r in steps:
        print(
            f"| {r['model']} | {r['batch']} | {r['options']} | {r['update']:.2e} "
            f"| {r['stats']:.2e} | {r['loss']:.1e} |"
        )
    with tempfile.TemporaryDirectory() as tmp:
        runs = trajectory_rows(tmp, [int(d) for d in args.devices.split(",")], args.run_model)
    print("| devices | dtype | last loss | params |\n|---|---|---|---|")
    for r in runs:
        print(f"| {r['devices']} | {r['dtype']} | {r['last_loss']:.1e} | {r['params']:.1e} |")
    print(json.dumps({"xla_flags": flags, "one_step": steps, "four_steps": runs}))


if __name__ == "__main__":
    main()
