"""The ONNX graph being built (dcff_jax.deploy.onnx_graph): its values (Tensor: a name and its
layout), nodes and constants, and the transposes between layouts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


class UnsupportedOp(NotImplementedError):
    """An op (or an op's configuration) this converter does not translate."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A graph value: ONNX tensor `name` holds the jax value transposed by `perm`
    (onnx = jnp.transpose(jax_value, perm)). `lazy_broadcast`: the ONNX tensor still has size 1
    on axes the jax value broadcasts to; only broadcasting (elementwise) ops may read it."""

    name: str
    perm: tuple[int, ...]
    lazy_broadcast: bool = False


def is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def inverse(perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


class GraphBuilder:
    """Nodes, constants and layouts; the converter's state."""

    def __init__(self):
        import itertools

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

        read = read_names(self.nodes)
        return [numpy_helper.from_array(a, n) for n, a in self.arrays.items() if n in read]

    def int64s(self, values: Sequence[int]) -> str:
        return self.constant(np.asarray(values, np.int64))

    def in_layout(self, value: Tensor, perm: Sequence[int]) -> Tensor:
        """value as an ONNX tensor in layout `perm`."""
        perm = tuple(perm)
        if value.perm == perm:
            return value
        if value.lazy_broadcast:
            raise UnsupportedOp("a broadcast value read in another layout")
        # onnx_now = T(x, value.perm); wanted T(x, perm) = T(onnx_now, inverse(value.perm)[perm]).
        undo = inverse(value.perm)
        step = tuple(undo[p] for p in perm)
        return Tensor(self.node("Transpose", [value.name], perm=list(step)), perm)

    def plain(self, value: Tensor) -> Tensor:
        return self.in_layout(value, tuple(range(len(value.perm))))

    def operand(self, value, perm: Sequence[int], dtype) -> str:
        """An elementwise operand in layout `perm`: a tensor transposed, a constant stored."""
        if isinstance(value, Tensor):
            return self.in_layout(value, perm).name
        array = np.asarray(value, dtype)
        if array.ndim == len(perm):
            array = np.transpose(array, perm)
        return self.constant(array)


def read_names(nodes) -> set[str]:
    """The value names the nodes read."""
    return {name for node in nodes for name in node.input}
