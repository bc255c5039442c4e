"""Import a published DCFF compact checkpoint (a torch state dict) as our compact export.

  python -m dcff_jax.import_torch --config=configs/resnet56_cifar.py \\
      --state_dict=model_best_compact.pt --out=DIR/compact [--config.cprate=...]

The config names the architecture, the plan the checkpoint was trained with (the published
rate string), the dataset and image size; the result is read by `load_compact` and `evaluate`
like any export of ours. torch is not needed, and nothing in the file is run (see
dcff_jax.deploy.torch_import).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dcff_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment config of the checkpoint's model.", lock_config=True
)
_STATE_DICT = flags.DEFINE_string("state_dict", None, "The torch checkpoint (a state dict).")
_OUT = flags.DEFINE_string("out", None, "Where the compact export goes (e.g. DIR/compact).")
flags.mark_flags_as_required(["config", "state_dict", "out"])


def main(argv):
    errors.no_positional_arguments(argv)
    from dcff_jax import models
    from dcff_jax.config import validate_config
    from dcff_jax.deploy import compact, torch_import

    config = _CONFIG.value
    validate_config(config)
    model = models.create_model(
        config.model, config.cprate or None, "compact", num_classes=config.num_classes
    )
    state = torch_import.read_state_dict(_STATE_DICT.value)
    variables = torch_import.variables_from_torch(model, state, config.image_size)
    record = {"epoch": None, "test_top1": None, "test_top5": None}
    metadata = compact.metadata_of(config, record) | {"imported_from": _STATE_DICT.value}
    compact.write_export(_OUT.value, variables, metadata, model)
    logging.info("imported %s into %s", _STATE_DICT.value, _OUT.value)
    print(_OUT.value)


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
