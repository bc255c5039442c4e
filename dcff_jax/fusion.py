"""The former module name of dcff_jax.method.fusion, kept so that `dcff_jax.fusion.NAME` keeps
working."""

from dcff_jax.method.fusion import *  # noqa: F403
