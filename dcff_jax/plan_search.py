"""Find pruning rates that reach a target FLOPs and/or params reduction.

The search works on any counting function `count(rates) -> (flops, params)` over a vector of
rates (our architectures' rate strings, or any other plan), so other models reuse it unchanged:

    result = search_rates(count, num_rates, flops_reduction=0.533, params_reduction=0.251)
    result.rates, result.flops_reduction, result.params_reduction

How: every rate is rate_i = clip(alpha + beta * z_i, 0, max_rate), rounded to `decimals`.
z_i in [-1, 1] ranks how much pruning entry i alone removes FLOPs relative to params (measured
once, one count per entry): z = 1 for the most FLOPs-heavy entry (early, wide-image layers), -1
for the most params-heavy (late, many-channel layers). With one target, beta = 0 and alpha is
bisected (a uniform plan). With two, an outer bisection on beta trades FLOPs for params (beta >
0 prunes FLOPs-heavy entries harder) and an inner one on alpha meets the FLOPs target, so the
params reduction is matched along the curve of plans that meet the FLOPs one. Counts are
monotone in every rate, so each bisection converges; where the targets cannot both be met (the
width rule truncates, rates stop at max_rate), the result is the closest plan found, and
`flops_reduction` / `params_reduction` say what it reaches.

`python -m dcff_jax.plan_search --model=mobilenetv2 --flops_reduction=0.533
--params_reduction=0.251 [--convention=macs]` prints the rate string and its counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from dcff_jax.errors import ConfigError
from dcff_jax.method import rate_strings

CountFn = Callable[[tuple[float, ...]], tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """A plan and what it reaches; reductions are fractions of the unpruned counts."""

    rates: tuple[float, ...]
    flops: int
    params: int
    base_flops: int
    base_params: int
    evaluations: int  # how many times the counting function ran

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.flops / self.base_flops

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params / self.base_params

    @property
    def rate_string(self) -> str:
        return rate_string(self.rates)


def rate_string(rates: Sequence[float]) -> str:
    """The shortest run-length form of a rate list: (0.3, 0.3, 0.5) -> "[0.3]*2+[0.5]"."""
    parts, i = [], 0
    while i < len(rates):
        j = i
        while j < len(rates) and rates[j] == rates[i]:
            j += 1
        text = f"[{rates[i]:g}]"
        parts.append(text if j - i == 1 else f"{text}*{j - i}")
        i = j
    return "+".join(parts)


def _check_target(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be a fraction in [0, 1), got {value}")


def search_rates(
    count: CountFn,
    num_rates: int,
    *,
    flops_reduction: float | None = None,
    params_reduction: float | None = None,
    max_rate: float = 0.95,
    decimals: int = 2,
    base: tuple[int, int] | None = None,
) -> SearchResult:
    """Rates whose counts come closest to the target reductions (see the module docstring).

    Args:
      count: rates (num_rates,) -> (flops, params) of the pruned model; count((0,) * n) is the
        unpruned model. It must not increase when a rate increases.
      num_rates: length of the rate vector.
      flops_reduction, params_reduction: targets as fractions of the unpruned counts, in [0, 1);
        at least one.
      max_rate: the largest rate any entry may take.
      decimals: rates are rounded to this many decimals (what a rate string shows).
      base: the (flops, params) the reductions are relative to; default count((0,) * n).

    Returns:
      SearchResult with the rates and their counts.
    """
    _check_target("flops_reduction", flops_reduction)
    _check_target("params_reduction", params_reduction)
    if flops_reduction is None and params_reduction is None:
        raise ConfigError("give a target: flops_reduction and/or params_reduction")
    if not 0.0 < max_rate < 1.0:
        raise ConfigError(f"max_rate must be in (0, 1), got {max_rate}")
    cache: dict[tuple[float, ...], tuple[int, int]] = {}

    def counted(rates: tuple[float, ...]) -> tuple[int, int]:
        if rates not in cache:
            cache[rates] = tuple(int(v) for v in count(rates))
        return cache[rates]

    base_flops, base_params = base or counted((0.0,) * num_rates)

    def reductions(rates) -> tuple[float, float]:
        flops, params = counted(rates)
        return 1.0 - flops / base_flops, 1.0 - params / base_params

    z = _flops_heaviness(reductions, num_rates)

    def plan(alpha: float, beta: float) -> tuple[float, ...]:
        raw = np.clip(alpha + beta * z, 0.0, max_rate)
        return tuple(float(round(r, decimals)) for r in raw)

    def meet(target: float, which: int, beta: float) -> tuple[float, ...]:
        """The plan at this beta whose reduction `which` is closest to target (alpha bisected;
        every reduction grows with alpha)."""
        lo, hi = -1.0, 1.0 + max_rate  # every rate 0 ... every rate max_rate, at any beta
        best = plan(lo, beta)
        for _ in range(40):
            if hi - lo < 0.5 * 10.0**-decimals:
                break
            mid = (lo + hi) / 2
            rates = plan(mid, beta)
            if abs(reductions(rates)[which] - target) < abs(reductions(best)[which] - target):
                best = rates
            if reductions(rates)[which] < target:
                lo = mid
            else:
                hi = mid
        for candidate in (plan(lo, beta), plan(hi, beta)):
            if abs(reductions(candidate)[which] - target) < abs(reductions(best)[which] - target):
                best = candidate
        return best

    if params_reduction is None:
        rates = meet(flops_reduction, 0, 0.0)
    elif flops_reduction is None:
        rates = meet(params_reduction, 1, 0.0)
    else:
        rates = _trade_off(meet, reductions, flops_reduction, params_reduction)
    rates = _polish(rates, reductions, flops_reduction, params_reduction, max_rate, decimals)
    flops, params = counted(rates)
    return SearchResult(rates, flops, params, base_flops, base_params, len(cache))


def miss(reached: tuple[float, float], flops_target, params_target) -> float:
    """How far reached (FLOPs, params) reductions are from the targets: the larger relative miss
    of the targets given."""
    misses = [
        abs(got - want) / max(want, 1e-12)
        for got, want in zip(reached, (flops_target, params_target), strict=True)
        if want is not None
    ]
    return max(misses)


def _polish(rates, reductions, flops_target, params_target, max_rate, decimals, passes=4):
    """Greedy coordinate steps (one entry by +-1 and +-5 units of the last decimal) while one
    lowers the miss: the bisections move entries together, this moves them one at a time."""
    unit = 10.0**-decimals
    best, best_miss = rates, miss(reductions(rates), flops_target, params_target)
    for _ in range(passes):
        improved = False
        for i in range(len(rates)):
            for step in (unit, -unit, 5 * unit, -5 * unit):
                value = float(round(min(max(best[i] + step, 0.0), max_rate), decimals))
                candidate = best[:i] + (value,) + best[i + 1 :]
                candidate_miss = miss(reductions(candidate), flops_target, params_target)
                if candidate_miss < best_miss:
                    best, best_miss, improved = candidate, candidate_miss, True
        if not improved:
            break
    return best


def _flops_heaviness(reductions, num_rates: int) -> np.ndarray:
    """z_i in [-1, 1]: the rank of entry i by (FLOPs removed / params removed) when it alone is
    pruned at 0.5; ties share the mean rank. (n,)"""
    ratio = np.empty(num_rates)
    for i in range(num_rates):
        rates = tuple(0.5 if j == i else 0.0 for j in range(num_rates))
        flops, params = reductions(rates)
        ratio[i] = math.log((flops + 1e-12) / (params + 1e-12))
    if num_rates == 1:
        return np.zeros(1)
    order = np.argsort(ratio, kind="stable")
    ranks = np.empty(num_rates)
    ranks[order] = np.arange(num_rates, dtype=float)
    for value in np.unique(ratio):  # equal entries (a repeated block) get one rank
        ranks[ratio == value] = ranks[ratio == value].mean()
    return 2.0 * ranks / (num_rates - 1) - 1.0


def _trade_off(meet, reductions, flops_target: float, params_target: float):
    """Both targets: bisect beta so that the plan meeting the FLOPs target also meets the params
    one (its params reduction falls as beta grows); the closest plan by the larger relative
    miss of the two."""

    def off(rates) -> float:
        return miss(reductions(rates), flops_target, params_target)

    lo, hi = -1.0, 1.0
    best = meet(flops_target, 0, 0.0)
    for _ in range(12):
        mid = (lo + hi) / 2
        rates = meet(flops_target, 0, mid)
        if off(rates) < off(best):
            best = rates
        if reductions(rates)[1] > params_target:
            lo = mid
        else:
            hi = mid
    for beta in (lo, hi, -1.0, 1.0):
        rates = meet(flops_target, 0, beta)
        if off(rates) < off(best):
            best = rates
    return best


def search_plan(
    architecture: str,
    *,
    flops_reduction: float | None = None,
    params_reduction: float | None = None,
    convention: str = "thop",
    max_rate: float = 0.95,
    decimals: int = 2,
) -> SearchResult:
    """search_rates over one of our architectures' rate strings (dcff_jax.method.rate_strings
    layouts), counted in the given FLOPs convention (dcff_jax.flops), relative to the original model
    as flops.model_counts counts it."""
    count, base = architecture_counter(architecture, convention)
    return search_rates(
        count,
        rate_strings.rate_layout(architecture).num_rates,
        flops_reduction=flops_reduction,
        params_reduction=params_reduction,
        max_rate=max_rate,
        decimals=decimals,
        base=base,
    )


def architecture_counter(architecture: str, convention: str = "thop") -> tuple[CountFn, tuple]:
    """(rates -> (flops, params) of the compact model, (flops, params) of the original model).

    The base is the original model, not the compact one at rate 0: the published compact CIFAR
    ResNets pool with a module that thop counts (4,160 FLOPs in ResNet-56) where the originals
    call a function it does not, and the paper's reductions are relative to the original."""
    from dcff_jax import flops, models

    rate_strings.rate_layout(architecture)

    def count(rates: tuple[float, ...]) -> tuple[int, int]:
        # One trace of the original model, planned again for each rates: no model is built.
        counts = models.paper_dcff(architecture, rates).counts(convention)
        return counts.flops, counts.params

    original = flops.original_counts(architecture, convention)
    return count, (original.flops, original.params)


def main(argv: Sequence[str]) -> None:
    from dcff_jax import errors

    errors.no_positional_arguments(argv)
    result = search_plan(
        _MODEL.value,
        flops_reduction=_FLOPS.value,
        params_reduction=_PARAMS.value,
        convention=_CONVENTION.value,
        max_rate=_MAX_RATE.value,
    )
    print(f"cprate: {result.rate_string}")
    print(
        f"FLOPs {result.flops:,} of {result.base_flops:,} ({100 * result.flops_reduction:.2f}% "
        f"reduction), params {result.params:,} of {result.base_params:,} "
        f"({100 * result.params_reduction:.2f}%); {result.evaluations} counts"
    )


if __name__ == "__main__":
    from absl import app, flags

    from dcff_jax import errors

    _MODEL = flags.DEFINE_string("model", None, "Architecture (dcff_jax.ARCHITECTURES).")
    _FLOPS = flags.DEFINE_float("flops_reduction", None, "Target FLOPs reduction, e.g. 0.533.")
    _PARAMS = flags.DEFINE_float("params_reduction", None, "Target params reduction.")
    _CONVENTION = flags.DEFINE_enum("convention", "thop", ["thop", "macs"], "FLOPs convention.")
    _MAX_RATE = flags.DEFINE_float("max_rate", 0.95, "Largest rate of any entry.")
    flags.mark_flags_as_required(["model"])
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
