"""Side-by-side CPU comparisons in one run; prints markdown tables and a final JSON line.

  python experiments/compare_cpu.py --torch_python=/tmp/torchvenv/bin/python [--sections=...]
      [--configs=vgg16_cifar,...] [--batches=64,...]

Sections:
  train     ours (fused) vs the PyTorch transcription (fused), VGG-16 and ResNet-56, batch 64/256
  overhead  our fused vs compact train step (the cost of fusing in every step)
  infer     compact vs original inference, batch 1 and 256 (CIFAR) / 1 and 16 (ImageNet)

Each measurement is its own process (`experiments/benchmark.py` or the torch baseline), run one
after the other on the same machine; figures are medians of the timed steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
_TORCH = flags.DEFINE_string(
    "torch_python", "", "Python of a venv with torch==2.13.0 (train section)."
)
_SECTIONS = flags.DEFINE_list("sections", ["train", "overhead", "infer"], "What to compare.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per measurement.")
_CONFIGS = flags.DEFINE_list("configs", [], "Only these configs (e.g. vgg16_cifar).")
_BATCHES = flags.DEFINE_list("batches", [], "These batch sizes instead of each section's.")


def chosen(configs):
    """The section's configs that --configs keeps (all without it)."""
    return [c for c in configs if not _CONFIGS.value or c in _CONFIGS.value]


def batches(default):
    return tuple(int(b) for b in _BATCHES.value) or default


def run_json(cmd: list[str]) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ours(config: str, variant: str, mode: str, batch: int, steps: int) -> dict:
    return run_json(
        [
            sys.executable,
            os.path.join(HERE, "benchmark.py"),
            f"--config=configs/{config}.py",
            f"--variant={variant}",
            f"--mode={mode}",
            f"--batch_size={batch}",
            f"--steps={steps}",
        ]
    )


def torch(model: str, batch: int, steps: int) -> dict:
    script = os.path.join(HERE, "baselines", "torch_dcff.py")
    return run_json(
        [_TORCH.value, script, f"--model={model}", f"--batch_size={batch}", f"--steps={steps}"]
    )


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def section_train(steps: int) -> list[dict]:
    rows = []
    print("| model | batch | ours fused images/s | PyTorch fused images/s | ours / PyTorch |")
    print("|---|---|---|---|---|")
    for config in chosen(("vgg16_cifar", "resnet56_cifar")):
        model = config.split("_")[0]
        for batch in batches((64, 256)):
            a, b = ours(config, "fused", "train", batch, steps), torch(model, batch, steps)
            ratio = a["images_per_sec"] / b["images_per_sec"]
            row(
                model,
                batch,
                f"{a['images_per_sec']:.1f}",
                f"{b['images_per_sec']:.1f}",
                f"{ratio:.2f}x",
            )
            rows.append({"model": model, "batch": batch, "ours": a, "torch": b, "ratio": ratio})
    return rows


def section_overhead(steps: int) -> list[dict]:
    rows = []
    print("| model | batch | fused ms/step | compact ms/step | fused overhead |")
    print("|---|---|---|---|---|")
    for config in chosen(("vgg16_cifar", "resnet56_cifar")):
        (batch,) = batches((64,))[:1]
        a, b = (
            ours(config, "fused", "train", batch, steps),
            ours(config, "compact", "train", batch, steps),
        )
        overhead = a["step_ms_median"] / b["step_ms_median"] - 1
        row(
            config,
            batch,
            f"{a['step_ms_median']:.1f}",
            f"{b['step_ms_median']:.1f}",
            f"{100 * overhead:+.1f}%",
        )
        rows.append({"config": config, "fused": a, "compact": b, "overhead": overhead})
    return rows


def section_infer(steps: int) -> list[dict]:
    rows = []
    row(
        "model",
        "batch",
        "original ms",
        "compact ms",
        "speed-up",
        "FLOPs ratio",
        "speed-up / FLOPs ratio",
    )
    print("|---|---|---|---|---|---|---|")
    from dcff_jax import flops
    from dcff_jax.config import load_config

    cases = [
        ("vgg16_cifar", (1, 256)),
        ("resnet56_cifar", (1, 256)),
        ("resnet110_cifar", (1, 256)),
        ("googlenet_cifar", (1, 256)),
        ("resnet50_imagenet", (1, 16)),
        ("mobilenetv2_imagenet", (1, 16)),
    ]
    for config, sizes in cases:
        if config not in chosen([config]):
            continue
        cfg = load_config(os.path.join(ROOT, "configs", f"{config}.py"))
        counts = flops.model_counts(cfg.model, cfg.cprate)
        flops_ratio = counts["base_flops"] / counts["flops"]
        for batch in batches(sizes):
            a = ours(config, "original", "infer", batch, steps)
            b = ours(config, "compact", "infer", batch, steps)
            speedup = a["step_ms_median"] / b["step_ms_median"]
            cells = (f"{a['step_ms_median']:.2f}", f"{b['step_ms_median']:.2f}", f"{speedup:.2f}x")
            row(config, batch, *cells, f"{flops_ratio:.2f}x", f"{100 * speedup / flops_ratio:.0f}%")
            rows.append(
                {
                    "config": config,
                    "batch": batch,
                    "original": a,
                    "compact": b,
                    "speedup": speedup,
                    "flops_ratio": flops_ratio,
                }
            )
    return rows


def main(argv):
    del argv
    results = {}
    for name in _SECTIONS.value:
        if name == "train" and not _TORCH.value:
            print("train: skipped (no --torch_python)")
            continue
        print(f"\n### {name}\n")
        results[name] = {
            "train": section_train,
            "overhead": section_overhead,
            "infer": section_infer,
        }[name](_STEPS.value)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
