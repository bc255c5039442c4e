"""Write tests/fixtures/legacy/: what users hold from before the package's layout refactor
(issue 24), for tests/test_legacy.py to load with today's code.

    python tests/make_legacy_fixtures.py

Run once, at commit "legacy fixtures" (before the refactor), and never again: the point of the
files is that they were written by the old code. They hold:
- train_states.json: every architecture's trainer checkpoint tree at its paper rates (each
  leaf's path, shape and dtype): a checkpoint restores only into the same tree;
- any_model/: DCFF.save of a small user ResNet (its plan.json and orbax checkpoint) after one
  fusion update (epoch 0 of 3: T = 1, soft fusion; later epochs of so short a schedule freeze);
- export/: a ResNet-56 compact export (v1: LATEST, metadata.json, variables, model.stablehlo)
  at rates 0.9 after the same fusion update, and logits.npz: 4 fixed uint8 images and the fused
  model's eval-mode logits on them (normalised as in training).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flax_user_models as user  # noqa: E402
from helpers import paper_config, tiny_config  # noqa: E402

import dcff_jax  # noqa: E402
from dcff_jax import auto, export, input_pipeline, models  # noqa: E402
from dcff_jax.method import fusion
from dcff_jax.training import optim, steps

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy")
EXPORT_CPRATE = "[0.9]*27+[0.9]*3"


def abstract_tree(tree) -> dict[str, list]:
    """{keystr path: [shape, dtype]} of every leaf."""
    return {
        jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def train_state_tree(arch: str) -> dict[str, list]:
    """The abstract TrainState the trainer checkpoints for an architecture at its paper rates."""
    config = paper_config(arch)
    model = models.create_model(arch, config.cprate, "fused")
    tx = optim.make_optimizer(config, 10)
    size = models.input_shape(arch)[1]
    state = jax.eval_shape(
        lambda: steps.create_train_state(model, tx, size, config.seed, steps.make_mesh())
    )
    return abstract_tree(state)


def user_images() -> jax.Array:
    return jax.random.normal(jax.random.key(1), (4, 32, 32, 3))


def write_any_model(directory: str) -> None:
    images = user_images()
    dcff = auto.DCFF(user.ResNet(), images[:1], 0.5, apply_kwargs={"train": False})
    variables = dcff.fused().init(jax.random.key(0), images[:1], train=False)
    new_fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], 0, 3)
    dcff.save(directory, {**variables, "fusion": new_fusion})


def write_export(directory: str) -> None:
    config = tiny_config("", model="resnet56", cprate=EXPORT_CPRATE)
    model = models.create_model("resnet56", EXPORT_CPRATE, "fused")
    state = steps.create_train_state(
        model, optim.make_optimizer(config, 10), 32, 0, steps.make_mesh()
    )
    new_fusion, _ = fusion.update_fusion(state.params, state.fusion, 0, 3)
    variables = {"params": state.params, "batch_stats": state.batch_stats, "fusion": new_fusion}
    export.save_compact(
        directory, variables, config, {"epoch": 0, "test_top1": 10.0, "test_top5": 50.0}
    )
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    mean, std = input_pipeline.normalization(config.dataset)
    x = input_pipeline.normalize(jnp.asarray(images), mean, std)
    logits = model.apply(variables, x, train=False)
    np.savez(os.path.join(directory, "logits.npz"), images=images, logits=np.asarray(logits))


def main() -> None:
    if os.path.exists(LEGACY):
        shutil.rmtree(LEGACY)
    os.makedirs(LEGACY)
    trees = {arch: train_state_tree(arch) for arch in sorted(models.ARCHITECTURES)}
    with open(os.path.join(LEGACY, "train_states.json"), "w") as f:
        json.dump({"jax": jax.__version__, "trees": trees}, f, indent=0, sort_keys=True)
    write_any_model(os.path.join(LEGACY, "any_model"))
    write_export(os.path.join(LEGACY, "export"))


if __name__ == "__main__":
    main()
