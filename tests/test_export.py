import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import U32, init_jitted

from dcff_jax import compact_variables, create_model, update_fusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location(
        "own_cnn", os.path.join(ROOT, "examples", "own_cnn.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "arch,cprate,size",
    [
        ("vgg16", "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6", 32),
        ("resnet56", "[0.6]*27+[0.3]+[0.5]+[0.2]", 32),
        pytest.param("googlenet", "([0.5]+[0.3]*6)*9+[0.4]", 32, marks=pytest.mark.slow),
        # ResNet-50 ends in the published AvgPool2d(7): 224x224. MobileNetV2 pools globally, so
        # 64x64 exercises every layer (strides, depthwise convs) at a fraction of the cost.
        pytest.param(
            "resnet50",
            "[0.0]+[0.8]*10+[0.7]*6+[0.6]*10+[0.4]*6+[0.3]*4",
            224,
            marks=pytest.mark.slow,
        ),
        pytest.param("mobilenetv2", "[0.25]+[0.5]*16+[0.1]*7+[0.2]", 64, marks=pytest.mark.slow),
    ],
)
def test_compact_logits_equal_fused_eval_logits(arch, cprate, size):
    fused = create_model(arch, cprate, "fused")
    compact = create_model(arch, cprate, "compact")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, size, size, 3)), jnp.float32)
    # Batch 1, as test_init.py initialises the same model (VGG-16, ResNet-50, MobileNetV2 at
    # their rates there): one program in the run's cache. The initial values are the same.
    variables = init_jitted(fused, x[:1])
    # Soft fusion (T = 1), real batch statistics: the hardest case for the export.
    variables["fusion"], _ = update_fusion(variables["params"], variables["fusion"], 0, 300)
    # MobileNetV2's dropout needs its rng in train mode; it does not touch the statistics.
    train_apply = lambda v, x: fused.apply(  # noqa: E731
        v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    _, stats = jax.jit(train_apply)(variables, x)
    variables["batch_stats"] = stats["batch_stats"]
    exported = compact_variables(variables)
    assert "fusion" not in exported
    fused_logits, compact_logits = eval_logits(fused, variables, compact, exported, x)
    # The export is exact: in float64 the compact model computes the fused model's logits up to
    # float64 rounding (the same sums in another order; even a 1e6 amplification through
    # batch norm leaves them within 1e-9 of each other). A wrong slot, bias or statistic moves
    # them by O(1).
    with jax.enable_x64(True):
        variables64 = to_float64(variables)
        fused64, compact64 = eval_logits(
            fused, variables64, compact, compact_variables(variables64), x.astype(jnp.float64)
        )
        fused64, compact64 = np.asarray(fused64), np.asarray(compact64)
    scale = float(np.max(np.abs(fused64)))
    assert float(np.max(np.abs(compact64 - fused64))) <= 1e-9 * scale
    # In float32 each is as close to float64 as a float32 forward allows (2^14 u of the largest
    # logit: the budget of test_parallel.py; measured 2-3 u here).
    for logits in (fused_logits, compact_logits):
        assert (
            float(np.max(np.abs(np.asarray(logits, np.float64) - fused64))) <= 2**14 * U32 * scale
        )
    # And the exported tree is exactly the compact model's structure.
    abstract = jax.eval_shape(lambda: compact.init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, exported)


def to_float64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def eval_logits(fused, fused_variables, compact, compact_vars, x):
    """Eval-mode logits of the fused model and of its compact export, each jitted."""
    apply = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)
    return apply(fused, fused_variables, x), apply(compact, compact_vars, x)


def test_export_rejects_non_fused_variables():
    with pytest.raises(ValueError, match="fusion"):
        compact_variables({"params": {}})


def test_user_cnn_example_trains_and_exports():
    example = load_example()
    key_x, key_w = jax.random.split(jax.random.key(0))
    images = jax.random.normal(key_x, (1024, 16, 16, 3))
    labels = jnp.argmax(images.mean(axis=(1, 2)) @ jax.random.normal(key_w, (3, 10)), axis=-1)
    fused, fused_vars, compact, compact_vars, losses = example.train(
        images, labels, num_epochs=3, steps_per_epoch=15
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    assert fused_vars["params"]["conv1"]["kernel"].shape == (3, 3, 8, 32)
    assert compact_vars["params"]["conv1"]["kernel"].shape == (3, 3, 8, 8)
    x = images[:8]
    # No batch norm, eager apply: both run the same conv ops on the same fused kernels (computed
    # by the same fuse_kernel), so the logits agree bit for bit.
    np.testing.assert_array_equal(compact.apply(compact_vars, x), fused.apply(fused_vars, x))


def test_an_interrupted_export_leaves_the_previous_one_loadable(tmp_path):
    """save_compact writes version v<N+1> completely, then points LATEST at it. An export killed
    before the pointer moved leaves a partial v<N+1> that nothing names: load_compact still
    returns v<N>, and the next export writes over the partial version."""
    import ml_collections

    from dcff_jax import export
    from dcff_jax.deploy import compact as deploy

    cprate = "[0.5]*30"
    model = create_model("resnet56", cprate, "fused")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)))
    config = ml_collections.ConfigDict(
        {
            "model": "resnet56",
            "cprate": cprate,
            "num_classes": 10,
            "image_size": 32,
            "dataset": "cifar10_folder",
            "data_dir": "",
        }
    )
    directory = tmp_path / "compact"
    assert deploy.exported_epoch(str(directory)) is None  # nothing exported yet
    for epoch in range(3):
        record = {"epoch": epoch, "test_top1": 10.0 + epoch, "test_top5": 50.0}
        export.save_compact(str(directory), variables, config, record)
    # Three exports: the pointer names v3, and v2 is kept for a reader that is still loading it.
    assert (directory / "LATEST").read_text() == "v3\n"
    assert sorted(os.listdir(directory)) == ["LATEST", "v2", "v3"]
    # An export killed after writing part of v4 (no metadata, pointer unchanged).
    os.makedirs(directory / "v4" / "variables")
    (directory / "v4" / "variables" / "partial").write_bytes(b"\0" * 10)
    model, restored, meta = export.load_compact(str(directory))
    assert meta["epoch"] == 2 and meta["test_top1"] == 12.0
    want = compact_variables(variables)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    record = {"epoch": 3, "test_top1": 13.0, "test_top5": 50.0}
    export.save_compact(str(directory), variables, config, record)
    assert export.load_compact(str(directory))[2]["epoch"] == 3
    assert sorted(os.listdir(directory)) == ["LATEST", "v3", "v4"]
    assert not (directory / "v4" / "variables" / "partial").exists()
    # What a finished run started again checks before exporting (train.export_best): the epoch
    # the current export holds, and None where its metadata cannot be read (export again).
    assert deploy.exported_epoch(str(directory)) == 3
    metadata = (directory / "v4" / "metadata.json").read_text()
    (directory / "v4" / "metadata.json").write_text(metadata[:20])
    assert deploy.exported_epoch(str(directory)) is None
    (directory / "v4" / "metadata.json").write_text(metadata)
    # A pointer that names nothing valid, and a directory that is no export, are user errors.
    (directory / "LATEST").write_text("../elsewhere")
    with pytest.raises(ValueError, match="not an export version"):
        export.load_compact(str(directory))
    with pytest.raises(FileNotFoundError, match="not a compact export"):
        export.load_compact(str(tmp_path))


def small_stablehlo() -> bytes:
    """A real serialized StableHLO module (x -> 2x, any batch), made in well under a second."""
    from dcff_jax import export

    return export.batch_polymorphic_stablehlo(lambda x: 2 * x, (4,), jnp.float32, pad_to=1)


def test_native_parsed_files_are_checked_against_their_sha256_before_parsing(tmp_path):
    """model.stablehlo and model.onnx go to C++ parsers that Python cannot catch: a file is
    read only when metadata.json records its SHA-256 and the bytes match it."""
    import hashlib
    import json

    from dcff_jax import export
    from dcff_jax.errors import DataError, MissingFileError

    data = small_stablehlo()
    version = tmp_path / "compact" / "v1"
    version.mkdir(parents=True)
    path = str(version / export.STABLEHLO)
    base = {
        "architecture": "vgg16",
        "cprate": "[0.5]*13",
        "num_classes": 10,
        "image_size": 32,
        "dataset": "cifar10",
    }
    metadata = export.with_digest(base, export.STABLEHLO, data)
    assert metadata[export.DIGESTS] == {export.STABLEHLO: hashlib.sha256(data).hexdigest()}
    export.write_beside_metadata(version, export.STABLEHLO, data, metadata)
    exported, read = export.load_stablehlo(path)
    assert read == metadata
    assert np.array_equal(exported.call(jnp.ones((3, 4))), 2 * np.ones((3, 4)))

    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x40
    (version / export.STABLEHLO).write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="does not match the SHA-256 in .*export_stablehlo"):
        export.load_stablehlo(path)
    (version / export.STABLEHLO).write_bytes(data[: len(data) // 2])  # truncated, digest kept
    with pytest.raises(DataError, match="does not match the SHA-256"):
        export.load_stablehlo(path)
    # A file whose digest matches but does not parse: jax's own error, in one line.
    export.write_beside_metadata(
        version, export.STABLEHLO, data[:64], export.with_digest(base, export.STABLEHLO, data[:64])
    )
    with pytest.raises(DataError, match="is not a readable StableHLO export"):
        export.load_stablehlo(path)
    (version / "metadata.json").write_text(json.dumps(base))
    with pytest.raises(DataError, match="records no SHA-256 for model.stablehlo"):
        export.load_stablehlo(path)
    for text in ("[1, 2]", '{"sha256": ', b"\xff\xfe{"):
        if isinstance(text, bytes):
            (version / "metadata.json").write_bytes(text)
        else:
            (version / "metadata.json").write_text(text)
        with pytest.raises(DataError, match="metadata.json is not valid JSON for"):
            export.load_stablehlo(path)
    (version / "metadata.json").write_text(json.dumps({**base, "sha256": ["not", "a", "map"]}))
    with pytest.raises(DataError, match="records no SHA-256"):
        export.load_stablehlo(path)
    (version / "metadata.json").write_text(json.dumps({**base, "image_size": -3}))
    with pytest.raises(DataError, match="image_size is -3, expected an integer in"):
        export.load_stablehlo(path)
    os.remove(version / "metadata.json")
    with pytest.raises(MissingFileError, match="metadata.json does not exist"):
        export.load_stablehlo(path)


def test_the_former_module_names_re_export_the_deploy_package():
    """dcff_jax.export, .onnx_export, .channel_padding and .torch_import keep the names users
    had; each is the one object in dcff_jax.deploy."""
    from dcff_jax import channel_padding, deploy, export, onnx_export, torch_import
    from dcff_jax.deploy import compact, onnx_file, onnx_graph, stablehlo, versions

    assert export.load_compact is deploy.load_compact is compact.load_compact
    assert export.write_stablehlo is stablehlo.write_stablehlo
    assert export.read_verified is versions.read_verified and export.POINTER == "LATEST"
    assert onnx_export.jaxpr_to_onnx is onnx_graph.jaxpr_to_onnx
    assert onnx_export.onnx_bytes is onnx_file.onnx_bytes and onnx_export.ONNX == "model.onnx"
    assert channel_padding.pad_channels is deploy.pad_channels
    assert torch_import.read_state_dict is deploy.torch_import.read_state_dict
