"""A workdir and data on gs://, against a local GCS emulator (gcp-storage-emulator) on 127.0.0.1.

Every part of a run talks to the emulator, nothing to the internet:
  - epath (config.json, plots, the export's pointer and metadata, the data) through gcsfs,
    pointed there by STORAGE_EMULATOR_HOST, anonymous;
  - orbax's arrays (checkpoints, export variables) through tensorstore's GCS driver, pointed
    there by TENSORSTORE_GCS_HTTP_URL;
  - TensorBoard events through tensorboardX's google-cloud-storage writer (STORAGE_EMULATOR_HOST);
  - credential look-ups that would ask a GCE metadata server are sent to a closed local port.
"""

import json
import os
import re
import shutil
import signal
import socket
import sys
import time

import numpy as np
import pytest
from helpers import (
    checkpoint_params,
    main_command,
    run_python,
    start_python,
    write_cifar_folder,
)

pytest.importorskip("gcsfs", reason="the gcs extra (pip install -e '.[gcs]') is not installed")
emulator = pytest.importorskip(
    "gcp_storage_emulator.server", reason="gcp-storage-emulator (test extra) is not installed"
)

BUCKET = "dcff-test"
# Media downloads of objects under this prefix are answered 403 Forbidden (None: none are), as
# when a run's credentials lose read access: an I/O error, not damage.
DENIED = {"prefix": None}


def _with_generation_headers(download):
    """Real GCS answers every media download with x-goog-generation (tensorstore's GCS driver,
    which orbax writes through, reads it to validate its OCDBT manifest); gcp-storage-emulator
    omits it ("Malformed StorageGeneration"). Add it from the object's own metadata. Downloads
    under DENIED["prefix"] get 403 instead."""
    from http import HTTPStatus

    from gcp_storage_emulator.exceptions import NotFound

    def patched(request, response, storage, *args, **kwargs):
        denied = DENIED["prefix"]
        if denied is not None and request.params["object_id"].startswith(denied):
            response.status = HTTPStatus.FORBIDDEN
            response.json({"error": {"code": 403, "message": "Forbidden (test)"}})
            return None
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj.get("generation", "1"))
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except NotFound:
            pass
        return download(request, response, storage, *args, **kwargs)

    return patched


@pytest.fixture(scope="module")
def gcs_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from gcp_storage_emulator.handlers import objects

    objects.download = _with_generation_headers(objects.download)
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials for the emulator
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs's bucket-type probe speaks gRPC, which the emulator does not (a 60 s timeout).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }
    yield env
    server.stop()


def gs_listing(env, prefix: str) -> list[str]:
    """Every object under gs://BUCKET/prefix, as seen by a fresh process."""
    code = (
        "import sys, fsspec; "
        "print('\\n'.join('gs://' + p for p in sorted(fsspec.filesystem('gs').find(sys.argv[1]))))"
    )
    proc = run_python([sys.executable, "-c", code, f"gs://{BUCKET}/{prefix}"], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def main_args(workdir, data_dir):
    return main_command(data_dir, workdir, "--config.checkpoint_every_steps=100")


def without_retry_delays(argv):
    """`python -m dcff_jax.main ...` with its 3 checkpoint-read retries' delays (1 + 4 + 15 s)
    set to 0: the same tries, without the 20 s of waiting."""
    assert argv[1:3] == ["-m", "dcff_jax.main"], argv
    launcher = (
        "import runpy, sys\n"
        "from dcff_jax.training import checkpoints\n"
        "checkpoints.RETRY_DELAYS_S = (0.0,) * len(checkpoints.RETRY_DELAYS_S)\n"
        "sys.argv = ['dcff_jax.main', *sys.argv[1:]]\n"
        "runpy.run_module('dcff_jax.main', run_name='__main__', alter_sys=True)"
    )
    return [argv[0], "-c", launcher, *argv[3:]]


def run(argv, env):
    return run_python(argv, env=env)


def upload(env, local: str, remote: str) -> None:
    code = (
        "import sys, os; from etils import epath; src, dst = sys.argv[1:]\n"
        "for name in os.listdir(src):\n"
        "    (epath.Path(dst) / name).write_bytes(open(os.path.join(src, name), 'rb').read())"
    )
    proc = run_python([sys.executable, "-c", code, local, remote], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_run_on_gs_saves_resumes_and_exports_like_a_local_one(gcs_env, tmp_path):
    data = write_cifar_folder(str(tmp_path / "cifar"), train=64, test=24)
    remote_data = f"gs://{BUCKET}/data/cifar-10-batches-py"
    upload(gcs_env, os.path.join(data, "cifar-10-batches-py"), remote_data)
    workdir = f"gs://{BUCKET}/run"

    # Preempted mid-epoch 2 (SIGTERM), then resumed: both halves on gs://, data read from gs://.
    log = tmp_path / "victim.stderr"
    victim = start_python(main_args(workdir, remote_data), str(log), env=gcs_env)
    # Stop it as soon as epoch 1 has ended (its checkpoint is saved next): mid-epoch 2.
    deadline = time.time() + 600
    while "epoch 1/2: test top-1" not in log.read_text() and time.time() < deadline:
        if victim.poll() is not None:
            pytest.fail(f"the run ended before epoch 1 did (exit {victim.returncode})")
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    victim.wait(timeout=600)
    err = log.read_text()
    assert victim.returncode == 75, err[-3000:]
    step = int(re.search(r"saved a checkpoint at step (\d+) in gs://", err).group(1))
    proc = run(main_args(workdir, remote_data), gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step} in {workdir}" in proc.stderr

    objects = gs_listing(gcs_env, "run")
    for name in ("config.json", "accuracy.png", "temperature.png", "widths.png", "compact/LATEST"):
        assert f"{workdir}/{name}" in objects, (name, objects)
    assert any("/tensorboard/events.out.tfevents" in p for p in objects), objects
    assert any(p.startswith(f"{workdir}/checkpoints/8/") for p in objects), objects

    # The export evaluates straight from gs://, to the accuracy it recorded.
    out = run(
        [sys.executable, "-m", "dcff_jax.evaluate", f"--checkpoint={workdir}/compact"], gcs_env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    best = float(re.search(r"best test top-1 ([\d.]+)%", proc.stderr).group(1))
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] == pytest.approx(best, abs=0.005)

    # And the same run on a local disk ends with the same parameters, bit for bit.
    local = str(tmp_path / "local")
    proc = run(main_args(local, data), gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copy = str(tmp_path / "copied")
    download(gcs_env, f"{workdir}/checkpoints/8", os.path.join(copy, "checkpoints", "8"))
    (step_gs, params_gs), (step_local, params_local) = (
        checkpoint_params(copy),
        checkpoint_params(local),
    )
    assert step_gs == step_local == 8
    for key in params_local:
        np.testing.assert_array_equal(params_gs[key], params_local[key])

    # Read access to the newest checkpoint lost (403, an I/O error, not damage): the run retries,
    # then stops in one line naming that checkpoint, and moves nothing.
    DENIED["prefix"] = "run/checkpoints/8/"
    try:
        proc = run(without_retry_delays(main_args(workdir, remote_data)), gcs_env)
    finally:
        DENIED["prefix"] = None
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-5000:]
    assert f"{workdir}/checkpoints/8" in errors[0] and "Nothing was moved" in errors[0], errors
    assert proc.stderr.count("; trying again in 0 s") == 3  # RETRY_DELAYS_S's 3 retries
    # (The TensorBoard writer opened a new events file before the restore: not a checkpoint.)
    checkpoints = [p for p in objects if "/checkpoints/" in p]
    assert [p for p in gs_listing(gcs_env, "run") if "/checkpoints/" in p] == checkpoints


def download(env, remote: str, local: str) -> None:
    code = (
        "import sys, fsspec; src, dst = sys.argv[1:]\n"
        "fsspec.filesystem('gs').get(src, dst, recursive=True)"
    )
    shutil.rmtree(local, ignore_errors=True)
    proc = run_python([sys.executable, "-c", code, remote, local], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_gs_path_without_gcsfs_is_a_clear_error(monkeypatch):
    import importlib.util

    from dcff_jax import storage
    from dcff_jax.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'dcff-jax\[gcs\]'"):
        storage.resolve("gs://bucket/run")
    for uri in ("ftp://host/run", "s3://bucket/run"):  # s3: untested here, so refused
        with pytest.raises(ConfigError, match="is not supported; use a local path or gs://"):
            storage.resolve(uri)


def test_tfds_data_on_gs_is_refused_up_front():
    from dcff_jax import input_pipeline
    from dcff_jax.config import default_config
    from dcff_jax.errors import ConfigError

    config = default_config()
    config.dataset, config.data_dir = "imagenet2012", "gs://bucket/tfds"
    with pytest.raises(ConfigError, match="cannot be read from an object store"):
        input_pipeline.load_data(config)


READ_IMAGE_FOLDER = """
import sys, numpy as np
from dcff_jax import input_pipeline as ip
from helpers import tiny_config
config = tiny_config(sys.argv[1], dataset="imagenet_folder", image_size=32, num_classes=3)
data = ip.load_data(config)
images, labels = data.train.load(np.arange(data.train.num_examples), epoch=1)
test, _ = data.test.load(np.arange(data.test.num_examples), epoch=0)
np.savez(sys.argv[2], images=images, labels=labels, test=test)
"""


@pytest.mark.slow
def test_image_folders_on_gs_read_as_the_local_copy(gcs_env, tmp_path):
    from test_image_folder import write_split

    local = str(tmp_path / "imagenet")
    write_split(local, "train")
    write_split(local, "val")
    for folder, _, files in os.walk(local):
        if files:
            relative = os.path.relpath(folder, local)
            upload(gcs_env, folder, f"gs://{BUCKET}/imagenet/{relative}")
    results = []
    for where in (local, f"gs://{BUCKET}/imagenet"):
        out = str(tmp_path / f"{len(results)}.npz")
        proc = run_python(
            [sys.executable, "-c", READ_IMAGE_FOLDER, where, out],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            env=gcs_env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(np.load(out))
    for key in ("images", "labels", "test"):
        np.testing.assert_array_equal(results[0][key], results[1][key])
