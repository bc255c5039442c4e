"""Channel padding's rules for convs, matmuls and the ops that move, cut, pad or join the channel
axis (dcff_jax.deploy.channel_padding): each returns the padded result with its channel map, or
None to have the op run on the real channels."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from dcff_jax.deploy.channel_maps import (
    ChannelMap,
    Lazy,
    Traced,
    depthwise,
    prefix_map,
    round_up,
    spread,
)
from dcff_jax.jaxpr import walk


class ContractionRules:
    """A conv or matmul reads the real channels through zero weights at the padded positions; a
    conv's own outputs are rounded up to the multiple (self.multiple)."""

    def op_conv(self, eqn, x, kernel) -> Traced | None:
        if not isinstance(x, Traced) or isinstance(kernel, (Traced, Lazy)):
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
            return Traced(out, prefix_map(out_axis, width, filters))
        if groups == filters == (len(m.index) if m else filters) and per_group == 1:  # depthwise
            if m is not None:
                kernel = spread(kernel, k_out, m.width, m.index)
                params["feature_group_count"] = m.width
            out = depthwise(x.value, jnp.asarray(kernel), params)
            return Traced(out, None if m is None else dataclasses.replace(m, axis=out_axis))
        return None

    def op_dot(self, eqn, x, weight) -> Traced | None:
        if not isinstance(x, Traced) or x.map is None or isinstance(weight, (Traced, Lazy)):
            return None
        (x_contract, w_contract), (x_batch, _) = eqn.params["dimension_numbers"]
        if x_batch or tuple(x_contract) != (x.map.axis,):
            return None
        weight = np.asarray(weight)
        (axis,) = w_contract
        wide = spread(weight, axis, x.map.width, x.map.index)
        return Traced(eqn.primitive.bind(x.value, jnp.asarray(wide), **eqn.params))


class ShapeRules:
    """Pools and reductions over other axes, channel pads (re-offset), slices, concats,
    transposes, squeezes and flattens carry the map."""

    def op_reduce_window(self, eqn, x, *rest) -> Traced | None:
        if not isinstance(x, Traced) or x.map is None or rest:
            return None
        if not walk.window_keeps_axis(eqn.params, x.map.axis):
            return None
        return Traced(eqn.primitive.bind(x.value, **eqn.params), x.map)

    def op_reduce(self, eqn, x) -> Traced | None:
        return self.without_axes(eqn, x, eqn.params["axes"])

    def without_axes(self, eqn, x, removed) -> Traced | None:
        """An op that drops the axes `removed` (a reduction, a squeeze): the map follows its
        channel axis, unless that axis is dropped."""
        if not isinstance(x, Traced) or x.map is None:
            return None
        axis = walk.removed_axis(x.map.axis, removed)
        if axis is None:
            return None
        out = eqn.primitive.bind(x.value, **eqn.params)
        return Traced(out, dataclasses.replace(x.map, axis=axis))

    def op_pad(self, eqn, x, padding_value) -> Traced | None:
        if not isinstance(x, Traced) or x.map is None or isinstance(padding_value, Traced):
            return None
        config = list(eqn.params["padding_config"])
        m = x.map
        low, high, interior = config[m.axis]
        if (low, high, interior) == (0, 0, 0):
            out = eqn.primitive.bind(x.value, jnp.asarray(padding_value), **eqn.params)
            return Traced(out, m)
        real = len(m.index)
        wanted = real + low + high
        if interior or low < 0 or wanted <= 0 or not m.is_prefix():
            return None
        # Real channel k lands at low + k, as in fn; the padded positions after the real ones
        # are cut or extended so that the width is a multiple (only padded positions are cut).
        width = round_up(wanted, self.multiple)
        config[m.axis] = (low, width - low - m.width, 0)
        out = eqn.primitive.bind(x.value, jnp.asarray(padding_value), padding_config=tuple(config))
        return Traced(out, prefix_map(m.axis, width, wanted))

    def op_slice(self, eqn, x) -> Traced | None:
        if not isinstance(x, Traced) or x.map is None:
            return None
        a = x.map.axis
        starts, limits = list(eqn.params["start_indices"]), list(eqn.params["limit_indices"])
        strides = eqn.params["strides"]
        if starts[a] != 0 or limits[a] != len(x.map.index) or (strides and strides[a] != 1):
            return None
        limits[a] = x.map.width
        out = lax.slice(x.value, starts, limits, strides)
        return Traced(out, x.map)

    def op_concatenate(self, eqn, *parts) -> Traced | None:
        if not all(isinstance(p, Traced) for p in parts):
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
        return Traced(out, ChannelMap(axis, offset, np.concatenate(index)))

    def op_transpose(self, eqn, x) -> Traced | None:
        if not isinstance(x, Traced) or x.map is None:
            return None
        perm = list(eqn.params["permutation"])
        out = eqn.primitive.bind(x.value, **eqn.params)
        return Traced(out, dataclasses.replace(x.map, axis=perm.index(x.map.axis)))

    def op_squeeze(self, eqn, x) -> Traced | None:
        return self.without_axes(eqn, x, eqn.params["dimensions"])

    def op_reshape(self, eqn, x, *dynamic_shape) -> Traced | None:
        """A flatten (batch, ..., channels) -> (batch, features) of a channels-last value:
        feature (s, k) of spatial position s and real channel k sits at s * width + index[k]."""
        if not isinstance(x, Traced) or x.map is None or dynamic_shape:
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
        return Traced(out, ChannelMap(1, positions * m.width, index))
