"""Channel maps and the values channel padding carries (dcff_jax.deploy.channel_padding): where
a padded value's real channels sit, how weights are spread to the padded positions, and
depthwise convs written for XLA:CPU."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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
class Traced:
    """A value computed from the function's input, channels padded as `map` says (None: not)."""

    value: jax.Array
    map: ChannelMap | None = None


@dataclasses.dataclass(frozen=True)
class Lazy:
    """Weights broadcast to a batch-sized shape: kept with size 1 on the broadcast axes."""

    array: np.ndarray


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plain(value, aval) -> jax.Array:
    """The value as fn computed it: real channels only, full shape."""
    if isinstance(value, Traced):
        m = value.map
        if m is None:
            return value.value
        if m.is_prefix():
            return lax.slice_in_dim(value.value, 0, len(m.index), axis=m.axis)
        return jnp.take(value.value, jnp.asarray(m.index), axis=m.axis)
    if isinstance(value, Lazy):
        return jnp.broadcast_to(value.array, aval.shape)
    return jnp.asarray(value)


NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs (HWIO), out specs


def depthwise(x: jax.Array, kernel: jax.Array, params: dict) -> jax.Array:
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


def prefix_map(axis: int, width: int, real: int) -> ChannelMap | None:
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


def static(value: Any) -> np.ndarray:
    return value.array if isinstance(value, Lazy) else np.asarray(value)
