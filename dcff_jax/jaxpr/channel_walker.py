"""The walker of the channel analysis (dcff_jax.jaxpr.channels): each equation's effect on the
channel spaces, by jaxpr.walk.CHANNEL_RULE (shape ops: channel_shapes.ShapeRules)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from dcff_jax.jaxpr import walk
from dcff_jax.jaxpr.channel_shapes import ShapeRules
from dcff_jax.jaxpr.channel_types import (
    PROBE,
    Analysis,
    ConvRecord,
    Info,
    Param,
    Segment,
    Tag,
    Tie,
)


class Walker(ShapeRules):
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

    def tie(self, tag: Tag, param: Param, value_axis: int, kind: str) -> None:
        for leaf, axes in param.entries:
            for v, leaf_axis in axes:
                if v == value_axis:
                    self.a.ties.append(Tie(leaf, leaf_axis, tag, kind))

    # --- walking ------------------------------------------------------------------------------
    def run(
        self, jaxpr, infos: Sequence[Info], top: bool, consts: Sequence[Info] | None = None
    ) -> list[Info]:
        def literal(v) -> Info:
            shape = getattr(v.aval, "shape", ())
            scalar = float(v.val) if shape == () else None
            return Info(const_axes=frozenset(range(len(shape))), scalar=scalar)

        consts = [Info()] * len(jaxpr.constvars) if consts is None else consts
        results = walk.interpret(jaxpr, consts, infos, self.equation, literal)
        if top:
            for info in results:
                self.block(info.tag, "reaches the model's output")
        return results

    def equation(self, eqn, ins: list[Info]) -> list[Info]:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        call = walk.inlined(eqn, ins)
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
        rule = walk.CHANNEL_RULE.get(name)
        handler = getattr(self, f"op_{rule}", None) if rule else None
        if handler is not None:
            return handler(eqn, ins)
        for i in ins:
            self.block(i.tag, f"reaches {name}, which dcff-jax does not follow")
        return [Info()] * n_out

    def op_identity(self, eqn, ins: list[Info]) -> list[Info]:
        return [ins[0]]

    def op_elementwise(self, eqn, ins: list[Info]) -> list[Info]:
        return [self.elementwise(eqn, ins)] * len(eqn.outvars)

    def op_reduce(self, eqn, ins: list[Info]) -> list[Info]:
        return [self.reduce(eqn, ins[0], tuple(eqn.params["axes"]))]

    def op_reduce_window(self, eqn, ins: list[Info]) -> list[Info]:
        return [self.reduce_window(eqn, ins)] * len(eqn.outvars)

    def constness(self, eqn, ins: list[Info]) -> Info:
        """Untagged, parameter-free values: only which axes stay constant matters."""
        rule = walk.CHANNEL_RULE.get(eqn.primitive.name)
        shape = eqn.outvars[0].aval.shape if hasattr(eqn.outvars[0].aval, "shape") else ()
        if rule == "identity":
            return ins[0]
        if rule == "broadcast":
            dims = eqn.params["broadcast_dimensions"]
            in_shape = eqn.invars[0].aval.shape
            kept = {dims[i] for i in ins[0].const_axes}
            kept |= {dims[i] for i, n in enumerate(in_shape) if n == 1}
            return Info(const_axes=frozenset(set(range(len(shape))) - set(dims)) | kept)
        if rule == "elementwise":
            axes = frozenset(range(len(shape)))
            for i, v in zip(ins, eqn.invars, strict=True):
                if len(getattr(v.aval, "shape", ())) == len(shape):
                    axes &= i.const_axes
            return Info(const_axes=axes)
        return Info()

    def elementwise(self, eqn, ins: list[Info], shape=None) -> Info:
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
            return Info(tag=tag)
        entries = tuple(e for i in ins if i.param for e in i.param.entries)
        return Info(param=Param(entries, pure=False))

    def reduce(self, eqn, x: Info, axes: tuple[int, ...]) -> Info:
        def remap(axis):
            return walk.removed_axis(axis, axes)

        if x.tag is not None:
            axis = remap(x.tag.axis)
            if axis is None and eqn.primitive.name in ("argmax", "argmin"):
                # An index into the channels: which channel, not how many (a layer norm's
                # mean over them follows the kept width, and stays fusable).
                self.block(x.tag, f"{eqn.primitive.name} over the channel axis")
                return Info()
            if axis is None:
                return Info()
            return Info(tag=dataclasses.replace(x.tag, axis=axis))
        return Info(param=self.remap_param(x.param, remap, pure=False))

    def remap_param(self, param: Param | None, remap, pure: bool) -> Param | None:
        if param is None:
            return None
        entries = []
        for leaf, axes in param.entries:
            mapped = tuple((remap(v), la) for v, la in axes if remap(v) is not None)
            entries.append((leaf, mapped))
        return Param(tuple(entries), pure=pure and param.pure)

    def reduce_window(self, eqn, ins: list[Info]) -> Info:
        x = next((i for i in ins if i.tag is not None), None)
        if x is None:
            return Info()
        if not walk.window_keeps_axis(eqn.params, x.tag.axis):
            self.block(x.tag, f"{eqn.primitive.name} pools across channels")
            return Info()
        return Info(tag=x.tag)

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
            return [Info()]
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
            return [Info(tag=out_tag)]
        if groups == c_in and c_out == c_in and in_tag is not None and w.param is not None:
            # Depthwise, one filter per channel: follows its producer.
            self.tie(in_tag, w.param, rhs_spec[0], "out")
            self.record(
                ConvRecord("conv", leaf, k_shape, c_in, c_out, groups, in_tag, in_tag, None, pair)
            )
            return [Info(tag=dataclasses.replace(in_tag, axis=out_axis))]
        self.block(in_tag, f"a grouped conv ({groups} groups) fixes the channel blocks")
        self.record(ConvRecord("conv", leaf, k_shape, c_in, c_out, groups, None, None, None, pair))
        return [Info()]

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
            return [Info(tag=tags[0])]
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
                return [Info()]
            space = self.new_space(width, "the output of a dense layer (not fused)")
            return [Info(tag=Tag(len(out_shape) - 1, (Segment(space, width),)))]
        return [Info()]


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
