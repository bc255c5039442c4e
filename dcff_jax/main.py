"""Train a DCFF model: python -m dcff_jax.main --config=configs/vgg16_cifar.py --workdir=DIR

Override any field: --config.num_epochs=1 --config.steps_per_epoch=20. A second run on the same
workdir resumes where the first stopped.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dcff_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the compact model go.")
_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "Where compiled steps are kept for the next start (a resume loads them instead of compiling "
    "again): a directory, 'auto' ($XDG_CACHE_HOME/dcff_jax/xla or ~/.cache/dcff_jax/xla) or '' "
    "(off). JAX_COMPILATION_CACHE_DIR, when set, wins.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    errors.no_positional_arguments(argv)
    config = errors.loaded_config(_CONFIG.value)
    if not _WORKDIR.value:
        raise errors.ConfigError("--workdir is empty; give the run's directory, --workdir=DIR")
    import jax

    if config.distributed:
        kwargs = {"heartbeat_timeout_seconds": config.heartbeat_timeout_s}
        if config.coordinator_address:
            kwargs.update(
                coordinator_address=config.coordinator_address,
                num_processes=config.num_processes,
                process_id=config.process_id,
            )
        jax.distributed.initialize(**kwargs)
    from dcff_jax import xla_options
    from dcff_jax.training import preemption, train

    xla_options.enable_compilation_cache(_CACHE.value)

    logging.info(
        "JAX process %d/%d, %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    stop = preemption.StopRequest().install()
    try:
        train.train_and_evaluate(config, _WORKDIR.value, stop)
    except train.Stopped as stopped:
        logging.warning("%s", stopped)
        logging.flush()
        stop.uninstall()
        sys.exit(preemption.EXIT_STOPPED)
    except Exception as error:
        full = errors.disk_full(error)
        if full is not None:
            _exit_disk_full(*full, train.last_checkpoint(_WORKDIR.value))
        if (
            not isinstance(error, jax.errors.JaxRuntimeError)
            or jax.process_count() == 1
            or not _lost_a_peer(error)
        ):
            raise
        logging.error(
            "process %d: a collective failed because another process died or was preempted "
            "(%s). Restart every process with the same command: the run resumes from its last "
            "checkpoint in %s/checkpoints.",
            jax.process_index(),
            str(error).splitlines()[0][:200],
            _WORKDIR.value,
        )
        logging.flush()
        # Skip jax.distributed's shutdown barrier: the dead process can never reach it, and
        # waiting would end in an abort after shutdown_timeout.
        os._exit(preemption.EXIT_STOPPED)


def _exit_disk_full(path: str, what: str, last_checkpoint: str) -> None:
    print(
        f"error: could not write {path}: {what}. Free space and run the same command again; "
        f"{last_checkpoint}",
        file=sys.stderr,
        flush=True,
    )
    logging.flush()
    # Orbax's writer threads still hold the failed save; an orderly interpreter exit would print
    # their teardown errors. Nothing else is pending: finished checkpoints are already committed.
    os._exit(errors.EXIT_USER_ERROR)


_PEER_LOST_SIGNS = ("Connection reset", "Connection refused", "Gloo", "UNAVAILABLE", "DEADLINE")


def _lost_a_peer(error: Exception) -> bool:
    """Whether a runtime error is a collective that lost another process (not a bug here)."""
    return any(sign in str(error) for sign in _PEER_LOST_SIGNS)


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
