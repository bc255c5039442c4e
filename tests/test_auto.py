"""DCFF on unmodified Flax models (dcff_jax.any_model): traced plans, fused training, compact
export."""

import math

import flax_user_models as user
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from helpers import (
    NUMERIC_ARCHS,
    PAPER_CONFIGS,
    handwritten_fused_layers,
    handwritten_model,
    init_jitted,
    paper_config,
    pure_macs,
    random_rate_string,
    trees_equal,
)
from jax.ad_checkpoint import checkpoint_name

import dcff_jax
from dcff_jax import any_model, models
from dcff_jax.errors import ConfigError, DataError, MissingFileError

IMAGES = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
LABELS = jnp.arange(8) % 10
# Fused eval and compact logits are the same function of the same numbers up to the order of
# float32 sums (the fused kernel is computed once at export instead of inside the step).
TOLERANCE = 1e-5


def relative(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def train_linen(module, variables, steps=6, epochs=2, **train_kwargs):
    """A few SGD steps per epoch with the fusion updated before each epoch, as DCFF trains."""
    tx = optax.sgd(0.01, momentum=0.9)
    opt_state = jax.jit(tx.init)(variables["params"])

    @jax.jit
    def step(variables, opt_state):
        def loss_fn(params):
            logits, updates = module.apply(
                {**variables, "params": params}, IMAGES, mutable=["batch_stats"], **train_kwargs
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        new, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], new)
        return {**variables, **updates, "params": params}, opt_state, loss

    losses = []
    for epoch in range(epochs):
        fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], epoch, epochs)
        variables = {**variables, "fusion": fusion}
        for _ in range(steps):
            variables, opt_state, loss = step(variables, opt_state)
            losses.append(float(loss))
    return variables, losses


def spatial_sizes(model, x, **kwargs) -> dict[str, int]:
    """Output H*W of every nn.Conv of the unpruned model, by module path (pruning keeps them)."""
    sizes = {}

    def record(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            sizes["/".join(context.module.scope.path)] = math.prod(y.shape[1:-1])
        return y

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    return sizes


def linen_macs(compact_params, sizes: dict[str, int]) -> int:
    """Conv + dense MACs of batch 1 from the compact kernels' shapes alone (kernel elements x
    output pixels; a dense kernel's elements): independent of dcff_jax.jaxpr.channels."""
    flat = jax.tree_util.tree_flatten_with_path(compact_params)[0]
    total = 0
    for path, leaf in flat:
        names = [k.key for k in path]
        if names[-1] != "kernel":
            continue
        module = "/".join(names[:-1])
        total += leaf.size * (sizes[module] if leaf.ndim == 4 else 1)
    return total


def check_linen_export(model, plan_kwargs, apply_kwargs=None, train_kwargs=None):
    apply_kwargs = apply_kwargs or {}
    dcff = any_model.DCFF(model, IMAGES[:1], apply_kwargs=apply_kwargs, **plan_kwargs)
    fused = dcff.fused()
    variables = init_jitted(fused, IMAGES[:1], **apply_kwargs)
    variables, losses = train_linen(fused, variables, **(train_kwargs or apply_kwargs))
    assert losses[-1] < losses[0]
    # Epoch 0 of 10 (T = 1): every fused output mixes all filters, so the export must fuse.
    fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], 0, 10)
    variables = {**variables, "fusion": fusion}
    compact, compact_vars = dcff.compact(variables)
    reference = jax.jit(lambda v: fused.apply(v, IMAGES, **apply_kwargs))(variables)
    logits = jax.jit(lambda v: compact.apply(v, IMAGES, **apply_kwargs))(compact_vars)
    assert relative(reference, logits) <= TOLERANCE
    # Each fused conv stores all its filters; the compact conv has the kept width.
    for path, conv in dcff.plan.fused.items():
        node = variables["params"]
        compact_node = compact_vars["params"]
        for part in path.split("/"):
            node, compact_node = node[part], compact_node[part]
        assert node["kernel"].shape[-1] == conv.filters
        assert compact_node["kernel"].shape[-1] == conv.kept
    sizes = spatial_sizes(model, IMAGES[:1], **apply_kwargs)
    assert dcff.plan.compact_macs == linen_macs(compact_vars["params"], sizes)
    original = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **apply_kwargs), IMAGES)
    assert dcff.plan.params == sum(x.size for x in jax.tree.leaves(original["params"]))
    assert dcff.plan.compact_params == sum(x.size for x in jax.tree.leaves(compact_vars["params"]))
    return dcff, compact_vars


def test_flax_examples_resnet_plan_couples_residual_adds():
    dcff, _ = check_linen_export(
        user.ResNet(), {"rates": 0.5}, {"train": False}, train_kwargs={"train": True}
    )
    convs = {c.path: c for c in dcff.plan.convs}
    # conv3 and the projection meet at the add; the next block's conv3 adds to their sum.
    assert convs["Bottleneck_0/Conv_2"].group == convs["Bottleneck_0/conv_proj"].group
    stage2 = {
        convs[p].group
        for p in ("Bottleneck_1/Conv_2", "Bottleneck_1/conv_proj", "Bottleneck_2/Conv_2")
    }
    assert len(stage2) == 1 and stage2 != {convs["Bottleneck_0/Conv_2"].group}
    assert len({c.group for c in dcff.plan.convs}) == 9
    assert all(c.fused and c.kept == c.filters // 2 for c in dcff.plan.convs)
    assert "Bottleneck_0/conv_proj" in dcff.plan.table()


def test_concat_and_flatten_into_dense():
    dcff, compact_vars = check_linen_export(user.ConcatCNN(), {"rates": {"*": 0.5}})
    widths = {c.path: c.kept for c in dcff.plan.convs}
    assert widths == {"Conv_0": 8, "branch_a": 4, "branch_b": 6, "conv_after": 8}
    # The concat's consumer sees 4 + 6 channels; the flatten 8 x 8 pixels x 8 channels.
    assert compact_vars["params"]["conv_after"]["kernel"].shape == (3, 3, 10, 8)
    assert compact_vars["params"]["fc1"]["kernel"].shape == (8 * 8 * 8, 32)
    params = sum(x.size for x in jax.tree.leaves(compact_vars["params"]))
    by_hand = (27 * 8 + 8) + (8 * 4 + 4) + (72 * 6 + 6) + (90 * 8 + 8) + (512 * 32 + 32) + 330
    assert params == by_hand == dcff.plan.compact_params == 18172
    macs = 32 * 32 * (8 * 27 + 4 * 8 + 6 * 72) + 16 * 16 * 8 * 90 + 512 * 32 + 32 * 10
    assert dcff.plan.compact_macs == macs


def test_flaxmodels_resnet18_third_party():
    flaxmodels = pytest.importorskip("flaxmodels")
    model = flaxmodels.ResNet18(output="logits", pretrained=None, num_classes=10)
    dcff, _ = check_linen_export(
        model, {"rates": 0.4}, {"train": False}, train_kwargs={"train": True}
    )
    convs = {c.path: c for c in dcff.plan.convs}
    assert len(convs) == 20 and all(c.fused for c in convs.values())
    # The stem and the first stage's conv2s meet at identity shortcuts: one group, one width.
    assert convs["Conv_0"].group == convs["BasicBlock_1/Conv_1"].group
    assert convs["BasicBlock_2/Conv_2"].group == convs["BasicBlock_3/Conv_1"].group
    assert convs["BasicBlock_6/Conv_0"].kept == 307


def nnx_train(model, steps=6, epochs=2):
    """The nnx way: nnx.jit, nnx.value_and_grad over the Params, an nnx.Optimizer; the fusion
    state (not a Param) is updated before each epoch."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(IMAGES)
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = []
    for epoch in range(epochs):
        any_model.update_fusion_nnx(model, epoch, epochs)
        losses += [float(step(model, optimizer)) for _ in range(steps)]
    model.eval()
    return losses


def test_nnx_depthwise_separable():
    model = user.SepNet(nnx.Rngs(0))
    dcff = any_model.DCFF(model, IMAGES[:1], rates=0.5)
    convs = {c.path: c for c in dcff.plan.convs}
    assert [p for p, c in convs.items() if c.fused] == [
        "stem",
        "blocks/0/pointwise",
        "blocks/1/pointwise",
    ]
    assert convs["blocks/0/depthwise"].kept == 8 and "follows" in convs["blocks/0/depthwise"].reason
    fused = dcff.fused()
    # The depthwise conv and its BN follow the stem's 8 kept channels; the head sees 16.
    assert fused.blocks[0].depthwise.kernel.shape == (3, 3, 1, 8)
    assert fused.blocks[0].bn1.scale.shape == (8,)
    assert fused.blocks[0].pointwise.conv.kernel.shape == (1, 1, 8, 32)
    assert fused.head.kernel.shape == (16, 10)
    assert model.stem.kernel.shape == (3, 3, 3, 16)  # the user's model is untouched
    losses = nnx_train(fused)
    assert losses[-1] < losses[0]
    any_model.update_fusion_nnx(fused, 0, 10)  # epoch 0 of 10 (T = 1): every filter mixes in
    assert int(jnp.sum(fused.stem.matrix[...] > 0)) == 8 * 16
    compact = any_model.compact_nnx(fused)
    assert relative(fused(IMAGES), compact(IMAGES)) <= TOLERANCE
    assert compact.stem.kernel.shape == (3, 3, 3, 8) and compact.stem.bias.shape == (8,)
    kernels = [
        compact.stem.kernel,
        *[getattr(b, n).kernel for b in compact.blocks for n in ("depthwise", "pointwise")],
    ]
    # Every conv runs at 16 x 16 (stride-2 stem on 32 x 32); the head is dense.
    assert dcff.plan.compact_macs == sum(k.size for k in kernels) * 16 * 16 + 16 * 10
    params = jax.tree.leaves(nnx.state(compact, nnx.Param))
    assert dcff.plan.compact_params == sum(x.size for x in params)


@pytest.mark.parametrize("arch", sorted(PAPER_CONFIGS))
def test_our_architectures_traced_match_their_published_plans(arch):
    """The per-path mapping (rate_strings.path_rates) on an architecture's unpruned definition,
    traced: the plan fuses exactly the convs the hand-written fused model fuses, at its widths, and
    resizes the published unfused convs (ResNet-50's downsamples) to their group's width, for
    the paper's rate string and a random one; its compact MACs and params are exactly the
    hand-written compact model's."""
    # The convs a rate applies to, as the original model calls them (counted independently of
    # the tracer): every conv but the depthwise ones, in call order.
    calls, _ = models.trace_calls(
        models.create_model(arch, None, "original"), models.input_shape(arch)
    )
    called = [
        c.path for c in calls if isinstance(c.module, nn.Conv) and c.module.feature_group_count == 1
    ]
    assert models.conv_paths(arch) == tuple(called)
    for cprate in (paper_config(arch).cprate, random_rate_string(arch, len(arch))):
        plan = models.paper_dcff(arch, cprate).plan
        want = handwritten_fused_layers(arch, cprate)
        assert {c.path: c.kept for c in plan.convs if c.fused} == want, cprate
        resized = {c.path: c.kept for c in plan.convs if c.resized}
        assert resized == {
            p: want[p.replace("downsample_conv", "conv3")]
            for p in called
            if p.endswith("downsample_conv")
        }
        depthwise = [c.path for c in plan.convs if c.group == -1]
        assert sorted(plan.followers) == sorted(depthwise)
        compact = handwritten_model(arch, cprate, "compact")
        shape = models.input_shape(arch)
        assert plan.compact_macs == pure_macs(compact, shape), cprate
        assert plan.compact_params == dcff_jax.count_flops(compact, shape).params, cprate


def test_the_per_path_mapping_refuses_a_model_that_is_not_the_architecture():
    from dcff_jax.method import rate_strings

    paths = models.conv_paths("resnet56")
    with pytest.raises(ValueError, match="resnet56's layout has 55 fused convs, the model 54"):
        rate_strings.path_rates("resnet56", None, paths[:-1])
    with pytest.raises(ConfigError, match="resnet56 needs 30 pruning rates, got 2"):
        rate_strings.path_rates("resnet56", "[0.5]*2", paths)


def test_blocked_convs_say_why():
    plan = any_model.make_plan(user.SlicingCNN(), IMAGES[:1], 0.5)
    convs = {c.path: c for c in plan.convs}
    assert convs["free"].fused and convs["free"].kept == 4
    assert not convs["sliced"].fused and "slice selects channels" in convs["sliced"].reason
    assert not convs["head"].fused and "model's output" in convs["head"].reason
    assert "no: slice selects channels" in plan.table()


def test_convs_the_rewriter_cannot_fuse_are_planned_unfused_with_the_reason():
    """A conv module that is no nn.Conv is never rewritten, so it must not be planned as fused
    (the plan's widths and MACs would be wrong); channels reduced to one value (argmax over
    classes) or read by a computed kernel cannot shrink either."""
    plan = any_model.make_plan(user.UnrewritableCNN(), IMAGES[:1], 0.5)
    convs = {c.path: c for c in plan.convs}
    assert convs["free"].fused and convs["free"].kept == 4
    assert convs["last"].fused  # its consumer `classes` is an nn.Conv, resized with it
    assert not convs["own"].fused and "own is no flax Conv module" in convs["own"].reason
    assert not convs["classes"].fused and "argmax over the channel axis" in convs["classes"].reason
    assert not convs["before_fixed"].fused
    assert "a conv whose kernel is not a parameter" in convs["before_fixed"].reason
    fused = any_model.DCFF(user.UnrewritableCNN(), IMAGES[:1], 0.5).fused()
    variables = fused.init(jax.random.key(0), IMAGES[:1])
    assert sorted(variables["fusion"]) == ["free", "last"]


class NamedAndOwnDense(nn.Module):
    """A conv whose output is named for remat (checkpoint_name: an identity the tracer follows)
    and a classifier computed without a Dense module (a matmul the layer calls do not show)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x))
        x = checkpoint_name(x, "conv_out")
        x = jnp.mean(x, axis=(1, 2))
        return x @ self.param("head", nn.initializers.lecun_normal(), (8, 10))


def test_counts_follow_named_values_and_matmuls_outside_layer_calls():
    dcff = any_model.DCFF(NamedAndOwnDense(), IMAGES[:1], 0.5)
    (conv,) = dcff.plan.convs
    assert conv.fused and conv.kept == 4
    # The conv at 16 x 16 with 3 x 3 x 3 inputs, the matmul as it is: 8 (then 4) x 10.
    assert dcff.plan.macs == 16 * 16 * 27 * 8 + 8 * 10
    assert dcff.counts("macs").flops == dcff.plan.compact_macs == 16 * 16 * 27 * 4 + 4 * 10
    layers = dcff.counts("macs", compact=False).layers
    assert [(r.path, r.kind) for r in layers] == [("Conv_0", "conv"), ("", "dense")]
    assert dcff.counts(compact=False).params == 27 * 8 + 8 * 10


def test_nnx_counts_are_macs_only():
    dcff = any_model.DCFF(user.SepNet(nnx.Rngs(0)), IMAGES[:1], rates=0.5)
    assert dcff.counts("macs").flops == dcff.plan.compact_macs
    assert dcff.counts("macs", compact=False).flops == dcff.plan.macs
    assert dcff.counts("macs").params == dcff.plan.compact_params
    with pytest.raises(ConfigError, match="count it with convention='macs'"):
        dcff.counts()


def test_rates_by_glob_with_exclusions_and_conflicts():
    model, kwargs = user.ResNet(), {"apply_kwargs": {"train": False}}
    rates = {"Bottleneck_0/*": 0.25, "*/Conv_0": 0.5, "Bottleneck_2/Conv_1": 0}
    plan = any_model.make_plan(model, IMAGES[:1], rates, exclude=["conv_init"], **kwargs)
    convs = {c.path: c for c in plan.convs}
    assert convs["Bottleneck_0/Conv_0"].kept == 6  # first matching pattern wins: 8 * 0.75
    assert convs["Bottleneck_1/Conv_0"].kept == 8  # 16 * 0.5
    unmatched = convs["Bottleneck_1/Conv_1"]
    assert not unmatched.fused and unmatched.reason == any_model.NO_RATE
    # Rate 0 fuses all 16 filters into 16, as the published code's rate-0 layers do.
    assert convs["Bottleneck_2/Conv_1"].fused and convs["Bottleneck_2/Conv_1"].kept == 16
    assert not convs["conv_init"].fused and "excluded" in convs["conv_init"].reason
    with pytest.raises(ConfigError, match="give rates"):
        any_model.make_plan(model, IMAGES[:1], **kwargs)
    with pytest.raises(ConfigError, match="must share one rate"):
        any_model.make_plan(model, IMAGES[:1], {"*/Conv_2": 0.5, "*": 0.25}, **kwargs)
    with pytest.raises(ConfigError, match="outside"):
        any_model.make_plan(model, IMAGES[:1], 1.0, **kwargs)


def test_plan_round_trips_and_refuses_a_changed_model():
    model, kwargs = user.ResNet(), {"apply_kwargs": {"train": False}}
    plan = any_model.make_plan(model, IMAGES[:1], 0.5, **kwargs)
    restored = any_model.Plan.from_json(plan.to_json())
    assert restored == plan
    assert any_model.DCFF(model, IMAGES[:1], plan=restored, **kwargs).plan == plan
    with pytest.raises(ConfigError, match="no longer matches its plan"):
        any_model.DCFF(user.ResNet(stage_sizes=(1, 3)), IMAGES[:1], plan=restored, **kwargs)
    with pytest.raises(ConfigError, match="no longer matches its plan"):
        any_model.DCFF(user.ResNet(num_filters=16), IMAGES[:1], plan=restored, **kwargs)
    with pytest.raises(ConfigError, match="not a dcff-jax plan"):
        any_model.Plan.from_json('{"format": "something else"}')


@pytest.mark.parametrize("target", ["macs", "params"])
def test_target_reduction_is_searched_per_group(target):
    plan = any_model.make_plan(
        user.ResNet(),
        IMAGES[:1],
        apply_kwargs={"train": False},
        **{f"target_{target}_reduction": 0.5},
    )
    reached = 1 - getattr(plan, f"compact_{target}") / getattr(plan, target)
    # Widths are integers (8 to 64 filters here): a group's step moves the total by a few %.
    assert abs(reached - 0.5) < 0.03, reached
    groups = {}
    for c in plan.convs:
        groups.setdefault(c.group, set()).add(c.rate)
    assert all(len(rates) == 1 for rates in groups.values())
    assert any(c.fused for c in plan.convs)


def test_linen_save_load_and_export_carry_the_plan(tmp_path):
    model, kwargs = user.ResNet(), {"apply_kwargs": {"train": False}}
    dcff = any_model.DCFF(model, IMAGES[:1], 0.5, **kwargs)
    fused = dcff.fused()
    variables = fused.init(jax.random.key(0), IMAGES[:1], train=False)
    fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], 0, 10)
    variables = {**variables, "fusion": fusion}
    dcff.save(str(tmp_path / "ckpt"), variables)
    loaded, restored = any_model.DCFF.load(str(tmp_path / "ckpt"), model, IMAGES[:1], **kwargs)
    assert loaded.plan == dcff.plan
    assert trees_equal(variables, restored)
    with pytest.raises(ConfigError, match="no longer matches its plan"):
        any_model.DCFF.load(
            str(tmp_path / "ckpt"), user.ResNet(num_filters=4), IMAGES[:1], **kwargs
        )
    with pytest.raises(MissingFileError, match="not a dcff-jax save"):
        any_model.DCFF.load(str(tmp_path / "nothing"), model, IMAGES[:1], **kwargs)
    for path in (tmp_path / "ckpt/state").rglob("*"):  # every array file of the checkpoint
        if path.is_file() and path.stat().st_size > 64 and "manifest" not in path.name:
            path.write_bytes(b"\0" * 16)
    with pytest.raises(DataError, match="corrupt or unreadable"):
        any_model.DCFF.load(str(tmp_path / "ckpt"), model, IMAGES[:1], **kwargs)

    compact, compact_vars = dcff.export(str(tmp_path / "export"), variables, IMAGES[:1])
    exported = jax.export.deserialize(bytearray((tmp_path / "export/model.stablehlo").read_bytes()))
    expected = fused.apply(variables, IMAGES, train=False)
    assert relative(expected, exported.call(IMAGES)) <= TOLERANCE
    assert relative(expected[:3], exported.call(IMAGES[:3])) <= TOLERANCE  # any batch size
    assert any_model.Plan.from_json((tmp_path / "export/plan.json").read_text()) == dcff.plan


def test_nnx_save_load_and_export(tmp_path):
    model = user.SepNet(nnx.Rngs(0))
    dcff = any_model.DCFF(model, IMAGES[:1], 0.5)
    fused = dcff.fused()
    any_model.update_fusion_nnx(fused, 0, 10)
    fused.eval()
    dcff.save(str(tmp_path / "ckpt"), fused)
    loaded, restored = any_model.DCFF.load(str(tmp_path / "ckpt"), model, IMAGES[:1])
    restored.eval()
    assert relative(fused(IMAGES), restored(IMAGES)) == 0.0
    compact, _ = dcff.export(str(tmp_path / "export"), fused, IMAGES[:1])
    exported = jax.export.deserialize(bytearray((tmp_path / "export/model.stablehlo").read_bytes()))
    assert relative(fused(IMAGES), exported.call(IMAGES)) <= TOLERANCE


@pytest.mark.slow
def test_our_mobilenetv2_through_the_tracer_fuses_and_exports():
    """Linen depthwise convs follow their producers: our MobileNetV2's unpruned definition,
    fused by the tracer, exports a compact model with the fused model's logits."""
    model = models.create_model("mobilenetv2", None, "original", num_classes=10)
    dcff = any_model.DCFF(model, IMAGES[:1], 0.3, apply_kwargs={"train": False})
    assert len(dcff.plan.followers) == 17  # one depthwise conv per inverted-residual block
    fused = dcff.fused()
    variables = init_jitted(fused, IMAGES[:1], train=False)
    # Untrained, every BN is zero-centred and the logits are ~1e-10: shift the biases.
    params = jax.jit(
        lambda params: jax.tree_util.tree_map_with_path(
            lambda p, a: a + 0.1 if p[-1].key == "bias" else a, params
        )
    )(variables["params"])
    train_apply = jax.jit(
        lambda v: fused.apply(
            v, IMAGES, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )[1]
    )
    variables = {**variables, "params": params}
    for _ in range(10):
        variables = {**variables, **train_apply(variables)}
    fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], 0, 10)
    variables = {**variables, "fusion": fusion}
    compact, compact_vars = dcff.compact(variables)
    reference = jax.jit(lambda v: fused.apply(v, IMAGES, train=False))(variables)
    logits = jax.jit(lambda v: compact.apply(v, IMAGES, train=False))(compact_vars)
    assert relative(reference, logits) <= TOLERANCE
    block = compact_vars["params"]["block1"]
    assert block["depthwise"]["kernel"].shape == (3, 3, 1, block["expand"]["kernel"].shape[-1])


def test_nnx_unfused_conv_is_resized_not_wrapped():
    model = user.SepNet(nnx.Rngs(0))
    dcff = any_model.DCFF(model, IMAGES[:1], 0.5, unfused=["stem"])
    stem = {c.path: c for c in dcff.plan.convs}["stem"]
    assert stem.resized and not stem.fused and stem.kept == 8
    fused = dcff.fused()
    assert isinstance(fused.stem, nnx.Conv) and fused.stem.kernel.shape == (3, 3, 3, 8)
    assert fused.stem.bias.shape == (8,) and fused.bn.scale.shape == (8,)
    assert isinstance(fused.blocks[0].pointwise, any_model.FusedConvNNX)
    any_model.update_fusion_nnx(fused, 0, 10)
    fused.eval()
    assert relative(fused(IMAGES), any_model.compact_nnx(fused)(IMAGES)) <= TOLERANCE


@pytest.mark.parametrize(
    "init", [nnx.initializers.constant(0.5), nnx.initializers.normal(0.01)], ids=["const", "normal"]
)
def test_narrowed_layers_keep_their_values_unscaled_in_nnx_and_linen(init):
    """One choice for both APIs: a layer whose width the plan narrows keeps its first
    channels' values, unscaled, so a non-fan-in initialiser (or a pretrained weight) keeps its
    scale (the old nnx path multiplied by sqrt(fan-in ratio): 0.5 became 0.707)."""
    model = user.SepNet(nnx.Rngs(0), init=init)
    fused = any_model.DCFF(model, IMAGES[:1], 0.5).fused()
    # The head's input 32 -> 16, the depthwise conv follows the stem (16 -> 8), the pointwise
    # conv's input 16 -> 8 (its 32 filters stay, fused).
    expected = {
        "head": model.head.kernel[:16],
        "depthwise": model.blocks[0].depthwise.kernel[..., :8],
        "pointwise": model.blocks[0].pointwise.kernel[:, :, :8],
    }
    got = {
        "head": fused.head.kernel[...],
        "depthwise": fused.blocks[0].depthwise.kernel[...],
        "pointwise": fused.blocks[0].pointwise.conv.kernel[...],
    }
    for name in expected:
        assert bool(jnp.array_equal(got[name], expected[name])), name

    linen = user.SepNetLinen(kernel_init=init)
    variables = linen.init(jax.random.key(0), IMAGES[:1])
    dcff = any_model.DCFF(linen, IMAGES[:1], 0.5, apply_kwargs={"train": False})
    fused_vars = dcff.fused_variables(variables)
    params, full = fused_vars["params"], variables["params"]
    assert bool(jnp.array_equal(params["head"]["kernel"], full["head"]["kernel"][:16]))
    assert bool(jnp.array_equal(params["Conv_0"]["kernel"], full["Conv_0"]["kernel"][..., :8]))
    assert bool(jnp.array_equal(params["Conv_1"]["kernel"], full["Conv_1"]["kernel"][:, :, :8]))
    assert bool(jnp.array_equal(params["stem"]["kernel"], full["stem"]["kernel"]))  # fused: whole
    assert set(fused_vars["fusion"]) == {"stem", "Conv_1", "Conv_3"}
    logits = dcff.fused().apply(fused_vars, IMAGES, train=False)  # the variables fit the model
    assert logits.shape == (8, 10)
    with pytest.raises(ConfigError, match="not the model's"):
        dcff.fused_variables({"params": params})


IDENTICAL = {"vgg16": 32, "resnet56": 32, "googlenet": 32, "mobilenetv2": 32, "resnet50": 224}


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.slow) if a in ("resnet50", "googlenet") else a
        for a in IDENTICAL
    ],
)
def test_our_architectures_through_the_tracer_are_our_fused_models(arch):
    """Our unpruned definitions, traced and fused with the published widths, ARE the
    hand-written fused variants: the same variables at init, bit for bit, and the same
    logits (ResNet-50's downsample convs `unfused`, as published)."""
    size, cprate = IDENTICAL[arch], paper_config(arch).cprate
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    dcff = models.paper_dcff(arch, cprate)
    traced, ours = dcff.fused(), handwritten_model(arch, cprate, "fused")
    # The same key; both inits are one program, and it is test_init.py's (the same model at its
    # default class count, key and batch 1) for VGG-16, ResNet-56 and ResNet-50: whichever test
    # comes later loads it from the run's cache.
    v_traced, v_ours = (init_jitted(m, images[:1]) for m in (traced, ours))
    assert trees_equal(v_traced, v_ours)
    # Dense fusion matrices, so that every fused kernel mixes all its filters.
    fusion = jax.tree_util.tree_map_with_path(
        lambda p, a: dense_matrix(p, a, normalise=False), v_ours["fusion"]
    )
    logits = [
        jax.jit(lambda v, m=m: m.apply(v, images, train=False))({**v_ours, "fusion": fusion})
        for m in (traced, ours)
    ]
    assert trees_equal(*logits)


def dense_matrix(path, a, normalise: bool = True):
    """A fusion state leaf with its "matrix" replaced by a dense random one (NumPy: no compile
    per shape), rows summing to 1 if `normalise`; other leaves as they are."""
    if path[-1].key != "matrix":
        return a
    matrix = np.random.default_rng(len(path)).uniform(size=a.shape).astype(np.float32)
    return jnp.asarray(matrix / matrix.sum(axis=-1, keepdims=True) if normalise else matrix)


# Image size and batch of the training-mode comparison (ResNet-50 pools 7x7: 224 only).
TRAINED = {a: (224, 2) if a == "resnet50" else (32, 4) for a in NUMERIC_ARCHS}


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.slow) if a in ("resnet50", "googlenet") else a
        for a in TRAINED
    ],
)
def test_our_architectures_through_the_tracer_train_and_compact_as_our_models(arch):
    """The oracle that replacing the hand-written variants with traced ones must pass: from the
    same variables, one training-mode step of the traced fused model gives our fused model's
    loss, gradients and batch statistics bit for bit (batch statistics, dropout, the residual
    ReLU's differentiated form), and the traced compact model and variables give our compact
    model's logits bit for bit."""
    (size, batch), cprate = TRAINED[arch], paper_config(arch).cprate
    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    labels = jnp.arange(batch) % 10
    dcff = models.paper_dcff(arch, cprate)
    traced, ours = dcff.fused(), handwritten_model(arch, cprate, "fused")
    variables = init_jitted(ours, images[:1])  # the program the test above compiles

    # Dense fusion matrices, rows summing to 1 (as softmax proxies do), so that every fused
    # kernel mixes all its filters and activations keep their scale through every layer.
    variables["fusion"] = jax.tree_util.tree_map_with_path(dense_matrix, variables["fusion"])

    def step(model, v):
        def loss_fn(params):
            logits, updates = model.apply(
                {**v, "params": params},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(2)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        return jax.value_and_grad(loss_fn, has_aux=True)(v["params"])

    got, want = (jax.jit(lambda v, m=m: step(m, v))(variables) for m in (traced, ours))
    assert trees_equal(got, want)
    (loss, _), grads = want
    # In NumPy: jnp would compile two ops per distinct gradient shape.
    grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert np.isfinite(float(loss)) and all(np.any(g != 0) for g in grads)

    compact_model, compact_variables = dcff.compact(variables)
    ours_compact = handwritten_model(arch, cprate, "compact")
    from dcff_jax.export import compact_variables as ours_compact_variables

    logits = [
        jax.jit(lambda v, m=m: m.apply(v, images, train=False))(v)
        for m, v in (
            (compact_model, compact_variables),
            (ours_compact, ours_compact_variables(variables)),
        )
    ]
    assert np.all(np.isfinite(logits[1])) and trees_equal(*logits)


def test_norms_and_gates():
    plan = any_model.make_plan(user.NormsAndGates(), IMAGES[:1], 0.5)
    convs = {c.path: c for c in plan.convs}
    assert convs["layer_norm"].fused and convs["last"].fused
    assert "reshape splits the channel axis" in convs["group_norm"].reason
    assert "dense layer" in convs["gated"].reason
    dcff = any_model.DCFF(user.NormsAndGates(), IMAGES[:1], 0.5)
    variables = dcff.fused().init(jax.random.key(0), IMAGES[:1])
    fusion, _ = dcff_jax.update_fusion(variables["params"], variables["fusion"], 0, 10)
    variables = {**variables, "fusion": fusion}
    assert variables["params"]["LayerNorm_0"]["scale"].shape == (8,)  # follows its conv
    compact, compact_vars = dcff.compact(variables)
    expected = dcff.fused().apply(variables, IMAGES)
    assert relative(expected, compact.apply(compact_vars, IMAGES)) <= TOLERANCE


def test_our_data_parallel_steps_train_a_users_fused_model():
    """The fused linen model plugs into dcff_jax.steps (the mesh, the sharded step), as our
    architectures do: a model that takes train= and has batch norm needs nothing else."""
    from dcff_jax.training import steps

    dcff = any_model.DCFF(user.ResNet(), IMAGES[:1], 0.5, apply_kwargs={"train": False})
    model, mesh, tx = dcff.fused(), steps.make_mesh(), optax.sgd(0.01, momentum=0.9)
    state = steps.create_train_state(model, tx, 32, 0, mesh)
    fusion, _ = dcff_jax.update_fusion(state.params, state.fusion, 0, 10)
    state = state.replace(fusion=fusion)
    spec = steps.InputSpec(mean=(0.5,) * 3, std=(0.25,) * 3, augment=True)
    train_step = steps.make_train_step(model, tx, spec, mesh, 0)
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), np.uint8)
    labels = (np.arange(16) % 10).astype(np.int32)
    before = jax.tree.map(np.asarray, state.params)  # the step donates the state
    for _ in range(2):
        state, metrics = train_step(state, *steps.to_global(mesh, images, labels))
        assert np.isfinite(float(metrics["loss"]))
    assert set(state.fusion) == {"conv_init", "Bottleneck_0", "Bottleneck_1", "Bottleneck_2"}
    # Through the fusion (dense at epoch 0) every one of the stem's 8 filters trains, not only
    # the 4 it keeps.
    change = np.abs(np.asarray(state.params["conv_init"]["kernel"]) - before["conv_init"]["kernel"])
    assert change.shape[-1] == 8 and np.all(change.max(axis=(0, 1, 2)) > 0)


def test_the_former_module_name_still_imports():
    from dcff_jax import auto

    assert auto.DCFF is dcff_jax.DCFF is any_model.DCFF
    assert auto.Plan is dcff_jax.Plan and auto.update_fusion_nnx is dcff_jax.update_fusion_nnx


def test_a_training_mode_call_is_refused_in_one_line_by_dcff_and_load(tmp_path):
    """A model whose `train` defaults to True updates batch_stats when traced: DCFF and
    DCFF.load without apply_kwargs say what to pass, instead of flax's ModifyScopeVariableError."""
    eval_mode = {"train": False}
    with pytest.raises(ConfigError, match=r"updates its 'batch_stats' variables .*'train': False"):
        any_model.DCFF(user.ResNet(), IMAGES[:1], 0.5)
    dcff = any_model.DCFF(user.ResNet(), IMAGES[:1], 0.5, apply_kwargs=eval_mode)
    variables = dcff.fused().init(jax.random.key(0), IMAGES[:1], train=False)
    dcff.save(str(tmp_path / "saved"), variables)
    with pytest.raises(ConfigError, match="pass its eval-mode arguments as apply_kwargs"):
        any_model.DCFF.load(str(tmp_path / "saved"), user.ResNet(), IMAGES[:1])
    _, restored = any_model.DCFF.load(
        str(tmp_path / "saved"), user.ResNet(), IMAGES[:1], apply_kwargs=eval_mode
    )
    assert trees_equal(restored, variables)
