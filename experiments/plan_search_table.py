"""The plan search against every row of the paper's table (and MobileNetV2's).

    python experiments/plan_search_table.py [--archs vgg16,...] > experiments/logs/plan_search.md

For each row: the paper's FLOPs and params reductions as targets, dcff_jax.search_plan's rate
string, and the reductions it reaches in our count (thop convention; MobileNetV2 in the
multiply-accumulate convention its 140M / 300M figures use), beside what the published rate
string reaches.
"""

from __future__ import annotations

import time

from dcff_jax import flops, plan_search

# (row, architecture, FLOPs reduction, params reduction, published rate string or None), from
# the paper's table (../shared/REFERENCE.md).
ROWS = [
    ("VGG-16", "vgg16", 0.7683, 0.9280, "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6"),
    (
        "ResNet-56",
        "resnet56",
        0.5588,
        0.5495,
        "[0.7]*2+[0.5]*3+[0.3]*2+[0.4]+[0.8]+[0.7]*2+[0.8]*4+[0.4]+[0.2]*2+[0.7]+[0.3]+[0.8]"
        "+[0.4]*2+[0.7]+[0.3]+[0.4]+[0.8]+[0.0]*3",
    ),
    (
        "ResNet-110",
        "resnet110",
        0.6655,
        0.6786,
        "[0.2]+[0.0]+[0.2]+[0.3]+[0.7]*2+[0.1]+[0.3]*2+[0.4]+[0.7]*2+[0.5]+[0.1]+[0.3]+[0.0]"
        "+[0.6]+[0.0]+[0.2]+[0.5]+[0.0]+[0.7]*2+[0.5]+[0.7]*2+[0.4]*2+[0.0]+[0.3]+[0.1]+[0.5]"
        "+[0.1]*3+[0.7]+[0.1]*2+[0.3]*5+[0.5]+[0.7]+[0.2]+[0.4]+[0.7]*5+[0.5]+[0.1]+[0.6]+[0.2]"
        "+[0.5]",
    ),
    (
        "GoogLeNet",
        "googlenet",
        0.7011,
        0.6628,
        "[0.0]*2+[0.8]+[0.0]+[0.8]*2+[0.0]*2+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*3"
        "+([0.0]+[0.8]+[0.0]+[0.8]*2+[0.0]*2)*3+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*2",
    ),
    ("ResNet-50 step-0.96B", "resnet50", 0.7670, 0.7103,
     "[0.0]+[0.8]*10+[0.7]*6+[0.6]*10+[0.4]*6+[0.3]*4"),
    ("ResNet-50 step-1.49B", "resnet50", 0.6375, 0.5860,
     "[0.0]+[0.6]*10+[0.5]*6+[0.5]*10+[0.4]*6+[0.2]*4"),
    ("ResNet-50 step-2.25B", "resnet50", 0.4530, 0.4067,
     "[0.0]+[0.35]*10+[0.3]*6+[0.4]*10+[0.3]*6+[0.1]*4"),
    ("ResNet-50 cos-1.52B", "resnet50", 0.6296, 0.5677,
     "[0.0]+([0.5]*10+[0.5]*6)*2+[0.25]*3+[0.0]"),
    ("ResNet-50 cos-1.38B", "resnet50", 0.6641, 0.5377,
     "[0.0]+([0.7]*7+[0.45]*9)*2+[0.24]*3+[0.0]"),
    ("ResNet-50 cos-1.02B", "resnet50", 0.7511, 0.7433,
     "[0.0]+([0.43]*7+[0.73]*9)*2+[0.45]*3+[0.0]"),
    ("MobileNetV2 (MACs)", "mobilenetv2", 0.533, 0.251, None),
]  # fmt: skip


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="", help="only these architectures (comma-separated)")
    archs = set(filter(None, parser.parse_args().archs.split(",")))
    print(
        "| row | target FLOPs / params reduction | searched FLOPs / params reduction | "
        "miss (relative, larger) | published string reaches | counts | s | searched rates |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row, arch, flops_target, params_target, published in ROWS:
        if archs and arch not in archs:
            continue
        convention = "macs" if arch == "mobilenetv2" else "thop"
        start = time.time()
        result = plan_search.search_plan(
            arch,
            flops_reduction=flops_target,
            params_reduction=params_target,
            convention=convention,
        )
        seconds = time.time() - start
        miss = plan_search.miss(
            (result.flops_reduction, result.params_reduction), flops_target, params_target
        )
        if published:
            c = flops.model_counts(arch, published, convention)
            reached = (
                f"{pct(1 - c['flops'] / c['base_flops'])} / "
                f"{pct(1 - c['params'] / c['base_params'])}"
            )
        else:
            reached = "(none published)"
        print(
            f"| {row} | {pct(flops_target)} / {pct(params_target)} | "
            f"{pct(result.flops_reduction)} / {pct(result.params_reduction)} | "
            f"{100 * miss:.2f}% | {reached} | {result.evaluations} | {seconds:.0f} | "
            f"`{result.rate_string}` |",
            flush=True,
        )


if __name__ == "__main__":
    main()
