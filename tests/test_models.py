import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import init_jitted

from dcff_jax import create_model, input_shape, keep_width, layer_rates, models

# The paper's rates (configs/), except ResNet-110's and MobileNetV2's: the same init programs as
# test_auto's and test_golden's where the shapes agree.
RATES = {
    "vgg16": "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6",
    "resnet56": "[0.7]*2+[0.5]*3+[0.3]*2+[0.4]+[0.8]+[0.7]*2+[0.8]*4+[0.4]+[0.2]*2+[0.7]+[0.3]"
    "+[0.8]"
    "+[0.4]*2+[0.7]+[0.3]+[0.4]+[0.8]+[0.0]*3",
    "resnet110": "[0.3]*54+[0.1]+[0.2]+[0.4]",
    "googlenet": "[0.0]*2+[0.8]+[0.0]+[0.8]*2+[0.0]*2+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*3"
    "+([0.0]+[0.8]+[0.0]+[0.8]*2+[0.0]*2)*3+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*2",
    "resnet50": "[0.0]+[0.8]*10+[0.7]*6+[0.6]*10+[0.4]*6+[0.3]*4",
    "mobilenetv2": "[0.25]+[0.5]*16+[0.1]*7+[0.2]",
}
FULL_WIDTHS = {  # c_out of every fused conv, in plan order (from the published definitions)
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "resnet56": [16] + [16] * 18 + [32] * 18 + [64] * 18,
    "resnet50": [64]
    + [
        w
        for planes, n in zip((64, 128, 256, 512), (3, 4, 6, 3))
        for _ in range(n)
        for w in (planes, planes, 4 * planes)
    ],
}


def abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


@pytest.mark.parametrize("arch", sorted(RATES))
def test_three_variants_shapes(arch):
    shape = input_shape(arch, 2)
    rates = layer_rates(arch, RATES[arch])
    fused = abstract_variables(create_model(arch, RATES[arch], "fused"), shape)
    compact = abstract_variables(create_model(arch, RATES[arch], "compact"), shape)
    original = abstract_variables(create_model(arch, RATES[arch], "original"), shape)
    assert "fusion" not in compact and "fusion" not in original
    layers = traverse_util.flatten_dict(fused["fusion"])
    matrices = {k[:-1]: v.shape for k, v in layers.items() if k[-1] == "matrix"}
    assert len(matrices) == len(rates)
    flat_compact = traverse_util.flatten_dict(compact["params"])
    flat_fused = traverse_util.flatten_dict(fused["params"])
    flat_original = traverse_util.flatten_dict(original["params"])
    # Same names everywhere; fused kernels are full width on output, compact on input.
    assert set(flat_compact) == set(flat_fused) == set(flat_original)
    # Each fused layer keeps keep_width(c, its own rate); plan order is call order.
    layers = models.fused_layers(arch, RATES[arch])
    layer_rate = dict(zip((tuple(layer.path.split("/")) for layer in layers), rates, strict=True))
    for path, (m, c) in matrices.items():
        assert m == keep_width(c, layer_rate[path]), path
        fk = flat_fused[path + ("kernel",)].shape
        ck = flat_compact[path + ("kernel",)].shape
        ok = flat_original[path + ("kernel",)].shape
        assert fk[-1] == c == ok[-1]
        assert ck[-1] == m
        assert fk[:-1] == ck[:-1]  # fused layers see compact input widths, as published
    for path, v in flat_compact.items():
        if path[:-1] not in matrices:
            assert v.shape == flat_fused[path].shape, path
    n = 2 if arch in ("vgg16", "resnet56", "resnet110", "googlenet") else 1000
    num_classes = 10 if n == 2 else 1000
    for variant in ("fused", "compact", "original"):
        model = create_model(arch, RATES[arch], variant)
        out = jax.eval_shape(
            lambda m=model: m.apply(m.init(jax.random.key(0), jnp.zeros(shape)), jnp.zeros(shape))
        )
        assert out.shape == (2, num_classes)


@pytest.mark.parametrize("arch", sorted(FULL_WIDTHS))
def test_fused_widths_follow_plan(arch):
    rates = layer_rates(arch, RATES[arch])
    model = create_model(arch, RATES[arch], "fused")
    fused = traverse_util.flatten_dict(abstract_variables(model, input_shape(arch, 1))["fusion"])
    # fused_layers lists the layers in call order, which is the plan order.
    layers = models.fused_layers(arch, RATES[arch])
    shapes = [fused[tuple(layer.path.split("/")) + ("matrix",)].shape for layer in layers]
    assert shapes == [(layer.kept, layer.filters) for layer in layers]
    want = [(keep_width(c, r), c) for c, r in zip(FULL_WIDTHS[arch], rates, strict=True)]
    assert shapes == want


@pytest.mark.parametrize("arch", ["vgg16", "resnet56", "googlenet"])
def test_cifar_forward_train_and_eval(arch):
    model = create_model(arch, RATES[arch], "fused")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    # test_init.py's init program (same model, key and shape): loaded from the run's cache.
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)))
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))
    # In NumPy: jnp would compile two ops per distinct statistics shape.
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        updates["batch_stats"],
        variables["batch_stats"],
    )
    assert all(jax.tree.leaves(changed))


def test_kaiming_normal_init_scale():
    model = create_model("resnet56", None, "original")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)))
    kernel = variables["params"]["stage3_block0"]["conv2"]["kernel"]  # 3x3x64x64
    std = float(jnp.std(kernel))
    assert abs(std - np.sqrt(2.0 / (9 * 64))) / np.sqrt(2.0 / (9 * 64)) < 0.05


def test_option_a_shortcut_pads_and_crops_like_torch_pad():
    x = jnp.arange(2 * 2 * 5, dtype=jnp.float32).reshape(1, 2, 2, 5)
    padded = models.resnet_cifar.pad_or_crop_channels(x, 8)  # diff 3: 1 before, 2 after
    np.testing.assert_array_equal(padded[..., 1:6], x)
    assert float(jnp.abs(padded[..., 0]).sum() + jnp.abs(padded[..., 6:]).sum()) == 0.0
    cropped = models.resnet_cifar.pad_or_crop_channels(
        x, 2
    )  # diff -3: F.pad crops 2 before, 1 after
    np.testing.assert_array_equal(cropped, x[..., 2:4])


def test_a_run_traces_its_architecture_once():
    """The trainer's fused model (explicit class count, float32 runs' dtype None), the export's
    compact model and the counts in its metadata share one trace of the original model: each
    trace of a whole model costs start-up time."""
    from dcff_jax import flops

    models._traced_original.cache_clear()
    create_model("vgg16", "[0.5]*13", "fused", num_classes=10, dtype=None)
    create_model("vgg16", "[0.5]*13", "compact", num_classes=10)
    flops.model_counts("vgg16", "[0.5]*13")
    assert models._traced_original.cache_info().misses == 1
    create_model("vgg16", "[0.5]*13", "fused", dtype=jnp.bfloat16)  # another model: traced
    assert models._traced_original.cache_info().misses == 2


def test_unknown_variant_and_architecture():
    with pytest.raises(ValueError, match="variant"):
        create_model("vgg16", None, "pruned")
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("alexnet")


def test_batch_norm_takes_the_running_variance_unbiased_as_torch_does():
    """models.common.BatchNorm: torch.nn.BatchNorm2d's running update, var <- 0.9 var + 0.1 *
    unbiased batch variance (x n / (n - 1), n = batch x height x width); a layer to the
    tracer, recorded once although its __call__ calls nn.BatchNorm's."""
    from dcff_jax.models import common

    x = jax.random.normal(jax.random.key(0), (4, 3, 5, 2)) * 3.0 + 1.0
    bn = common.batch_norm(train=True)
    variables = bn.init(jax.random.key(1), x)
    _, updates = bn.apply(variables, x, mutable=["batch_stats"])
    n = 4 * 3 * 5
    unbiased = np.var(np.asarray(x).reshape(n, 2), axis=0, ddof=1)
    # float32 E[x^2] - E[x]^2 over 60 values (E[x^2] ~ 1.1 var): ~60 * 2 * 1.1 * eps ~ 2e-5;
    # 1e-4 still tells the unbiased update from the biased one (n / (n - 1) = 1.017).
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-4)
    mean = np.asarray(x).reshape(n, 2).mean(axis=0)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-4)
    calls, _ = models.trace_calls(create_model("resnet56", None, "original"), (1, 32, 32, 3))
    norms = [c for c in calls if isinstance(c.module, common.BatchNorm)]
    assert len(norms) == len({c.path for c in norms}) == 55
