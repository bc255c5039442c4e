"""3x3 max pools on XLA:CPU: lax.reduce_window against the rewrites one might try, side by side.

  python experiments/bench_maxpool.py [--batch 256] [--steps 7]

The shapes are GoogLeNet-CIFAR's pools (NHWC; stride 1 in each inception's pool branch,
stride 2 between stages). Forms, all equal to reduce_window bit for bit (checked):
- reduce_window: what nn.max_pool lowers to;
- shifted: max over the kh*kw shifted slices of the input padded with -inf;
- separable_pad / separable_concat: rows then columns, the borders by a -inf pad or by
  concatenating a -inf row;
- reduce_window/16: reduce_window over micro-batches of 16 (lax.map), activations in cache.
Median ms of --steps calls after a warm-up, dcff_jax.compiler_options().
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_conv_latency import median_ms  # the same timing as the per-conv benchmark
from jax import lax

from dcff_jax import compiler_options

SHAPES = (((32, 32, 192), 1), ((32, 32, 256), 1), ((32, 32, 480), 2), ((16, 16, 512), 1))
SHAPES += (((16, 16, 832), 2), ((8, 8, 832), 1))


def reduce_window(x, stride: int):
    window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)


def _pad(x, axes: tuple[int, ...]):
    config = [(1, 1, 0) if a in axes else (0, 0, 0) for a in range(x.ndim)]
    return lax.pad(x, jnp.array(-jnp.inf, x.dtype), config)


def shifted(x, stride: int):
    padded = _pad(x, (1, 2))
    n, h, w, c = x.shape
    out = None
    for i in range(3):
        for j in range(3):
            window = lax.slice(padded, (0, i, j, 0), (n, i + h, j + w, c))
            out = window if out is None else jnp.maximum(out, window)
    return out[:, ::stride, ::stride]


def _max3(x, axis: int, border):
    """max of x and its neighbours along `axis`, -inf beyond the edges."""
    n = x.shape[axis]
    padded = border(x, axis)
    parts = [lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(3)]
    return jnp.maximum(jnp.maximum(parts[0], parts[1]), parts[2])


def _pad_border(x, axis):
    return _pad(x, (axis,))


def _concat_border(x, axis):
    edge = jnp.full((*x.shape[:axis], 1, *x.shape[axis + 1 :]), -jnp.inf, x.dtype)
    return jnp.concatenate([edge, x, edge], axis)


def separable(border):
    def pool(x, stride: int):
        return _max3(_max3(x, 1, border), 2, border)[:, ::stride, ::stride]

    return pool


def in_microbatches(fn, size: int):
    def pool(x, stride: int):
        chunks = x.reshape(-1, size, *x.shape[1:])
        out = lax.map(lambda c: fn(c, stride), chunks)
        return out.reshape(x.shape[0], *out.shape[2:])

    return pool


FORMS = {
    "reduce_window": reduce_window,
    "shifted": shifted,
    "separable_pad": separable(_pad_border),
    "separable_concat": separable(_concat_border),
    "reduce_window/16": in_microbatches(reduce_window, 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    print("| input HWC | stride | " + " | ".join(f"{name} ms" for name in FORMS) + " |")
    print("|---" * (2 + len(FORMS)) + "|")
    for hwc, stride in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, *hwc)), jnp.float32)
        want = jax.jit(reduce_window, static_argnums=1)(x, stride)
        cells = []
        for form in FORMS.values():
            fn = jax.jit(form, static_argnums=1, compiler_options=compiler_options())
            np.testing.assert_array_equal(fn(x, stride), want)
            cells.append(f"{median_ms(fn, (x, stride), args.steps):.1f}")
        print(f"| {hwc} | {stride} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
