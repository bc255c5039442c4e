"""The nnx rewrite: a resized copy of the user's model with each fused conv wrapped
(FusedConvNNX), updated in place."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Sequence

import jax

from dcff_jax.any_model.plan import Plan
from dcff_jax.any_model.tracing import Traced, narrowed_leaves
from dcff_jax.method import fusion, layers

# --- nnx --------------------------------------------------------------------------------------

_ACTIVE_MATRIX: contextvars.ContextVar = contextvars.ContextVar("dcff_fusion_matrix", default=None)


def _fusing_promote(original, arrays, dtype=None, **kwargs):
    """An nnx.Conv promote_dtype hook: fuses the kernel and bias it is handed with the matrix of
    the FusedConvNNX calling it, then promotes as the conv would."""
    matrix = _ACTIVE_MATRIX.get()
    if matrix is None:
        raise RuntimeError("a fused nnx conv must be called through its FusedConvNNX wrapper")
    inputs, kernel, *rest = arrays
    fused = [None if a is None else layers.fused_param(a, matrix) for a in (kernel, *rest)]
    return original((inputs, *fused), dtype=dtype, **kwargs)


def _nnx_classes():
    from flax import nnx

    class FusionState(nnx.Variable):
        """DCFF fusion state: updated once per epoch, never by the optimizer."""

    class FusedConvNNX(nnx.Module):
        """An nnx.Conv holding all c filters whose `kept` outputs are their fusions (DCFF).

        conv: the user's conv, unchanged but for a promote_dtype hook; matrix (kept, c),
        scores (c,), kept (kept,): FusionState, as in dcff_jax.FusedConv's "fusion" collection.
        """

        def __init__(self, conv, kept: int):
            initial = fusion.init_fusion_state(conv.out_features, kept)
            self.matrix = FusionState(initial["matrix"])
            self.scores = FusionState(initial["scores"])
            self.kept = FusionState(initial["kept"])
            conv.promote_dtype = functools.partial(_fusing_promote, conv.promote_dtype)
            self.conv = conv

        def __call__(self, x, *args, **kwargs):
            token = _ACTIVE_MATRIX.set(self.matrix[...])
            try:
                return self.conv(x, *args, **kwargs)
            finally:
                _ACTIVE_MATRIX.reset(token)

    return FusionState, FusedConvNNX


FusionState, FusedConvNNX = _nnx_classes()


def _nnx_get(root, path: Sequence[str]):
    node = root
    for part in path:
        node = (
            node[int(part)] if part.isdigit() and not hasattr(node, part) else getattr(node, part)
        )
    return node


def _nnx_set(root, path: Sequence[str], value) -> None:
    parent, last = _nnx_get(root, path[:-1]), path[-1]
    if last.isdigit() and not hasattr(parent, last):
        parent[int(last)] = value
    else:
        setattr(parent, last, value)


def fuse_nnx(model, plan: Plan, traced: Traced):
    """A copy of the nnx `model` with the plan's convs wrapped and their consumers narrowed
    (`narrowed_leaves`: the model's own values, unscaled)."""
    from flax import nnx

    model = nnx.clone(model)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    nnx.update(model, jax.tree.unflatten(treedef, narrowed_leaves(plan, traced, leaves, True)))
    for _, module in nnx.iter_graph(model):
        _sync_nnx_attributes(module)
    for path, conv in plan.fused.items():
        parts = path.split("/")
        _nnx_set(model, parts, FusedConvNNX(_nnx_get(model, parts), conv.kept))
    return model


def _sync_nnx_attributes(module) -> None:
    """Re-derive the width attributes of nnx layers from their (resized) parameters."""
    from flax import nnx

    if isinstance(module, nnx.Conv):
        shape = module.kernel[...].shape
        depthwise = (
            module.feature_group_count > 1 and module.feature_group_count == module.in_features
        )
        if depthwise:
            module.feature_group_count = shape[-1]
        module.in_features = shape[-2] * module.feature_group_count
        module.out_features = shape[-1]
        module.kernel_shape = tuple(shape)
    elif isinstance(module, nnx.Linear):
        module.in_features, module.out_features = module.kernel[...].shape
    elif hasattr(module, "num_features"):
        for name in ("scale", "bias", "mean", "var"):
            value = getattr(module, name, None)
            if isinstance(value, nnx.Variable) and value[...] is not None:
                module.num_features = value[...].shape[-1]
                break


def update_fusion_nnx(model, epoch, num_epochs, **kwargs) -> dict:
    """dcff_jax.update_fusion for an nnx fused model, in place; returns its info."""
    from flax import nnx

    wrappers = {
        "/".join(map(str, path)): m
        for path, m in nnx.iter_graph(model)
        if isinstance(m, FusedConvNNX)
    }
    params = {p: {"kernel": w.conv.kernel[...]} for p, w in wrappers.items()}
    state = {
        p: {n: getattr(w, n)[...] for n in ("matrix", "scores", "kept")}
        for p, w in wrappers.items()
    }
    new, info = fusion.update_fusion(params, state, epoch, num_epochs, **kwargs)
    for p, w in wrappers.items():
        for n in ("matrix", "scores", "kept"):
            getattr(w, n)[...] = new[p][n]
    return info


def compact_nnx(fused_model):
    """The compact nnx model of a fused one: each FusedConvNNX replaced by its conv at the kept
    width holding the fused kernel and bias (a new object; the fused model is unchanged)."""
    from flax import nnx

    model = nnx.clone(fused_model)
    wrappers = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, FusedConvNNX)]
    for path, wrapper in wrappers:
        conv, matrix = wrapper.conv, wrapper.matrix[...]
        # set_value, not [...] =: the width changes.
        conv.kernel.set_value(fusion.fuse_kernel(conv.kernel[...], matrix))
        if conv.bias is not None:
            conv.bias.set_value(fusion.fuse_kernel(conv.bias[...], matrix))
        conv.promote_dtype = conv.promote_dtype.args[0]
        _sync_nnx_attributes(conv)
        _nnx_set(model, [str(p) for p in path], conv)
    return model
