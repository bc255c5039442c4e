"""The compact model as ONNX (our jaxpr-to-ONNX converter, run by onnxruntime): the JAX compact
model's logits for every architecture (helpers.NUMERIC_ARCHS) at any batch size; accepted by
`evaluate`; ops outside the converter's set are refused by name."""

import collections
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import (
    NUMERIC_ARCHS,
    evaluate_result,
    init_jitted,
    main_command,
    paper_config,
    run_module,
    write_cifar_folder,
)

from dcff_jax import input_pipeline, models, onnx_export
from dcff_jax.errors import DataError

onnxruntime = pytest.importorskip("onnxruntime")


def trained_looking(model, variables: dict, images: jax.Array, seed: int = 1) -> dict:
    """Init variables with the batch-norm statistics of `images` and random affine terms, so
    that every BN computes something (at init, mean 0 / var 1 / scale 1 / bias 0, a BN is
    almost the identity, and a converter that dropped it would pass)."""
    rng = np.random.default_rng(seed)
    params = traverse_util.flatten_dict(variables["params"])
    for key, a in params.items():
        if key[-1] == "scale":  # NumPy: eager jnp would compile once per distinct shape
            params[key] = np.asarray(a) * rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
        elif key[-1] == "bias":
            params[key] = np.asarray(a) + rng.normal(0, 0.1, a.shape).astype(a.dtype)
    variables = {**variables, "params": traverse_util.unflatten_dict(params)}
    rngs = {"dropout": jax.random.key(seed)}  # MobileNetV2 has dropout before its classifier
    _, updated = jax.jit(
        lambda v: model.apply(v, images, train=True, mutable=["batch_stats"], rngs=rngs)
    )(variables)
    # One update gives 0.9 * old + 0.1 * batch (common.batch_norm); solve for batch's.
    batch_stats = jax.tree.map(
        lambda new, old: (np.asarray(new) - 0.9 * np.asarray(old)) / 0.1,
        updated["batch_stats"],
        variables["batch_stats"],
    )
    return {**variables, "batch_stats": batch_stats}


def trained_looking_compact(arch: str):
    """(config, model, variables, uint8 images (3, s, s, 3), their normalised copy, mean, std):
    the paper plan's compact model of `arch` with trained-looking variables (also
    experiments/bench_onnx_paths.py's)."""
    config = paper_config(arch)
    model = models.create_model(arch, config.cprate, "compact")  # the paper's plan
    size = config.image_size
    variables = init_jitted(model, jnp.zeros((1, size, size, 3)))
    mean, std = input_pipeline.normalization(config.dataset)
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    x = input_pipeline.normalize(jnp.asarray(images), mean, std, jnp.float32)
    return config, model, trained_looking(model, dict(variables), x), images, x, mean, std


@pytest.mark.slow
@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_onnxruntime_gives_the_compact_models_logits_at_any_batch(arch):
    config, model, variables, images, x, mean, std = trained_looking_compact(arch)
    size = config.image_size
    session = onnxruntime.InferenceSession(
        onnx_export.onnx_bytes(model, variables, size, mean, std),
        providers=["CPUExecutionProvider"],
    )
    want = np.asarray(jax.jit(lambda v: model.apply(v, x, train=False))(variables))
    scale = np.abs(want).max()
    # The logits depend on the image (else a graph that ignored its input could pass).
    assert want.std(axis=0).max() > 1e-3 * scale
    # The bound. The same float32 function, evaluated by another engine: only the
    # summation order of each conv/matmul differs, ~sqrt(K) * 2^-24 relative per layer
    # (K <= 4608); measured on this CPU <= 1e-6 (experiments/RESULTS.md).
    for batch in (1, 3):
        got = onnx_export.run_session(session, images[:batch])
        assert got.shape == want[:batch].shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want[:batch], rtol=0, atol=1e-4 * scale)


def test_an_op_outside_the_set_is_refused_by_name():
    with pytest.raises(onnx_export.UnsupportedOp, match="sort"):
        onnx_export.jaxpr_to_onnx(lambda x: jnp.sort(x, axis=-1), (None, 4), np.float32)


def test_the_layout_follows_convs_and_a_flatten_reads_nhwc_order():
    """A conv (NCHW inside ONNX), a channel-wise add, a max pool, then a flatten: the flatten
    must see jax's NHWC order, so a transpose back must sit before it."""
    kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)
    shift = np.arange(4, dtype=np.float32)

    def fn(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        y = jnp.maximum(y + shift, 0.0)
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return y.reshape(y.shape[0], -1)

    proto = onnx_export.jaxpr_to_onnx(fn, (None, 6, 6, 2), np.float32)
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 2)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"images": x})[0], fn(x), rtol=1e-5, atol=1e-5)
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Transpose") == 2  # into NCHW for the conv, back for the flatten


@pytest.mark.slow
def test_the_cli_writes_it_and_evaluate_gives_the_exports_result(tmp_path):
    data = write_cifar_folder(str(tmp_path / "cifar"), train=32, test=20)
    workdir = str(tmp_path / "wd")
    proc = run_module(*main_command(data, workdir, "--config.num_epochs=1")[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_module("dcff_jax.export_onnx", f"--checkpoint={workdir}/compact")
    assert out.returncode == 0, out.stderr[-3000:]
    *_, said, path = out.stdout.strip().splitlines()
    assert said.startswith("conv widths padded to multiples of 8: ")
    version = open(os.path.join(workdir, "compact", "LATEST")).read().strip()
    assert path == os.path.join(workdir, "compact", version, onnx_export.ONNX)
    with open(os.path.join(workdir, "compact", version, "metadata.json")) as f:
        digests = json.load(f)["sha256"]
    with open(path, "rb") as f:
        assert digests["model.onnx"] == hashlib.sha256(f.read()).hexdigest()
    assert set(digests) == {"model.onnx", "model.stablehlo"}
    variables_result = evaluate_result(os.path.join(workdir, "compact"))
    onnx_result = evaluate_result(path)
    assert onnx_result["examples"] == variables_result["examples"] == 20
    assert onnx_result["top1"] == variables_result["top1"]
    assert onnx_result["loss"] == pytest.approx(variables_result["loss"], rel=1e-4)


def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path):
    from dcff_jax import export

    data = b"not a protobuf"
    described = {"architecture": "vgg16", "cprate": "", "num_classes": 10, "image_size": 32}
    metadata = export.with_digest({**described, "dataset": "cifar10"}, onnx_export.ONNX, data)
    export.write_beside_metadata(tmp_path, onnx_export.ONNX, data, metadata)
    out = run_module("dcff_jax.evaluate", f"--checkpoint={tmp_path / 'model.onnx'}")
    assert out.returncode == 2
    assert "is not a readable ONNX model" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    # A file changed after it was written never reaches onnxruntime's parser.
    (tmp_path / onnx_export.ONNX).write_bytes(b"not a protobuf!")
    with pytest.raises(DataError, match="does not match the SHA-256 in .*export_onnx"):
        onnx_export.load_onnx(str(tmp_path / onnx_export.ONNX))


def resnet56_graph(cprate: str):
    """(model, variables, uint8 images (4, 32, 32, 3), their normalised copy, the ONNX graph of
    the compact ResNet-56 at cprate, unpadded)."""
    model = models.create_model("resnet56", cprate, "compact")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = input_pipeline.normalization("cifar10")
    x = input_pipeline.normalize(jnp.asarray(images), mean, std, jnp.float32)
    variables = trained_looking(model, dict(variables), x)
    proto = onnx_export.jaxpr_to_onnx(
        lambda im: model.apply(
            variables, input_pipeline.normalize(im, mean, std, jnp.float32), train=False
        ),
        (None, 32, 32, 3),
        np.uint8,
    )
    return model, variables, images, x, proto


def test_batch_norm_folds_into_the_convs_and_relus_are_relus():
    """Eval-mode batch norm is a per-channel affine map of a conv's output: the graph keeps
    none of it (no Mul; the one Sub is the input normalisation), and max(x, 0) is a Relu that
    onnxruntime fuses into the conv before it."""
    model, variables, images, x, proto = resnet56_graph("[0.5]*27+[0.3]*3")
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["Conv"] == 55 and ops["Relu"] == 55
    assert ops["Mul"] == 0 and ops["Sub"] == 1 and ops["Max"] == 0
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    want = np.asarray(jax.jit(lambda v: model.apply(v, x, train=False))(variables))
    got = onnx_export.run_session(session, images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_a_conv_output_read_twice_is_not_folded():
    """conv(x) * s + conv(x): folding * s into the conv would change the second reader."""
    kernel = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype(np.float32)
    scale = np.asarray([1.0, 2.0, 3.0, 4.0], np.float32)

    def fn(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return (y * scale + y).reshape(y.shape[0], -1)

    proto = onnx_export.jaxpr_to_onnx(fn, (None, 5, 5, 2), np.float32)
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 2)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"images": x})[0], fn(x), rtol=1e-5, atol=1e-5)
    assert "Mul" in [node.op_type for node in proto.graph.node]


def conv_widths_of(proto) -> list[int]:
    arrays = {t.name: t.dims for t in proto.graph.initializer}
    return [arrays[n.input[1]][0] for n in proto.graph.node if n.op_type == "Conv"]


class TracesCounted:
    """A linen model whose apply counts its calls (each one traces the model)."""

    def __init__(self, model):
        self.model, self.traces = model, 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


def test_padded_widths_are_multiples_of_8_with_the_same_logits():
    """ResNet-56's compact widths are odd (e.g. 11, 22); the export converts the padded
    function (channel_padding), so every conv is a multiple of 8 wide, the option-A shortcut
    pads still line the real channels up, the logits are the unpadded model's, and the file's
    MAC counts are the counter's: the model's own at the plan's widths, more when padded."""
    import onnx

    from dcff_jax import flops

    model = models.create_model("resnet56", "[0.3]*27+[0.3]*3", "compact")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = input_pipeline.normalization("cifar10")
    x = input_pipeline.normalize(jnp.asarray(images), mean, std, jnp.float32)
    variables = trained_looking(model, dict(variables), x)
    counted = TracesCounted(model)
    graphs = {
        pad_to: onnx.load_from_string(
            onnx_export.onnx_bytes(counted, variables, 32, mean, std, pad_to)
        )
        for pad_to in (1, 8)
    }
    # One trace of the model per export: the padded function re-runs its jaxpr, and the file
    # and both MAC counts come from the traces made for the file.
    assert counted.traces == 2
    plain, padded = conv_widths_of(graphs[1]), conv_widths_of(graphs[8])
    assert len(plain) == len(padded) == 55
    assert any(w % 8 for w in plain) and all(w % 8 == 0 for w in padded)
    meta = {p.key: int(p.value) for p in graphs[8].metadata_props}
    assert meta["dcff_jax.pad_channels_to"] == 8
    assert meta["dcff_jax.macs_paper_widths"] == flops.count(model, (1, 32, 32, 3), "macs").flops
    assert meta["dcff_jax.macs_padded"] > meta["dcff_jax.macs_paper_widths"]
    assert not graphs[1].metadata_props
    want = np.asarray(jax.jit(lambda v: model.apply(v, x, train=False))(variables))
    for graph in graphs.values():
        got = onnx_export.run_session(
            onnxruntime.InferenceSession(graph.SerializeToString()), images
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_padding_places_divisors_depthwise_kernels_and_matmul_rows_by_the_channel_map():
    """A hand-made function that reaches the padding rules the six models do not all reach,
    converted padded: a per-channel divisor (padded with 1, or 0/0 would put NaN in the padded
    channels and, through the zero weights after them, in the logits), a depthwise conv that
    follows its producer's padded width (the padded function holds a CPU-only rewrite of it in a
    platform-dependent branch: the file holds the plain grouped Conv), and a matmul whose rows
    follow the map."""
    from dcff_jax.deploy.channel_padding import pad_channels

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    divisor = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    depthwise = rng.normal(size=(3, 3, 1, 5)).astype(np.float32)
    dense = rng.normal(size=(5, 3)).astype(np.float32)
    nhwc = ("NHWC", "HWIO", "NHWC")

    def fn(x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=nhwc)
        y = jax.nn.relu(y / divisor + y)  # read twice, so the divisor stays a Div
        y = jax.lax.conv_general_dilated(
            y, depthwise, (1, 1), "SAME", dimension_numbers=nhwc, feature_group_count=5
        )
        return jnp.mean(y, axis=(1, 2)) @ dense

    padded = onnx_export.jaxpr_to_onnx(pad_channels(fn, 8), (None, 6, 6, 2), np.float32)
    ops = [node.op_type for node in padded.graph.node]
    assert "Div" in ops and "Squeeze" not in ops  # no trace of the CPU-only shifted form
    assert conv_widths_of(padded) == [8, 8]
    groups = [a.i for n in padded.graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]  # fmt: skip
    assert groups == [1, 8]
    x = rng.normal(size=(2, 6, 6, 2)).astype(np.float32)
    want = np.asarray(fn(x))
    got = onnxruntime.InferenceSession(padded.SerializeToString()).run(None, {"images": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_negative_padding_crops_and_a_checkpoint_name_is_an_identity():
    """lax.pad with negative widths (channel_padding cuts padded positions so) is a Pad of the
    positive parts, then a Slice; checkpoint_name converts to nothing."""
    from jax.ad_checkpoint import checkpoint_name

    def fn(x):
        x = checkpoint_name(x, "named")
        return jax.lax.pad(x, 0.5, ((0, 0, 0), (-1, 2, 0), (2, -3, 0)))

    proto = onnx_export.jaxpr_to_onnx(fn, (None, 4, 6), np.float32)
    x = np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)
    got = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, {"images": x})[0]
    np.testing.assert_array_equal(got, fn(x))
    assert [n.op_type for n in proto.graph.node] == ["Pad", "Slice", "Identity"]


@pytest.mark.slow
def test_bench_onnx_paths_writes_files_and_times_two_sets(tmp_path):
    """experiments/bench_onnx_paths.py (the before/after of the export path): `write` records
    the file's MACs and its logits' difference; `time` prints each set's median and the ratio."""
    import sys

    from helpers import ROOT, run_python

    script = os.path.join(ROOT, "experiments", "bench_onnx_paths.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}

    def run(*args):
        proc = run_python([sys.executable, script, *args], env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("write", "--archs=vgg16", f"--out={tmp_path}/a", "--repeats=2")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["vgg16"]
    assert summary["export_seconds"] > 0 and len(summary["export_seconds_repeats"]) == 1
    assert int(summary["metadata"]["dcff_jax.macs_padded"]) > int(
        summary["metadata"]["dcff_jax.macs_paper_widths"]
    )
    assert summary["max_logit_difference_relative"] < 1e-4
    rows = run("time", f"{tmp_path}/a", f"{tmp_path}/a", "--steps=2").splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["vgg16", "1"], ["vgg16", "256"]]
    for row in rows:
        a, b, ratio = map(float, row.split()[2:])
        # Each figure is printed to 2 decimals (+-0.005): b / a of the printed medians is off
        # by at most ratio * 0.005 * (1/a + 1/b), the printed ratio by 0.005 more.
        assert a > 0 and b > 0
        assert abs(ratio - b / a) <= 0.005 + ratio * 0.005 * (1 / a + 1 / b) + 1e-9
