"""Epoch wall time and the time outside the train and eval steps, variants side by side.

    python experiments/bench_epoch.py --data DIR [--epochs 4] [--repo OTHER_CHECKOUT ...] \
        [-- --config.FIELD=VALUE ...]

Runs `python -m dcff_jax.main` (--config: ResNet-56, the paper's config) for each variant one
after the other on the same data: this checkout with the data on the devices and on the host,
and any other checkout given with --repo (e.g. a worktree of an older commit: its epoch times
are compared the same way). An epoch's wall time is the gap between two epoch lines' timestamps, so
epoch 1 (start-up) is left out; "outside" is what the epoch line says (this code's lines only).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r"^I\d{4} (\d\d:\d\d:\d\d\.\d+) .*epoch (\d+)/\d+: test top-1(.*)$")
OUTSIDE = re.compile(r"([\d.]+) s \(([\d.]+)% outside the train and eval steps\)")


def epoch_times(log: str) -> list[tuple[float, float | None]]:
    """(wall seconds, outside %) of every epoch after the first, from main's log."""
    stamps, outside = [], []
    for line in log.splitlines():
        match = EPOCH_LINE.match(line)
        if match:
            stamps.append(datetime.strptime(match.group(1), "%H:%M:%S.%f"))
            found = OUTSIDE.search(match.group(3))
            outside.append(float(found.group(2)) if found else None)
    walls = [(b - a).total_seconds() % 86400 for a, b in zip(stamps, stamps[1:], strict=False)]
    return list(zip(walls, outside[1:], strict=True))


def run_variant(repo: str, config: str, data: str, epochs: int, overrides: list[str]) -> str:
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, "-m", "dcff_jax.main", f"--config={config}"]
        command += [f"--workdir={workdir}", "--config.dataset=cifar10_folder"]
        command += [f"--config.data_dir={data}", f"--config.num_epochs={epochs}"]
        command += ["--config.checkpoint_every_steps=0", *overrides]
        env = {**os.environ, "PYTHONPATH": repo}
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{repo} {overrides}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        return proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--config", default="configs/resnet56_cifar.py", help="relative to a repo")
    parser.add_argument("--repo", action="append", default=[], help="another checkout to time")
    parser.add_argument("--placements", default="device,host", help="this checkout's variants")
    parser.add_argument("overrides", nargs="*", help="--config.FIELD=VALUE for every variant")
    args = parser.parse_args()
    where = {"device": "on the devices", "host": "on the host"}
    variants = [
        (REPO, [f"--config.data_placement={p}"], f"this checkout, data {where[p]}")
        for p in args.placements.split(",")
    ]
    variants += [(repo, [], f"{repo}") for repo in args.repo]
    print("| variant | epochs timed | epoch wall s (median) | outside the steps % (median) |")
    print("|---|---|---|---|")
    for repo, extra, name in variants:
        log = run_variant(repo, args.config, args.data, args.epochs, [*args.overrides, *extra])
        times = epoch_times(log)
        outside = [o for _, o in times if o is not None]
        shown = f"{statistics.median(outside):.1f}" if outside else "not reported"
        wall = statistics.median(w for w, _ in times)
        print(f"| {name} | {len(times)} | {wall:.2f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
