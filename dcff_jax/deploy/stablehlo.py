"""The compact model as one StableHLO file (jax.export): any batch size, every platform, its
conv widths padded (dcff_jax.deploy.channel_padding); loadable with jax alone."""

from __future__ import annotations

from dcff_jax.deploy.versions import (
    current_version_dir,
    read_verified,
    with_digest,
    write_beside_metadata,
)
from dcff_jax.errors import DataError

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

    from dcff_jax.deploy.channel_padding import pad_channels

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
    from dcff_jax.deploy.compact import load_compact

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
