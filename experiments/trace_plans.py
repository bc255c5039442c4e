"""Traced plans (dcff_jax.any_model) for our six architectures' unpruned definitions, with the
published rate strings mapped to conv paths (models.paper_dcff): how long tracing takes, how
many convs fuse, and the compact MACs and params against our hand-written compact models'
own counts.

    PYTHONPATH=. python experiments/trace_plans.py [--tables]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import PAPER_CONFIGS, paper_config, pure_macs  # noqa: E402

import dcff_jax  # noqa: E402
from dcff_jax import any_model, models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", action="store_true", help="print every plan's table")
    parser.add_argument("--archs", default=",".join(PAPER_CONFIGS), help="comma-separated")
    args = parser.parse_args()
    print(f"{'model':<12}{'trace s':>8}{'convs':>7}{'fused':>7}{'blocked':>9}"
          f"{'compact MACs':>15}{'ours':>15}{'params':>12}{'ours':>12}")  # fmt: skip
    for arch in args.archs.split(","):
        cprate = paper_config(arch).cprate
        start = time.perf_counter()
        plan = models.paper_dcff(arch, cprate).plan
        seconds = time.perf_counter() - start
        compact = models.create_model(arch, cprate, "compact")
        ours = dcff_jax.count_flops(compact, models.input_shape(arch))
        macs = pure_macs(compact, models.input_shape(arch))
        blocked = sum(not c.fused and not c.resized and c.reason != any_model.NO_RATE
                      and not c.reason.startswith("depthwise") for c in plan.convs)  # fmt: skip
        print(
            f"{arch:<12}{seconds:>8.2f}{len(plan.convs):>7}{len(plan.fused):>7}{blocked:>9}"
            f"{plan.compact_macs:>15,}{macs:>15,}{plan.compact_params:>12,}{ours.params:>12,}"
        )
        if args.tables:
            print(plan.table())


if __name__ == "__main__":
    main()
