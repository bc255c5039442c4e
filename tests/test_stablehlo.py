"""The compact model as serialized StableHLO: runs with jax alone (dcff_jax and flax hidden), at
any batch size, with the logits of the Flax compact model; written with every export and
accepted by `evaluate`."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    SMOKE_MODEL,
    evaluate_result,
    init_jitted,
    run_module,
    write_cifar_folder,
)

from dcff_jax import export, input_pipeline, models

# Run in a fresh interpreter that cannot import dcff_jax or flax: what a deployment has.
LOAD_WITHOUT_DCFF = """
import sys
sys.modules["dcff_jax"] = None  # `import dcff_jax` now raises ImportError
sys.modules["flax"] = None
import jax, numpy as np
try:
    import dcff_jax
    raise SystemExit("dcff_jax is importable")
except ImportError:
    pass
path, images_path, out = sys.argv[1:]
exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
images = np.load(images_path)
logits = [np.asarray(exported.call(images[:n])) for n in (1, len(images))]
np.savez(out, one=logits[0], all=logits[1])
"""


@pytest.mark.parametrize(
    "arch, cprate",
    [("resnet56", "[0.5]*27+[0.3]*3"), ("vgg16", "[0.5]*13")],  # residual adds; a flatten
)
def test_stablehlo_runs_without_dcff_jax_at_any_batch_with_the_models_logits(
    arch, cprate, tmp_path
):
    model = models.create_model(arch, cprate, "compact")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)), seed=1)
    mean, std = input_pipeline.normalization("cifar10")
    path = tmp_path / "model.stablehlo"
    path.write_bytes(export.stablehlo_bytes(model, variables, 32, mean, std))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_DCFF,
            str(path),
            str(tmp_path / "images.npy"),
            str(tmp_path / "logits.npz"),
        ],
        cwd=str(tmp_path),  # not the repository: nothing of ours on the path
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "logits.npz")
    x = input_pipeline.normalize(jnp.asarray(images), mean, std, jnp.float32)
    want = np.asarray(model.apply(variables, x, train=False))
    scale = np.abs(want).max()
    # Same float32 graph, compiled separately: only fusion-order rounding differs.
    np.testing.assert_allclose(got["all"], want, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(got["one"], want[:1], rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_training_writes_it_and_evaluate_gives_the_compact_models_result(tmp_path):
    data = write_cifar_folder(str(tmp_path / "cifar"), train=32, test=20)
    workdir = str(tmp_path / "wd")
    proc = run_module(
        "dcff_jax.main",
        "--config=configs/resnet56_cifar.py",
        f"--workdir={workdir}",
        "--config.dataset=cifar10_folder",
        f"--config.data_dir={data}",
        "--config.batch_size=8",
        "--config.num_epochs=1",
        f"--config.model={SMOKE_MODEL}",
        "--config.cprate=[0.3]*6",  # ResNet-8's widths 11, 22, 44: not multiples of 8
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    version = open(os.path.join(workdir, "compact", "LATEST")).read().strip()
    stablehlo = os.path.join(workdir, "compact", version, "model.stablehlo")
    assert os.path.isfile(stablehlo)
    variables_result = evaluate_result(os.path.join(workdir, "compact"))
    stablehlo_result = evaluate_result(stablehlo)
    assert stablehlo_result["examples"] == variables_result["examples"] == 20
    assert stablehlo_result["top1"] == variables_result["top1"]
    assert stablehlo_result["loss"] == pytest.approx(variables_result["loss"], rel=1e-5)
    metadata_path = os.path.join(workdir, "compact", version, "metadata.json")
    assert json.load(open(metadata_path))["stablehlo_channels_padded_to"] == 8
    assert all(w % 8 == 0 for w in conv_widths_of(stablehlo))
    # The CLI re-writes it from the export (for exports made before they had it), with the
    # padding asked for, and says so in the metadata.
    os.remove(stablehlo)
    out = run_module(
        "dcff_jax.export_stablehlo", f"--checkpoint={workdir}/compact", "--pad_channels_to=1"
    )
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == stablehlo
    assert any(w % 8 for w in conv_widths_of(stablehlo))  # the plan's widths
    assert json.load(open(metadata_path))["stablehlo_channels_padded_to"] == 1
    assert evaluate_result(stablehlo)["top1"] == variables_result["top1"]
    bad = run_module(
        "dcff_jax.export_stablehlo", f"--checkpoint={workdir}/compact", "--pad_channels_to=0"
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--pad_channels_to must be >= 1" in bad.stderr


def conv_widths_of(path) -> list[int]:
    """The output channels of each convolution in a serialized StableHLO file."""
    exported = jax.export.deserialize(bytearray(open(path, "rb").read()))
    text = exported.mlir_module()
    widths = [
        int(m.group(1))
        for m in re.finditer(r"stablehlo\.convolution.*->\s*tensor<[^>]*x(\d+)xf32>", text)
    ]
    assert widths, "no convolution found"
    return widths


def test_its_conv_widths_are_padded_to_8_by_default_and_kept_with_1(tmp_path):
    model = models.create_model("resnet56", "[0.5]*27+[0.3]*3", "compact")
    variables = init_jitted(model, jnp.zeros((1, 32, 32, 3)), seed=1)
    mean, std = input_pipeline.normalization("cifar10")
    for pad_to, name in ((8, "padded"), (1, "plain")):
        (tmp_path / name).write_bytes(
            export.stablehlo_bytes(model, variables, 32, mean, std, pad_to=pad_to)
        )
    assert all(w % 8 == 0 for w in conv_widths_of(tmp_path / "padded"))
    plain = conv_widths_of(tmp_path / "plain")
    assert any(w % 8 for w in plain)
    # 55 convs, lowered once per platform
    assert len(plain) == len(conv_widths_of(tmp_path / "padded"))
    assert len(plain) == 55 * len(export.STABLEHLO_PLATFORMS)
