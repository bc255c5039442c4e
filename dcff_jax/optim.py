"""The optimizer's former module name, kept so that `from dcff_jax import optim` (an earlier
README's custom-loop example) keeps working: it lives in dcff_jax.training.optim."""

from dcff_jax.training.optim import *  # noqa: F403
