"""Fused -> compact: turn a trained fused model's variables into the compact model's variables.

The compact model is the same definition with plain convs at the kept widths (same module names:
DCFF's compact rewrite, or a prunable_conv model's "compact" variant), so the mapping is per
layer: every fused conv's kernel becomes its fused kernel F @ W (and its bias F @ b); everything
else (batch norm, dense, plain convs) is copied as is.
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


# The compact export's layout: DIRECTORY/LATEST names the current version, DIRECTORY/v<N>/ holds
# it (variables/ and metadata.json). LATEST is written last, in one write, so a reader never
# sees a half-written version, on a local disk or on an object store without atomic renames.
POINTER = "LATEST"
KEEP_VERSIONS = 2  # the current one and the one before (a reader may be loading it)


def save_compact(directory: str, variables: Mapping[str, Any], config, record: dict) -> None:
    """Write the compact model of a fused model's variables ({"params", "batch_stats",
    "fusion"}, e.g. steps.model_variables(state)) as a new version under `directory`.

    The version is complete (orbax variables + metadata.json) before the pointer names it, so
    an interruption at any point leaves the previous export loadable. With several processes
    every one must call it (the orbax save is collective); process 0 writes the metadata and the
    pointer.
    """
    import jax

    variables = jax.device_get(compact_variables(variables))
    from dcff_jax import models

    model = models.create_model(
        config.model, config.cprate or None, "compact", num_classes=config.num_classes
    )
    write_export(directory, variables, metadata_of(config, record), model)


def write_export(directory: str, variables, metadata: dict, model=None) -> None:
    """Write compact `variables` (host arrays) and `metadata` as the next version under
    `directory`, then point LATEST at it (see save_compact; collective with several processes).
    With the compact `model`, process 0 also writes its StableHLO (model.stablehlo) there, from
    the host arrays (no collective; lowering takes well under a second)."""
    import json

    import jax
    import orbax.checkpoint as ocp

    from dcff_jax import checkpoints, storage
    from dcff_jax.data import sources

    root = storage.resolve(directory)
    current = _current_version(root)
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
            metadata = with_digest(metadata, STABLEHLO, module)
            metadata["stablehlo_channels_padded_to"] = STABLEHLO_PAD_TO
        (root / version / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
        storage.write_text_atomic(root / POINTER, version + "\n")
        _remove_old_versions(root, keep=version)
    checkpoints.barrier("dcff_export_published")


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


_METADATA_REMEDY = "restore the file or export the model again"
# metadata.json's fields that readers use: (type, lowest, highest) for numbers.
_METADATA_FIELDS = {
    "architecture": (str, None, None),
    "cprate": (str, None, None),  # or null
    "num_classes": (int, 1, 1 << 20),
    "image_size": (int, 1, 1 << 14),
    "dataset": (str, None, None),
}


def read_metadata(path) -> dict:
    """An export's metadata.json, with the fields readers use checked (types, ranges).

    Raises:
      MissingFileError: no such file.
      DataError: not a JSON object, or a field missing or out of range."""
    from dcff_jax import storage
    from dcff_jax.errors import expect

    metadata = storage.read_json_object(path, "a dcff-jax export's metadata", _METADATA_REMEDY)
    for key, (kind, low, high) in _METADATA_FIELDS.items():
        if key == "cprate" and metadata.get(key) is None:
            continue
        try:
            expect(metadata.get(key), kind, key, low, high)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: {e}; {_METADATA_REMEDY}") from e
    return metadata


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
        raise DataError(f"{path} describes no model we can build ({e}); {_METADATA_REMEDY}") from e


def _current_version(root) -> str | None:
    """The version LATEST names ('v3'), or None before the first export."""
    pointer = root / POINTER
    if not pointer.exists():
        return None
    version = pointer.read_text().strip()
    if not (version.startswith("v") and version[1:].isdigit()):
        raise DataError(f"{pointer} names {version!r}, not an export version (v1, v2, ...)")
    return version


def _remove_old_versions(root, keep: str) -> None:
    versions = sorted(
        (int(p.name[1:]) for p in root.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()),
        reverse=True,
    )
    for number in versions:
        if number <= int(keep[1:]) - KEEP_VERSIONS:
            (root / f"v{number}").rmtree()


def load_compact(directory: str):
    """(model, variables, metadata) of an exported compact model, ready for model.apply.

    Usage from other JAX code:
        model, variables, meta = dcff_jax.load_compact("WORKDIR/compact")
        logits = model.apply(variables, images, train=False)   # images NHWC, normalised
    """

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dcff_jax import storage

    path = _export_version(storage.resolve(directory), directory)
    metadata = read_metadata(path / "metadata.json")
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


STABLEHLO = "model.stablehlo"
# Lowered for each, so that one file runs wherever jax does (selected at call time).
STABLEHLO_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


# Conv widths of the StableHLO export are rounded up to a multiple of this by zero filters, and
# its depthwise convs run as shifted multiply-adds on CPU (channel_padding): the same logits,
# and XLA:CPU runs the plan's odd widths and depthwise convs far slower (experiments/RESULTS.md:
# ResNet-110's compact model at batch 1, 3.6 -> 2.0 ms; MobileNetV2's at 16, 471 -> 70 ms).
STABLEHLO_PAD_TO = 8


def stablehlo_bytes(
    model, variables, image_size: int, mean, std, pad_to: int = STABLEHLO_PAD_TO
) -> bytes:
    """The compact model as serialized StableHLO (`jax.export`): images uint8 (b, image_size,
    image_size, 3) NHWC, any batch b -> logits float32 (b, classes), eval mode, with the
    variables and the normalisation ((x / 255 - mean) / std) inside, conv widths padded to a
    multiple of `pad_to` and depthwise convs as shifted multiply-adds on CPU (1: the plain
    model; see channel_padding).

    Load it with jax alone (no dcff_jax, no flax):
        exported = jax.export.deserialize(open(path, "rb").read())
        logits = exported.call(images)
    """
    import jax.numpy as jnp

    from dcff_jax.data import transforms

    def logits(images):
        x = transforms.normalize(images, mean, std, jnp.float32)
        return model.apply(variables, x, train=False).astype(jnp.float32)

    return batch_polymorphic_stablehlo(logits, (image_size, image_size, 3), jnp.uint8, pad_to)


def batch_polymorphic_stablehlo(fn, example_shape, dtype, pad_to: int = STABLEHLO_PAD_TO) -> bytes:
    """fn (a batch of inputs of example_shape -> outputs) as serialized StableHLO for any batch
    size, lowered for every STABLEHLO_PLATFORMS, rewritten by channel_padding.pad_channels
    with `pad_to` (1: as it is)."""
    import jax

    from dcff_jax.channel_padding import pad_channels

    if pad_to > 1:
        fn = pad_channels(fn, pad_to)
    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *example_shape), dtype)
    return jax.export.export(jax.jit(fn), platforms=STABLEHLO_PLATFORMS)(spec).serialize()


def write_stablehlo(directory: str, pad_to: int = STABLEHLO_PAD_TO) -> str:
    """Write `model.stablehlo` (see stablehlo_bytes) into the current export version under
    `directory` (WORKDIR/compact), and its padding into metadata.json; returns its path,
    written atomically. Exports have it from the start; this is for older ones, to re-lower
    for a newer jax, or to choose the padding. One process only (it reads the export with
    orbax)."""

    from dcff_jax.data import sources

    model, variables, metadata = load_compact(directory)
    mean, std = sources.normalization(metadata["dataset"])
    data = stablehlo_bytes(model, variables, metadata["image_size"], mean, std, pad_to)
    version = current_version_dir(directory)
    metadata = with_digest(metadata, STABLEHLO, data)
    metadata["stablehlo_channels_padded_to"] = pad_to
    write_beside_metadata(version, STABLEHLO, data, metadata)
    return str(version / STABLEHLO)


def load_stablehlo(path: str):
    """(exported, metadata) of a `model.stablehlo` file and the metadata.json beside it,
    its SHA-256 checked (read_verified) before jax parses it."""
    import jax

    data, metadata = read_verified(path)
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:
        raise DataError(
            f"{path} is not a readable StableHLO export ({type(e).__name__}: {e})"
        ) from e
    return exported, metadata


# metadata.json's {file name: SHA-256 hex} of the files native parsers read (StableHLO, ONNX):
# a damaged file must be refused before it reaches C++ code that Python cannot catch.
DIGESTS = "sha256"


def with_digest(metadata: dict, name: str, data: bytes) -> dict:
    """A copy of `metadata` recording data's SHA-256 as the digest of file `name`."""
    import hashlib

    digests = metadata.get(DIGESTS)
    digests = dict(digests) if isinstance(digests, dict) else {}
    return {**metadata, DIGESTS: {**digests, name: hashlib.sha256(data).hexdigest()}}


def write_beside_metadata(version, name: str, data: bytes, metadata: dict) -> None:
    """Write version/name, then version/metadata.json recording its digest, each atomically.
    Interrupted between the two, the file and its digest disagree and readers refuse it with
    a line that says to write it again."""
    import json

    from dcff_jax import storage

    storage.write_text_atomic(version / name, data)
    storage.write_text_atomic(
        version / "metadata.json", json.dumps(metadata, indent=2, default=str)
    )


def read_verified(path: str) -> tuple[bytes, dict]:
    """(bytes, metadata) of an export's file and the metadata.json beside it (read_metadata),
    refused with DataError unless metadata.json records the file's SHA-256 and the bytes match
    it; MissingFileError if either file is missing."""
    import hashlib

    from etils import epath

    file = epath.Path(path)
    meta_path = file.parent / "metadata.json"
    try:
        data = file.read_bytes()
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist") from e
    metadata = read_metadata(meta_path)
    digests = metadata.get(DIGESTS)
    expected = digests.get(file.name) if isinstance(digests, dict) else None
    rewrite = (
        "python -m dcff_jax.export_onnx"
        if file.name.endswith(".onnx")
        else "python -m dcff_jax.export_stablehlo"
    ) + f" --checkpoint={file.parent.parent}"
    if expected is None:
        raise DataError(
            f"{meta_path} records no SHA-256 for {file.name} (written before dcff-jax checked "
            f"them, or edited): write the file again with {rewrite}"
        )
    if hashlib.sha256(data).hexdigest() != expected:
        raise DataError(
            f"{path} does not match the SHA-256 in {meta_path}: it was damaged or changed "
            f"after it was written; write it again with {rewrite}"
        )
    return data, metadata


def current_version_dir(directory: str):
    """The epath of the current export version under `directory` (WORKDIR/compact)."""
    from dcff_jax import storage

    return _export_version(storage.resolve(directory), directory)


def _export_version(root, given: str):
    """The directory holding the current export under `root`: the version LATEST names, or
    root itself for an export written before versions (metadata.json directly inside)."""
    version = _current_version(root)
    if version is not None:
        return root / version
    if (root / "metadata.json").exists():
        return root
    raise MissingFileError(
        f"{given} is not a compact export: no {POINTER} or metadata.json (expected WORKDIR/compact)"
    )
