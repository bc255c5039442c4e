"""The any-model API's former module name, kept so that `from dcff_jax import auto` and
`dcff_jax.auto.DCFF` keep working: everything lives in dcff_jax.any_model."""

from dcff_jax.any_model import *  # noqa: F403
from dcff_jax.any_model import __all__  # noqa: F401
