"""The ONNX converter's translations (dcff_jax.deploy.onnx_graph), by kind: values (elementwise
ops, casts, and the batch norms folded into the convs before them), convolutions and reductions
(in ONNX's NCHW layout), and shape ops (each keeping or changing a value's layout)."""

from __future__ import annotations

import dataclasses

import numpy as np

from dcff_jax.deploy.onnx_builder import Tensor, UnsupportedOp, is_static
from dcff_jax.jaxpr import walk


class ValueOps:
    """Elementwise ops and casts; folding per-channel affine ops into the conv before them."""

    def elementwise(self, op: str, eqn, inputs: list) -> Tensor:
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        perm = next((t.perm for t in tensors if not t.lazy_broadcast), tensors[0].perm)
        dtype = eqn.outvars[0].aval.dtype
        if len(tensors) == 1 and not tensors[0].lazy_broadcast:
            folded = self.fold_into_producer(op, inputs, dtype)
            if folded is not None:
                return folded
        names = [self.operand(x, perm, dtype) for x in inputs]
        return Tensor(self.node(op, names), perm)

    def fold_into_producer(self, op: str, inputs: list, dtype) -> Tensor | None:
        """An op of a single-use conv or relu output with a constant, absorbed by its producer:
        conv(x, W) + b followed by + c, - c, * c or / c with c per output channel (a batch
        norm in eval mode) becomes one conv with new W and b; max(y, 0) becomes Relu, and
        min(relu, c) a Clip. None when the pattern does not apply."""
        (t,) = [x for x in inputs if isinstance(x, Tensor)]
        c = next(np.asarray(x, dtype) for x in inputs if not isinstance(x, Tensor))
        tensor_first = isinstance(inputs[0], Tensor)
        if op == "Max" and not c.any():
            out = Tensor(self.node("Relu", [t.name]), t.perm)
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

    def op_convert_element_type(self, eqn, x: Tensor) -> Tensor:
        from onnx import helper

        to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
        return dataclasses.replace(x, name=self.node("Cast", [x.name], to=to))

    def op_copy(self, eqn, x: Tensor) -> Tensor:
        return x

    op_copy_p = op_name = op_copy  # name: jax.ad_checkpoint.checkpoint_name, an identity

    def op_integer_pow(self, eqn, x: Tensor) -> Tensor:
        if eqn.params["y"] != 2:
            raise UnsupportedOp(f"integer_pow with y={eqn.params['y']}")
        return dataclasses.replace(x, name=self.node("Mul", [x.name, x.name]))

    def op_rsqrt(self, eqn, x: Tensor) -> Tensor:
        return dataclasses.replace(x, name=self.node("Reciprocal", [self.node("Sqrt", [x.name])]))

    def op_clamp(self, eqn, low, x, high) -> Tensor:
        if isinstance(low, Tensor) or isinstance(high, Tensor) or not isinstance(x, Tensor):
            raise UnsupportedOp("clamp with tensor bounds")
        dtype = eqn.outvars[0].aval.dtype
        bounds = [self.constant(np.asarray(b, dtype).reshape(())) for b in (low, high)]
        return dataclasses.replace(x, name=self.node("Clip", [x.name, *bounds]))


class ConvOps:
    """Convolutions, pools, reductions and matmuls."""

    def op_conv_general_dilated(self, eqn, x, kernel) -> Tensor:
        p = eqn.params
        if isinstance(kernel, Tensor) or not isinstance(x, Tensor):
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
        return Tensor(y, tuple(out))

    def _pool(self, eqn, x: Tensor, op: str, **attributes) -> Tensor:
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
        return Tensor(y, x.perm)

    def op_reduce_window_max(self, eqn, x) -> Tensor:
        return self._pool(eqn, x, "MaxPool")  # ONNX pads max pools with -inf, as jax does

    def op_reduce_window_sum(self, eqn, x) -> Tensor:
        # A window sum = the mean over the whole window (zeros padded in, counted) * its size.
        y = self._pool(eqn, x, "AveragePool", count_include_pad=1)
        size = np.asarray(np.prod(eqn.params["window_dimensions"]), eqn.outvars[0].aval.dtype)
        return Tensor(self.node("Mul", [y.name, self.constant(size)]), y.perm)

    def _reduce(self, eqn, x: Tensor, op: str, axes_as_input: bool) -> Tensor:
        axes = sorted(eqn.params["axes"])
        onnx_axes = [x.perm.index(a) for a in axes]
        if axes_as_input:
            y = self.node(op, [x.name, self.int64s(onnx_axes)], keepdims=0)
        else:
            y = self.node(op, [x.name], axes=onnx_axes, keepdims=0)
        kept = [a for a in x.perm if a not in axes]
        renumber = {a: i for i, a in enumerate(sorted(kept))}
        return Tensor(y, tuple(renumber[a] for a in kept))

    def op_reduce_sum(self, eqn, x) -> Tensor:
        return self._reduce(eqn, x, "ReduceSum", axes_as_input=True)

    def op_reduce_max(self, eqn, x) -> Tensor:
        stacked = self.stacks.get(x.name)
        if stacked is not None and tuple(eqn.params["axes"]) == (stacked[0],):
            # max over a stack (our residual ReLU: max(stack([y, 0]))) is an elementwise Max.
            return self.elementwise("Max", eqn, stacked[1])
        return self._reduce(eqn, x, "ReduceMax", axes_as_input=False)

    def op_dot_general(self, eqn, x, w) -> Tensor:
        (contract_x, contract_w), (batch_x, batch_w) = eqn.params["dimension_numbers"]
        if not isinstance(x, Tensor) or isinstance(w, Tensor) or batch_x or batch_w:
            raise UnsupportedOp("dot_general other than activations x known weights")
        w = np.asarray(w, eqn.outvars[0].aval.dtype)
        rank = eqn.invars[0].aval.ndim
        if tuple(contract_x) != (rank - 1,) or w.ndim != 2:
            raise UnsupportedOp(f"dot_general contracting {contract_x} x {contract_w}")
        if tuple(contract_w) == (1,):
            w = w.T
        x = self.plain(x)
        return Tensor(self.node("MatMul", [x.name, self.constant(w)]), x.perm)


class ShapeOps:
    """Stacks, broadcasts, reshapes, squeezes, concats, pads and slices."""

    def op_stack(self, eqn, *inputs) -> Tensor:
        axis, rank = eqn.params["axis"], eqn.outvars[0].aval.ndim
        readable = all(
            isinstance(x, Tensor)
            and not x.lazy_broadcast
            or all(is_static(d) for d in v.aval.shape)
            for x, v in zip(inputs, eqn.invars, strict=True)
        )
        if readable:
            names = []
            for value, var in zip(inputs, eqn.invars, strict=True):
                if isinstance(value, Tensor):
                    value = self.plain(value).name
                else:
                    value = self.constant(np.broadcast_to(value, var.aval.shape))
                names.append(self.node("Unsqueeze", [value, self.int64s([axis])]))
            out = Tensor(self.node("Concat", names, axis=axis), tuple(range(rank)))
        else:  # a batch-sized constant: only a max over the stack can read it (op_reduce_max)
            out = Tensor(next(self.names), tuple(range(rank)), lazy_broadcast=True)
        self.stacks[out.name] = (axis, list(inputs))
        return out

    def op_broadcast_in_dim(self, eqn, x: Tensor) -> Tensor:
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        x = self.plain(x)
        new_axes = [a for a in range(len(shape)) if a not in dims]
        y = self.node("Unsqueeze", [x.name, self.int64s(new_axes)]) if new_axes else x.name
        in_shape = eqn.invars[0].aval.shape
        grows = any(in_shape[i] != shape[d] for i, d in enumerate(dims)) or any(
            shape[a] != 1 for a in new_axes
        )
        return Tensor(y, tuple(range(len(shape))), lazy_broadcast=grows)

    def op_reshape(self, eqn, x: Tensor) -> Tensor:
        if eqn.params.get("dimensions") is not None:
            raise UnsupportedOp("reshape with dimensions")
        x = self.plain(x)
        in_shape = eqn.invars[0].aval.shape
        target = []
        for i, d in enumerate(eqn.params["new_sizes"]):
            if is_static(d):
                target.append(int(d))
            elif i == 0 and not is_static(in_shape[0]) and d == in_shape[0]:
                target.append(0)  # ONNX: copy the input's dim 0 (the batch)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            raise UnsupportedOp(f"reshape to {eqn.params['new_sizes']}")
        shape = self.int64s(target)
        return Tensor(self.node("Reshape", [x.name, shape]), tuple(range(len(target))))

    def op_squeeze(self, eqn, x: Tensor) -> Tensor:
        x = self.plain(x)
        axes = self.int64s(list(eqn.params["dimensions"]))
        return Tensor(self.node("Squeeze", [x.name, axes]), tuple(range(eqn.outvars[0].aval.ndim)))

    def op_concatenate(self, eqn, *inputs) -> Tensor:
        tensors = [x for x in inputs if isinstance(x, Tensor)]
        perm = tensors[0].perm
        dtype = eqn.outvars[0].aval.dtype
        names = [self.operand(x, perm, dtype) for x in inputs]
        axis = perm.index(eqn.params["dimension"])
        return Tensor(self.node("Concat", names, axis=axis), perm)

    def op_pad(self, eqn, x, value) -> Tensor:
        config = eqn.params["padding_config"]
        if isinstance(value, Tensor) or any(interior for *_, interior in config):
            raise UnsupportedOp("interior padding or a computed padding value")
        ordered = [config[a] for a in x.perm]
        if any(lo > 0 or hi > 0 for lo, hi, _ in ordered):
            grow = [max(lo, 0) for lo, _, _ in ordered] + [max(hi, 0) for _, hi, _ in ordered]
            fill = self.constant(np.asarray(value, eqn.outvars[0].aval.dtype).reshape(()))
            pad = self.node("Pad", [x.name, self.int64s(grow), fill], mode="constant")
            x = Tensor(pad, x.perm)
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
        return Tensor(self.node("Slice", inputs), x.perm)

    def op_slice(self, eqn, x: Tensor) -> Tensor:
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
            if not (is_static(start) and is_static(limit)):
                raise UnsupportedOp("a slice with symbolic bounds")
            axes.append(x.perm.index(a))
            starts.append(int(start))
            ends.append(int(limit))
            steps.append(int(stride))
        if not axes:
            return x
        inputs = [x.name, *(self.int64s(v) for v in (starts, ends, axes, steps))]
        return Tensor(self.node("Slice", inputs), x.perm)
