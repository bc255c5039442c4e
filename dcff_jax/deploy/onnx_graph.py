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
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dcff_jax.jaxpr import walk

OPSET = 17
_BATCH = "batch"


class UnsupportedOp(NotImplementedError):
    """An op (or an op's configuration) this converter does not translate."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A graph value: ONNX tensor `name` holds the jax value transposed by `perm`
    (onnx = jnp.transpose(jax_value, perm)). `lazy_broadcast`: the ONNX tensor still has size 1
    on axes the jax value broadcasts to; only broadcasting (elementwise) ops may read it."""

    name: str
    perm: tuple[int, ...]
    lazy_broadcast: bool = False


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


class _Converter:
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

    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.arrays: dict[str, np.ndarray] = {}  # initializers, by name (folds edit them)
        self.names = (f"v{i}" for i in itertools.count())
        self.stacks: dict[str, tuple[int, list]] = {}  # stack output -> (axis, inputs)
        # Conv outputs (their Conv node, weight and bias names) that a per-channel affine op
        # may still fold into, the Relu outputs a Min may turn into a Clip, and which values
        # have exactly one reader (only those may be folded into their producer).
        self.convs: dict[str, tuple[Any, str, str | None]] = {}
        self.relus: dict[str, Any] = {}
        self.single_use: set[str] = set()

    # --- graph building ------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], **attributes) -> str:
        out = next(self.names)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attributes))
        return out

    def constant(self, value: np.ndarray) -> str:
        name = next(self.names)
        self.arrays[name] = np.asarray(value)
        return name

    def initializers(self) -> list:
        """The constants some node reads (folding leaves others behind)."""
        from onnx import numpy_helper

        read = _read_names(self.nodes)
        return [numpy_helper.from_array(a, n) for n, a in self.arrays.items() if n in read]

    def int64s(self, values: Sequence[int]) -> str:
        return self.constant(np.asarray(values, np.int64))

    def in_layout(self, value: _Tensor, perm: Sequence[int]) -> _Tensor:
        """value as an ONNX tensor in layout `perm`."""
        perm = tuple(perm)
        if value.perm == perm:
            return value
        if value.lazy_broadcast:
            raise UnsupportedOp("a broadcast value read in another layout")
        # onnx_now = T(x, value.perm); wanted T(x, perm) = T(onnx_now, inverse(value.perm)[perm]).
        inverse = _inverse(value.perm)
        step = tuple(inverse[p] for p in perm)
        return _Tensor(self.node("Transpose", [value.name], perm=list(step)), perm)

    def plain(self, value: _Tensor) -> _Tensor:
        return self.in_layout(value, tuple(range(len(value.perm))))

    def operand(self, value, perm: Sequence[int], dtype) -> str:
        """An elementwise operand in layout `perm`: a tensor transposed, a constant stored."""
        if isinstance(value, _Tensor):
            return self.in_layout(value, perm).name
        array = np.asarray(value, dtype)
        if array.ndim == len(perm):
            array = np.transpose(array, perm)
        return self.constant(array)

    # --- the walk -----------------------------------------------------------------------
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
            if isinstance(value, _Tensor):
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
        if not any(isinstance(x, _Tensor) for x in inputs):
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

    # --- translations -------------------------------------------------------------------
    def elementwise(self, op: str, eqn, inputs: list) -> _Tensor:
        tensors = [x for x in inputs if isinstance(x, _Tensor)]
        perm = next((t.perm for t in tensors if not t.lazy_broadcast), tensors[0].perm)
        dtype = eqn.outvars[0].aval.dtype
        if len(tensors) == 1 and not tensors[0].lazy_broadcast:
            folded = self.fold_into_producer(op, inputs, dtype)
            if folded is not None:
                return folded
        names = [self.operand(x, perm, dtype) for x in inputs]
        return _Tensor(self.node(op, names), perm)

    def fold_into_producer(self, op: str, inputs: list, dtype) -> _Tensor | None:
        """An op of a single-use conv or relu output with a constant, absorbed by its producer:
        conv(x, W) + b followed by + c, - c, * c or / c with c per output channel (a batch
        norm in eval mode) becomes one conv with new W and b; max(y, 0) becomes Relu, and
        min(relu, c) a Clip. None when the pattern does not apply."""
        (t,) = [x for x in inputs if isinstance(x, _Tensor)]
        c = next(np.asarray(x, dtype) for x in inputs if not isinstance(x, _Tensor))
        tensor_first = isinstance(inputs[0], _Tensor)
        if op == "Max" and not c.any():
            out = _Tensor(self.node("Relu", [t.name]), t.perm)
            self.relus[out.name] = self.nodes[-1]
            return out
        single = t.name in self.single_use
        if op == "Min" and single and t.name in self.relus and c.size == 1:
            node = self.relus.pop(t.name)  # min(max(x, 0), c) = Clip(x, 0, c)
            node.op_type = "Clip"
            zero = np.zeros((), dtype)
            node.input.extend([self.constant(zero), self.constant(c.reshape(()))])
            return t
        if t.name not in self.convs or not single or op not in ("Add", "Sub", "Mul", "Div"):
            return None
        if not tensor_first and op in ("Sub", "Div"):
            return None
        channels = self.arrays[self.convs[t.name][1]].shape[0]
        if c.ndim:  # onnx layout: (batch, channels, spatial...); per channel = only axis 1
            c = np.transpose(c, t.perm)
            if any(n != 1 for i, n in enumerate(c.shape) if i != 1):
                return None
        vector = np.broadcast_to(c.reshape(-1), (channels,)).astype(dtype)
        node, weight, bias = self.convs[t.name]
        if bias is None:
            bias = self.constant(np.zeros(channels, dtype))
            node.input.append(bias)
            self.convs[t.name] = (node, weight, bias)
        w, b = self.arrays[weight], self.arrays[bias]
        scale_shape = (channels,) + (1,) * (w.ndim - 1)
        if op == "Add":
            self.arrays[bias] = b + vector
        elif op == "Sub":
            self.arrays[bias] = b - vector
        elif op == "Mul":
            self.arrays[weight] = w * vector.reshape(scale_shape)
            self.arrays[bias] = b * vector
        else:
            self.arrays[weight] = w / vector.reshape(scale_shape)
            self.arrays[bias] = b / vector
        return t

    def op_convert_element_type(self, eqn, x: _Tensor) -> _Tensor:
        from onnx import helper

        to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
        return dataclasses.replace(x, name=self.node("Cast", [x.name], to=to))

    def op_copy(self, eqn, x: _Tensor) -> _Tensor:
        return x

    op_copy_p = op_name = op_copy  # name: jax.ad_checkpoint.checkpoint_name, an identity

    def op_integer_pow(self, eqn, x: _Tensor) -> _Tensor:
        if eqn.params["y"] != 2:
            raise UnsupportedOp(f"integer_pow with y={eqn.params['y']}")
        return dataclasses.replace(x, name=self.node("Mul", [x.name, x.name]))

    def op_rsqrt(self, eqn, x: _Tensor) -> _Tensor:
        return dataclasses.replace(x, name=self.node("Reciprocal", [self.node("Sqrt", [x.name])]))

    def op_clamp(self, eqn, low, x, high) -> _Tensor:
        if isinstance(low, _Tensor) or isinstance(high, _Tensor) or not isinstance(x, _Tensor):
            raise UnsupportedOp("clamp with tensor bounds")
        dtype = eqn.outvars[0].aval.dtype
        bounds = [self.constant(np.asarray(b, dtype).reshape(())) for b in (low, high)]
        return dataclasses.replace(x, name=self.node("Clip", [x.name, *bounds]))

    def op_conv_general_dilated(self, eqn, x, kernel) -> _Tensor:
        p = eqn.params
        if isinstance(kernel, _Tensor) or not isinstance(x, _Tensor):
            raise UnsupportedOp("conv_general_dilated needs images as input and a known kernel")
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise UnsupportedOp("transposed or batch-grouped convolutions")
        lhs, rhs, out = p["dimension_numbers"]
        x = self.in_layout(x, lhs)
        weight = self.constant(np.transpose(kernel, rhs).astype(eqn.invars[0].aval.dtype))
        pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
        y = self.node(
            "Conv",
            [x.name, weight],
            strides=list(p["window_strides"]),
            pads=pads,
            dilations=list(p["rhs_dilation"]),
            group=int(p["feature_group_count"]),
        )
        self.convs[y] = (self.nodes[-1], weight, None)
        return _Tensor(y, tuple(out))

    def _pool(self, eqn, x: _Tensor, op: str, **attributes) -> _Tensor:
        p = eqn.params
        windows, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise UnsupportedOp("dilated pooling")
        rank = len(windows)
        kept = [0, rank - 1]  # batch and channels (NHWC); the axes between are pooled
        pooled = list(range(1, rank - 1))
        if not all(walk.window_keeps_axis(p, a) for a in kept):
            raise UnsupportedOp(f"pooling over the batch or channel axis: windows {windows}")
        x = self.in_layout(x, kept + pooled)  # (batch, channels, spatial...) as ONNX pools
        y = self.node(
            op,
            [x.name],
            kernel_shape=[windows[a] for a in pooled],
            strides=[strides[a] for a in pooled],
            pads=[padding[a][0] for a in pooled] + [padding[a][1] for a in pooled],
            **attributes,
        )
        return _Tensor(y, x.perm)

    def op_reduce_window_max(self, eqn, x) -> _Tensor:
        return self._pool(eqn, x, "MaxPool")  # ONNX pads max pools with -inf, as jax does

    def op_reduce_window_sum(self, eqn, x) -> _Tensor:
        # A window sum = the mean over the whole window (zeros padded in, counted) * its size.
        y = self._pool(eqn, x, "AveragePool", count_include_pad=1)
        size = np.asarray(np.prod(eqn.params["window_dimensions"]), eqn.outvars[0].aval.dtype)
        return _Tensor(self.node("Mul", [y.name, self.constant(size)]), y.perm)

    def _reduce(self, eqn, x: _Tensor, op: str, axes_as_input: bool) -> _Tensor:
        axes = sorted(eqn.params["axes"])
        onnx_axes = [x.perm.index(a) for a in axes]
        if axes_as_input:
            y = self.node(op, [x.name, self.int64s(onnx_axes)], keepdims=0)
        else:
            y = self.node(op, [x.name], axes=onnx_axes, keepdims=0)
        kept = [a for a in x.perm if a not in axes]
        renumber = {a: i for i, a in enumerate(sorted(kept))}
        return _Tensor(y, tuple(renumber[a] for a in kept))

    def op_reduce_sum(self, eqn, x) -> _Tensor:
        return self._reduce(eqn, x, "ReduceSum", axes_as_input=True)

    def op_reduce_max(self, eqn, x) -> _Tensor:
        stacked = self.stacks.get(x.name)
        if stacked is not None and tuple(eqn.params["axes"]) == (stacked[0],):
            # max over a stack (our residual ReLU: max(stack([y, 0]))) is an elementwise Max.
            return self.elementwise("Max", eqn, stacked[1])
        return self._reduce(eqn, x, "ReduceMax", axes_as_input=False)

    def op_stack(self, eqn, *inputs) -> _Tensor:
        axis, rank = eqn.params["axis"], eqn.outvars[0].aval.ndim
        readable = all(
            isinstance(x, _Tensor)
            and not x.lazy_broadcast
            or all(_is_static(d) for d in v.aval.shape)
            for x, v in zip(inputs, eqn.invars, strict=True)
        )
        if readable:
            names = []
            for value, var in zip(inputs, eqn.invars, strict=True):
                if isinstance(value, _Tensor):
                    value = self.plain(value).name
                else:
                    value = self.constant(np.broadcast_to(value, var.aval.shape))
                names.append(self.node("Unsqueeze", [value, self.int64s([axis])]))
            out = _Tensor(self.node("Concat", names, axis=axis), tuple(range(rank)))
        else:  # a batch-sized constant: only a max over the stack can read it (op_reduce_max)
            out = _Tensor(next(self.names), tuple(range(rank)), lazy_broadcast=True)
        self.stacks[out.name] = (axis, list(inputs))
        return out

    def op_broadcast_in_dim(self, eqn, x: _Tensor) -> _Tensor:
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        x = self.plain(x)
        new_axes = [a for a in range(len(shape)) if a not in dims]
        y = self.node("Unsqueeze", [x.name, self.int64s(new_axes)]) if new_axes else x.name
        in_shape = eqn.invars[0].aval.shape
        grows = any(in_shape[i] != shape[d] for i, d in enumerate(dims)) or any(
            shape[a] != 1 for a in new_axes
        )
        return _Tensor(y, tuple(range(len(shape))), lazy_broadcast=grows)

    def op_reshape(self, eqn, x: _Tensor) -> _Tensor:
        if eqn.params.get("dimensions") is not None:
            raise UnsupportedOp("reshape with dimensions")
        x = self.plain(x)
        in_shape = eqn.invars[0].aval.shape
        target = []
        for i, d in enumerate(eqn.params["new_sizes"]):
            if _is_static(d):
                target.append(int(d))
            elif i == 0 and not _is_static(in_shape[0]) and d == in_shape[0]:
                target.append(0)  # ONNX: copy the input's dim 0 (the batch)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            raise UnsupportedOp(f"reshape to {eqn.params['new_sizes']}")
        shape = self.int64s(target)
        return _Tensor(self.node("Reshape", [x.name, shape]), tuple(range(len(target))))

    def op_squeeze(self, eqn, x: _Tensor) -> _Tensor:
        x = self.plain(x)
        axes = self.int64s(list(eqn.params["dimensions"]))
        return _Tensor(self.node("Squeeze", [x.name, axes]), tuple(range(eqn.outvars[0].aval.ndim)))

    def op_concatenate(self, eqn, *inputs) -> _Tensor:
        tensors = [x for x in inputs if isinstance(x, _Tensor)]
        perm = tensors[0].perm
        dtype = eqn.outvars[0].aval.dtype
        names = [self.operand(x, perm, dtype) for x in inputs]
        axis = perm.index(eqn.params["dimension"])
        return _Tensor(self.node("Concat", names, axis=axis), perm)

    def op_pad(self, eqn, x, value) -> _Tensor:
        config = eqn.params["padding_config"]
        if isinstance(value, _Tensor) or any(interior for *_, interior in config):
            raise UnsupportedOp("interior padding or a computed padding value")
        ordered = [config[a] for a in x.perm]
        if any(lo > 0 or hi > 0 for lo, hi, _ in ordered):
            grow = [max(lo, 0) for lo, _, _ in ordered] + [max(hi, 0) for _, hi, _ in ordered]
            fill = self.constant(np.asarray(value, eqn.outvars[0].aval.dtype).reshape(()))
            pad = self.node("Pad", [x.name, self.int64s(grow), fill], mode="constant")
            x = _Tensor(pad, x.perm)
        # Negative padding crops (channel_padding cuts padded positions so): a Slice, its
        # ends counted from the end of the axis.
        crops = [(a, -lo, hi) for a, (lo, hi, _) in enumerate(ordered) if lo < 0 or hi < 0]
        if not crops:
            return x
        big = np.iinfo(np.int64).max
        starts = [max(start, 0) for _, start, _ in crops]
        ends = [hi if hi < 0 else big for _, _, hi in crops]
        axes = [a for a, _, _ in crops]
        inputs = [x.name, *(self.int64s(v) for v in (starts, ends, axes))]
        return _Tensor(self.node("Slice", inputs), x.perm)

    def op_slice(self, eqn, x: _Tensor) -> _Tensor:
        p = eqn.params
        shape = eqn.invars[0].aval.shape
        strides = p["strides"] or (1,) * len(shape)
        axes, starts, ends, steps = [], [], [], []
        for a, (start, limit, stride) in enumerate(
            zip(p["start_indices"], p["limit_indices"], strides, strict=True)
        ):
            whole = start == 0 and stride == 1 and (limit is shape[a] or limit == shape[a])
            if whole:
                continue
            if not (_is_static(start) and _is_static(limit)):
                raise UnsupportedOp("a slice with symbolic bounds")
            axes.append(x.perm.index(a))
            starts.append(int(start))
            ends.append(int(limit))
            steps.append(int(stride))
        if not axes:
            return x
        inputs = [x.name, *(self.int64s(v) for v in (starts, ends, axes, steps))]
        return _Tensor(self.node("Slice", inputs), x.perm)

    def op_dot_general(self, eqn, x, w) -> _Tensor:
        (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
        if not isinstance(x, _Tensor) or isinstance(w, _Tensor) or batch_x or batch_w:
            raise UnsupportedOp("dot_general other than activations x known weights")
        w = np.asarray(w, eqn.outvars[0].aval.dtype)
        rank = eqn.invars[0].aval.ndim
        if tuple(contract_x) != (rank - 1,) or w.ndim != 2:
            raise UnsupportedOp(f"dot_general contracting {contract_x} x {contract_w}")
        if tuple(contract_w) == (1,):
            w = w.T
        x = self.plain(x)
        return _Tensor(self.node("MatMul", [x.name, self.constant(w)]), x.perm)


def jaxpr_to_onnx(
    fn: Callable, input_shape: Sequence[int | None], input_dtype, *, name: str = "dcff_jax"
):
    """fn traced at `input_shape` (None = the batch, symbolic) as an onnx.ModelProto with one
    input "images" and one output "logits"; raises UnsupportedOp for ops outside the set above.
    """
    import jax
    import onnx
    from onnx import helper

    (batch,) = jax.export.symbolic_shape("b")
    shape = tuple(batch if d is None else d for d in input_shape)
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, input_dtype))
    converter = _Converter()
    (out,) = converter.run(
        closed.jaxpr, closed.consts, [_Tensor("images", tuple(range(len(shape))))]
    )
    if not isinstance(out, _Tensor) or out.lazy_broadcast:
        raise UnsupportedOp("the output does not depend on the input")
    out = converter.plain(out)
    converter.nodes.append(helper.make_node("Identity", [out.name], ["logits"]))

    def value_info(value_name, aval_dtype, dims):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(aval_dtype))
        return helper.make_tensor_value_info(
            value_name, elem, [_BATCH if d is None or not _is_static(d) else int(d) for d in dims]
        )

    (out_aval,) = closed.out_avals
    graph = helper.make_graph(
        converter.nodes,
        name,
        [value_info("images", input_dtype, input_shape)],
        [value_info("logits", out_aval.dtype, out_aval.shape)],
        converter.initializers(),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dcff_jax"
    )
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.16
    onnx.checker.check_model(model)
    return model


def _read_names(nodes) -> set[str]:
    """The value names the nodes read."""
    return {name for node in nodes for name in node.input}
