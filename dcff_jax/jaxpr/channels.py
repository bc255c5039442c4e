"""Which convs of an arbitrary JAX function can be fused, found from its jaxpr.

`analyze(fn, leaves, x)` traces fn(leaves, x) with `jax.make_jaxpr` and follows every conv's
output channels forward through the graph. Each conv output is a *channel space*; a value
carries a `Tag` (which of its axes holds which spaces). The rules are DCFF's:

  - channel-wise ops (bias, batch norm, activations, pooling, reductions over other axes) keep
    the tag; their per-channel parameters are *tied* to the space (they shrink with it);
  - a conv or dense layer contracting the channels consumes them (its kernel's input axis is
    tied; a flatten before a dense layer ties H*W copies);
  - values that meet in an elementwise op (a residual add) must have one width: their spaces
    are merged into a group, each producer fusing independently into the same slots;
  - a concat on the channel axis keeps each input's space as a segment;
  - a depthwise conv follows its producer (its kernel's output axis is tied);
  - anything else that sees the channels (slicing or padding them, a gather, a grouped conv,
    a model output, an op this module does not know) blocks the spaces it sees, with the reason.

Which primitive is which is jaxpr.walk.CHANNEL_RULE, shared with channel padding. The records
are in channel_types, the walker in channel_walker (its shape-op rules in channel_shapes).

The analysis is abstract (no FLOP spent) and returns records that `dcff_jax.any_model` turns into a
plan, and that count MACs for any choice of widths (dcff_jax.flops).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dcff_jax.jaxpr.channel_types import (  # noqa: F401 (the analysis's public records)
    PROBE,
    Analysis,
    ConvRecord,
    Info,
    Param,
    Segment,
    Tag,
    Tie,
)
from dcff_jax.jaxpr.channel_walker import Walker


def analyze(fn: Callable, leaves: Sequence[Any], example: Any) -> Analysis:
    """Trace fn(leaves, example) abstractly and follow conv channels (see the module docstring).

    Args:
      fn: (list of parameter arrays, input) -> output; pure and jax-traceable.
      leaves: the parameter leaves (arrays or ShapeDtypeStructs), in the order Tie.leaf and
        ConvRecord.kernel_leaf refer to.
      example: an input (array or ShapeDtypeStruct) of the shape the model is used with.
    """
    leaves = [jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) for x in leaves]
    closed = jax.make_jaxpr(fn)(leaves, example)
    walker = Walker()
    infos = [_leaf_info(i, len(leaf.shape)) for i, leaf in enumerate(leaves)]
    n_inputs = len(closed.jaxpr.invars) - len(leaves)
    walker.run(closed.jaxpr, infos + [Info()] * n_inputs, top=True)
    return walker.a


def analyze_function(fn: Callable, example: Any) -> Analysis:
    """analyze() for a function of one input whose weights are constants it closes over (a
    model with its variables bound, as exported, or as channel_padding rewrites it): constant
    i of its jaxpr is parameter leaf i. Its records give every conv's and matmul's widths and
    MACs (dcff_jax.flops.function_macs)."""
    example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    return analyze_closed(jax.make_jaxpr(fn)(example))


def analyze_closed(closed) -> Analysis:
    """analyze_function of a function already traced (a ClosedJaxpr; symbolic dimensions make
    symbolic MACs)."""
    consts = [_leaf_info(i, np.ndim(c)) for i, c in enumerate(closed.consts)]
    walker = Walker()
    walker.run(closed.jaxpr, [Info()] * len(closed.jaxpr.invars), top=True, consts=consts)
    return walker.a


def _leaf_info(index: int, rank: int) -> Info:
    """Parameter leaf `index` itself: each of its axes is the leaf's own."""
    return Info(param=Param(((index, tuple((a, a) for a in range(rank))),), pure=True))
