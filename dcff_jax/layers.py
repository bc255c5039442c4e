"""The former module name of dcff_jax.method.layers, kept so that `dcff_jax.layers.NAME` keeps
working."""

from dcff_jax.method.layers import *  # noqa: F403
