"""The former module name of dcff_jax.method.rate_strings, kept so that `dcff_jax.plans.NAME`
keeps working."""

from dcff_jax.method.rate_strings import *  # noqa: F403
