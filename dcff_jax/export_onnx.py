"""Write the ONNX file of a compact export (needs the extra: pip install 'dcff-jax[onnx]').

  python -m dcff_jax.export_onnx --checkpoint=WORKDIR/compact

Prints the written path (WORKDIR/compact/vN/model.onnx) as the last line. The file takes uint8
NHWC images of any batch size ("images") and gives float32 logits ("logits"), with the weights
and the normalisation inside; run it with onnxruntime, or with dcff_jax.evaluate.
"""

from absl import app, flags

from dcff_jax import errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A compact export (WORKDIR/compact).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    errors.no_positional_arguments(argv)
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise errors.ConfigError(
            "ONNX export needs the onnx package: pip install 'dcff-jax[onnx]'"
        ) from None
    from dcff_jax import onnx_export

    print(onnx_export.write_onnx(_CHECKPOINT.value))


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
