"""Write the ONNX file of a compact export (needs the extra: pip install 'dcff-jax[onnx]').

  python -m dcff_jax.export_onnx --checkpoint=WORKDIR/compact

Prints the MACs per image (the plan's widths, and padded) and, as the last line, the written
path (WORKDIR/compact/vN/model.onnx). The file takes uint8
NHWC images of any batch size ("images") and gives float32 logits ("logits"), with the weights
and the normalisation inside; run it with onnxruntime, or with dcff_jax.evaluate.
"""

from absl import app

from dcff_jax import errors
from dcff_jax.deploy.cli_flags import define_export_flags, pad_multiple

_CHECKPOINT, _PAD_TO = define_export_flags(
    "onnxruntime's fast CPU convs want multiples of 8, or 16 on AVX-512"
)


def main(argv):
    errors.no_positional_arguments(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise errors.ConfigError(
            "ONNX export needs the onnx package: pip install 'dcff-jax[onnx]'"
        ) from None
    pad_to = pad_multiple(_PAD_TO)
    from dcff_jax.deploy import onnx_file

    path = onnx_file.write_onnx(_CHECKPOINT.value, pad_to)
    print(onnx_file.describe(path))
    print(path)


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
