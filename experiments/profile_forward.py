"""Where a model's forward pass spends its time on XLA:CPU: the jitted apply (eval mode, our
compile options) traced with jax.profiler, its XLA ops ranked by total time.

  PYTHONPATH=. python experiments/profile_forward.py --arch googlenet --variant compact --batch 64

Three traced calls after two warm-ups; each op's time is its summed trace events / 3. The op
names are the compiled HLO's (e.g. `wrapped_reduce-window.2`, `conv_general_dilated.58`,
`add_maximum_fusion.8`); --hlo writes the compiled HLO to look them up. Times of ops that run
concurrently overlap, so the column need not sum to the wall time. Convolutions that XLA hands
to Eigen's thread pool are traced only in part (a GoogLeNet's convs show ~2 ms of ~200):
bench_conv_latency.py times convs; this script is for what lies outside them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import paper_config  # noqa: E402

from dcff_jax import compiler_options, models  # noqa: E402

CALLS = 3
# XLA op names (`fusion.3`, `wrapped_reduce-window`); Python frames and runtime bookkeeping
# events are named otherwise.
OP_NAME = re.compile(r"^[a-z][a-z0-9_\-]*(\.\d+)?$")


def op_times(trace_dir: str) -> collections.Counter:
    """{op name: ms per call} from the perfetto trace jax.profiler wrote into trace_dir."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and OP_NAME.match(name):
            totals[name] += event["dur"] / 1e3 / CALLS
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--variant", default="compact", choices=("original", "compact"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", default="", help="also write the compiled HLO text here")
    args = parser.parse_args()
    cprate = paper_config(args.arch).cprate if args.variant == "compact" else None
    model = models.create_model(args.arch, cprate, args.variant)
    shape = models.input_shape(args.arch, args.batch)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape[1:])))
    images = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    apply = jax.jit(lambda x: model.apply(variables, x, train=False), compiler_options=dict(
        compiler_options(), xla_cpu_enable_xprof_traceme=True))  # fmt: skip
    for _ in range(2):
        jax.block_until_ready(apply(images))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(CALLS):
                jax.block_until_ready(apply(images))
        totals = op_times(trace_dir)
    by_kind = collections.Counter()
    for name, ms in totals.items():
        by_kind[name.split(".")[0]] += ms
    print(f"{args.arch} {args.variant} batch {args.batch}: ms per call by op kind")
    for kind, ms in by_kind.most_common():
        print(f"  {ms:9.2f}  {kind}")
    print(f"top {args.top} ops:")
    for name, ms in totals.most_common(args.top):
        print(f"  {ms:9.2f}  {name}")
    if args.hlo:
        Path(args.hlo).write_text(apply.lower(images).compile().as_text())


if __name__ == "__main__":
    main()
