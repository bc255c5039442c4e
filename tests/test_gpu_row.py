"""experiments/gpu_row.py, the GPU window's script: its dry run through main, and the packing of
an unfinished run's checkpoint into parts that come back from the GPU machine."""

import filecmp
import importlib.util
import io
import json
import os
import sys
import tarfile

import jax.numpy as jnp
import pytest
from helpers import ROOT, run_python, write_cifar_folder

from dcff_jax import flops
from dcff_jax.training import checkpoints

SCRIPT = os.path.join(ROOT, "experiments", "gpu_row.py")


def gpu_row():
    spec = importlib.util.spec_from_file_location("gpu_row", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_unfinished_runs_checkpoint_packs_into_small_parts_and_unpacks_whole(
    tmp_path, monkeypatch
):
    row = gpu_row()
    workdir = tmp_path / "run"
    mngr = checkpoints.manager(str(workdir / "checkpoints"))
    for step in (4, 8):
        state = {"w": jnp.arange(3000, dtype=jnp.float32) * step}
        checkpoints.save(mngr, step, state, {"best_top1": float(step)})
    (workdir / "config.json").write_text('{"model": "resnet56"}')
    (workdir / "xla_cache").mkdir()
    (workdir / "xla_cache" / "entry").write_bytes(b"x" * 5000)
    monkeypatch.setattr(row, "PART_BYTES", 4096)
    parts = row.pack(str(workdir), str(tmp_path / "out" / "resume"), "resnet56")
    assert len(parts) >= 5 and all(os.path.getsize(p) <= 4096 for p in parts)
    assert [os.path.basename(p) for p in parts][:2] == ["resnet56.tar.00", "resnet56.tar.01"]
    restored = tmp_path / "restored"
    assert row.unpack(str(tmp_path / "out" / "resume"), str(restored))
    assert not row.unpack(str(tmp_path / "out" / "resume"), str(restored))  # has a checkpoint
    assert sorted(os.listdir(restored / "checkpoints")) == ["8"]  # the newest only
    compare = filecmp.dircmp(workdir / "checkpoints" / "8", restored / "checkpoints" / "8")
    assert not compare.diff_files and not compare.left_only
    assert (restored / "xla_cache" / "entry").read_bytes() == b"x" * 5000
    assert row.read_progress(str(restored)) == {"best_top1": 8.0}
    # Over the limit, the compilation cache is left out, then the whole pack is refused.
    without_cache = len(row._tar(str(workdir), ["checkpoints/8", "config.json"]))
    monkeypatch.setattr(row, "RESUME_BYTES", without_cache + 1000)
    row.pack(str(workdir), str(tmp_path / "small"), "resnet56")
    blob = b"".join(p.read_bytes() for p in sorted((tmp_path / "small").iterdir()))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
    assert "config.json" in names and not any(n.startswith("xla_cache") for n in names)
    monkeypatch.setattr(row, "RESUME_BYTES", without_cache - 1)
    with pytest.raises(SystemExit, match="bytes, over the"):
        row.pack(str(workdir), str(tmp_path / "none"), "resnet56")


@pytest.mark.slow
def test_the_dry_run_trains_a_row_through_main_and_reports_it(tmp_path):
    """--dry_run: 2 epochs at batch 16 of a 40-image folder (two full steps and the partial
    one), through `python -m dcff_jax.main` as on the GPU; the row's JSON has every field."""
    data = write_cifar_folder(str(tmp_path / "data"), train=40, test=8)
    out = tmp_path / "out"
    command = [sys.executable, SCRIPT, "run", "resnet56", "--data", data, "--out", str(out)]
    command += ["--scratch", str(tmp_path / "scratch"), "--dry_run", "--limit", "800"]
    # The path is under test, not the numerics: XLA's optimisations off compile in a fraction.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    proc = run_python(command, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + (out / "resnet56.log").read_text()[-3000:]
    result = json.loads((out / "resnet56.json").read_text())
    assert result["finished"] and result["epochs_done"] == 2 == result["num_epochs"]
    assert result["exit_status"] == 0 and result["data"] == "given folder"
    assert 0 <= result["final_top1"] <= result["best_top1"] <= 100
    assert result["compile_s"] > 0 and result["train_images_per_s_median"] > 0
    assert 0 < result["outside_steps_fraction_median"] < 1
    assert result["start_to_first_epoch_s"] > result["compile_s"]
    counts = flops.model_counts("resnet56", result["cprate"])
    assert result["flops"] == counts["flops"] == 55_835_840  # the paper's 55.84M
    assert result["params"] == counts["params"] == 384_316
    assert "resume_parts" not in result and result["seed"] == 0
    assert json.loads((out / "machine.json").read_text())["versions"]["jax"]
    log = (out / "resnet56.log").read_text()
    assert "epoch 2/2: test top-1" in log and "compiled in" in log
    assert os.path.exists(tmp_path / "scratch" / "resnet56" / "compact" / "LATEST")
