"""What users hold from before the layout refactor (issue 24) still loads: fixtures written by
tests/make_legacy_fixtures.py at the commit before it (see that script), never rewritten."""

from __future__ import annotations

import json
import os
import shutil

import flax_user_models as user
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from make_legacy_fixtures import (
    EXPORT_CPRATE,
    LEGACY,
    abstract_tree,
    train_state_tree,
    user_images,
)

import dcff_jax
from dcff_jax import any_model, export, input_pipeline

U32 = float(np.finfo(np.float32).eps) / 2


def legacy_trees() -> dict[str, dict[str, list]]:
    with open(os.path.join(LEGACY, "train_states.json")) as f:
        return json.load(f)["trees"]


@pytest.mark.parametrize("arch", sorted(legacy_trees()))
def test_trainer_checkpoints_from_before_restore_into_todays_state(arch):
    """A trainer checkpoint restores only into a state of the same tree: every leaf's path,
    shape and dtype of today's TrainState at the paper rates is what the old code saved."""
    assert train_state_tree(arch) == legacy_trees()[arch]


def test_a_dcff_save_from_before_loads_with_its_plan(tmp_path):
    images = user_images()
    directory = str(tmp_path / "any_model")
    shutil.copytree(os.path.join(LEGACY, "any_model"), directory)
    kwargs = {"apply_kwargs": {"train": False}}
    loaded, variables = any_model.DCFF.load(directory, user.ResNet(), images[:1], **kwargs)
    assert loaded.plan == any_model.DCFF(user.ResNet(), images[:1], 0.5, **kwargs).plan
    fresh = loaded.fused().init(jax.random.key(0), images[:1], train=False)
    assert abstract_tree(variables) == abstract_tree(fresh)
    # The saved fusion state is the one update (epoch 0 of 3) made before saving, not the
    # initial state (zero scores): its matrices' rows are softmax proxies (each sums to 1).
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["fusion"])[0]:
        if path[-1].key == "scores":
            assert bool(jnp.any(leaf != 0)), path
        elif path[-1].key == "matrix":
            np.testing.assert_allclose(np.sum(leaf, axis=1), 1.0, rtol=1e-5)
    logits = loaded.fused().apply(variables, images, train=False)
    assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
    compact, compact_variables = loaded.compact(variables)
    np.testing.assert_allclose(
        compact.apply(compact_variables, images, train=False),
        logits,
        atol=2**15 * U32 * float(jnp.max(jnp.abs(logits))),
    )


def test_a_compact_export_from_before_loads_and_gives_its_logits(tmp_path):
    """The v1 export (orbax variables, metadata, StableHLO) loads through today's readers and
    gives the logits the old fused model gave: within 2^15 u of the largest logit, twice the
    float32-vs-float64 budget of test_export (the two machines' float32 runs each within it)."""
    directory = str(tmp_path / "export")
    shutil.copytree(os.path.join(LEGACY, "export"), directory)
    saved = np.load(os.path.join(directory, "logits.npz"))
    images, want = saved["images"], saved["logits"]
    bound = 2**15 * U32 * float(np.max(np.abs(want)))

    model, variables, metadata = dcff_jax.load_compact(directory)
    assert (metadata["architecture"], metadata["cprate"]) == ("resnet56", EXPORT_CPRATE)
    mean, std = input_pipeline.normalization(metadata["dataset"])
    x = input_pipeline.normalize(jnp.asarray(images), mean, std)
    np.testing.assert_allclose(model.apply(variables, x, train=False), want, atol=bound)

    exported, _ = export.load_stablehlo(os.path.join(directory, "v1", export.STABLEHLO))
    np.testing.assert_allclose(exported.call(jnp.asarray(images)), want, atol=bound)
