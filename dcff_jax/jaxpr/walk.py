"""What our jaxpr walkers share (jaxpr.channels: channel analysis; deploy.channel_padding: padded
re-runs; deploy.onnx_graph: ONNX graphs): the walk over equations, inlining calls (and a
platform-dependent cond's branch for other platforms), what each primitive does to the channel
axis, and folding weights that are broadcast to a batch-sized shape."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Primitives that only call a sub-jaxpr (jit, custom derivative rules, remat), and the parameter
# holding it: every walker steps into them.
INLINE = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


# What each primitive does to the channel axis of a value: the one classification the channel
# analysis (jaxpr.channels) and channel padding (deploy.channel_padding) dispatch on, rule -> their
# op_<rule>. A primitive not listed blocks channels (analysis) or runs on the real channels
# (padding).
_RULES = {
    # The value itself: cast, copied or named (checkpoint_name).
    "identity": "convert_element_type copy copy_p reduce_precision optimization_barrier name",
    # Each output element from the same position of every (broadcast) operand: channel-wise.
    "elementwise": (
        "add sub mul div max min pow atan2 rem nextafter neg exp exp2 log log1p expm1 tanh "
        "logistic sqrt rsqrt cbrt abs sign floor ceil round integer_pow square sin cos tan erf "
        "erfc erf_inv is_finite not and or xor eq ne lt le gt ge select_n clamp add_any "
        "logaddexp real imag"
    ),
    # Reduces params["axes"]; the channel axis is kept if it is not among them.
    "reduce": "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin",
    # A window over every axis: channel-wise when its window is 1 on the channel axis.
    "reduce_window": "reduce_window_sum reduce_window_max reduce_window_min reduce_window",
    # Shape ops: each moves, merges, cuts, pads or joins the channel axis its own way.
    "broadcast": "broadcast_in_dim",
    "reshape": "reshape",
    "squeeze": "squeeze",
    "transpose": "transpose",
    "concatenate": "concatenate",
    "pad": "pad",
    "slice": "slice",
    "stack": "stack",
    # Contractions: a conv contracts its input's channels and makes its own.
    "conv": "conv_general_dilated",
    "dot": "dot_general",
}
CHANNEL_RULE: dict[str, str] = {
    name: rule for rule, names in _RULES.items() for name in names.split()
}


def removed_axis(axis: int, removed: Sequence[int]) -> int | None:
    """Where `axis` is once the axes `removed` are dropped (None: it is one of them)."""
    return None if axis in removed else axis - sum(a < axis for a in removed)


def window_keeps_axis(params: dict, axis: int) -> bool:
    """Whether a reduce_window's window leaves `axis` alone (size 1, stride 1, no padding)."""
    return (
        params["window_dimensions"][axis] == 1
        and params["window_strides"][axis] == 1
        and tuple(params["padding"][axis]) == (0, 0)
    )


def inlined(eqn, inputs: Sequence) -> tuple[Any, Sequence, list] | None:
    """(jaxpr, consts, inputs) of the sub-jaxpr that `eqn` only calls, or None. Custom
    derivative rules take extra leading operands; the sub-jaxpr reads the last ones.

    A cond made by lax.platform_dependent is a call of its default branch (the one for other
    platforms than those named: channel_padding keeps XLA:CPU's rewrite of a depthwise conv in
    a CPU-only branch, and the walkers see the plain conv of the default branch)."""
    if eqn.primitive.name == "cond" and eqn.params.get("branches_platforms"):
        platforms = list(eqn.params["branches_platforms"])
        if None in platforms:
            branch = eqn.params["branches"][platforms.index(None)]
            return branch.jaxpr, branch.consts, list(inputs[1:])
    key = INLINE.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    jaxpr = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr, or an open one (remat)
    consts = getattr(sub, "consts", ())
    return jaxpr, consts, list(inputs[len(inputs) - len(jaxpr.invars) :])


def interpret(
    jaxpr,
    consts: Sequence,
    args: Sequence,
    equation: Callable[[Any, list], Sequence],
    literal: Callable[[Any], Any],
    bound: Callable[[Any, Any], None] | None = None,
) -> list:
    """Walk `jaxpr` in order: each equation's outputs are equation(eqn, its inputs' values);
    constvars take `consts`, invars `args`, literals literal(var); bound(var, value), if given,
    sees each invar and equation output as it is bound. Returns the outputs' values.

    A platform_index equation (lax.platform_dependent's) is not evaluated: its only reader is
    its cond, which `inlined` turns into a call of the default branch."""
    from jax.extend.core import Literal

    env: dict = dict(zip(jaxpr.constvars, consts, strict=True))

    def bind(var, value):
        env[var] = value
        if bound is not None:
            bound(var, value)

    for var, value in zip(jaxpr.invars, args, strict=True):
        bind(var, value)

    def read(var):
        return literal(var) if isinstance(var, Literal) else env[var]

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "platform_index":
            env[eqn.outvars[0]] = None
            continue
        outputs = equation(eqn, [read(v) for v in eqn.invars])
        for var, value in zip(eqn.outvars, outputs, strict=True):
            bind(var, value)
    return [read(v) for v in jaxpr.outvars]


def trace_any_batch(fn: Callable, input_shape: Sequence[int | None], input_dtype):
    """fn (one array -> arrays) traced by jax.make_jaxpr at `input_shape`, None being a
    symbolic batch size: the one trace an export lowers, converts and counts (a ClosedJaxpr,
    re-run without tracing fn again by jax.extend.core.jaxpr_as_fun)."""
    import jax

    (batch,) = jax.export.symbolic_shape("b")
    shape = tuple(batch if d is None else d for d in input_shape)
    return jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, input_dtype))


def has_static_shape(aval) -> bool:
    """No symbolic (batch) dimension in the value's shape."""
    return all(isinstance(d, (int, np.integer)) for d in aval.shape)


def broadcast_with_ones(x, params: dict) -> np.ndarray:
    """A broadcast_in_dim of weights to a batch-sized shape (zeros_like(activations), a bias
    broadcast to the output), kept with size 1 on every broadcast axis: the walkers fold weights
    at trace time, where the batch size may be symbolic, and the consumer broadcasts."""
    shape = [1] * len(params["shape"])
    for i, d in enumerate(params["broadcast_dimensions"]):
        shape[d] = np.shape(x)[i]
    return np.reshape(x, shape)
