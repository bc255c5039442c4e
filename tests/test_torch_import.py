"""The published code's compact checkpoints, read without torch and without running any code.

Fixture (made once by experiments/make_torch_import_fixture.py in a torch venv):
`published_resnet56_compact.pt` is the model_best_compact.pt that the published main_cifar.py
wrote for ResNet-56 at the paper's plan (its epoch 3 on the real CIFAR-10, test top-1 50.68%),
and the .npz holds the published CompactResNet's eval logits for 4 fixed images.
"""

import io
import os
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_module

from dcff_jax import create_model, export, input_pipeline
from dcff_jax.deploy import torch_import
from dcff_jax.errors import DataError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "published_resnet56_compact")


@pytest.fixture(scope="module")
def published():
    with np.load(FIXTURE + ".npz") as f:
        return {"images": f["images"], "logits": f["logits"], "plan": str(f["plan"])}


def test_the_state_dict_is_read_as_arrays(published):
    state = torch_import.read_state_dict(FIXTURE + ".pt")
    assert len(state) == 332  # 55 convs, 55 bns x 5 fields, linear weight + bias
    assert state["conv1.weight"].shape == (16, 3, 3, 3)
    assert state["conv1.weight"].dtype == np.float32
    assert state["fc.weight"].shape == (10, 64)
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert all(v.flags["C_CONTIGUOUS"] for v in state.values())


def test_the_imported_model_gives_the_published_models_logits(published):
    model = create_model("resnet56", published["plan"], "compact")
    state = torch_import.read_state_dict(FIXTURE + ".pt")
    variables = torch_import.variables_from_torch(model, state, 32)
    mean, std = input_pipeline.normalization("cifar10")
    x = input_pipeline.normalize(jnp.asarray(published["images"]), mean, std, jnp.float32)
    logits = np.asarray(model.apply(variables, x, train=False))
    # float32 both sides, different conv algorithms: rounding only.
    scale = np.abs(published["logits"]).max()
    np.testing.assert_allclose(logits, published["logits"], rtol=0, atol=1e-5 * scale)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint(path, payload) -> None:
    """A torch-like zip checkpoint whose data.pkl is `payload` pickled."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(payload))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write_checkpoint(path, {"conv1.weight": _RunsACommand(marker)})
    with pytest.raises(DataError, match=r"refusing (posix|os)\.system"):
        torch_import.read_state_dict(str(path))
    assert not marker.exists()


def test_wrong_files_and_plans_are_named(tmp_path, published):
    not_zip = tmp_path / "old.pt"
    not_zip.write_bytes(b"\x80\x02legacy torch format")
    with pytest.raises(DataError, match="not a torch checkpoint in the zip format"):
        torch_import.read_state_dict(str(not_zip))
    state = torch_import.read_state_dict(FIXTURE + ".pt")
    other_plan = create_model("resnet56", "[0.5]*27+[0.0]*3", "compact")
    with pytest.raises(DataError, match="another plan"):
        torch_import.variables_from_torch(other_plan, state, 32)
    with pytest.raises(DataError, match="layers, the model"):
        torch_import.variables_from_torch(create_model("vgg16", None, "compact"), state, 32)
    listed = io.BytesIO()
    with zipfile.ZipFile(listed, "w") as archive:
        archive.writestr("archive/other.txt", "")
    (tmp_path / "empty.pt").write_bytes(listed.getvalue())
    with pytest.raises(DataError, match="expected one"):
        torch_import.read_state_dict(str(tmp_path / "empty.pt"))


def test_the_cli_writes_an_export_that_load_compact_reads(tmp_path, published):
    out = str(tmp_path / "compact")
    proc = run_module(
        "dcff_jax.import_torch",
        "--config=configs/resnet56_cifar.py",
        f"--state_dict={FIXTURE}.pt",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, variables, metadata = export.load_compact(out)
    assert metadata["imported_from"].endswith("published_resnet56_compact.pt")
    assert metadata["cprate"] == published["plan"]
    mean, std = input_pipeline.normalization("cifar10")
    x = input_pipeline.normalize(jnp.asarray(published["images"]), mean, std, jnp.float32)
    logits = np.asarray(model.apply(variables, x, train=False))
    scale = np.abs(published["logits"]).max()
    np.testing.assert_allclose(logits, published["logits"], rtol=0, atol=1e-5 * scale)
    bad = run_module(
        "dcff_jax.import_torch",
        "--config=configs/resnet56_cifar.py",
        f"--state_dict={tmp_path}/missing.pt",
        f"--out={out}",
    )
    assert bad.returncode == 2 and "error: " in bad.stderr and "Traceback" not in bad.stderr
