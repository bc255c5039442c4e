"""Write the StableHLO file of a compact export (every export has one from the start; this is
for exports written before that, to re-lower for a newer jax, or to choose the padding).

  python -m dcff_jax.export_stablehlo --checkpoint=WORKDIR/compact [--pad_channels_to=8]

Prints the written path (WORKDIR/compact/vN/model.stablehlo) as the last line.
"""

from absl import app

from dcff_jax import errors
from dcff_jax.deploy.cli_flags import define_export_flags, pad_multiple

_CHECKPOINT, _PAD_TO = define_export_flags(
    "the same logits; XLA:CPU's convs run the plan's odd widths slowly"
)


def main(argv):
    errors.no_positional_arguments(argv)
    pad_to = pad_multiple(_PAD_TO)
    from dcff_jax.deploy import stablehlo

    print(stablehlo.write_stablehlo(_CHECKPOINT.value, pad_to))


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
