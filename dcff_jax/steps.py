"""The steps' former module name, kept so that `from dcff_jax import steps` (the README's
custom-loop example) keeps working: it lives in dcff_jax.training.steps."""

from dcff_jax.training.steps import *  # noqa: F403
