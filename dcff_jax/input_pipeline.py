"""The data modules' former single module, kept so that `dcff_jax.input_pipeline.normalize`
and the other names it had keep working: everything lives in dcff_jax.data."""

from dcff_jax.data import *  # noqa: F403
from dcff_jax.data import __all__  # noqa: F401
