"""Train a DCFF model: python -m dcff_jax.main --config=configs/vgg16_cifar.py --workdir=DIR

Override any field: --config.num_epochs=1 --config.steps_per_epoch=20. A second run on the same
workdir resumes where the first stopped.
"""

import logging as pylogging

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the compact model go.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings and errors only."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    pylogging.getLogger("absl").addFilter(_QuietLibraries())
    config = _CONFIG.value
    import jax

    if config.distributed:
        kwargs = {}
        if config.coordinator_address:
            kwargs = dict(
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes,
                process_id=config.process_id,
            )
        jax.distributed.initialize(**kwargs)
    from dcff_jax import train

    logging.info(
        "JAX process %d/%d, %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
