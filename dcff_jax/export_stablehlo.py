"""Write the StableHLO file of a compact export (every export has one from the start; this is
for exports written before that, to re-lower for a newer jax, or to choose the padding).

  python -m dcff_jax.export_stablehlo --checkpoint=WORKDIR/compact [--pad_channels_to=8]

Prints the written path (WORKDIR/compact/vN/model.stablehlo) as the last line.
"""

from absl import app, flags

from dcff_jax import errors

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A compact export (WORKDIR/compact).")
_PAD_TO = flags.DEFINE_integer(
    "pad_channels_to",
    8,
    "Round conv widths up to a multiple of this with zero filters (the same logits; XLA:CPU's "
    "convs run the plan's odd widths slowly); 1: the plan's widths exactly.",
)
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
    errors.no_positional_arguments(argv)
    if _PAD_TO.value < 1:
        raise errors.ConfigError(f"--pad_channels_to must be >= 1, got {_PAD_TO.value}")
    from dcff_jax.deploy import stablehlo

    print(stablehlo.write_stablehlo(_CHECKPOINT.value, _PAD_TO.value))


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
