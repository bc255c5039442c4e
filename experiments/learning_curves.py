"""Test top-1 per epoch of ours and the published code, read from their logs: a table and a PNG.

  python experiments/learning_curves.py --out experiments/learning_curves.png \
      --run "ResNet-56,OURS_LOG,PUBLISHED_LOG" [--run "VGG-16,OURS_LOG,PUBLISHED_LOG"]

Ours: the `epoch N/E: test top-1 X%` lines of dcff_jax.main (a resumed run appends to the same
log; a repeated epoch keeps its last line). Published: the `Test Loss: ... Acc: X%` lines of
main_cifar.py, one per epoch in order. Epochs are numbered from 1 on both sides.
"""

import argparse
import re

OURS = re.compile(r"epoch (\d+)/\d+: test top-1 ([\d.]+)%")
PUBLISHED = re.compile(r"Test Loss: [\d.]+\s+Acc: ([\d.]+)%")


def ours_curve(text: str) -> list[float]:
    """Test top-1 per epoch (1-based, in order) from dcff_jax.main's log."""
    by_epoch = {int(m.group(1)): float(m.group(2)) for m in OURS.finditer(text)}
    return [by_epoch[e] for e in range(1, max(by_epoch, default=0) + 1) if e in by_epoch]


def published_curve(text: str) -> list[float]:
    """Test top-1 per epoch from main_cifar.py's log (its epochs count from 0; listed in order)."""
    return [float(m.group(1)) for m in PUBLISHED.finditer(text)]


def noise(curve: list[float]) -> float:
    """Epoch-to-epoch noise: the median over inner epochs of |x_e - (x_{e-1} + x_{e+1}) / 2|,
    how far an epoch sits from the mean of its neighbours (0 when too short)."""
    wiggle = sorted(
        abs(curve[i] - (curve[i - 1] + curve[i + 1]) / 2) for i in range(1, len(curve) - 1)
    )
    return wiggle[len(wiggle) // 2] if wiggle else 0.0


def table(runs: dict[str, tuple[list[float], list[float]]]) -> str:
    width = max(max(len(o), len(p)) for o, p in runs.values())
    head = "| run | " + " | ".join(str(e) for e in range(1, width + 1)) + " | noise |"
    lines = [head, "|" + "---|" * (width + 2)]
    for name, curves in runs.items():
        for side, curve in zip(("ours", "published"), curves, strict=True):
            cells = [f"{v:.2f}" for v in curve] + [""] * (width - len(curve))
            lines.append(f"| {name} {side} | " + " | ".join(cells) + f" | {noise(curve):.2f} |")
        ours, published = curves
        diff = [f"{o - p:+.2f}" for o, p in zip(ours, published, strict=False)]
        lines.append(
            f"| {name} ours - published | " + " | ".join(diff + [""] * (width - len(diff))) + " | |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, tuple[list[float], list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, (ours, published)) in zip(axes[0], runs.items(), strict=True):
        ax.plot(range(1, len(ours) + 1), ours, "o-", label="dcff-jax")
        ax.plot(range(1, len(published) + 1), published, "s--", label="published (PyTorch)")
        ax.set(title=f"{name}, CIFAR-10, CPU", xlabel="epoch", ylabel="test top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME,OURS_LOG,PUB_LOG")
    parser.add_argument("--out", default="", help="PNG path (none: table only)")
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        name, ours_log, published_log = spec.split(",")
        with open(ours_log) as f:
            ours = ours_curve(f.read())
        with open(published_log) as f:
            published = published_curve(f.read())
        runs[name] = (ours, published)
    print(table(runs))
    if args.out:
        plot(runs, args.out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
