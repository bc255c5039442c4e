"""The walker of the channel analysis (dcff_jax.jaxpr.channels): each equation's effect on the
channel spaces, by jaxpr.walk.CHANNEL_RULE; its bookkeeping is channel_types.Spaces, its rules for
shape ops channel_shapes.ShapeRules, for convs and matmuls channel_contractions.ContractionRules."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dcff_jax.jaxpr import walk
from dcff_jax.jaxpr.channel_contractions import ContractionRules
from dcff_jax.jaxpr.channel_shapes import ShapeRules
from dcff_jax.jaxpr.channel_types import (
    PROBE,
    Info,
    Param,
    Spaces,
    Tag,
)


class Walker(Spaces, ShapeRules, ContractionRules):
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
