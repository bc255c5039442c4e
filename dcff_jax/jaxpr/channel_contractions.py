"""The channel walker's rules for contractions (dcff_jax.jaxpr.channel_walker): a conv consumes
its input's channels and makes its own (a fusable conv starts a space, a depthwise one follows its
producer); a matmul of data and weights consumes them (a dense layer: fixed outputs)."""

from __future__ import annotations

import dataclasses
import math

from dcff_jax.jaxpr.channel_types import ConvRecord, Info, Segment, Tag


class ContractionRules:
    """op_conv and op_dot; mixed into Walker, whose Spaces bookkeeping they use."""

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
