"""The shared defaults (dcff_jax/config.py), as a config file: `--config=configs/default.py`."""

from dcff_jax.config import default_config


def get_config():
    return default_config()
