"""The channel analysis's records (dcff_jax.jaxpr.channels): spaces of conv output channels,
the tags that say which axis of a value holds them, the ties of parameter axes to them, and one
record per conv or matmul; and the facts the walker keeps per value (_Info)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
class Param:
    """A value derived from parameter leaves: (leaf, ((value axis, leaf axis), ...)) entries.
    pure: the value is exactly one leaf, up to dtype."""

    entries: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    pure: bool


@dataclasses.dataclass(frozen=True)
class Info:
    tag: Tag | None = None
    param: Param | None = None
    const_axes: frozenset = frozenset()  # axes along which the value is constant (broadcast)
    scalar: float | None = None  # the value of a known scalar constant


class Spaces:
    """The analysis being built, and its bookkeeping: new spaces, blocks (with reasons), unions
    of spaces that must keep one width, ties of parameter axes, records of convs and matmuls."""

    def __init__(self):
        self.a = Analysis([], [], {}, {}, [], [])
        self.inside: str | None = None  # the probed layer call being walked

    def record(self, record: ConvRecord) -> None:
        self.a.records.append(dataclasses.replace(record, inside=self.inside))

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
