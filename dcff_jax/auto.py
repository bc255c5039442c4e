"""DCFF on an unmodified Flax model (linen or nnx): a traced plan, the fused training model, the
compact export.

    dcff = dcff_jax.DCFF(model, images[:1], rates=0.5, apply_kwargs={"train": False})
    print(dcff.plan.table())
    fused = dcff.fused()              # train this (linen: a Module; nnx: a resized copy)
    compact, compact_vars = dcff.compact(fused_variables)   # nnx: dcff.compact(fused_model)

Which convs fuse, and how their widths couple, comes from tracing the model (dcff_jax.trace):
a conv whose outputs only reach channel-wise ops and then convs or dense layers fuses freely;
outputs that meet at a residual add form a group that shares one rate and one kept width (each
conv fusing independently into the same slots); concat branches fuse independently; a flatten
into a dense layer shrinks its input; a depthwise conv follows its producer; a zero pad of the
channels meeting an add (an option-A shortcut) follows the widths. Everything else is reported
with the reason.

Rates: a number for every fusable conv, or a mapping from glob patterns over layer paths
("layer1/*/conv1", "*") to rates, the first matching pattern winning (unmatched convs are not
fused; rate 0 fuses all c filters into c, as the published code's rate-0 layers do); or
target_macs_reduction / target_params_reduction, searched by dcff_jax.search_rates over one
rate per group. Convs of one group must resolve to one rate. `exclude` patterns are never fused;
`unfused` patterns are trained at their group's width without fusion (the published ResNet-50's
downsample convs).

The plan is a value (`Plan.to_json` / `Plan.from_json`), saved beside checkpoints and exports
(`DCFF.save`, `DCFF.export`); building from a saved plan re-traces the model and refuses a model
whose convs no longer match it, so a changed model can never silently remap layers.

Linen: the fused model is a Module wrapping yours whose variables have the same paths; each fused
conv keeps all c filters in params and its fusion state in the "fusion" collection (as
dcff_jax.FusedConv), so `dcff_jax.update_fusion` and `dcff_jax.compact_variables` apply as is.
nnx: the fused model is a copy of yours with each fused conv wrapped (FusedConvNNX) and its
consumers resized; `update_fusion_nnx` updates it in place.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import fnmatch
import functools
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from dcff_jax import flops, fusion, layers, trace
from dcff_jax.errors import ConfigError, expect
from dcff_jax.plans import keep_width

PLAN_FORMAT = "dcff_jax.plan/1"
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class PlannedConv:
    """One conv of the traced model and what the plan does with it."""

    path: str  # module path, "layer1/0/conv1"
    kernel_shape: tuple[int, ...]
    group: int  # convs of one group share one width (residual adds)
    rate: float
    kept: int  # output width in the fused/compact model (== filters when not fused)
    fused: bool
    reason: str  # why not fused ("" when fused)
    resized: bool = False  # not fused but at its group's kept width (see `unfused`)

    @property
    def filters(self) -> int:
        return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which convs of a model fuse, at which widths. `followers` are the depthwise convs whose
    groups follow a fused producer; macs are conv + dense multiply-accumulates at batch 1."""

    convs: tuple[PlannedConv, ...]
    followers: tuple[str, ...]
    macs: int
    compact_macs: int
    params: int  # trainable parameters
    compact_params: int

    @property
    def fused(self) -> dict[str, PlannedConv]:
        return {c.path: c for c in self.convs if c.fused}

    def to_json(self) -> str:
        convs = [dataclasses.asdict(c) for c in self.convs]
        return json.dumps(
            {
                "format": PLAN_FORMAT,
                "convs": convs,
                "followers": list(self.followers),
                "macs": self.macs,
                "compact_macs": self.compact_macs,
                "params": self.params,
                "compact_params": self.compact_params,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """The plan `to_json` wrote; ConfigError for anything else (every field's type and
        range is checked, so a damaged file cannot reach the model builder)."""
        try:
            data = expect(json.loads(text), dict, "the plan")
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
            convs = tuple(_planned_conv(c) for c in expect(data["convs"], list, "convs"))
            followers = tuple(expect(f, str, "a follower") for f in data["followers"])
            counts = [
                expect(data[k], int, k, low=0)
                for k in ("macs", "compact_macs", "params", "compact_params")
            ]
            return cls(convs, followers, *counts)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ConfigError(f"not a dcff-jax plan ({type(e).__name__}: {e})") from e

    def table(self) -> str:
        """One row per conv: path, kernel shape, group, rate, width, fused or why not."""
        rows = [f"{'layer':<36}{'kernel':<20}{'group':>6}{'rate':>7}{'width':>12}  fused"]
        for c in self.convs:
            width = f"{c.filters}->{c.kept}" if c.kept != c.filters else str(c.filters)
            rows.append(
                f"{c.path:<36}{str(c.kernel_shape):<20}{c.group:>6}{c.rate:>7.3g}{width:>12}  "
                + ("yes" if c.fused else f"no: {c.reason}")
            )
        rows.append(
            f"conv+dense MACs {self.macs:,} -> {self.compact_macs:,} "
            f"({100 * (1 - self.compact_macs / max(self.macs, 1)):.1f}% fewer), params "
            f"{self.params:,} -> {self.compact_params:,} "
            f"({100 * (1 - self.compact_params / max(self.params, 1)):.1f}% fewer)"
        )
        return "\n".join(rows)


def _planned_conv(entry) -> PlannedConv:
    """A PlannedConv from its JSON object, every field checked."""
    entry = expect(entry, dict, "a conv")
    names = {f.name for f in dataclasses.fields(PlannedConv)}
    if not {"path", "kernel_shape", "group", "rate", "kept", "fused", "reason"} <= set(entry):
        raise KeyError(f"a conv lacks {sorted(names - set(entry))}")
    if set(entry) - names:
        raise KeyError(f"a conv has unknown fields {sorted(set(entry) - names)}")
    path = expect(entry["path"], str, "a conv's path")
    shape = expect(entry["kernel_shape"], list, f"{path}: kernel_shape")
    if not 2 <= len(shape) <= 5:
        raise ValueError(f"{path}: kernel_shape {shape} is not a conv kernel's")
    shape = tuple(expect(n, int, f"{path}: kernel_shape", low=1, high=1 << 20) for n in shape)
    return PlannedConv(
        path=path,
        kernel_shape=shape,
        group=expect(entry["group"], int, f"{path}: group", low=-1),
        rate=float(expect(entry["rate"], float, f"{path}: rate", low=0, high=0.9999)),
        kept=expect(entry["kept"], int, f"{path}: kept", low=1, high=shape[-1]),
        fused=expect(entry["fused"], bool, f"{path}: fused"),
        reason=expect(entry["reason"], str, f"{path}: reason"),
        resized=expect(entry.get("resized", False), bool, f"{path}: resized"),
    )


# --- Tracing ----------------------------------------------------------------------------------


def _is_nnx(model) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@dataclasses.dataclass
class _Traced:
    analysis: trace.Analysis
    leaf_paths: list[tuple[str, ...]]
    leaf_shapes: list[tuple[int, ...]]
    trainable: list[bool]  # linen: in "params"; nnx: an nnx.Param
    # The counted layers (dcff_jax.flops) and the tags of their input and output channels
    # (None: a fixed width): linen's layer calls, then every conv or dense made outside them
    # (all of an nnx model's, whose calls are not seen: conv and dense alone).
    layers: list[flops.Layer]
    layer_tags: list[tuple[trace.Tag | None, trace.Tag | None]]
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


def _trace(model, example, apply_kwargs: Mapping[str, Any]) -> _Traced:
    example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    calls: list[tuple[flops.Layer, int, int]] = []  # (layer, input rank, output rank)
    if _is_nnx(model):
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
        trainable = [_key_name(path[0]) == "params" for path, _ in flat]
        convs = set()

        def record(module, path, call, args, kwargs):
            if isinstance(module, nn.Conv) and path:
                convs.add(path)
            x = args[0]
            if not isinstance(module, flops.COUNTED) or not hasattr(x, "shape"):
                return call(*args, **kwargs)
            # Probes: the analysis keeps the tags of the layer's input and output channels.
            key = f"{trace.PROBE}{len(calls)}"
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
            _key_name(k)
            for k in path
            if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
        )
        for path, _ in flat
    ]
    shapes = [tuple(leaf.shape) for leaf in leaves]
    analysis = trace.analyze(fn, leaves, example)  # fills convs and calls (linen)
    layers, tags = _counted_layers(analysis, calls, paths, _is_nnx(model))
    return _Traced(
        analysis, paths, shapes, trainable, layers, tags, frozenset(convs), not _is_nnx(model)
    )


def _counted_layers(a: trace.Analysis, calls, leaf_paths, nnx_model: bool):
    """The traced layer calls with their probed channel tags (a tag on another axis than the
    channels' is a fixed width), then every conv and dense made outside them."""
    layers, tags = [], []

    def channel_tag(key: str, rank: int) -> trace.Tag | None:
        tag = a.probes.get(key)
        return tag if tag is not None and tag.axis == rank - 1 else None

    for i, (layer, in_rank, out_rank) in enumerate(calls):
        layers.append(layer)
        tags.append((channel_tag(f"{i}/in", in_rank), channel_tag(f"{i}/out", out_rank)))
    for r in a.records:
        if r.inside is not None:
            continue
        leaf = r.kernel_leaf
        path = "" if leaf is None else _module_path(leaf_paths[leaf], nnx_model)
        layers.append(
            flops.Layer(
                path,
                r.kind,
                (r.out_width,),
                r.in_width,
                r.out_width,
                0,
                r.macs_per_channel_pair,
                r.groups,
            )  # fmt: skip
        )
        tags.append((r.in_tag, r.out_tag))
    return layers, tags


def _module_path(leaf_path: tuple[str, ...], nnx_model: bool) -> str:
    # linen: ("params", ..., "kernel"); nnx: (..., "kernel").
    parts = list(leaf_path)
    if not nnx_model:
        parts = parts[1:]
    return "/".join(parts[:-1])


def _match(path: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)


# The reason a conv that could fuse does not: no rate pattern matched it.
NO_RATE = "no rate given"


def _resolve_rate(path: str, rates) -> float | None:
    """The rate of the conv at `path`: None (not fused) when no pattern matches."""
    if rates is None:
        return None
    if isinstance(rates, Mapping):
        pattern = _match(path, list(rates))
        return None if pattern is None else _check_rate(float(rates[pattern]), path)
    return _check_rate(float(rates), path)


def _check_rate(rate: float, where: str) -> float:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(
            f"rate {rate} for {where} is outside [0, 1): the fraction of filters pruned"
        )
    return rate


def make_plan(model, example, rates=None, **options) -> Plan:
    """The plan alone: DCFF(model, example, rates, **options).plan (see DCFF for the options)."""
    return DCFF(model, example, rates, **options).plan


def _check_rates_given(rates, targets) -> None:
    if rates is None and all(t is None for t in targets):
        raise ConfigError(
            "give rates (a number, or {glob over layer paths: rate}) or a target reduction "
            "(target_macs_reduction=, target_params_reduction=)"
        )
    if rates is not None and any(t is not None for t in targets):
        raise ConfigError("give rates or a target reduction, not both")


def _conv_paths(traced: _Traced, nnx_model: bool) -> dict[int, str]:
    """{index into the analysis' records: module path} of the convs whose kernel is a leaf."""
    return {
        i: _module_path(traced.leaf_paths[r.kernel_leaf], nnx_model)
        for i, r in enumerate(traced.analysis.records)
        if r.kind == "conv" and r.kernel_leaf is not None
    }


def _plan_widths(plan: Plan, traced: _Traced, nnx_model: bool):
    """root space -> its width in the plan's compact model (the function counts take)."""
    a = traced.analysis
    by_path = {c.path: c for c in plan.convs}
    kept = {}
    for i, path in _conv_paths(traced, nnx_model).items():
        space, planned = a.records[i].out_space, by_path.get(path)
        if space is not None and planned is not None and (planned.fused or planned.resized):
            kept[a.find(space)] = planned.kept
    return lambda root: kept.get(root, a.spaces[root])


def _plan_from_trace(
    traced, nnx_model, rates, exclude=(), targets=(None, None), unfused=()
) -> Plan:
    a = traced.analysis
    path_of = _conv_paths(traced, nnx_model)
    groups = a.groups()
    roots = sorted({a.find(s) for s in a.producers})
    group_id = {root: n for n, root in enumerate(roots)}
    members = {root: [a.producers[s] for s in groups[root] if s in a.producers] for root in roots}
    reasons = {root: a.group_reasons(groups[root]) for root in roots}
    for root in roots:
        for i in members[root]:
            hit = _match(path_of[i], exclude)
            if hit:
                reasons[root].append(f"excluded ({path_of[i]} matches {hit!r})")
            if path_of[i] not in traced.rewritable:
                reasons[root].append(
                    f"{path_of[i]} is no flax Conv module (dcff-jax rewrites nn.Conv and "
                    "nnx.Conv; this one computes its conv itself)"
                )
    open_roots = [r for r in roots if not reasons[r]]

    def group_rate(root) -> float | None:
        found = {path_of[i]: _resolve_rate(path_of[i], rates) for i in members[root]}
        if len(set(found.values())) > 1:
            raise ConfigError(
                "these convs meet at a residual add and must share one rate, but the rates "
                f"give {found}: give them one rate (or exclude them)"
            )
        return next(iter(found.values()))

    if any(t is not None for t in targets):
        chosen = _search(traced, open_roots, targets)
    else:
        chosen = {root: group_rate(root) for root in open_roots}
    # Rate 0 still fuses (m = c filters, each a fusion of all c), as the published code does.
    kept = {
        root: keep_width(a.spaces[root], rate) for root, rate in chosen.items() if rate is not None
    }

    def width(root):
        return kept.get(root, a.spaces[root])

    convs, followers = [], []
    for i, record in enumerate(a.records):
        if i not in path_of:
            continue
        root = a.find(record.out_space) if record.out_space is not None else None
        if record.groups > 1 and record.in_tag is not None:  # depthwise
            convs.append(
                PlannedConv(
                    path_of[i],
                    record.kernel_shape,
                    -1,
                    0.0,
                    a.width(record.in_tag, width),
                    False,
                    "depthwise: follows its input's width",
                )
            )
            segments = record.in_tag.segments
            if any(s.space is not None and a.find(s.space) in kept for s in segments):
                followers.append(path_of[i])
            continue
        unfused_by = _match(path_of[i], unfused) if root in kept else None
        if unfused_by:
            convs.append(
                PlannedConv(
                    path_of[i],
                    record.kernel_shape,
                    group_id[root],
                    chosen[root],
                    kept[root],
                    False,
                    f"unfused: trained at its group's width ({unfused_by!r})",
                    resized=True,
                )
            )
            continue
        if root is None:
            fused, reason, rate = False, "its kernel is not a plain parameter", 0.0
        elif root in kept:
            fused, reason, rate = True, "", chosen[root]
        elif reasons[root]:
            fused, reason, rate = False, "; ".join(reasons[root]), 0.0
        else:
            fused, reason, rate = False, NO_RATE, 0.0
        convs.append(
            PlannedConv(
                path_of[i],
                record.kernel_shape,
                group_id.get(root, -1),
                rate,
                kept[root] if fused else record.out_width,
                fused,
                reason,
            )
        )
    return Plan(
        tuple(convs),
        tuple(followers),
        traced.counts(None, "macs").flops,
        traced.counts(width, "macs").flops,
        traced.params(),
        traced.params(width),
    )


def _search(traced: _Traced, roots: list[int], targets) -> dict[int, float]:
    from dcff_jax.plan_search import search_rates

    a = traced.analysis
    if not roots:
        raise ConfigError("no conv of this model can be fused, so no reduction target can be met")

    def count(rates):
        widths = {r: keep_width(a.spaces[r], rate) for r, rate in zip(roots, rates, strict=True)}

        def width(root):
            return widths.get(root, a.spaces[root])

        counts = traced.counts(width, "macs")
        return counts.flops, counts.params

    macs, params = targets
    result = search_rates(count, len(roots), flops_reduction=macs, params_reduction=params)
    return dict(zip(roots, result.rates, strict=True))


def _check_plan(plan: Plan, traced: _Traced, nnx_model: bool) -> None:
    """Raise ConfigError unless the re-traced model has the plan's convs (same paths, kernel
    shapes and groups, none newly blocked): a plan saved with a checkpoint must never be
    applied to a changed model."""
    now = {c.path: c for c in _plan_from_trace(traced, nnx_model, None, ()).convs}
    saved = {c.path: c for c in plan.convs}
    problems = set(now) ^ set(saved)
    for path in set(now) & set(saved):
        old, new = saved[path], now[path]
        if (old.kernel_shape, old.group) != (new.kernel_shape, new.group):
            problems.add(path)
        elif old.fused and new.reason != NO_RATE:  # fusable then, blocked now
            problems.add(path)
    if problems:
        raise ConfigError(
            f"the model no longer matches its plan at {sorted(problems)[:5]}: "
            "it changed since the plan was made; make a new plan (and retrain) for it"
        )


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
    if module.use_bias:
        params["bias"] = module.param("bias", module.bias_init, (stored,), module.param_dtype)
    if matrix_width:
        matrix = layers.fusion_state(module, matrix_width, features)
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


def _tie_indices(a: trace.Analysis, tag: trace.Tag, kept) -> np.ndarray:
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


def _narrowed_leaves(plan: Plan, traced: _Traced, leaves: list, is_nnx: bool) -> list:
    """The model's variable leaves (in trace order) at the plan's fused-model widths: every
    variable whose channels follow a narrowed conv keeps its first kept channels' values,
    unscaled; a fused conv's own kernel and bias stay whole (all its filters are trained)."""
    a = traced.analysis
    fused_paths = plan.fused
    narrowed = {c.path: c.kept for c in plan.convs if c.fused or c.resized}
    kept_of_root = {}
    for r in a.records:
        if r.out_space is not None and r.kernel_leaf is not None:
            path = _module_path(traced.leaf_paths[r.kernel_leaf], is_nnx)
            if path in narrowed:
                kept_of_root[a.find(r.out_space)] = narrowed[path]
    own = {
        i: path[-1]
        for i, path in enumerate(traced.leaf_paths)
        if path[-1] in ("kernel", "bias") and _module_path(path, is_nnx) in fused_paths
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


def _fuse_nnx(model, plan: Plan, traced: _Traced):
    """A copy of the nnx `model` with the plan's convs wrapped and their consumers narrowed
    (`_narrowed_leaves`: the model's own values, unscaled)."""
    from flax import nnx

    model = nnx.clone(model)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    nnx.update(model, jax.tree.unflatten(treedef, _narrowed_leaves(plan, traced, leaves, True)))
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


# --- The entry point --------------------------------------------------------------------------


class DCFF:
    """DCFF for an unmodified Flax model: its plan, fused training model and compact export.

    Args:
      model: a flax.linen Module or an nnx.Module, unchanged (traced in eval mode).
      example: an input batch (NHWC; only its shape and dtype are used).
      rates: one rate for every fusable conv, or {glob over module paths: rate} (first match
        wins; unmatched convs are not fused; rate 0 fuses c filters into c).
      exclude: glob patterns of convs never fused (their group is not fused either).
      unfused: glob patterns of convs in a fused group that are not fused but trained directly
        at the group's kept width (the published ResNet-50's downsample convs).
      target_macs_reduction / target_params_reduction: instead of rates, search one rate per
        group for these fractions of conv + dense MACs and of trainable parameters removed
        (dcff_jax.search_rates; either or both).
      plan: a saved Plan (Plan.from_json) instead of rates; the model is checked against it.
      apply_kwargs: the linen call's eval-mode arguments, e.g. {"train": False}.
    """

    def __init__(
        self,
        model,
        example,
        rates: float | Mapping[str, float] | None = None,
        *,
        exclude: Sequence[str] = (),
        unfused: Sequence[str] = (),
        target_macs_reduction: float | None = None,
        target_params_reduction: float | None = None,
        plan: Plan | None = None,
        apply_kwargs: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.is_nnx = _is_nnx(model)
        self.apply_kwargs = dict(apply_kwargs or {})
        self._example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
        self._traced = _trace(model, example, self.apply_kwargs)
        if plan is None:
            targets = (target_macs_reduction, target_params_reduction)
            _check_rates_given(rates, targets)
            plan = _plan_from_trace(self._traced, self.is_nnx, rates, exclude, targets, unfused)
        else:
            _check_plan(plan, self._traced, self.is_nnx)
        self.plan = plan

    def replanned(
        self,
        rates: float | Mapping[str, float] | None = None,
        *,
        exclude: Sequence[str] = (),
        unfused: Sequence[str] = (),
        target_macs_reduction: float | None = None,
        target_params_reduction: float | None = None,
    ) -> DCFF:
        """The same model's DCFF with another plan (the constructor's planning options),
        without tracing the model again."""
        targets = (target_macs_reduction, target_params_reduction)
        _check_rates_given(rates, targets)
        new = copy.copy(self)
        new.plan = _plan_from_trace(self._traced, self.is_nnx, rates, exclude, targets, unfused)
        return new

    def counts(
        self, convention: str = "thop", *, compact: bool = True, uncounted: Sequence[str] = ()
    ):
        """FLOPs and params (dcff_jax.flops.Counts) of the plan's compact model (compact=False:
        of the model as given), at the example's batch, counted from the one trace: no model
        is built. convention: "thop" (linen only: nnx layer calls are not seen) or "macs".
        uncounted: paths of layers left out."""
        if self.is_nnx and convention != "macs":
            raise ConfigError(
                f"convention {convention!r} counts layer calls, which an nnx model does not "
                "show: count it with convention='macs'"
            )
        kept = _plan_widths(self.plan, self._traced, self.is_nnx) if compact else None
        return self._traced.counts(kept, convention, tuple(uncounted))

    def _linen_layers(self, fused: bool) -> tuple:
        layers = [
            (c.path, c.kept, c.filters if fused and c.fused else 0, 0)
            for c in self.plan.convs
            if c.fused or c.resized
        ]
        layers += [(path, 0, 0, 1) for path in self.plan.followers]
        return tuple(layers)

    def fused(self):
        """The fused training model (linen: a Module; nnx: a resized copy of the model).

        A layer whose width the plan narrows keeps its first channels' values, unscaled: nnx
        copies them from the model (zero, constant, N(0, s) or pretrained weights are kept as
        they are); linen modules hold no values, so pass yours through `fused_variables`
        (`fused().init` draws fresh values at the new widths instead)."""
        if self.is_nnx:
            return _fuse_nnx(self.model, self.plan, self._traced)
        return FusedLinen(self.model, self._linen_layers(True))

    def fused_variables(self, variables, key: jax.Array | None = None):
        """linen: the fused model's variables from the model's `variables` (full width), as
        nnx's `fused()` makes them: narrowed layers keep their first channels' values unscaled,
        fused convs all their filters; the "fusion" state is fresh (from `key`, default 0).

        Raises ConfigError if `variables` are not the traced model's (paths or shapes)."""
        if self.is_nnx:
            raise TypeError("fused_variables is for linen models; nnx's fused() copies values")
        flat, _ = jax.tree_util.tree_flatten_with_path(variables)
        paths = [tuple(_key_name(k) for k in path) for path, _ in flat]
        shapes = [tuple(np.shape(leaf)) for _, leaf in flat]
        if paths != self._traced.leaf_paths or shapes != self._traced.leaf_shapes:
            raise ConfigError(
                "fused_variables: these variables are not the model's that DCFF traced (other "
                "paths or shapes): pass model.init(...)'s or a checkpoint of the same model"
            )
        leaves = _narrowed_leaves(self.plan, self._traced, [x for _, x in flat], False)
        narrowed = dict(zip(paths, leaves, strict=True))
        example = jnp.zeros(self._example.shape, self._example.dtype)
        key = jax.random.key(0) if key is None else key
        fresh = self.fused().init(key, example, **self.apply_kwargs)

        def pick(path, leaf):
            return narrowed.get(tuple(_key_name(k) for k in path), leaf)

        return jax.tree_util.tree_map_with_path(pick, fresh)

    def compact_model(self) -> nn.Module:
        """linen: the compact model (plain convs at the kept widths) for compact_variables."""
        if self.is_nnx:
            raise TypeError("for an nnx model, call compact(fused_model)")
        return FusedLinen(self.model, self._linen_layers(False))

    def compact(self, fused):
        """linen: fused variables -> (compact Module, its variables); nnx: fused model -> the
        compact model. Eval-mode logits are the fused model's."""
        if self.is_nnx:
            return compact_nnx(fused)
        from dcff_jax.export import compact_variables

        return self.compact_model(), compact_variables(fused)

    # --- Checkpoints and exports, each with its plan -------------------------------------------

    def save(self, directory: str, fused) -> None:
        """Write a fused training state (linen: its variables; nnx: the fused model) to
        `directory` as an orbax checkpoint ("state") beside the plan ("plan.json"), so that
        `DCFF.load` can refuse a model that changed since."""
        _write(directory, "state", _state_of(fused, self.is_nnx), self.plan)

    @classmethod
    def load(cls, directory: str, model, example, apply_kwargs=None):
        """(DCFF, fused) from a `save`d directory: linen fused variables, or the nnx fused model.

        Raises ConfigError if `model` no longer matches the saved plan, MissingFileError if
        the directory has no plan, DataError if the checkpoint cannot be read."""
        dcff = cls(model, example, plan=_read_plan(directory), apply_kwargs=apply_kwargs)
        if dcff.is_nnx:
            fused = dcff.fused()
            abstract = _state_of(fused, True)
        else:
            fused = None
            abstract = jax.eval_shape(
                lambda x: dcff.fused().init(jax.random.key(0), x, **dcff.apply_kwargs),
                jax.ShapeDtypeStruct(tuple(example.shape), example.dtype),
            )
        restored = _restore(directory, "state", abstract)
        if dcff.is_nnx:
            from flax import nnx

            nnx.update(fused, restored)
            return dcff, fused
        return dcff, restored

    def export(self, directory: str, fused, example) -> tuple[Any, Any]:
        """Write the compact model of `fused` (linen variables or the nnx fused model) to
        `directory`: its variables (orbax, "variables"), the plan, and `model.stablehlo`, the
        eval-mode function images -> logits with the variables inside and any batch size,
        loadable with jax alone (jax.export.deserialize(...).call(images)), its conv widths
        padded to multiples of 8 (export.STABLEHLO_PAD_TO; the same logits, faster on a CPU).
        Returns the compact (model, variables) for linen, (model, None) for nnx."""
        from dcff_jax import storage
        from dcff_jax.export import STABLEHLO, batch_polymorphic_stablehlo

        if self.is_nnx:
            from flax import nnx

            model, variables = self.compact(fused), None
            graphdef, state = nnx.split(model)

            def logits(x):
                return nnx.merge(graphdef, state)(x)

        else:
            model, variables = self.compact(fused)

            def logits(x):
                return model.apply(variables, x, **self.apply_kwargs)

        _write(
            directory,
            "variables",
            _state_of(model if self.is_nnx else variables, self.is_nnx),
            self.plan,
        )
        module = batch_polymorphic_stablehlo(logits, example.shape[1:], example.dtype)
        storage.write_text_atomic(storage.resolve(directory) / STABLEHLO, module)
        return model, variables


def _state_of(fused, is_nnx: bool):
    if not is_nnx:
        return fused
    from flax import nnx

    return nnx.state(fused)


def _write(directory: str, name: str, tree, plan: Plan) -> None:
    import orbax.checkpoint as ocp

    from dcff_jax import storage

    root = storage.ensure_dir(storage.resolve(directory))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / name, tree, force=True)
        checkpointer.wait_until_finished()
    storage.write_text_atomic(root / PLAN_FILE, plan.to_json())


def _read_plan(directory: str) -> Plan:
    from dcff_jax import storage
    from dcff_jax.errors import MissingFileError

    path = storage.resolve(directory) / PLAN_FILE
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: {directory} is not a dcff-jax save")
    return Plan.from_json(path.read_text())


def _restore(directory: str, name: str, abstract):
    import orbax.checkpoint as ocp

    from dcff_jax import storage
    from dcff_jax.errors import DataError

    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(storage.resolve(directory) / name, abstract)
    except Exception as e:
        raise DataError(
            f"{directory}/{name} is corrupt or unreadable ({type(e).__name__}: {e})"
        ) from e
