"""The linen rewrite: the user's Module wrapped, each fused conv applied with its fused kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dcff_jax.any_model.tracing import key_name, narrowed_leaves
from dcff_jax.errors import ConfigError
from dcff_jax.method import layers

# --- linen ------------------------------------------------------------------------------------


def _kernel_size(module: nn.Conv) -> tuple[int, ...]:
    k = module.kernel_size
    return (k,) if isinstance(k, int) else tuple(k)


def _conv_with(module: nn.Conv, x, features: int, groups: int, matrix_width: int | None):
    """module's conv on x with `features` outputs and `groups` groups; with matrix_width c its
    params hold c filters and the conv uses their fusion (FusedConv's math)."""
    stored = matrix_width or features
    shape = (*_kernel_size(module), x.shape[-1] // groups, stored)
    params = {"kernel": module.param("kernel", module.kernel_init, shape, module.param_dtype)}
    # The fusion state after the kernel and before the bias, in FusedConv's order: the same
    # values either way, but then a traced model's init is the hand-written model's program
    # (one compile, not two, where both are built).
    matrix = layers.fusion_state(module, matrix_width, features) if matrix_width else None
    if module.use_bias:
        params["bias"] = module.param("bias", module.bias_init, (stored,), module.param_dtype)
    if matrix_width:
        params = {k: layers.fused_param(v, matrix) for k, v in params.items()}
    plain = module.clone(parent=None, name=None, features=features, feature_group_count=groups)
    return plain.apply({"params": params}, x)


class FusedLinen(nn.Module):
    """A linen model with its planned convs rewritten (same variable paths as the model).

    layers: ((path, output width, stored filters or 0, follower 1 or 0), ...): a conv at `path`
    gets that output width; with stored filters c it keeps c filters and fuses them (the fused
    variant), with 0 it is a plain conv at that width (the compact variant). A follower is a
    depthwise conv: its groups and outputs become its input width.
    """

    model: nn.Module
    layers: tuple[tuple[str, int, int, int], ...]

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, **kwargs):
        layers = {path: rest for path, *rest in self.layers}

        def rewrite(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, nn.Conv):
                return next_fun(*call_args, **call_kwargs)
            path = "/".join(module.scope.path) if module.scope else ""
            if path not in layers or not call_args:
                return next_fun(*call_args, **call_kwargs)
            width, stored, follower = layers[path]
            x = call_args[0]
            if follower:
                return _conv_with(module, x, x.shape[-1], x.shape[-1], None)
            return _conv_with(module, x, width, module.feature_group_count, stored or None)

        with nn.intercept_methods(rewrite):
            return self.model(*args, **kwargs)


def fused_variables(dcff, variables, key: jax.Array | None = None):
    """DCFF.fused_variables."""
    if dcff.is_nnx:
        raise TypeError("fused_variables is for linen models; nnx's fused() copies values")
    flat, _ = jax.tree_util.tree_flatten_with_path(variables)
    paths = [tuple(key_name(k) for k in path) for path, _ in flat]
    shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
    if paths != dcff._traced.leaf_paths or shapes != dcff._traced.leaf_shapes:
        raise ConfigError(
            "fused_variables: these variables are not the model's that DCFF traced (other "
            "paths or shapes): pass model.init(...)'s or a checkpoint of the same model"
        )
    leaves = narrowed_leaves(dcff.plan, dcff._traced, [x for _, x in flat], False)
    narrowed = dict(zip(paths, leaves, strict=True))
    example = jnp.zeros(dcff._example.shape, dcff._example.dtype)
    key = jax.random.key(0) if key is None else key
    fresh = dcff.fused().init(key, example, **dcff.apply_kwargs)

    def pick(path, leaf):
        return narrowed.get(tuple(key_name(k) for k in path), leaf)

    return jax.tree_util.tree_map_with_path(pick, fresh)
