import pytest

from dcff_jax import plan_search
from dcff_jax.errors import ConfigError
from dcff_jax.method import rate_strings

# A toy chain of 4 convs (3x3, no bias) on shrinking images, counted exactly like a compact CNN:
# FLOPs = sum of out_pixels * c_out * c_in * 9, params = sum of c_out * c_in * 9.
WIDTHS = (32, 64, 128, 256)
PIXELS = (32 * 32, 16 * 16, 8 * 8, 4 * 4)


def toy_count(rates):
    c_in, flops, params = 3, 0, 0
    for width, pixels, rate in zip(WIDTHS, PIXELS, rates, strict=True):
        c_out = rate_strings.keep_width(width, rate)
        flops += pixels * c_out * c_in * 9
        params += c_out * c_in * 9
        c_in = c_out
    return flops, params


def reductions(count, rates):
    flops, params = count(rates)
    base_flops, base_params = count((0.0,) * len(rates))
    return 1 - flops / base_flops, 1 - params / base_params


def test_rate_string_round_trips_through_the_parser():
    rates = (0.3, 0.3, 0.5, 0.0, 0.0, 0.0, 0.25)
    text = plan_search.rate_string(rates)
    assert text == "[0.3]*2+[0.5]+[0]*3+[0.25]"
    assert rate_strings.parse_rates(text) == rates


@pytest.mark.parametrize("plan", [(0.3, 0.5, 0.1, 0.7), (0.6, 0.2, 0.5, 0.1), (0.0, 0.0, 0.4, 0.9)])
def test_both_targets_of_a_reachable_plan_are_met(plan):
    # Targets that some plan reaches exactly: the search must come within 1% (relative) of
    # both, though it does not know the plan; FLOPs-heavy and params-heavy layers pull apart.
    flops_target, params_target = reductions(toy_count, plan)
    result = plan_search.search_rates(
        toy_count, 4, flops_reduction=flops_target, params_reduction=params_target
    )
    assert abs(result.flops_reduction - flops_target) <= 0.01 * flops_target
    assert abs(result.params_reduction - params_target) <= 0.01 * params_target
    assert (result.flops, result.params) == toy_count(result.rates)
    assert all(0.0 <= r <= 0.95 for r in result.rates)


def test_one_target_gives_a_uniform_plan_at_the_closest_rate():
    result = plan_search.search_rates(toy_count, 4, flops_reduction=0.5)
    # Every uniform plan at 0.01 steps, exhaustively: none is closer than the one found.
    uniform = [(r / 100,) * 4 for r in range(96)]
    best = min(abs(reductions(toy_count, p)[0] - 0.5) for p in uniform)
    assert abs(result.flops_reduction - 0.5) <= best
    assert result.evaluations < 200


def test_unreachable_targets_return_the_closest_plan_and_say_what_it_reaches():
    # At most 0.5 per layer cannot remove 90% of the FLOPs: every rate ends at the cap.
    result = plan_search.search_rates(toy_count, 4, flops_reduction=0.9, max_rate=0.5)
    assert result.rates == (0.5,) * 4
    assert result.flops_reduction == pytest.approx(reductions(toy_count, (0.5,) * 4)[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give a target"),
        ({"flops_reduction": 1.0}, "flops_reduction must be a fraction in"),
        ({"params_reduction": -0.1}, "params_reduction must be a fraction in"),
        ({"flops_reduction": 0.5, "max_rate": 1.0}, "max_rate must be in"),
    ],
)
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_search.search_rates(toy_count, 4, **kwargs)


@pytest.mark.slow
def test_vgg16_reaches_the_published_plans_reductions():
    published = "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6"
    from dcff_jax import flops

    counts = flops.model_counts("vgg16", published)
    flops_target = 1 - counts["flops"] / counts["base_flops"]
    params_target = 1 - counts["params"] / counts["base_params"]
    result = plan_search.search_plan(
        "vgg16", flops_reduction=flops_target, params_reduction=params_target
    )
    assert abs(result.flops_reduction - flops_target) <= 0.01 * flops_target
    assert abs(result.params_reduction - params_target) <= 0.01 * params_target
    # The string it prints is one `--config.cprate` accepts, and counts as reported.
    again = flops.model_counts("vgg16", result.rate_string)
    assert (again["flops"], again["params"]) == (result.flops, result.params)
    assert (result.base_flops, result.base_params) == (counts["base_flops"], counts["base_params"])


def test_the_search_and_the_flops_counter_share_one_base():
    """The search's reductions are relative to the original model exactly as flops counts it
    (they differed by ResNet-56's pooling module, 4,160 FLOPs, when the base was the compact
    model at rate 0)."""
    from dcff_jax import flops

    for architecture in ("resnet56", "vgg16"):
        count, base = plan_search.architecture_counter(architecture)
        counts = flops.model_counts(architecture, None)
        assert base == (counts["base_flops"], counts["base_params"])
        assert count((0.0,) * rate_strings.LAYOUTS[architecture].num_rates)[1] == base[1]
