"""A small jaxpr-to-ONNX converter for the ops compact CNNs use (the file: deploy.onnx_file).

Why our own converter and not jax2onnx: jax2onnx 0.17.1 pins orbax-checkpoint < 0.11.37, which
cannot live beside our orbax, and it pulls in a large dependency tree. A compact CNN in eval mode
needs few ops, and everything that depends only on the weights (batch norm folded to a scale and
a shift, kernel reshapes) is evaluated here once, by jax, and stored as constants.

How: the function (uint8 NHWC images -> float32 logits) is traced with `jax.make_jaxpr` at a
symbolic batch size and walked by walk.interpret (jit, custom_jvp and the default branch of a
platform-dependent cond inlined), equations whose inputs are all known are folded, and the rest
become ONNX nodes (opset 17). The export converts the function as channel_padding pads it, so
its conv widths are multiples of 8 (onnx_file.onnx_bytes). Convolutions and pools run in
ONNX's NCHW layout: every value carries the permutation from its jax (NHWC) layout to its ONNX
layout, and is transposed only where an op needs another layout (a reshape, a matmul), so
a CNN's graph holds one transpose at the input and one before the classifier.

Needs the optional extra `dcff-jax[onnx]` (onnx; onnxruntime to run the file).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from dcff_jax.deploy.onnx_builder import (  # noqa: F401 (UnsupportedOp: the converter's error)
    GraphBuilder,
    Tensor,
    UnsupportedOp,
    is_static,
    read_names,
)
from dcff_jax.deploy.onnx_ops import ConvOps, ShapeOps, ValueOps
from dcff_jax.jaxpr import walk

OPSET = 17
_BATCH = "batch"


class Converter(GraphBuilder, ValueOps, ConvOps, ShapeOps):
    """Walks a jaxpr and emits ONNX nodes; see the module docstring."""

    ELEMENTWISE = {
        "add": "Add",
        "sub": "Sub",
        "mul": "Mul",
        "div": "Div",
        "max": "Max",
        "min": "Min",
    }
    UNARY = {
        "neg": "Neg",
        "exp": "Exp",
        "log": "Log",
        "sqrt": "Sqrt",
        "tanh": "Tanh",
        "logistic": "Sigmoid",
        "abs": "Abs",
    }

    def run(self, jaxpr, consts: Sequence, args: Sequence) -> list:
        from jax.extend.core import Literal

        uses = collections.Counter(
            v for e in jaxpr.eqns for v in e.invars if not isinstance(v, Literal)
        )
        for var in jaxpr.outvars:
            if not isinstance(var, Literal):
                uses[var] += 2  # read outside this jaxpr too: never folded into its producer
        inputs = set(jaxpr.invars)

        def bound(var, value):
            # Only a value read once may be folded into its producer (an input's producer is
            # outside: it is single-use only if read once there and once here).
            if isinstance(value, Tensor):
                if uses[var] != 1:
                    self.single_use.discard(value.name)
                elif var not in inputs:
                    self.single_use.add(value.name)

        consts = [np.asarray(c) for c in consts]
        return walk.interpret(
            jaxpr, consts, args, self.equation, lambda var: np.asarray(var.val), bound
        )

    def equation(self, eqn, inputs: list) -> list:
        name = eqn.primitive.name
        call = walk.inlined(eqn, inputs)
        if call is not None:
            return self.run(*call)
        if not any(isinstance(x, Tensor) for x in inputs):
            return self.fold(eqn, inputs)
        handler = getattr(self, f"op_{name}", None)
        if name in self.ELEMENTWISE:
            out = self.elementwise(self.ELEMENTWISE[name], eqn, inputs)
        elif name in self.UNARY:
            (x,) = inputs
            out = dataclasses.replace(x, name=self.node(self.UNARY[name], [x.name]))
        elif handler is not None:
            out = handler(eqn, *inputs)
        else:
            raise UnsupportedOp(f"no ONNX translation for jax primitive {name!r}")
        return out if eqn.primitive.multiple_results else [out]

    def fold(self, eqn, inputs: list) -> list:
        """Evaluate an equation whose inputs are all known (weights, literals) with jax."""
        import jax.numpy as jnp

        if not all(walk.has_static_shape(v.aval) for v in eqn.outvars):
            if eqn.primitive.name != "broadcast_in_dim":
                raise UnsupportedOp(f"{eqn.primitive.name} of constants to a batch-sized shape")
            return [walk.broadcast_with_ones(inputs[0], eqn.params)]
        outs = eqn.primitive.bind(*[jnp.asarray(x) for x in inputs], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [np.asarray(o) for o in outs]


def jaxpr_to_onnx(
    fn: Callable, input_shape: Sequence[int | None], input_dtype, *, name: str = "dcff_jax"
):
    """fn traced at `input_shape` (None = the batch, symbolic) as an onnx.ModelProto with one
    input "images" and one output "logits"; raises UnsupportedOp for ops outside the set above.
    """
    return closed_to_onnx(walk.trace_any_batch(fn, input_shape, input_dtype), name=name)


def closed_to_onnx(closed, *, name: str = "dcff_jax"):
    """jaxpr_to_onnx of a function already traced (walk.trace_any_batch): one input, one
    output; a symbolic dimension becomes the file's "batch"."""
    import onnx
    from onnx import helper

    (in_aval,) = closed.in_avals
    converter = Converter()
    (out,) = converter.run(
        closed.jaxpr, closed.consts, [Tensor("images", tuple(range(len(in_aval.shape))))]
    )
    if not isinstance(out, Tensor) or out.lazy_broadcast:
        raise UnsupportedOp("the output does not depend on the input")
    out = converter.plain(out)
    converter.nodes.append(helper.make_node("Identity", [out.name], ["logits"]))

    def value_info(value_name, aval_dtype, dims):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(aval_dtype))
        return helper.make_tensor_value_info(
            value_name, elem, [_BATCH if not is_static(d) else int(d) for d in dims]
        )

    (out_aval,) = closed.out_avals
    graph = helper.make_graph(
        converter.nodes,
        name,
        [value_info("images", in_aval.dtype, in_aval.shape)],
        [value_info("logits", out_aval.dtype, out_aval.shape)],
        converter.initializers(),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dcff_jax"
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.16
    onnx.checker.check_model(model)
    return model
