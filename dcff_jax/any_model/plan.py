"""A plan (which convs fuse, at which widths; Plan, saved as plan.json) and how it is made from
a traced model: rates resolved by glob, groups that meet at residual adds, a searched target."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Mapping, Sequence

from dcff_jax.any_model.tracing import Traced, module_path
from dcff_jax.errors import ConfigError, expect
from dcff_jax.method.rate_strings import keep_width

PLAN_FORMAT = "dcff_jax.plan/1"
PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class PlannedConv:
    """One conv of the traced model and what the plan does with it."""

    path: str  # module path, "layer1/0/conv1"
    kernel_shape: tuple[int, ...]
    group: int  # convs of one group share one width (residual adds)
    rate: float
    kept: int  # output width in the fused/compact model (== filters when not fused)
    fused: bool
    reason: str  # why not fused ("" when fused)
    resized: bool = False  # not fused but at its group's kept width (see `unfused`)

    @property
    def filters(self) -> int:
        return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which convs of a model fuse, at which widths. `followers` are the depthwise convs whose
    groups follow a fused producer; macs are conv + dense multiply-accumulates at batch 1."""

    convs: tuple[PlannedConv, ...]
    followers: tuple[str, ...]
    macs: int
    compact_macs: int
    params: int  # trainable parameters
    compact_params: int

    @property
    def fused(self) -> dict[str, PlannedConv]:
        return {c.path: c for c in self.convs if c.fused}

    def to_json(self) -> str:
        convs = [dataclasses.asdict(c) for c in self.convs]
        return json.dumps(
            {
                "format": PLAN_FORMAT,
                "convs": convs,
                "followers": list(self.followers),
                "macs": self.macs,
                "compact_macs": self.compact_macs,
                "params": self.params,
                "compact_params": self.compact_params,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """The plan `to_json` wrote; ConfigError for anything else (every field's type and
        range is checked, so a damaged file cannot reach the model builder)."""
        try:
            data = expect(json.loads(text), dict, "the plan")
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PLAN_FORMAT!r}")
            convs = tuple(_planned_conv(c) for c in expect(data["convs"], list, "convs"))
            followers = tuple(expect(f, str, "a follower") for f in data["followers"])
            counts = [
                expect(data[k], int, k, low=0)
                for k in ("macs", "compact_macs", "params", "compact_params")
            ]
            return cls(convs, followers, *counts)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise ConfigError(f"not a dcff-jax plan ({type(e).__name__}: {e})") from e

    def table(self) -> str:
        """One row per conv: path, kernel shape, group, rate, width, fused or why not."""
        rows = [f"{'layer':<36}{'kernel':<20}{'group':>6}{'rate':>7}{'width':>12}  fused"]
        for c in self.convs:
            width = f"{c.filters}->{c.kept}" if c.kept != c.filters else str(c.filters)
            rows.append(
                f"{c.path:<36}{str(c.kernel_shape):<20}{c.group:>6}{c.rate:>7.3g}{width:>12}  "
                + ("yes" if c.fused else f"no: {c.reason}")
            )
        rows.append(
            f"conv+dense MACs {self.macs:,} -> {self.compact_macs:,} "
            f"({100 * (1 - self.compact_macs / max(self.macs, 1)):.1f}% fewer), params "
            f"{self.params:,} -> {self.compact_params:,} "
            f"({100 * (1 - self.compact_params / max(self.params, 1)):.1f}% fewer)"
        )
        return "\n".join(rows)


def _planned_conv(entry) -> PlannedConv:
    """A PlannedConv from its JSON object, every field checked."""
    entry = expect(entry, dict, "a conv")
    names = {f.name for f in dataclasses.fields(PlannedConv)}
    if not {"path", "kernel_shape", "group", "rate", "kept", "fused", "reason"} <= set(entry):
        raise KeyError(f"a conv lacks {sorted(names - set(entry))}")
    if set(entry) - names:
        raise KeyError(f"a conv has unknown fields {sorted(set(entry) - names)}")
    path = expect(entry["path"], str, "a conv's path")
    shape = expect(entry["kernel_shape"], list, f"{path}: kernel_shape")
    if not 2 <= len(shape) <= 5:
        raise ValueError(f"{path}: kernel_shape {shape} is not a conv kernel's")
    shape = tuple(expect(n, int, f"{path}: kernel_shape", low=1, high=1 << 20) for n in shape)
    return PlannedConv(
        path=path,
        kernel_shape=shape,
        group=expect(entry["group"], int, f"{path}: group", low=-1),
        rate=float(expect(entry["rate"], float, f"{path}: rate", low=0, high=0.9999)),
        kept=expect(entry["kept"], int, f"{path}: kept", low=1, high=shape[-1]),
        fused=expect(entry["fused"], bool, f"{path}: fused"),
        reason=expect(entry["reason"], str, f"{path}: reason"),
        resized=expect(entry.get("resized", False), bool, f"{path}: resized"),
    )


def _match(path: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)


# The reason a conv that could fuse does not: no rate pattern matched it.
NO_RATE = "no rate given"


def _resolve_rate(path: str, rates) -> float | None:
    """The rate of the conv at `path`: None (not fused) when no pattern matches."""
    if rates is None:
        return None
    if isinstance(rates, Mapping):
        pattern = _match(path, list(rates))
        return None if pattern is None else _check_rate(float(rates[pattern]), path)
    return _check_rate(float(rates), path)


def _check_rate(rate: float, where: str) -> float:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(
            f"rate {rate} for {where} is outside [0, 1): the fraction of filters pruned"
        )
    return rate


def check_rates_given(rates, targets) -> None:
    if rates is None and all(t is None for t in targets):
        raise ConfigError(
            "give rates (a number, or {glob over layer paths: rate}) or a target reduction "
            "(target_macs_reduction=, target_params_reduction=)"
        )
    if rates is not None and any(t is not None for t in targets):
        raise ConfigError("give rates or a target reduction, not both")


def _conv_paths(traced: Traced, nnx_model: bool) -> dict[int, str]:
    """{index into the analysis' records: module path} of the convs whose kernel is a leaf."""
    return {
        i: module_path(traced.leaf_paths[r.kernel_leaf], nnx_model)
        for i, r in enumerate(traced.analysis.records)
        if r.kind == "conv" and r.kernel_leaf is not None
    }


def plan_widths(plan: Plan, traced: Traced, nnx_model: bool):
    """root space -> its width in the plan's compact model (the function counts take)."""
    a = traced.analysis
    by_path = {c.path: c for c in plan.convs}
    kept = {}
    for i, path in _conv_paths(traced, nnx_model).items():
        space, planned = a.records[i].out_space, by_path.get(path)
        if space is not None and planned is not None and (planned.fused or planned.resized):
            kept[a.find(space)] = planned.kept
    return lambda root: kept.get(root, a.spaces[root])


def plan_from_trace(traced, nnx_model, rates, exclude=(), targets=(None, None), unfused=()) -> Plan:
    a = traced.analysis
    path_of = _conv_paths(traced, nnx_model)
    groups = a.groups()
    roots = sorted({a.find(s) for s in a.producers})
    group_id = {root: n for n, root in enumerate(roots)}
    members = {root: [a.producers[s] for s in groups[root] if s in a.producers] for root in roots}
    reasons = {root: a.group_reasons(groups[root]) for root in roots}
    for root in roots:
        for i in members[root]:
            hit = _match(path_of[i], exclude)
            if hit:
                reasons[root].append(f"excluded ({path_of[i]} matches {hit!r})")
            if path_of[i] not in traced.rewritable:
                reasons[root].append(
                    f"{path_of[i]} is no flax Conv module (dcff-jax rewrites nn.Conv and "
                    "nnx.Conv; this one computes its conv itself)"
                )
    open_roots = [r for r in roots if not reasons[r]]

    def group_rate(root) -> float | None:
        found = {path_of[i]: _resolve_rate(path_of[i], rates) for i in members[root]}
        if len(set(found.values())) > 1:
            raise ConfigError(
                "these convs meet at a residual add and must share one rate, but the rates "
                f"give {found}: give them one rate (or exclude them)"
            )
        return next(iter(found.values()))

    if any(t is not None for t in targets):
        chosen = _search(traced, open_roots, targets)
    else:
        chosen = {root: group_rate(root) for root in open_roots}
    # Rate 0 still fuses (m = c filters, each a fusion of all c), as the published code does.
    kept = {
        root: keep_width(a.spaces[root], rate) for root, rate in chosen.items() if rate is not None
    }

    def width(root):
        return kept.get(root, a.spaces[root])

    convs, followers = [], []
    for i, record in enumerate(a.records):
        if i not in path_of:
            continue
        root = a.find(record.out_space) if record.out_space is not None else None
        if record.groups > 1 and record.in_tag is not None:  # depthwise
            convs.append(
                PlannedConv(
                    path_of[i],
                    record.kernel_shape,
                    -1,
                    0.0,
                    a.width(record.in_tag, width),
                    False,
                    "depthwise: follows its input's width",
                )
            )
            segments = record.in_tag.segments
            if any(s.space is not None and a.find(s.space) in kept for s in segments):
                followers.append(path_of[i])
            continue
        unfused_by = _match(path_of[i], unfused) if root in kept else None
        if unfused_by:
            convs.append(
                PlannedConv(
                    path_of[i],
                    record.kernel_shape,
                    group_id[root],
                    chosen[root],
                    kept[root],
                    False,
                    f"unfused: trained at its group's width ({unfused_by!r})",
                    resized=True,
                )
            )
            continue
        if root is None:
            fused, reason, rate = False, "its kernel is not a plain parameter", 0.0
        elif root in kept:
            fused, reason, rate = True, "", chosen[root]
        elif reasons[root]:
            fused, reason, rate = False, "; ".join(reasons[root]), 0.0
        else:
            fused, reason, rate = False, NO_RATE, 0.0
        convs.append(
            PlannedConv(
                path_of[i],
                record.kernel_shape,
                group_id.get(root, -1),
                rate,
                kept[root] if fused else record.out_width,
                fused,
                reason,
            )
        )
    return Plan(
        tuple(convs),
        tuple(followers),
        traced.counts(None, "macs").flops,
        traced.counts(width, "macs").flops,
        traced.params(),
        traced.params(width),
    )


def _search(traced: Traced, roots: list[int], targets) -> dict[int, float]:
    from dcff_jax.plan_search import search_rates

    a = traced.analysis
    if not roots:
        raise ConfigError("no conv of this model can be fused, so no reduction target can be met")

    def count(rates):
        widths = {r: keep_width(a.spaces[r], rate) for r, rate in zip(roots, rates, strict=True)}

        def width(root):
            return widths.get(root, a.spaces[root])

        counts = traced.counts(width, "macs")
        return counts.flops, counts.params

    macs, params = targets
    result = search_rates(count, len(roots), flops_reduction=macs, params_reduction=params)
    return dict(zip(roots, result.rates, strict=True))


def check_plan(plan: Plan, traced: Traced, nnx_model: bool) -> None:
    """Raise ConfigError unless the re-traced model has the plan's convs (same paths, kernel
    shapes and groups, none newly blocked): a plan saved with a checkpoint must never be
    applied to a changed model."""
    now = {c.path: c for c in plan_from_trace(traced, nnx_model, None, ()).convs}
    saved = {c.path: c for c in plan.convs}
    problems = set(now) ^ set(saved)
    for path in set(now) & set(saved):
        old, new = saved[path], now[path]
        if (old.kernel_shape, old.group) != (new.kernel_shape, new.group):
            problems.add(path)
        elif old.fused and new.reason != NO_RATE:  # fusable then, blocked now
            problems.add(path)
    if problems:
        raise ConfigError(
            f"the model no longer matches its plan at {sorted(problems)[:5]}: "
            "it changed since the plan was made; make a new plan (and retrain) for it"
        )
