"""The channel walker's rules for shape ops (dcff_jax.jaxpr.channel_walker): where each moves,
merges, cuts, pads or joins the channel axis of a value, and what it does to a parameter's axes."""

from __future__ import annotations

import dataclasses
import math

from dcff_jax.jaxpr.channel_types import Info, Segment, Tag


class ShapeRules:
    """op_<rule> for jaxpr.walk.CHANNEL_RULE's shape rules; mixed into Walker, whose
    block, elementwise, reduce and remap_param they use."""

    def op_broadcast(self, eqn, ins):
        (x, *_) = ins
        dims = eqn.params["broadcast_dimensions"]
        if x.tag is not None:
            return [Info(tag=dataclasses.replace(x.tag, axis=dims[x.tag.axis]))]
        in_shape = eqn.invars[0].aval.shape
        return [
            Info(
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
                return [Info(param=self.remap_param(x.param, mapping.get, pure=False))]
            return [Info(param=self.remap_param(x.param, lambda _: None, pure=False))]
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
                return [Info(tag=Tag(b, x.tag.segments, x.tag.repeat * factor))]
        self.block(x.tag, "a reshape splits the channel axis")
        return [Info()]

    def op_squeeze(self, eqn, ins):
        dims = eqn.params["dimensions"]
        return [
            self.reduce(eqn, ins[0], tuple(dims))
            if ins[0].tag is None or ins[0].tag.axis not in dims
            else Info()
        ]

    def op_transpose(self, eqn, ins):
        perm = tuple(eqn.params["permutation"])
        x = ins[0]
        if x.tag is not None:
            return [Info(tag=dataclasses.replace(x.tag, axis=perm.index(x.tag.axis)))]
        return [Info(param=self.remap_param(x.param, perm.index, pure=False))]

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
                return [Info()]
            segments.extend(i.tag.segments if i.tag else (Segment(None, v.aval.shape[axis]),))
        return [Info(tag=Tag(axis, tuple(segments)))]

    def op_pad(self, eqn, ins):
        x = ins[0]
        if x.tag is None or tuple(eqn.params["padding_config"][x.tag.axis]) == (0, 0, 0):
            return [Info(tag=x.tag)]
        low, high, interior = eqn.params["padding_config"][x.tag.axis]
        if interior or low < 0 or high < 0 or x.tag.repeat != 1 or ins[1].scalar != 0.0:
            self.block(x.tag, "pad adds channels")
            return [Info()]
        # Zero channels before and after (the option-A shortcut of the CIFAR ResNets).
        pads = [Segment(None, n, zeros=True) for n in (low, high)]
        segments = (pads[0],) * bool(low) + x.tag.segments + (pads[1],) * bool(high)
        return [Info(tag=dataclasses.replace(x.tag, segments=segments))]

    def op_slice(self, eqn, ins):
        x = ins[0]
        if x.tag is None:
            return [Info()]
        a = x.tag.axis
        start, limit = eqn.params["start_indices"][a], eqn.params["limit_indices"][a]
        strides = eqn.params["strides"]
        if start != 0 or limit != x.tag.width or (strides and strides[a] != 1):
            self.block(x.tag, "slice selects channels")
            return [Info()]
        return [Info(tag=x.tag)]

    def op_stack(self, eqn, ins):
        # A new axis: the operands meet elementwise, their tags shift past it.
        axis = eqn.params["axis"]
        shifted = [
            Info(tag=dataclasses.replace(i.tag, axis=i.tag.axis + (i.tag.axis >= axis)))
            if i.tag is not None
            else Info(param=i.param, const_axes=frozenset(a + (a >= axis) for a in i.const_axes))
            for i in ins
        ]
        return [self.elementwise(eqn, shifted, eqn.outvars[0].aval.shape)]
