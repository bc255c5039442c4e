"""What our jaxpr walkers share (trace: channel analysis; onnx_export: ONNX graphs;
channel_padding: padded re-runs): inlining calls, the walk over equations, and folding
weights that are broadcast to a batch-sized shape."""

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


def inlined(eqn, inputs: Sequence) -> tuple[Any, Sequence, list] | None:
    """(jaxpr, consts, inputs) of the sub-jaxpr that `eqn` only calls, or None. Custom
    derivative rules take extra leading operands; the sub-jaxpr reads the last ones."""
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
) -> list:
    """Walk `jaxpr` in order: each equation's outputs are equation(eqn, its inputs' values);
    constvars take `consts`, invars `args`, literals literal(var). Returns the outputs' values."""
    from jax.extend.core import Literal

    env: dict = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var):
        return literal(var) if isinstance(var, Literal) else env[var]

    for eqn in jaxpr.eqns:
        env.update(zip(eqn.outvars, equation(eqn, [read(v) for v in eqn.invars]), strict=True))
    return [read(v) for v in jaxpr.outvars]


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
