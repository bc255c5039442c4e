"""Fused -> compact: the compact model's variables from a trained fused model's, and its export.

The compact model is the same definition with plain convs at the kept widths (same module names:
DCFF's compact rewrite, or a prunable_conv model's "compact" variant), so the mapping is per
layer: every fused conv's kernel becomes its fused kernel F @ W (and its bias F @ b); everything
else (batch norm, dense, plain convs) is copied as is. An export is a version under
WORKDIR/compact (dcff_jax.deploy.versions) holding the variables, metadata.json and the
StableHLO file (dcff_jax.deploy.stablehlo).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util
from flax.core import unfreeze

from dcff_jax.deploy import versions
from dcff_jax.errors import DataError
from dcff_jax.method.fusion import FUSION_COLLECTION, fuse_kernel


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
    return _compact_variables_jit(dict(fused_variables))


def _compact_variables(fused_variables: dict[str, Any]) -> dict[str, Any]:
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


# One program: eagerly, each layer's shapes compiled ops of their own (GoogLeNet's export took
# 1.61 s that way, 0.31 s jitted, the same bits).
_compact_variables_jit = jax.jit(_compact_variables)


def save_compact(directory: str, variables: Mapping[str, Any], config, record: dict):
    """Write the compact model of a fused model's variables ({"params", "batch_stats",
    "fusion"}, e.g. steps.model_variables(state)) as a new version under `directory`.

    The version is complete (orbax variables + metadata.json) before the pointer names it, so
    an interruption at any point leaves the previous export loadable. With several processes
    every one must call it (the orbax save is collective); process 0 writes the metadata and the
    pointer. Returns the version's path (DIRECTORY/vN).
    """
    variables = jax.device_get(compact_variables(variables))
    from dcff_jax import models

    model = models.create_model(
        config.model, config.cprate or None, "compact", num_classes=config.num_classes
    )
    return write_export(directory, variables, metadata_of(config, record), model)


def write_export(directory: str, variables, metadata: dict, model=None):
    """Write compact `variables` (host arrays) and `metadata` as the next version under
    `directory`, then point LATEST at it (see save_compact; collective with several processes).
    With the compact `model`, process 0 also writes its StableHLO (model.stablehlo) there, from
    the host arrays (no collective; lowering takes well under a second). Returns the version's
    path (an epath, DIRECTORY/vN)."""
    import json

    import orbax.checkpoint as ocp

    from dcff_jax import storage
    from dcff_jax.data import sources
    from dcff_jax.deploy.stablehlo import STABLEHLO, STABLEHLO_PAD_TO, stablehlo_bytes
    from dcff_jax.training import checkpoints

    root = storage.resolve(directory)
    current = versions.latest_version(root)
    version = f"v{int(current[1:]) + 1 if current else 1}"
    primary = jax.process_index() == 0
    if primary and (root / version).exists():  # left by an interrupted export: never named
        (root / version).rmtree()
    checkpoints.barrier("dcff_export_version_clean")
    # Collective: every process calls it (orbax synchronises them); the primary writes.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / version / "variables", variables)
        checkpointer.wait_until_finished()
    if primary:
        if model is not None:
            mean, std = sources.normalization(metadata["dataset"])
            module = stablehlo_bytes(model, variables, metadata["image_size"], mean, std)
            (root / version / STABLEHLO).write_bytes(module)
            metadata = versions.with_digest(metadata, STABLEHLO, module)
            metadata["stablehlo_channels_padded_to"] = STABLEHLO_PAD_TO
        (root / version / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
        storage.write_text_atomic(root / versions.POINTER, version + "\n")
        versions.remove_old_versions(root, keep=version)
    checkpoints.barrier("dcff_export_published")
    return root / version


def exported_epoch(directory: str) -> int | None:
    """The epoch (0-based) whose compact model DIRECTORY's current export holds; None before the
    first export, or when that export's pointer or metadata cannot be read (the caller then
    writes a new version)."""
    from dcff_jax import storage

    try:
        root = storage.resolve(directory)
        version = versions.latest_version(root)
        if version is None:
            return None
        return int(versions.read_metadata(root / version / "metadata.json")["epoch"])
    except (DataError, OSError):
        return None


def metadata_of(config, record: dict) -> dict:
    from dcff_jax import flops, models

    return {
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
        **flops.model_counts(config.model, config.cprate or None),
        "config": config.to_dict(),
    }


def model_of(metadata: dict, path) -> Any:
    """The compact model (a linen Module) that `metadata` (from `path`) describes; DataError
    if none can be built from it (an unknown architecture, a rate string that does not fit)."""
    from dcff_jax import models

    try:
        return models.create_model(
            metadata["architecture"],
            metadata["cprate"] or None,
            "compact",
            num_classes=metadata["num_classes"],
        )
    except ValueError as e:  # ConfigError: an unknown architecture or a bad rate string
        raise DataError(
            f"{path} describes no model we can build ({e}); {versions.METADATA_REMEDY}"
        ) from e


def load_compact(directory: str):
    """(model, variables, metadata) of an exported compact model, ready for model.apply.

    Usage from other JAX code:
        model, variables, meta = dcff_jax.load_compact("WORKDIR/compact")
        logits = model.apply(variables, images, train=False)   # images NHWC, normalised
    """

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dcff_jax import storage

    path = versions.export_version(storage.resolve(directory), directory)
    metadata = versions.read_metadata(path / "metadata.json")
    model = model_of(metadata, path / "metadata.json")
    size = metadata["image_size"]
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(path / "variables", abstract)
    except Exception as e:
        raise DataError(
            f"the compact export in {path} is corrupt or unreadable ({type(e).__name__}: {e})"
        ) from e
    return model, variables, metadata
