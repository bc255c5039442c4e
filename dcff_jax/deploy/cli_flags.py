"""The flags the deployment commands share (dcff_jax.export_onnx, dcff_jax.export_stablehlo):
the compact export they read and the channel padding of the file they write."""

from __future__ import annotations

from absl import flags

from dcff_jax import errors


def define_export_flags(why_pad: str) -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """--checkpoint (required) and --pad_channels_to, whose help says `why_pad` for this file
    format; returns their holders. Call once, at a command's import."""
    checkpoint = flags.DEFINE_string("checkpoint", None, "A compact export (WORKDIR/compact).")
    pad_to = flags.DEFINE_integer(
        "pad_channels_to",
        8,
        f"Round conv widths up to a multiple of this with zero filters ({why_pad}); 1: the "
        "plan's widths exactly.",
    )
    flags.mark_flags_as_required(["checkpoint"])
    return checkpoint, pad_to


def pad_multiple(pad_to: flags.FlagHolder) -> int:
    """--pad_channels_to's value, refused in one line below 1."""
    if pad_to.value < 1:
        raise errors.ConfigError(f"--pad_channels_to must be >= 1, got {pad_to.value}")
    return pad_to.value
