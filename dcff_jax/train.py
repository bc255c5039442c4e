"""The loop's former module name, kept so that `dcff_jax.train.train_and_evaluate` keeps
working: it lives in dcff_jax.training.train."""

from dcff_jax.training.train import train_and_evaluate  # noqa: F401
