"""Compact models with conv widths rounded up: the same function, faster kernels.

DCFF's compact widths are whatever the rates leave (3, 7, 19, ... channels). XLA:CPU's and
onnxruntime's conv kernels vectorise over channels and run narrow, odd widths far below their
usual throughput (experiments/RESULTS.md: ResNet-110's compact convs under 8 channels wide run at
19-29 GMAC/s where 32-64-wide ones run at 150-190). `pad_channels(fn, 8)` returns `fn` with every
conv's output channels rounded up to a multiple of 8 by zero filters; the logits are the same
(up to float32 rounding), the MACs higher, the time lower where the kernels need it.

How: `fn` is traced to a jaxpr at its input's shape and re-run equation by equation. Each value
computed from the input may carry a channel map (its channel axis is `width` wide, real channel k at
position index[k]; other positions hold finite values nobody reads). A conv or matmul reads the real
channels through zero weights at the padded positions; channel-wise ops (per-channel constants,
ReLU, pools, spatial pads and slices, reductions over other axes, transposes, a flatten) carry the
map; a channel pad (the option-A shortcut) is re-offset; a concat's map is its inputs' maps,
concatenated. Any other op gets the real channels back first, so an op this module does not know is
still computed right, only without padding after it. Which op is which is jaxpr.walk.CHANNEL_RULE,
the classification the channel analysis (jaxpr.channels) uses too. Equations of weights alone are
evaluated once, at trace time. The StableHLO and ONNX exports convert the padded function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcff_jax.jaxpr import walk


@dataclasses.dataclass(frozen=True)
class ChannelMap:
    """Axis `axis` is `width` wide; real channel k sits at position index[k]."""

    axis: int
    width: int
    index: np.ndarray

    def is_prefix(self) -> bool:
        return bool(np.array_equal(self.index, np.arange(len(self.index))))

    def same_as(self, other: ChannelMap | None) -> bool:
        return (
            other is not None
            and (self.axis, self.width) == (other.axis, other.width)
            and np.array_equal(self.index, other.index)
        )


@dataclasses.dataclass(frozen=True)
class _Traced:
    """A value computed from the function's input, channels padded as `map` says (None: not)."""

    value: jax.Array
    map: ChannelMap | None = None


@dataclasses.dataclass(frozen=True)
class _Lazy:
    """Weights broadcast to a batch-sized shape: kept with size 1 on the broadcast axes."""

    array: np.ndarray


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_channels(fn: Callable[[jax.Array], jax.Array], multiple: int = 8) -> Callable:
    """fn (one array -> one array or a tuple of them) with conv widths rounded up to `multiple`;
    see the module docstring. The result traces fn at each call's input shape (symbolic batch
    sizes included, so it lowers with jax.export) and is meant to be jitted."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")

    def padded(x):
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
        outs = _Walk(multiple).run(closed.jaxpr, closed.consts, [_Traced(x)])
        results = [_plain(v, var.aval) for v, var in zip(outs, closed.jaxpr.outvars, strict=True)]
        return results[0] if len(results) == 1 else tuple(results)

    return padded


def _plain(value, aval) -> jax.Array:
    """The value as fn computed it: real channels only, full shape."""
    if isinstance(value, _Traced):
        m = value.map
        if m is None:
            return value.value
        if m.is_prefix():
            return lax.slice_in_dim(value.value, 0, len(m.index), axis=m.axis)
        return jnp.take(value.value, jnp.asarray(m.index), axis=m.axis)
    if isinstance(value, _Lazy):
        return jnp.broadcast_to(value.array, aval.shape)
    return jnp.asarray(value)


class _Walk:
    # Of the elementwise ops (walk.CHANNEL_RULE), those padded here: binary ops whose weight
    # operands are spread to the padded positions, and unary ops that keep the finite values
    # at the padded positions finite (not log, rsqrt, ...). Others run on the real channels.
    BINARY = {"add", "sub", "mul", "max", "min", "div"}
    SAFE_UNARY = {
        "neg", "abs", "exp", "tanh", "logistic", "integer_pow", "sqrt", "erf", "sign", "square",
    }  # fmt: skip

    def __init__(self, multiple: int):
        self.multiple = multiple

    def run(self, jaxpr, consts, args) -> list:
        consts = [np.asarray(c) for c in consts]
        return walk.interpret(jaxpr, consts, args, self.equation, lambda var: np.asarray(var.val))

    def equation(self, eqn, inputs: list) -> list:
        call = walk.inlined(eqn, inputs)
        if call is not None:
            return self.run(*call)
        if not any(isinstance(x, _Traced) for x in inputs):
            folded = self.fold(eqn, inputs)
            if folded is not None:
                return folded
        rule = walk.CHANNEL_RULE.get(eqn.primitive.name)
        handler = getattr(self, f"op_{rule}", None) if rule else None
        out = None if handler is None else handler(eqn, *inputs)
        if out is None:
            return self.unpadded(eqn, inputs)
        return out if eqn.primitive.multiple_results else [out]

    def fold(self, eqn, inputs: list) -> list | None:
        """Evaluate an equation of weights alone, now; None when its result is batch-sized."""
        if not all(walk.has_static_shape(v.aval) for v in eqn.outvars):
            if eqn.primitive.name != "broadcast_in_dim" or isinstance(inputs[0], _Lazy):
                return None
            return [_Lazy(walk.broadcast_with_ones(inputs[0], eqn.params))]
        if any(isinstance(x, _Lazy) for x in inputs):
            return None
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*[jnp.asarray(x) for x in inputs], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [np.asarray(o) for o in outs]

    def unpadded(self, eqn, inputs: list) -> list:
        """The equation as it was, on the real channels: nothing padded after it."""
        values = [_plain(x, v.aval) for x, v in zip(inputs, eqn.invars, strict=True)]
        outs = eqn.primitive.bind(*values, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [_Traced(o) for o in outs]

    # --- ops that carry or make channel maps ----------------------------------------------
    def aligned(self, eqn, inputs: list) -> tuple[list, ChannelMap] | None:
        """The operands of an elementwise op (or a stack) at the padded shape: all traced ones
        padded alike, per-channel weights spread to the same positions. None if they differ."""
        traced = [x for x in inputs if isinstance(x, _Traced)]
        m = traced[0].map
        if m is None or not all(m.same_as(t.map) for t in traced):
            return None
        shape = traced[0].value.shape
        operands = []
        for k, x in enumerate(inputs):
            if isinstance(x, _Traced):
                operands.append(x.value)
                continue
            array = _static(x)
            if array.ndim == len(shape) and array.shape[m.axis] > 1:
                if array.shape[m.axis] != len(m.index):
                    return None
                fill = 1 if eqn.primitive.name == "div" and k == 1 else 0
                array = spread(array, m.axis, m.width, m.index, fill)
            dtype = eqn.invars[k].aval.dtype
            operands.append(jnp.broadcast_to(jnp.asarray(array, dtype), shape))
        return operands, m

    def op_identity(self, eqn, *inputs) -> _Traced | None:
        if len(inputs) != 1 or not isinstance(inputs[0], _Traced) or eqn.primitive.multiple_results:
            return None
        (x,) = inputs
        return _Traced(eqn.primitive.bind(x.value, **eqn.params), x.map)

    def op_elementwise(self, eqn, *inputs) -> _Traced | None:
        name = eqn.primitive.name
        if name in self.BINARY:
            return self.binary(eqn, list(inputs))
        if name == "clamp":
            return self.clamp(eqn, *inputs)
        if (
            name in self.SAFE_UNARY
            and len(inputs) == 1
            and eqn.params.get("y", 0) >= 0  # integer_pow: x ** -1 of a padded 0 is inf
        ):
            return self.op_identity(eqn, *inputs)
        return None

    def binary(self, eqn, inputs: list) -> _Traced | None:
        if eqn.primitive.name == "div" and isinstance(inputs[1], _Traced):
            return None  # padded positions of a divisor may be 0
        aligned = self.aligned(eqn, inputs)
        if aligned is None:
            return None
        operands, m = aligned
        return _Traced(eqn.primitive.bind(*operands, **eqn.params), m)

    def op_stack(self, eqn, *inputs) -> _Traced | None:
        aligned = self.aligned(eqn, list(inputs))
        if aligned is None:
            return None
        operands, m = aligned
        axis = m.axis + (eqn.params["axis"] <= m.axis)
        return _Traced(
            eqn.primitive.bind(*operands, **eqn.params), dataclasses.replace(m, axis=axis)
        )

    def op_conv(self, eqn, x, kernel) -> _Traced | None:
        if not isinstance(x, _Traced) or isinstance(kernel, (_Traced, _Lazy)):
            return None
        params = dict(eqn.params)
        dn = params["dimension_numbers"]
        in_axis, k_out, k_in, out_axis = (
            dn.lhs_spec[1],
            dn.rhs_spec[0],
            dn.rhs_spec[1],
            dn.out_spec[1],
        )
        if params["batch_group_count"] != 1 or (x.map is not None and x.map.axis != in_axis):
            return None
        kernel = np.asarray(kernel)
        filters, per_group = kernel.shape[k_out], kernel.shape[k_in]
        groups = params["feature_group_count"]
        m = x.map
        if groups == 1:
            width = round_up(filters, self.multiple)
            if m is None and width == filters:
                return None
            wide = spread(kernel, k_out, width, np.arange(filters))
            if m is not None:
                wide = spread(wide, k_in, m.width, m.index)
            out = lax.conv_general_dilated_p.bind(x.value, jnp.asarray(wide), **params)
            return _Traced(out, _prefix_map(out_axis, width, filters))
        if groups == filters == (len(m.index) if m else filters) and per_group == 1:  # depthwise
            if m is not None:
                kernel = spread(kernel, k_out, m.width, m.index)
                params["feature_group_count"] = m.width
            out = _depthwise(x.value, jnp.asarray(kernel), params)
            return _Traced(out, None if m is None else dataclasses.replace(m, axis=out_axis))
        return None

    def op_dot(self, eqn, x, weight) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None or isinstance(weight, (_Traced, _Lazy)):
            return None
        (x_contract, w_contract), (x_batch, _) = eqn.params["dimension_numbers"]
        if x_batch or tuple(x_contract) != (x.map.axis,):
            return None
        weight = np.asarray(weight)
        (axis,) = w_contract
        wide = spread(weight, axis, x.map.width, x.map.index)
        return _Traced(eqn.primitive.bind(x.value, jnp.asarray(wide), **eqn.params))

    def op_reduce_window(self, eqn, x, *rest) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None or rest:
            return None
        if not walk.window_keeps_axis(eqn.params, x.map.axis):
            return None
        return _Traced(eqn.primitive.bind(x.value, **eqn.params), x.map)

    def op_reduce(self, eqn, x) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None:
            return None
        axis = walk.removed_axis(x.map.axis, eqn.params["axes"])
        if axis is None:
            return None
        return _Traced(
            eqn.primitive.bind(x.value, **eqn.params), dataclasses.replace(x.map, axis=axis)
        )

    def op_pad(self, eqn, x, padding_value) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None or isinstance(padding_value, _Traced):
            return None
        config = list(eqn.params["padding_config"])
        m = x.map
        low, high, interior = config[m.axis]
        if (low, high, interior) == (0, 0, 0):
            out = eqn.primitive.bind(x.value, jnp.asarray(padding_value), **eqn.params)
            return _Traced(out, m)
        real = len(m.index)
        wanted = real + low + high
        if interior or low < 0 or wanted <= 0 or not m.is_prefix():
            return None
        # Real channel k lands at low + k, as in fn; the padded positions after the real ones
        # are cut or extended so that the width is a multiple (only padded positions are cut).
        width = round_up(wanted, self.multiple)
        config[m.axis] = (low, width - low - m.width, 0)
        out = eqn.primitive.bind(x.value, jnp.asarray(padding_value), padding_config=tuple(config))
        return _Traced(out, _prefix_map(m.axis, width, wanted))

    def op_slice(self, eqn, x) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None:
            return None
        a = x.map.axis
        starts, limits = list(eqn.params["start_indices"]), list(eqn.params["limit_indices"])
        strides = eqn.params["strides"]
        if starts[a] != 0 or limits[a] != len(x.map.index) or (strides and strides[a] != 1):
            return None
        limits[a] = x.map.width
        out = lax.slice(x.value, starts, limits, strides)
        return _Traced(out, x.map)

    def op_concatenate(self, eqn, *parts) -> _Traced | None:
        if not all(isinstance(p, _Traced) for p in parts):
            return None
        axis = eqn.params["dimension"]
        maps = [p.map for p in parts]
        if any(m is not None and m.axis != axis for m in maps):
            return None
        index, offset = [], 0
        for p, m in zip(parts, maps, strict=True):
            size = m.width if m else p.value.shape[axis]
            index.append((m.index if m else np.arange(size)) + offset)
            offset += size
        out = eqn.primitive.bind(*[p.value for p in parts], **eqn.params)
        return _Traced(out, ChannelMap(axis, offset, np.concatenate(index)))

    def op_transpose(self, eqn, x) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None:
            return None
        perm = list(eqn.params["permutation"])
        out = eqn.primitive.bind(x.value, **eqn.params)
        return _Traced(out, dataclasses.replace(x.map, axis=perm.index(x.map.axis)))

    def op_squeeze(self, eqn, x) -> _Traced | None:
        if not isinstance(x, _Traced) or x.map is None:
            return None
        axis = walk.removed_axis(x.map.axis, eqn.params["dimensions"])
        if axis is None:
            return None
        out = eqn.primitive.bind(x.value, **eqn.params)
        return _Traced(out, dataclasses.replace(x.map, axis=axis))

    def op_reshape(self, eqn, x, *dynamic_shape) -> _Traced | None:
        """A flatten (batch, ..., channels) -> (batch, features) of a channels-last value:
        feature (s, k) of spatial position s and real channel k sits at s * width + index[k]."""
        if not isinstance(x, _Traced) or x.map is None or dynamic_shape:
            return None
        in_shape, m = eqn.invars[0].aval.shape, x.map
        new_sizes = tuple(eqn.params["new_sizes"])
        if m.axis != len(in_shape) - 1 or len(new_sizes) != 2 or len(in_shape) < 2:
            return None
        spatial = in_shape[1:-1]
        if not all(isinstance(d, (int, np.integer)) for d in spatial):
            return None
        positions = int(np.prod(spatial, dtype=np.int64))
        if new_sizes[0] != in_shape[0] or new_sizes[1] != positions * len(m.index):
            return None
        index = (np.arange(positions)[:, None] * m.width + m.index[None, :]).ravel()
        out = jnp.reshape(x.value, (x.value.shape[0], positions * m.width))
        return _Traced(out, ChannelMap(1, positions * m.width, index))

    def clamp(self, eqn, low, x, high) -> _Traced | None:
        if not isinstance(x, _Traced) or isinstance(low, _Traced) or isinstance(high, _Traced):
            return None
        if np.ndim(_static(low)) or np.ndim(_static(high)):
            return None
        out = eqn.primitive.bind(jnp.asarray(_static(low)), x.value, jnp.asarray(_static(high)))
        return _Traced(out, x.map)


NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs (HWIO), out specs


def _depthwise(x: jax.Array, kernel: jax.Array, params: dict) -> jax.Array:
    """A depthwise conv (N, H, W, C) * (kh, kw, 1, C). On CPU, as kh * kw shifted multiply-adds:
    XLA:CPU's depthwise convs run at ~0.3 GMAC/s (experiments/RESULTS.md), the shifted form
    is one elementwise fusion, ~10x faster. Other platforms keep the conv."""
    dn = params["dimension_numbers"]
    specs = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
    plain_window = all(d == 1 for d in (*params["lhs_dilation"], *params["rhs_dilation"]))
    if specs != NHWC or not plain_window or isinstance(params["padding"], str):
        return lax.conv_general_dilated_p.bind(x, kernel, **params)

    def conv(x, kernel):
        return lax.conv_general_dilated_p.bind(x, kernel, **params)

    def shifts(x, kernel):
        (top, bottom), (left, right) = params["padding"]
        sh, sw = params["window_strides"]
        kh, kw = kernel.shape[:2]
        x = lax.pad(
            x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0))
        )
        n, h, w, c = x.shape
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        out = None
        for i in range(kh):
            for j in range(kw):
                window = lax.slice(
                    x,
                    (0, i, j, 0),
                    (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1),
                )
                term = window * kernel[i, j, 0]
                out = term if out is None else out + term
        return out.astype(x.dtype)

    return lax.platform_dependent(x, kernel, cpu=shifts, default=conv)


def _prefix_map(axis: int, width: int, real: int) -> ChannelMap | None:
    """Real channels first; None when nothing is padded (so that maps compare alike)."""
    return None if width == real else ChannelMap(axis, int(width), np.arange(real))


def spread(array: np.ndarray, axis: int, width: int, index: np.ndarray, fill=0) -> np.ndarray:
    """`array` widened to `width` along `axis`: its entry k at position index[k], `fill` at the
    other positions."""
    shape = list(array.shape)
    shape[axis] = width
    wide = np.full(shape, fill, array.dtype)
    np.moveaxis(wide, axis, 0)[index] = np.moveaxis(array, axis, 0)
    return wide


def _static(value: Any) -> np.ndarray:
    return value.array if isinstance(value, _Lazy) else np.asarray(value)


def conv_widths(fn: Callable, example: jax.ShapeDtypeStruct) -> list[int]:
    """The output widths of fn's convs, in order (to check what pad_channels produced; a conv
    with a CPU-only rewrite counts once, from the other platforms' branch)."""
    from dcff_jax.jaxpr import channels

    return [r.out_width for r in channels.analyze_function(fn, example).records if r.kind == "conv"]
