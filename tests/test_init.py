"""Every layer starts as the published model's does (MobileNetV2: as torchvision's), biases too.

The expected distribution of each parameter is stated here in PyTorch's terms (weight shape
(c_out, c_in / groups, kh, kw), fan_in = c_in / groups * kh * kw, fan_out = c_out * kh * kw) and
checked on the fused model with the paper's rates, whose convs see compact input widths, as the
published FuseConv2d layers do:
  - VGG-16, GoogLeNet: no re-init, so PyTorch's defaults: conv and Linear weights AND biases
    U(+-1/sqrt(fan_in)) (kaiming_uniform_(a=sqrt(5))).
  - ResNet-56/110: kaiming_normal_ (fan_in) on convs and the Linear weight; Linear bias default.
  - ResNet-50: kaiming_normal_(mode="fan_out") on convs; Linear weight and bias default.
  - MobileNetV2 (torchvision): kaiming_normal_(mode="fan_out") on every conv, Linear N(0, 0.01)
    and bias 0.
  - Every BatchNorm: scale 1, bias 0.

Tolerances: a statistic is allowed 6 standard errors from its analytic value (the standard error
of the sample mean and variance of n draws, computed below), which a correct init exceeds with
probability ~1e-9; the wrong laws this guards against (normal instead of uniform, fan_in instead
of fan_out, sqrt(2)-gain instead of the default, a zero bias) sit tens of standard errors away on
the large layers, and are caught by the bound and non-zero checks on the small ones.
"""

from __future__ import annotations

import math

import fast_threefry
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import init_jitted
from test_models import RATES

from dcff_jax import create_model, input_shape


def torch_fans(kernel_shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as PyTorch computes them, from our kernel's shape.

    Conv (kh, kw, c_in / groups, c_out) is PyTorch's (c_out, c_in / groups, kh, kw); Dense
    (in, out) is PyTorch's Linear (out, in).
    """
    *receptive, c_in, c_out = kernel_shape
    size = math.prod(receptive)
    return c_in * size, c_out * size


def uniform(bound: float) -> tuple[str, float]:
    return ("uniform", bound)


def normal(std: float) -> tuple[str, float]:
    return ("normal", std)


def constant(value: float) -> tuple[str, float]:
    return ("constant", value)


def expected_law(arch: str, kind: str, name: str, kernel_shape) -> tuple[str, float]:
    """The published init of one parameter. kind: "conv" | "dense" | "bn"."""
    if kind == "bn":
        return constant(1.0 if name == "scale" else 0.0)
    fan_in, fan_out = torch_fans(kernel_shape)
    torch_default = uniform(1.0 / math.sqrt(fan_in))  # weights and biases alike
    if arch in ("vgg16", "googlenet"):
        return torch_default
    if arch in ("resnet56", "resnet110"):
        return normal(math.sqrt(2.0 / fan_in)) if name == "kernel" else torch_default
    if arch == "resnet50":
        if kind == "conv":
            return normal(math.sqrt(2.0 / fan_out))
        return torch_default
    if arch == "mobilenetv2":
        if kind == "conv":
            return normal(math.sqrt(2.0 / fan_out)) if name == "kernel" else constant(0.0)
        return normal(0.01) if name == "kernel" else constant(0.0)
    raise AssertionError(arch)


def check(values: np.ndarray, law: tuple[str, float], where: str) -> None:
    x = np.asarray(values, np.float64).ravel()
    n = x.size
    kind, a = law
    if kind == "constant":
        assert np.all(x == a), f"{where}: expected all {a}, got range [{x.min()}, {x.max()}]"
        return
    if kind == "uniform":
        assert np.all(np.abs(x) <= a * (1 + 1e-6)), f"{where}: |x| max {np.abs(x).max()} > {a}"
        variance, var_se = a * a / 3, math.sqrt(4 / 45) * a * a / math.sqrt(n)
        if n >= 100:
            # The largest |x| of n uniform draws falls below a (1 - 20 / n) w.p. ~e^-20.
            assert np.abs(x).max() >= a * (1 - 20 / n), f"{where}: bound {a} too wide"
    else:
        variance, var_se = a * a, a * a * math.sqrt(2 / n)
        if n >= 10_000:
            # The 4th standardised moment tells a normal (3) from a uniform (1.8); its standard
            # error is sqrt(96 / n).
            kurtosis = np.mean(x**4) / a**4
            assert abs(kurtosis - 3) <= 6 * math.sqrt(96 / n), f"{where}: kurtosis {kurtosis}"
    assert np.std(x) > 0, f"{where}: all equal"
    assert abs(np.mean(x)) <= 6 * math.sqrt(variance / n), f"{where}: mean {np.mean(x)}"
    if n >= 100:
        sample = np.mean(x**2)  # the mean is 0 by the law, so E[x^2] is the variance
        assert abs(sample - variance) <= 6 * var_se, (
            f"{where}: variance {sample:.3e}, expected {variance:.3e} +- {6 * var_se:.1e}"
        )


def layer_params(arch: str, size: int) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """{layer path: {param name: value}} of the fused model with the paper's rates."""
    model = create_model(arch, RATES[arch], "fused")
    shape = (1, size, size, 3)
    variables = init_jitted(model, jnp.zeros(shape))  # test_models.py's forward test's too
    flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
    layers: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, value in flat.items():
        layers.setdefault(path[:-1], {})[path[-1]] = np.asarray(value)
    return layers


@pytest.mark.parametrize(
    "arch",
    [
        "vgg16",
        "resnet56",
        pytest.param("googlenet", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("mobilenetv2", marks=pytest.mark.slow),
    ],
)
def test_every_layer_starts_as_published(arch):
    # MobileNetV2 pools globally, so 64 px builds every layer; the others need their input size.
    size = 64 if arch == "mobilenetv2" else input_shape(arch)[1]
    layers = layer_params(arch, size)
    kinds = {"conv": 0, "dense": 0, "bn": 0}
    for path, params in layers.items():
        where = "/".join(path)
        if "scale" in params:
            kind = "bn"
        else:
            kind = "dense" if params["kernel"].ndim == 2 else "conv"
        kinds[kind] += 1
        kernel_shape = params.get("kernel", np.zeros(0)).shape
        for name, value in params.items():
            check(value, expected_law(arch, kind, name, kernel_shape), f"{where}/{name}")
    assert kinds["conv"] > 10 and kinds["dense"] == 1 and kinds["bn"] > 10, kinds


def test_the_checks_catch_the_wrong_laws():
    """The laws this test exists to tell apart really fail it (at a real layer's size)."""
    rng = np.random.default_rng(0)
    fan_in = 3 * 3 * 64
    bound = 1 / math.sqrt(fan_in)
    shape = (3, 3, 64, 128)
    kaiming = rng.normal(0, math.sqrt(2 / fan_in), shape)
    same_variance_normal = rng.normal(0, bound / math.sqrt(3), shape)
    with pytest.raises(AssertionError):
        check(kaiming, uniform(bound), "kaiming where PyTorch's default is expected")
    with pytest.raises(AssertionError):
        check(same_variance_normal, uniform(bound), "normal where uniform is expected")
    with pytest.raises(AssertionError):
        check(rng.uniform(-bound, bound, shape), normal(bound / math.sqrt(3)), "uniform")
    with pytest.raises(AssertionError):
        check(np.zeros(10), uniform(0.1), "a zero bias where PyTorch's default is expected")
    fan_out = 3 * 3 * 128
    with pytest.raises(AssertionError):
        check(rng.normal(0, math.sqrt(2 / fan_in), shape), normal(math.sqrt(2 / fan_out)), "fan")
    check(rng.uniform(-bound, bound, shape), uniform(bound), "right law")
    check(kaiming, normal(math.sqrt(2 / fan_in)), "right law")


def test_the_tests_unrolled_threefry_draws_what_jax_draws():
    """tests/fast_threefry.py: the unrolled lowering the tests compile with gives the bits,
    uniforms, normals and truncated normals (and so the inits) of JAX's own CPU lowering, and
    really replaces its loop. A JAX without these internals runs the tests with its own
    lowering."""
    key = jax.random.fold_in(jax.random.split(jax.random.key(3))[1], 7)

    def draws():  # a fresh function per lowering: nothing compiled is reused
        return jax.jit(
            lambda: (
                jax.random.bits(key, (5, 3), jnp.uint32),
                jax.random.uniform(key, (64, 3, 3, 32), minval=-0.1, maxval=0.1),
                jax.random.normal(jax.random.fold_in(key, 1), (1000,)),
                jax.random.truncated_normal(key, -2.0, 2.0, (7, 11)),
            )
        )

    if not fast_threefry.lower_threefry_on_cpu(unrolled=False):
        pytest.skip("this JAX lowers threefry without the internals tests/fast_threefry.py uses")
    try:
        rolled = draws()
        assert "while" in rolled.lower().as_text()
        rolled = rolled()
    finally:
        fast_threefry.lower_threefry_on_cpu()
    unrolled = draws()
    assert "while" not in unrolled.lower().as_text()
    for a, b in zip(rolled, unrolled(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
