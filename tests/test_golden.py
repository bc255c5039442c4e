"""A fixed-seed short run of the whole trainer, pinned: refactors must not change its results.

Two architectures, 2 epochs of 2 steps through `train.train_and_evaluate`: the loss of every step
(from the TensorBoard events), the kept filters of every fused layer after the last fusion
update, and a SHA-256 of the final parameters. tests/golden/<arch>.json holds them per machine
fingerprint (CPU ISA flags, jax/jaxlib versions): XLA:CPU generates different code for AVX2,
AVX-512 and AMX, so bits are comparable only on the same kind of machine and JAX.

- Same fingerprint as a recorded run: every value must be bit-identical. A numeric change on
  purpose is recorded again:
    DCFF_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py
  and the commit says which change was intended and why.
- Another machine: only the run's structure (4 finite losses, every layer's kept width). Its
  numbers are not comparable: the epoch-0 fusion update picks the kept filters from importance
  scores whose near-ties flip with the ISA's rounding, and then the runs differ at step 1
  (measured: VGG-16's first loss 2.3727 on an AVX2 Zen 2/3, 2.3618 on an AVX-512 Zen 5, with
  different kept sets; ResNet-56's fourth loss differs by 0.14%, past any few-step budget).
"""

import hashlib
import json
import os
import platform

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import read_scalars, tiny_config, write_cifar_folder

from dcff_jax import train

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
RUNS = {"vgg16": "[0.5]*7+[0.8]*6", "resnet56": "[0.5]*27+[0.3]*3"}
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")


def fingerprint() -> str:
    """What XLA:CPU's code depends on: ISA flags, the CPU family/model that LLVM tunes for (the
    same flags on another microarchitecture may schedule differently), the XLA_FLAGS, and the
    JAX versions."""
    fields = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = "+".join(flag for flag in ISA_FLAGS if flag in flags)
    cpu = f"family{fields.get('cpu family', '?')}-model{fields.get('model', '?')}"
    xla_flags = os.environ.get("XLA_FLAGS", "").strip()
    versions = f"jax{jax.__version__}:jaxlib{jax.lib.__version__}"
    return ":".join(x for x in (platform.machine(), cpu, isa, xla_flags, versions) if x)


def golden_run(arch: str, cprate: str, root: str) -> dict:
    data_dir = write_cifar_folder(os.path.join(root, "data"), train=32, test=8)
    workdir = os.path.join(root, arch)
    config = tiny_config(
        data_dir,
        model=arch,
        cprate=cprate,
        batch_size=8,
        num_epochs=2,
        steps_per_epoch=2,
        log_every_steps=1,
        checkpoint_every_steps=0,
        learning_rate=0.002,  # small: at 0.01-0.1 rounding flips max-pool ties by step 3
    )
    train.train_and_evaluate(config, workdir)
    losses = [
        v for _, v in sorted(read_scalars(os.path.join(workdir, "tensorboard"))["train/loss"])
    ]
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    state = mngr.restore(
        mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    digest = hashlib.sha256()
    norm = 0.0
    for path, leaf in sorted(
        (jax.tree_util.keystr(p), np.asarray(x))
        for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    ):
        digest.update(path.encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
        norm += float(np.sum(leaf.astype(np.float64) ** 2))
    kept = {
        jax.tree_util.keystr(p[:-1]): np.asarray(x).tolist()
        for p, x in jax.tree_util.tree_flatten_with_path(state["fusion"])[0]
        if jax.tree_util.keystr(p[-1:]) == "['kept']"
    }
    return {
        "losses": losses,
        "params_sha256": digest.hexdigest(),
        "params_norm": norm**0.5,
        "kept": kept,
    }


def golden_path(arch: str) -> str:
    return os.path.join(GOLDEN_DIR, f"{arch}.json")


def load_golden(arch: str) -> dict:
    """{fingerprint: run} recorded for one architecture (one file each: xdist-safe writes)."""
    if not os.path.exists(golden_path(arch)):
        return {}
    with open(golden_path(arch)) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(RUNS))
def test_fixed_seed_run_matches_golden(arch, tmp_path):
    got = golden_run(arch, RUNS[arch], str(tmp_path))
    assert len(got["losses"]) == 4 and len(set(got["losses"])) > 1
    golden = load_golden(arch)
    here = fingerprint()
    if os.environ.get("DCFF_RECORD_GOLDEN"):
        golden[here] = got
        with open(golden_path(arch), "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
        return
    if here in golden:
        want = golden[here]
        assert got["losses"] == want["losses"]
        assert got["kept"] == want["kept"]
        assert got["params_sha256"] == want["params_sha256"]
        return
    assert golden, f"no golden run recorded for {arch}; record one with DCFF_RECORD_GOLDEN=1"
    # Another machine: the same run's structure (see the module docstring).
    want = next(iter(golden.values()))
    assert {k: len(v) for k, v in got["kept"].items()} == {
        k: len(v) for k, v in want["kept"].items()
    }
    assert all(np.isfinite(got["losses"])) and np.isfinite(got["params_norm"])
