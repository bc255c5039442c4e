"""Fused -> compact: turn a trained fused model's variables into the compact model's variables.

The compact model is the same definition built with plain convs at the kept widths (same module
names), so the mapping is per layer: every FusedConv's kernel becomes its fused kernel F @ W (and
its bias F @ b); everything else (batch norm, dense, plain convs) is copied as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util
from flax.core import unfreeze

from dcff_jax.errors import DataError, MissingFileError
from dcff_jax.fusion import FUSION_COLLECTION, fuse_kernel


def compact_variables(fused_variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of the compact model whose eval-mode logits equal the fused model's.

    Args:
      fused_variables: {"params": ..., "fusion": ..., and e.g. "batch_stats": ...} of a model
        built with FusedConv layers (a dcff_jax model's "fused" variant or your own).

    Returns:
      The same collections without "fusion"; each fused layer's "kernel" (kh, kw, c_in, c) is now
      (kh, kw, c_in, m) and its "bias" (c,) is (m,).
    """
    if FUSION_COLLECTION not in fused_variables:
        raise ValueError(
            f"no {FUSION_COLLECTION!r} collection in the variables "
            f"(found {sorted(fused_variables)}): "
            "pass the variables of a fused model"
        )
    flat_params = traverse_util.flatten_dict(unfreeze(fused_variables["params"]))
    flat_fusion = traverse_util.flatten_dict(unfreeze(fused_variables[FUSION_COLLECTION]))
    for path, matrix in flat_fusion.items():
        if path[-1] != "matrix":
            continue
        layer = path[:-1]
        for name in ("kernel", "bias"):
            if layer + (name,) in flat_params:
                flat_params[layer + (name,)] = fuse_kernel(flat_params[layer + (name,)], matrix)
    out = {k: v for k, v in fused_variables.items() if k not in ("params", FUSION_COLLECTION)}
    out["params"] = traverse_util.unflatten_dict(flat_params)
    return out


def save_compact(directory: str, state, config, record: dict) -> None:
    """Write the compact model of a fused train state to `directory` (orbax + metadata.json).

    The new export is written beside the old one and swapped in by renames, so a finished export
    is never lost to an interruption. With several processes every one must call it (the orbax
    save is collective); process 0 writes the metadata and swaps.
    """
    import json
    import os
    import shutil

    import jax
    import orbax.checkpoint as ocp

    from dcff_jax import checkpoints, flops, models

    variables = compact_variables(
        {"params": state.params, "batch_stats": state.batch_stats, "fusion": state.fusion}
    )
    variables = jax.device_get(variables)
    counts = flops.model_counts(config.model, config.cprate or None)
    metadata = {
        "architecture": config.model,
        "cprate": config.cprate,
        "widths": [
            layer.kept for layer in models.fused_layers(config.model, config.cprate or None)
        ],
        "num_classes": config.num_classes,
        "image_size": config.image_size,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "epoch": record["epoch"],
        "test_top1": record["test_top1"],
        "test_top5": record["test_top5"],
        **counts,
        "config": config.to_dict(),
    }
    directory = os.path.abspath(directory)
    staging, old = directory + ".new", directory + ".old"
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
    checkpoints.barrier("dcff_export_staging_clean")
    # Collective: every process calls it (orbax synchronises them); the primary writes.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(staging, "variables"), variables)
        checkpointer.wait_until_finished()
    if primary:
        with open(os.path.join(staging, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=2, default=str)
        if os.path.exists(directory):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    checkpoints.barrier("dcff_export_swapped")


def load_compact(directory: str):
    """(model, variables, metadata) of an exported compact model, ready for model.apply.

    Usage from other JAX code:
        model, variables, meta = dcff_jax.load_compact("WORKDIR/compact")
        logits = model.apply(variables, images, train=False)   # images NHWC, normalised
    """
    import json
    import os

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dcff_jax import models

    path = os.path.abspath(directory)
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path) and os.path.isfile(
        os.path.join(path + ".old", "metadata.json")
    ):
        path = path + ".old"  # an interrupted swap: the previous export is intact
        meta_path = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta_path):
        raise MissingFileError(
            f"{directory} is not a compact export: no metadata.json (expected WORKDIR/compact)"
        )
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
        model = models.create_model(
            metadata["architecture"],
            metadata["cprate"] or None,
            "compact",
            num_classes=metadata["num_classes"],
        )
        size = metadata["image_size"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{meta_path} is truncated or not a dcff-jax export's metadata "
            f"({type(e).__name__}: {e}); re-export the model or restore the file"
        ) from e
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(os.path.join(path, "variables"), abstract)
    except Exception as e:
        raise DataError(
            f"the compact export in {path} is corrupt or unreadable ({type(e).__name__}: {e})"
        ) from e
    return model, variables, metadata
