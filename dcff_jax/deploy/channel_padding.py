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

import jax
import jax.numpy as jnp
import numpy as np

from dcff_jax.deploy.channel_maps import ChannelMap, Lazy, Traced, plain, spread, static
from dcff_jax.deploy.padding_rules import ContractionRules, ShapeRules
from dcff_jax.jaxpr import channels, walk


def pad_channels(fn: Callable[[jax.Array], jax.Array], multiple: int = 8) -> Callable:
    """fn (one array -> one array or a tuple of them) with conv widths rounded up to `multiple`;
    see the module docstring. The result traces fn at each call's input shape (symbolic batch
    sizes included, so it lowers with jax.export) and is meant to be jitted."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")

    def padded(x):
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)))
        outs = Walk(multiple).run(closed.jaxpr, closed.consts, [Traced(x)])
        results = [plain(v, var.aval) for v, var in zip(outs, closed.jaxpr.outvars, strict=True)]
        return results[0] if len(results) == 1 else tuple(results)

    return padded


class Walk(ContractionRules, ShapeRules):
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
        if not any(isinstance(x, Traced) for x in inputs):
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
            if eqn.primitive.name != "broadcast_in_dim" or isinstance(inputs[0], Lazy):
                return None
            return [Lazy(walk.broadcast_with_ones(inputs[0], eqn.params))]
        if any(isinstance(x, Lazy) for x in inputs):
            return None
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*[jnp.asarray(x) for x in inputs], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [np.asarray(o) for o in outs]

    def unpadded(self, eqn, inputs: list) -> list:
        """The equation as it was, on the real channels: nothing padded after it."""
        values = [plain(x, v.aval) for x, v in zip(inputs, eqn.invars, strict=True)]
        outs = eqn.primitive.bind(*values, **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [Traced(o) for o in outs]

    # --- ops that carry or make channel maps ----------------------------------------------
    def aligned(self, eqn, inputs: list) -> tuple[list, ChannelMap] | None:
        """The operands of an elementwise op (or a stack) at the padded shape: all traced ones
        padded alike, per-channel weights spread to the same positions. None if they differ."""
        traced = [x for x in inputs if isinstance(x, Traced)]
        m = traced[0].map
        if m is None or not all(m.same_as(t.map) for t in traced):
            return None
        shape = traced[0].value.shape
        operands = []
        for k, x in enumerate(inputs):
            if isinstance(x, Traced):
                operands.append(x.value)
                continue
            array = static(x)
            if array.ndim == len(shape) and array.shape[m.axis] > 1:
                if array.shape[m.axis] != len(m.index):
                    return None
                fill = 1 if eqn.primitive.name == "div" and k == 1 else 0
                array = spread(array, m.axis, m.width, m.index, fill)
            dtype = eqn.invars[k].aval.dtype
            operands.append(jnp.broadcast_to(jnp.asarray(array, dtype), shape))
        return operands, m

    def op_identity(self, eqn, *inputs) -> Traced | None:
        if len(inputs) != 1 or not isinstance(inputs[0], Traced) or eqn.primitive.multiple_results:
            return None
        (x,) = inputs
        return Traced(eqn.primitive.bind(x.value, **eqn.params), x.map)

    def op_elementwise(self, eqn, *inputs) -> Traced | None:
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

    def binary(self, eqn, inputs: list) -> Traced | None:
        if eqn.primitive.name == "div" and isinstance(inputs[1], Traced):
            return None  # padded positions of a divisor may be 0
        aligned = self.aligned(eqn, inputs)
        if aligned is None:
            return None
        operands, m = aligned
        return Traced(eqn.primitive.bind(*operands, **eqn.params), m)

    def op_stack(self, eqn, *inputs) -> Traced | None:
        aligned = self.aligned(eqn, list(inputs))
        if aligned is None:
            return None
        operands, m = aligned
        axis = m.axis + (eqn.params["axis"] <= m.axis)
        return Traced(
            eqn.primitive.bind(*operands, **eqn.params), dataclasses.replace(m, axis=axis)
        )

    def clamp(self, eqn, low, x, high) -> Traced | None:
        if not isinstance(x, Traced) or isinstance(low, Traced) or isinstance(high, Traced):
            return None
        if np.ndim(static(low)) or np.ndim(static(high)):
            return None
        out = eqn.primitive.bind(jnp.asarray(static(low)), x.value, jnp.asarray(static(high)))
        return Traced(out, x.map)


def conv_widths(fn: Callable, example: jax.ShapeDtypeStruct) -> list[int]:
    """The output widths of fn's convs, in order (to check what pad_channels produced; a conv
    with a CPU-only rewrite counts once, from the other platforms' branch)."""
    return [r.out_width for r in channels.analyze_function(fn, example).records if r.kind == "conv"]
