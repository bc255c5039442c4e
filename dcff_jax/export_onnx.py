"""Write the ONNX file of a compact export (needs the extra: pip install 'dcff-jax[onnx]').

  python -m dcff_jax.export_onnx --checkpoint=WORKDIR/compact

Prints the MACs per image (the plan's widths, and padded) and, as the last line, the written
path (WORKDIR/compact/vN/model.onnx). The file takes uint8
NHWC images of any batch size ("images") and gives float32 logits ("logits"), with the weights
and the normalisation inside; run it with onnxruntime, or with dcff_jax.evaluate.
"""

from absl import app, flags

from dcff_jax import errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A compact export (WORKDIR/compact).")
_PAD_TO = flags.DEFINE_integer(
    "pad_channels_to",
    8,
    "Round conv widths up to a multiple of this with zero filters (onnxruntime's fast CPU convs "
    "want multiples of 8, or 16 on AVX-512); 1: the plan's widths exactly.",
)
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    errors.no_positional_arguments(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise errors.ConfigError(
            "ONNX export needs the onnx package: pip install 'dcff-jax[onnx]'"
        ) from None
    if _PAD_TO.value < 1:
        raise errors.ConfigError(f"--pad_channels_to must be >= 1, got {_PAD_TO.value}")
    from dcff_jax.deploy import onnx_file

    path = onnx_file.write_onnx(_CHECKPOINT.value, _PAD_TO.value)
    print(onnx_file.describe(path))
    print(path)


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
