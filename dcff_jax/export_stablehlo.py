"""Write the StableHLO file of a compact export (every export has one from the start; this is
for exports written before that, or to re-lower for a newer jax).

  python -m dcff_jax.export_stablehlo --checkpoint=WORKDIR/compact

Prints the written path (WORKDIR/compact/vN/model.stablehlo) as the last line.
"""

from absl import app, flags

from dcff_jax import errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A compact export (WORKDIR/compact).")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    errors.no_positional_arguments(argv)
    from dcff_jax import export

    print(export.write_stablehlo(_CHECKPOINT.value))


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
