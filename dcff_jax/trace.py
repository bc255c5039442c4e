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

Which primitive is which is jaxprs.CHANNEL_RULE, shared with channel_padding.

The analysis is abstract (no FLOP spent) and returns records that `dcff_jax.any_model` turns into a
plan, and that count MACs for any choice of widths (dcff_jax.flops).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dcff_jax import jaxprs

# jax.ad_checkpoint.checkpoint_name(x, PROBE + key) marks a value whose tag the analysis keeps
# in Analysis.probes[key] (the counter reads a layer's channel widths there); every name is an
# identity, followed like a copy.
PROBE = "dcff_jax.probe/"


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of `size` channels from one space (None: channels that no conv made; zeros: a
    zero pad of the channel axis)."""

    space: int | None
    size: int
    zeros: bool = False


@dataclasses.dataclass(frozen=True)
class Tag:
    """Axis `axis` of a value holds `repeat` copies of the segments, channels innermost (repeat
    > 1 after a flatten of (H, W, C) into one axis)."""

    axis: int
    segments: tuple[Segment, ...]
    repeat: int = 1

    @property
    def width(self) -> int:
        return self.repeat * sum(s.size for s in self.segments)


@dataclasses.dataclass(frozen=True)
class Tie:
    """Axis `axis` of parameter leaf `leaf` is indexed by the channels of `tag` ("channel":
    per-channel values; "in": a consumer's contracted input; "out": a depthwise conv's
    outputs; "produced": a fusable conv's own filters)."""

    leaf: int
    axis: int
    tag: Tag
    kind: str


@dataclasses.dataclass(frozen=True)
class ConvRecord:
    """One conv_general_dilated or dot_general of the traced function, for plans and MACs.

    kernel_leaf: the parameter leaf of its kernel if the kernel is exactly a parameter.
    out_space: the space its outputs start (a fusable conv), else None.
    in_tag / out_tag: tags of its contracted input and of its output channels (None: fixed).
    macs_per_channel_pair: MACs = this x (input width / groups) x output width.
    """

    kind: str  # "conv" or "dense"
    kernel_leaf: int | None
    kernel_shape: tuple[int, ...]
    in_width: int
    out_width: int
    groups: int
    in_tag: Tag | None
    out_tag: Tag | None
    out_space: int | None
    macs_per_channel_pair: int
    # The PROBE key ("<layer>/in") of the probed layer call it was made in, if any.
    inside: str | None = None


@dataclasses.dataclass
class Analysis:
    spaces: list[int]  # the width of each space
    parent: list[int]  # union-find over spaces
    blocked: dict[int, list[str]]  # space -> reasons
    producers: dict[int, int]  # space -> index into records of its conv
    records: list[ConvRecord]
    ties: list[Tie]
    probes: dict[str, Tag | None] = dataclasses.field(default_factory=dict)

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def groups(self) -> dict[int, list[int]]:
        """Root space -> its member spaces, in creation order."""
        out: dict[int, list[int]] = {}
        for s in range(len(self.spaces)):
            out.setdefault(self.find(s), []).append(s)
        return out

    def group_reasons(self, members: list[int]) -> list[str]:
        """Why a group (its member spaces, as groups() lists them) cannot fuse, if it cannot."""
        reasons: list[str] = []
        for s in members:
            for r in self.blocked.get(s, []):
                if r not in reasons:
                    reasons.append(r)
        return reasons

    def width(self, tag: Tag | None, kept: Callable[[int], int]) -> int:
        """The width of a tagged axis once every space s has kept(root of s) channels."""
        if tag is None:
            return 0
        return tag.repeat * sum(
            s.size if s.space is None else kept(self.find(s.space)) for s in tag.segments
        )


@dataclasses.dataclass(frozen=True)
class _Param:
    """A value derived from parameter leaves: (leaf, ((value axis, leaf axis), ...)) entries.
    pure: the value is exactly one leaf, up to dtype."""

    entries: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    pure: bool


@dataclasses.dataclass(frozen=True)
class _Info:
    tag: Tag | None = None
    param: _Param | None = None
    const_axes: frozenset = frozenset()  # axes along which the value is constant (broadcast)
    scalar: float | None = None  # the value of a known scalar constant


class _Walker:
    def __init__(self):
        self.a = Analysis([], [], {}, {}, [], [])
        self.inside: str | None = None  # the probed layer call being walked

    def record(self, record: ConvRecord) -> None:
        self.a.records.append(dataclasses.replace(record, inside=self.inside))

    # --- spaces -------------------------------------------------------------------------------
    def new_space(self, width: int, reason: str | None = None) -> int:
        self.a.spaces.append(width)
        self.a.parent.append(len(self.a.parent))
        space = len(self.a.spaces) - 1
        if reason:
            self.block_space(space, reason)
        return space

    def block_space(self, space: int, reason: str) -> None:
        reasons = self.a.blocked.setdefault(space, [])
        if reason not in reasons:
            reasons.append(reason)

    def block(self, tag: Tag | None, reason: str) -> None:
        if tag is not None:
            for s in tag.segments:
                if s.space is not None:
                    self.block_space(s.space, reason)

    def union(self, a: Tag, b: Tag, where: str) -> None:
        if a.axis != b.axis or a.repeat != b.repeat or len(a.segments) != len(b.segments):
            self.block(a, f"{where}: channels meet a differently laid out value")
            self.block(b, f"{where}: channels meet a differently laid out value")
            return
        for x, y in zip(a.segments, b.segments, strict=True):
            if x.size != y.size or (x.space is None) != (y.space is None):
                self.block(a, f"{where}: channels meet fixed channels")
                self.block(b, f"{where}: channels meet fixed channels")
            elif x.space is not None:
                rx, ry = self.a.find(x.space), self.a.find(y.space)
                if rx != ry:
                    self.a.parent[max(rx, ry)] = min(rx, ry)

    def tie(self, tag: Tag, param: _Param, value_axis: int, kind: str) -> None:
        for leaf, axes in param.entries:
            for v, leaf_axis in axes:
                if v == value_axis:
                    self.a.ties.append(Tie(leaf, leaf_axis, tag, kind))

    # --- walking ------------------------------------------------------------------------------
    def run(
        self, jaxpr, infos: Sequence[_Info], top: bool, consts: Sequence[_Info] | None = None
    ) -> list[_Info]:
        def literal(v) -> _Info:
            shape = getattr(v.aval, "shape", ())
            scalar = float(v.val) if shape == () else None
            return _Info(const_axes=frozenset(range(len(shape))), scalar=scalar)

        consts = [_Info()] * len(jaxpr.constvars) if consts is None else consts
        results = jaxprs.interpret(jaxpr, consts, infos, self.equation, literal)
        if top:
            for info in results:
                self.block(info.tag, "reaches the model's output")
        return results

    def equation(self, eqn, ins: list[_Info]) -> list[_Info]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        call = jaxprs.inlined(eqn, ins)
        if call is not None:
            jaxpr, _, ins = call
            return self.run(jaxpr, ins, top=False)
        if name == "name":  # checkpoint_name: an identity
            key = eqn.params["name"]
            if isinstance(key, str) and key.startswith(PROBE):
                key = key.removeprefix(PROBE)
                self.a.probes[key] = ins[0].tag
                self.inside = key if key.endswith("/in") else None
            return [ins[0]]
        if not any(i.tag or i.param for i in ins):
            return [self.constness(eqn, ins)] * n_out
        rule = jaxprs.CHANNEL_RULE.get(name)
        handler = getattr(self, f"op_{rule}", None) if rule else None
        if handler is not None:
            return handler(eqn, ins)
        for i in ins:
            self.block(i.tag, f"reaches {name}, which dcff-jax does not follow")
        return [_Info()] * n_out

    def op_identity(self, eqn, ins: list[_Info]) -> list[_Info]:
        return [ins[0]]

    def op_elementwise(self, eqn, ins: list[_Info]) -> list[_Info]:
        return [self.elementwise(eqn, ins)] * len(eqn.outvars)

    def op_reduce(self, eqn, ins: list[_Info]) -> list[_Info]:
        return [self.reduce(eqn, ins[0], tuple(eqn.params["axes"]))]

    def op_reduce_window(self, eqn, ins: list[_Info]) -> list[_Info]:
        return [self.reduce_window(eqn, ins)] * len(eqn.outvars)

    def constness(self, eqn, ins: list[_Info]) -> _Info:
        """Untagged, parameter-free values: only which axes stay constant matters."""
        rule = jaxprs.CHANNEL_RULE.get(eqn.primitive.name)
        shape = eqn.outvars[0].aval.shape if hasattr(eqn.outvars[0].aval, "shape") else ()
        if rule == "identity":
            return ins[0]
        if rule == "broadcast":
            dims = eqn.params["broadcast_dimensions"]
            in_shape = eqn.invars[0].aval.shape
            kept = {dims[i] for i in ins[0].const_axes}
            kept |= {dims[i] for i, n in enumerate(in_shape) if n == 1}
            return _Info(const_axes=frozenset(set(range(len(shape))) - set(dims)) | kept)
        if rule == "elementwise":
            axes = frozenset(range(len(shape)))
            for i, v in zip(ins, eqn.invars, strict=True):
                if len(getattr(v.aval, "shape", ())) == len(shape):
                    axes &= i.const_axes
            return _Info(const_axes=axes)
        return _Info()

    def elementwise(self, eqn, ins: list[_Info], shape=None) -> _Info:
        where = eqn.primitive.name
        tagged = sorted((i.tag for i in ins if i.tag is not None), key=_has_zero_pad)
        if tagged:
            tag = tagged[0]
            for other in tagged[1:]:
                if where in ("add", "add_any", "sub") and _pads_to(other, tag):
                    continue  # an option-A shortcut: its zero pad follows tag's width
                self.union(tag, other, where)
            for i, v in zip(ins, eqn.invars, strict=True):
                v_shape = getattr(v.aval, "shape", ()) if shape is None else shape
                if i.tag is not None or len(v_shape) == 0 or v_shape[tag.axis] == 1:
                    continue
                if i.param is not None:
                    self.tie(tag, i.param, tag.axis, "channel")
                elif tag.axis not in i.const_axes:
                    self.block(tag, f"{where}: channels meet a fixed-width value")
            return _Info(tag=tag)
        entries = tuple(e for i in ins if i.param for e in i.param.entries)
        return _Info(param=_Param(entries, pure=False))

    def reduce(self, eqn, x: _Info, axes: tuple[int, ...]) -> _Info:
        def remap(axis):
            return jaxprs.removed_axis(axis, axes)

        if x.tag is not None:
            axis = remap(x.tag.axis)
            if axis is None and eqn.primitive.name in ("argmax", "argmin"):
                # An index into the channels: which channel, not how many (a layer norm's
                # mean over them follows the kept width, and stays fusable).
                self.block(x.tag, f"{eqn.primitive.name} over the channel axis")
                return _Info()
            if axis is None:
                return _Info()
            return _Info(tag=dataclasses.replace(x.tag, axis=axis))
        return _Info(param=self.remap_param(x.param, remap, pure=False))

    def remap_param(self, param: _Param | None, remap, pure: bool) -> _Param | None:
        if param is None:
            return None
        entries = []
        for leaf, axes in param.entries:
            mapped = tuple((remap(v), la) for v, la in axes if remap(v) is not None)
            entries.append((leaf, mapped))
        return _Param(tuple(entries), pure=pure and param.pure)

    def reduce_window(self, eqn, ins: list[_Info]) -> _Info:
        x = next((i for i in ins if i.tag is not None), None)
        if x is None:
            return _Info()
        if not jaxprs.window_keeps_axis(eqn.params, x.tag.axis):
            self.block(x.tag, f"{eqn.primitive.name} pools across channels")
            return _Info()
        return _Info(tag=x.tag)

    # --- shape ops ----------------------------------------------------------------------------
    def op_broadcast(self, eqn, ins):
        (x, *_) = ins
        dims = eqn.params["broadcast_dimensions"]
        if x.tag is not None:
            return [_Info(tag=dataclasses.replace(x.tag, axis=dims[x.tag.axis]))]
        in_shape = eqn.invars[0].aval.shape
        return [
            _Info(
                param=self.remap_param(
                    x.param, lambda a: dims[a] if in_shape[a] != 1 else None, pure=False
                )
            )
        ]

    def op_reshape(self, eqn, ins):
        x = ins[0]
        old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if x.tag is None:  # a parameter: its axes follow if only size-1 axes come and go
            old_axes = [a for a, n in enumerate(old) if n != 1]
            new_axes = [a for a, n in enumerate(new) if n != 1]
            if [old[a] for a in old_axes] == [new[a] for a in new_axes]:
                mapping = dict(zip(old_axes, new_axes, strict=True))
                return [_Info(param=self.remap_param(x.param, mapping.get, pure=False))]
            return [_Info(param=self.remap_param(x.param, lambda _: None, pure=False))]
        a = x.tag.axis
        inner = math.prod(old[a + 1 :])
        for b in range(len(new)):
            if math.prod(new[b + 1 :]) != inner or new[b] % old[a]:
                continue
            factor = new[b] // old[a]
            merged, j = 1, a
            while merged < factor and j > 0:
                j -= 1
                merged *= old[j]
            if merged == factor and math.prod(new[:b]) == math.prod(old[:j]):
                return [_Info(tag=Tag(b, x.tag.segments, x.tag.repeat * factor))]
        self.block(x.tag, "a reshape splits the channel axis")
        return [_Info()]

    def op_squeeze(self, eqn, ins):
        dims = eqn.params["dimensions"]
        return [
            self.reduce(eqn, ins[0], tuple(dims))
            if ins[0].tag is None or ins[0].tag.axis not in dims
            else _Info()
        ]

    def op_transpose(self, eqn, ins):
        perm = tuple(eqn.params["permutation"])
        x = ins[0]
        if x.tag is not None:
            return [_Info(tag=dataclasses.replace(x.tag, axis=perm.index(x.tag.axis)))]
        return [_Info(param=self.remap_param(x.param, perm.index, pure=False))]

    def op_concatenate(self, eqn, ins):
        axis = eqn.params["dimension"]
        tagged = [i.tag for i in ins if i.tag is not None]
        if any(t.axis != axis for t in tagged):
            out = self.elementwise(eqn, ins)
            return [out]
        segments = []
        for i, v in zip(ins, eqn.invars, strict=True):
            if i.tag is not None and i.tag.repeat != 1:
                self.block(i.tag, "a concat of flattened channels")
                return [_Info()]
            segments.extend(i.tag.segments if i.tag else (Segment(None, v.aval.shape[axis]),))
        return [_Info(tag=Tag(axis, tuple(segments)))]

    def op_pad(self, eqn, ins):
        x = ins[0]
        if x.tag is None or tuple(eqn.params["padding_config"][x.tag.axis]) == (0, 0, 0):
            return [_Info(tag=x.tag)]
        low, high, interior = eqn.params["padding_config"][x.tag.axis]
        if interior or low < 0 or high < 0 or x.tag.repeat != 1 or ins[1].scalar != 0.0:
            self.block(x.tag, "pad adds channels")
            return [_Info()]
        # Zero channels before and after (the option-A shortcut of the CIFAR ResNets).
        pads = [Segment(None, n, zeros=True) for n in (low, high)]
        segments = (pads[0],) * bool(low) + x.tag.segments + (pads[1],) * bool(high)
        return [_Info(tag=dataclasses.replace(x.tag, segments=segments))]

    def op_slice(self, eqn, ins):
        x = ins[0]
        if x.tag is None:
            return [_Info()]
        a = x.tag.axis
        start, limit = eqn.params["start_indices"][a], eqn.params["limit_indices"][a]
        strides = eqn.params["strides"]
        if start != 0 or limit != x.tag.width or (strides and strides[a] != 1):
            self.block(x.tag, "slice selects channels")
            return [_Info()]
        return [_Info(tag=x.tag)]

    def op_stack(self, eqn, ins):
        # A new axis: the operands meet elementwise, their tags shift past it.
        axis = eqn.params["axis"]
        shifted = [
            _Info(tag=dataclasses.replace(i.tag, axis=i.tag.axis + (i.tag.axis >= axis)))
            if i.tag is not None
            else _Info(param=i.param, const_axes=frozenset(a + (a >= axis) for a in i.const_axes))
            for i in ins
        ]
        return [self.elementwise(eqn, shifted, eqn.outvars[0].aval.shape)]

    # --- contractions -------------------------------------------------------------------------
    def op_conv(self, eqn, ins):
        x, w = ins
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        in_axis, out_axis = lhs_spec[1], out_spec[1]
        k_shape = tuple(eqn.invars[1].aval.shape)
        out_shape = eqn.outvars[0].aval.shape
        groups = p["feature_group_count"]
        c_in, c_out = eqn.invars[0].aval.shape[in_axis], k_shape[rhs_spec[0]]
        leaf = w.param.entries[0][0] if w.param and w.param.pure else None
        pair = math.prod(out_shape) // c_out * math.prod(k_shape[a] for a in rhs_spec[2:])
        in_tag = x.tag if x.tag is not None and x.tag.axis == in_axis else None
        if x.tag is not None and in_tag is None:
            self.block(x.tag, "a conv over the channel axis")
        if w.tag is not None:
            self.block(w.tag, "used as a conv kernel")
        if p.get("batch_group_count", 1) != 1:
            self.block(in_tag, "a batch-grouped conv")
            return [_Info()]
        if groups == 1:
            if in_tag is not None and w.param is not None:
                self.tie(in_tag, w.param, rhs_spec[1], "in")
            elif in_tag is not None:  # a computed kernel cannot drop the channels it reads
                self.block(in_tag, "a conv whose kernel is not a parameter")
            out_tag, space = None, None
            if leaf is not None:
                space = self.new_space(c_out)
                out_tag = Tag(out_axis, (Segment(space, c_out),))
                self.tie(out_tag, w.param, rhs_spec[0], "produced")
                self.a.producers[space] = len(self.a.records)
            self.record(
                ConvRecord("conv", leaf, k_shape, c_in, c_out, 1, in_tag, out_tag, space, pair)
            )
            return [_Info(tag=out_tag)]
        if groups == c_in and c_out == c_in and in_tag is not None and w.param is not None:
            # Depthwise, one filter per channel: follows its producer.
            self.tie(in_tag, w.param, rhs_spec[0], "out")
            self.record(
                ConvRecord("conv", leaf, k_shape, c_in, c_out, groups, in_tag, in_tag, None, pair)
            )
            return [_Info(tag=dataclasses.replace(in_tag, axis=out_axis))]
        self.block(in_tag, f"a grouped conv ({groups} groups) fixes the channel blocks")
        self.record(ConvRecord("conv", leaf, k_shape, c_in, c_out, groups, None, None, None, pair))
        return [_Info()]

    def op_dot(self, eqn, ins):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        l_shape, r_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        l_free = [a for a in range(len(l_shape)) if a not in lc and a not in lb]
        r_free = [a for a in range(len(r_shape)) if a not in rc and a not in rb]

        def out_axis(side: int, axis: int) -> int | None:
            batch, contract, free = (lb, lc, l_free) if side == 0 else (rb, rc, r_free)
            if axis in contract:
                return None
            if axis in batch:
                return list(batch).index(axis)
            return len(lb) + (free.index(axis) if side == 0 else len(l_free) + free.index(axis))

        tags = []
        for side, (me, other, my_c, other_c) in enumerate(((lhs, rhs, lc, rc), (rhs, lhs, rc, lc))):
            if me.tag is None:
                continue
            axis = out_axis(side, me.tag.axis)
            if axis is not None:
                tags.append(dataclasses.replace(me.tag, axis=axis))
                continue
            partner = other_c[list(my_c).index(me.tag.axis)]
            if other.tag is not None and other.tag.axis == partner:
                self.union(me.tag, other.tag, "dot_general")
            elif other.param is not None:
                self.tie(me.tag, other.param, partner, "in")
            else:
                self.block(me.tag, "contracted with a fixed-width value")
        out_shape = eqn.outvars[0].aval.shape
        if len(tags) > 1:
            for t in tags[1:]:
                self.union(tags[0], t, "dot_general")
        if tags:
            return [_Info(tag=tags[0])]
        # A dense layer (data times weights): its outputs are channels of fixed width (not
        # fused). Recorded for the counter also when its input carries no conv's channels.
        if rhs.param is not None and lhs.param is None and r_free:
            width = r_shape[r_free[-1]]
            in_width = math.prod(l_shape[a] for a in lc)
            per_pass = in_width if lhs.tag is None else max(lhs.tag.width, 1)
            self.record(
                ConvRecord(
                    "dense",
                    rhs.param.entries[0][0] if rhs.param.pure else None,
                    tuple(r_shape),
                    in_width,
                    width,
                    1,
                    lhs.tag,
                    None,
                    None,
                    math.prod(out_shape) // width * in_width // per_pass,
                )
            )
            if lhs.tag is None:
                return [_Info()]
            space = self.new_space(width, "the output of a dense layer (not fused)")
            return [_Info(tag=Tag(len(out_shape) - 1, (Segment(space, width),)))]
        return [_Info()]


def _has_zero_pad(tag: Tag) -> bool:
    return any(s.zeros for s in tag.segments)


def _pads_to(padded: Tag, partner: Tag) -> bool:
    """Whether `padded` is channels zero-padded to `partner`'s width, as an option-A shortcut
    pads its input (the published code computes the pads from the two widths, so they follow
    the fused widths: the spaces stay independent)."""
    return (
        _has_zero_pad(padded)
        and not _has_zero_pad(partner)
        and padded.axis == partner.axis
        and padded.repeat == partner.repeat == 1
        and padded.width == partner.width
    )


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
    walker = _Walker()
    infos = [_leaf_info(i, len(leaf.shape)) for i, leaf in enumerate(leaves)]
    n_inputs = len(closed.jaxpr.invars) - len(leaves)
    walker.run(closed.jaxpr, infos + [_Info()] * n_inputs, top=True)
    return walker.a


def analyze_function(fn: Callable, example: Any) -> Analysis:
    """analyze() for a function of one input whose weights are constants it closes over (a
    model with its variables bound, as exported, or as channel_padding rewrites it): constant
    i of its jaxpr is parameter leaf i. Its records give every conv's and matmul's widths and
    MACs (dcff_jax.flops.function_macs)."""
    example = jax.ShapeDtypeStruct(tuple(example.shape), example.dtype)
    closed = jax.make_jaxpr(fn)(example)
    consts = [_leaf_info(i, np.ndim(c)) for i, c in enumerate(closed.consts)]
    walker = _Walker()
    walker.run(closed.jaxpr, [_Info()] * len(closed.jaxpr.invars), top=True, consts=consts)
    return walker.a


def _leaf_info(index: int, rank: int) -> _Info:
    """Parameter leaf `index` itself: each of its axes is the leaf's own."""
    return _Info(param=_Param(((index, tuple((a, a) for a in range(rank))),), pure=True))
