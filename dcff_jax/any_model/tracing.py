"""The model traced once (linen or nnx): its channel analysis (dcff_jax.jaxpr.channels), its
parameter leaves, its counted layers (dcff_jax.flops) and the leaves narrowed to a plan."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from dcff_jax import flops
from dcff_jax.errors import ConfigError
from dcff_jax.jaxpr import channels

if TYPE_CHECKING:
    from dcff_jax.any_model.plan import Plan

# --- Tracing ----------------------------------------------------------------------------------


def is_nnx(model) -> bool:
    # A model can only be an nnx.Module once flax.nnx is imported: a linen user (and every
    # `main` run) never pays for importing it (~0.4 s).
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@dataclasses.dataclass
class Traced:
    analysis: channels.Analysis
    leaf_paths: list[tuple[str, ...]]
    leaf_shapes: list[tuple[int, ...]]
    trainable: list[bool]  # linen: in "params"; nnx: an nnx.Param
    # The counted layers (dcff_jax.flops) and the tags of their input and output channels
    # (None: a fixed width): linen's layer calls, then every conv or dense made outside them
    # (all of an nnx model's, whose calls are not seen: conv and dense alone).
    layers: list[flops.Layer]
    layer_tags: list[tuple[channels.Tag | None, channels.Tag | None]]
    # Paths of the flax Conv modules (nn.Conv, nnx.Conv): the convs the rewriter can fuse.
    rewritable: frozenset[str] = frozenset()
    layer_calls: bool = True  # whether the layers include the linen calls (thop's convention)

    def params(self, kept=None) -> int:
        """Trainable parameters with every group root r at kept(r) channels (None: all)."""
        a = self.analysis
        shapes = [list(shape) for shape in self.leaf_shapes]
        if kept is not None:
            for tie in a.ties:
                shapes[tie.leaf][tie.axis] = a.width(tie.tag, kept)
        return sum(math.prod(s) for s, t in zip(shapes, self.trainable, strict=True) if t)

    def counts(self, kept=None, convention: str = "thop", uncounted=()) -> flops.Counts:
        """FLOPs (flops.count_layers) and params with every group root r at kept(r) channels
        (None: all), at the traced example's batch."""
        widths = None
        if kept is not None:
            a = self.analysis
            widths = [
                (
                    layer.in_channels if t_in is None else a.width(t_in, kept),
                    layer.out_channels if t_out is None else a.width(t_out, kept),
                )
                for layer, (t_in, t_out) in zip(self.layers, self.layer_tags, strict=True)
            ]
        return flops.count_layers(self.layers, self.params(kept), convention, uncounted, widths)


def _analyze_in_eval_mode(fn, leaves, example, apply_kwargs: Mapping[str, Any]):
    """channels.analyze (it fills convs and calls, linen), with a call that updates a variable
    collection refused in one line: the model needs its eval-mode arguments."""
    from flax.errors import ModifyScopeVariableError

    try:
        return channels.analyze(fn, leaves, example)
    except ModifyScopeVariableError as e:
        collection = str(e).split('collection "', 1)[-1].split('"', 1)[0]
        raise ConfigError(
            f"the model, called with apply_kwargs={dict(apply_kwargs)}, updates its "
            f"{collection!r} variables (training mode): pass its eval-mode arguments as "
            "apply_kwargs, e.g. apply_kwargs={'train': False}, to DCFF and DCFF.load alike"
        ) from None


def trace_model(model, example, apply_kwargs: Mapping[str, Any]) -> Traced:
    example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    calls: list[tuple[flops.Layer, int, int]] = []  # (layer, input rank, output rank)
    if is_nnx(model):
        from flax import nnx

        copy = nnx.clone(model)
        copy.eval()
        graphdef, state = nnx.split(copy)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state)
        variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        trainable = [isinstance(v, nnx.Param) for v in variables]

        def fn(leaves, x):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x, **apply_kwargs)

        convs = {
            "/".join(map(str, path))
            for path, module in nnx.iter_graph(copy)
            if isinstance(module, nnx.Conv)
        }
    else:
        from dcff_jax.models import intercept_layers

        variables = jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, **apply_kwargs), example
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
        trainable = [key_name(path[0]) == "params" for path, _ in flat]
        convs = set()

        def record(module, path, call, args, kwargs):
            if isinstance(module, nn.Conv) and path:
                convs.add(path)
            x = args[0]
            if not isinstance(module, flops.COUNTED) or not hasattr(x, "shape"):
                return call(*args, **kwargs)
            # Probes: the analysis keeps the tags of the layer's input and output channels.
            key = f"{channels.PROBE}{len(calls)}"
            y = call(checkpoint_name(x, f"{key}/in"), *args[1:], **kwargs)
            calls.append((flops.layer_of(module, path, x.shape, y.shape), x.ndim, y.ndim))
            return checkpoint_name(y, f"{key}/out")

        def fn(leaves, x):
            with intercept_layers(record):
                return model.apply(jax.tree.unflatten(treedef, leaves), x, **apply_kwargs)

    leaves = [leaf for _, leaf in flat]
    # nnx state paths end in the Variable's .value attribute, which names nothing.
    paths = [
        tuple(
            key_name(k)
            for k in path
            if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
        )
        for path, _ in flat
    ]
    shapes = [tuple(leaf.shape) for leaf in leaves]
    analysis = _analyze_in_eval_mode(fn, leaves, example, apply_kwargs)
    layers, tags = _counted_layers(analysis, calls, paths, is_nnx(model))
    return Traced(
        analysis, paths, shapes, trainable, layers, tags, frozenset(convs), not is_nnx(model)
    )


def _counted_layers(a: channels.Analysis, calls, leaf_paths, nnx_model: bool):
    """The traced layer calls with their probed channel tags (a tag on another axis than the
    channels' is a fixed width), then every conv and dense made outside them."""
    layers, tags = [], []

    def channel_tag(key: str, rank: int) -> channels.Tag | None:
        tag = a.probes.get(key)
        return tag if tag is not None and tag.axis == rank - 1 else None

    for i, (layer, in_rank, out_rank) in enumerate(calls):
        layers.append(layer)
        tags.append((channel_tag(f"{i}/in", in_rank), channel_tag(f"{i}/out", out_rank)))
    for r in a.records:
        if r.inside is not None:
            continue
        leaf = r.kernel_leaf
        path = "" if leaf is None else module_path(leaf_paths[leaf], nnx_model)
        layers.append(flops.record_layer(r, path))
        tags.append((r.in_tag, r.out_tag))
    return layers, tags


def module_path(leaf_path: tuple[str, ...], nnx_model: bool) -> str:
    # linen: ("params", ..., "kernel"); nnx: (..., "kernel").
    parts = list(leaf_path)
    if not nnx_model:
        parts = parts[1:]
    return "/".join(parts[:-1])


def _tie_indices(a: channels.Analysis, tag: channels.Tag, kept) -> np.ndarray:
    """Indices along a tied axis that the first kept(root) channels of each space occupy."""
    index, offset = [], 0
    per_copy = sum(s.size for s in tag.segments)
    for repeat in range(tag.repeat):
        offset = repeat * per_copy
        for s in tag.segments:
            n = s.size if s.space is None else kept(a.find(s.space))
            index.extend(range(offset, offset + n))
            offset += s.size
    return np.asarray(index)


def narrowed_leaves(plan: Plan, traced: Traced, leaves: list, is_nnx: bool) -> list:
    """The model's variable leaves (in trace order) at the plan's fused-model widths: every
    variable whose channels follow a narrowed conv keeps its first kept channels' values,
    unscaled; a fused conv's own kernel and bias stay whole (all its filters are trained)."""
    a = traced.analysis
    fused_paths = plan.fused
    narrowed = {c.path: c.kept for c in plan.convs if c.fused or c.resized}
    kept_of_root = {}
    for r in a.records:
        if r.out_space is not None and r.kernel_leaf is not None:
            path = module_path(traced.leaf_paths[r.kernel_leaf], is_nnx)
            if path in narrowed:
                kept_of_root[a.find(r.out_space)] = narrowed[path]
    own = {
        i: path[-1]
        for i, path in enumerate(traced.leaf_paths)
        if path[-1] in ("kernel", "bias") and module_path(path, is_nnx) in fused_paths
    }
    resized: dict[tuple[int, int], np.ndarray] = {}  # (leaf, axis) -> kept indices
    for tie in a.ties:
        if own.get(tie.leaf) == "bias" or (tie.leaf in own and tie.kind == "produced"):
            continue  # a fused conv's own filters and bias: kept whole, fused
        if not any(
            s.space is not None and a.find(s.space) in kept_of_root for s in tie.tag.segments
        ):
            continue
        resized[(tie.leaf, tie.axis)] = _tie_indices(
            a, tie.tag, lambda r: kept_of_root.get(r, a.spaces[r])
        )
    leaves = list(leaves)
    for (leaf, axis), index in sorted(resized.items()):
        leaves[leaf] = jnp.take(leaves[leaf], index, axis=axis)
    return leaves
