"""The torch import's former module name, kept so that `dcff_jax.torch_import.read_state_dict`
and `variables_from_torch` keep working: they live in dcff_jax.deploy.torch_import."""

from dcff_jax.deploy.torch_import import read_state_dict, variables_from_torch  # noqa: F401
