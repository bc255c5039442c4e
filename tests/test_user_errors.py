"""Every fault a user can cause ends in one clear line, exit status 2, no traceback, nothing lost.

Each case runs a real CLI (`main`, `evaluate`, `flops`) in a subprocess. Cases that touch a
workdir run against a copy of a finished 2-epoch run (checkpoints, config.json, TensorBoard
events, the compact export) and check afterwards that every file in it is still there with the
same bytes (a checkpoint found corrupt may only be moved, intact, to checkpoints_quarantine/).
"""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, SMOKE_FLAGS, run_module, write_cifar_folder

BASE = (
    "--config=configs/resnet56_cifar.py",
    "--config.dataset=cifar10_folder",
    "--config.batch_size=16",
    "--config.num_epochs=2",
    *SMOKE_FLAGS,  # ResNet-8: the cases below give it 6 pruning rates
    "--config.checkpoint_every_steps=0",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar")), train=64, test=24)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished run: 2 epochs x 4 steps, a checkpoint per epoch, an export."""
    workdir = str(tmp_path_factory.mktemp("finished") / "wd")
    proc = run_module(
        "dcff_jax.main", *BASE, f"--workdir={workdir}", f"--config.data_dir={data_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    return workdir


def manifest(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_nothing_lost(before: dict[str, str], after: dict[str, str]) -> None:
    quarantined = {h for p, h in after.items() if p.startswith("checkpoints_quarantine/")}
    for path, digest in before.items():
        if after.get(path) == digest:
            continue
        assert path.startswith("checkpoints/") and digest in quarantined, f"{path} lost or changed"


# --- setups: each gets (workdir copy, data_dir, tmp_path) and returns extra arguments ----------


def truncate(path: str, keep: int = 20) -> None:
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)


def truncated_config_json(wd, data, tmp):
    truncate(os.path.join(wd, "config.json"))
    return ()


def truncated_metadata(wd, data, tmp):
    with open(os.path.join(wd, "compact", "LATEST")) as f:
        version = f.read().strip()
    truncate(os.path.join(wd, "compact", version, "metadata.json"))
    return ()


def truncated_stablehlo(wd, data, tmp):
    with open(os.path.join(wd, "compact", "LATEST")) as f:
        path = os.path.join(wd, "compact", f.read().strip(), "model.stablehlo")
    truncate(path)
    return (f"--checkpoint={path}",)


def corrupt_every_checkpoint(wd, data, tmp):
    for step in ("4", "8"):
        shutil.rmtree(os.path.join(wd, "checkpoints", step, "state"))
        os.makedirs(os.path.join(wd, "checkpoints", step, "state"))
    return ()


def checkpoint_of_another_config(wd, data, tmp):
    """No config.json to compare with: the checkpoint's own shapes must tell."""
    os.remove(os.path.join(wd, "config.json"))
    return ("--config.cprate=[0.2]*6",)


def corrupt_data(wd, data, tmp):
    bad = str(tmp / "bad")
    shutil.copytree(data, bad)
    truncate(os.path.join(bad, "cifar-10-batches-py", "data_batch_3"), 100)
    return (f"--config.data_dir={bad}",)


def labels_beyond_num_classes(wd, data, tmp):
    folder = os.path.join(data, "cifar-10-batches-py")
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        labels = pickle.load(f, encoding="bytes")[b"labels"]
    return (f"--config.num_classes={max(labels)}",)


def relative_data_dir(wd, data, tmp):
    return ("--config.data_dir=no-such-dir/cifar",)  # relative to the repo root (the cwd)


def empty_data_dir(wd, data, tmp):
    empty = tmp / "empty"
    empty.mkdir()
    return (f"--config.data_dir={empty}",)


def resume_from_epoch_one(wd, data, tmp):
    shutil.rmtree(os.path.join(wd, "checkpoints", "8"))  # epoch 2 must be trained and saved
    return ()


M, E, F = "dcff_jax.main", "dcff_jax.evaluate", "dcff_jax.flops"
# (id, module, arguments, setup, what the error line must say, uses the finished workdir)
CASES = [
    # Bad flags and config files.
    ("unknown-field", M, ("--config.foo=1",), None, "'foo' is not a field of the config", False),
    ("bad-int", M, ("--config.batch_size=abc",), None, "invalid literal for int()", False),
    ("no-config-file", M, ("--config=configs/nope.py",), None, "cannot load --config", False),
    ("stray-argument", M, ("oops",), None, "unexpected arguments ['oops']", False),
    ("no-workdir", M, ("--workdir=",), None, "--workdir", False),
    ("bad-rate-string", M, ("--config.cprate=[0.5]*2+[0.4",), None, "bad pruning-rate", False),
    ("rate-length", M, ("--config.cprate=[0.5]*3",), None, "needs 6", False),
    ("rate-range", M, ("--config.cprate=[1.0]*6",), None, "outside [0, 1)", False),
    ("rate-code", M, ("--config.cprate=__import__('os')",), None, "bad pruning-rate", False),
    ("batch-size", M, ("--config.batch_size=0",), None, "batch_size must be >= 1", False),
    ("epochs", M, ("--config.num_epochs=0",), None, "num_epochs must be >= 1", False),
    ("model", M, ("--config.model=alexnet",), None, "config.model 'alexnet' is unknown", False),
    ("criterion", M, ("--config.criterion=kl",), None, "config.criterion must be", False),
    ("dataset", M, ("--config.dataset=mnist",), None, "config.dataset must be", False),
    ("schedule", M, ("--config.lr_schedule=poly",), None, "lr_schedule must be", False),
    ("lr", M, ("--config.learning_rate=0",), None, "learning_rate must be > 0", False),
    ("momentum", M, ("--config.momentum=1.5",), None, "momentum must be in [0, 1)", False),
    ("decay", M, ("--config.weight_decay=-1",), None, "weight_decay must be >= 0", False),
    ("heartbeat", M, ("--config.heartbeat_timeout_s=0",), None, "heartbeat_timeout_s", False),
    ("minutes", M, ("--config.checkpoint_every_minutes=-1",), None, "every_minutes", False),
    ("placement", M, ("--config.data_placement=gpu",), None, "data_placement must be", False),
    ("per-call", M, ("--config.steps_per_call=-1",), None, "steps_per_call must be >= 0", False),
    (
        "vgg-224",
        M,
        ("--config.model=vgg16", "--config.cprate=", "--config.image_size=224"),
        None,
        "vgg16 takes 32 px images only",
        False,
    ),
    # Data.
    (
        "no-data",
        M,
        ("--config.data_dir=/nonexistent",),
        None,
        "'/nonexistent' does not exist",
        False,
    ),
    ("relative-data", M, (), relative_data_dir, f"relative to {ROOT}", False),
    ("corrupt-data", M, (), corrupt_data, "data_batch_3 is not a CIFAR-10 batch file", False),
    ("labels", M, (), labels_beyond_num_classes, "config.num_classes is", False),
    ("cifar-size", M, ("--config.image_size=40",), None, "are 32 px but config.image_size", False),
    (
        "no-download",
        M,
        ("--config.dataset=cifar10", "--config.download=False"),
        empty_data_dir,
        "--config.download=False: put the official cifar-10-python.tar.gz",
        False,
    ),
    # A workdir holding a finished run.
    (
        "changed-lr",
        M,
        ("--config.learning_rate=0.05",),
        None,
        "learning_rate: saved 0.1, now 0.05",
        True,
    ),
    ("changed-decay", M, ("--config.weight_decay=0.001",), None, "weight_decay: saved", True),
    ("changed-cprate", M, ("--config.cprate=[0.2]*6",), None, "cprate: saved", True),
    ("changed-seed", M, ("--config.seed=1",), None, "seed: saved 0, now 1", True),
    ("changed-t", M, ("--config.t_end=100.0",), None, "t_end: saved 10000.0, now 100.0", True),
    ("changed-classes", M, ("--config.num_classes=20",), None, "num_classes: saved 10", True),
    ("config-json", M, (), truncated_config_json, "config.json is not valid JSON", True),
    ("corrupt-checkpoints", M, (), corrupt_every_checkpoint, "no readable checkpoint", True),
    (
        "other-shapes",
        M,
        (),
        checkpoint_of_another_config,
        "saved by a run with another config",
        True,
    ),
    # evaluate and flops.
    ("eval-missing", E, ("--checkpoint=/nonexistent",), None, "is not a compact export", False),
    (
        "eval-batch",
        E,
        ("--checkpoint=x", "--batch_size=0"),
        None,
        "--batch_size must be >= 1",
        False,
    ),
    ("eval-metadata", E, (), truncated_metadata, "metadata.json is not valid JSON", True),
    ("eval-stablehlo", E, (), truncated_stablehlo, "does not match the SHA-256 in", True),
    ("eval-data", E, ("--data_dir=/nonexistent",), None, "'/nonexistent' does not exist", True),
    ("eval-flag", E, ("--checkpoint=x", "--bogus=1"), None, "Unknown command line flag", False),
    (
        "flops-model",
        F,
        ("--config=configs/vgg16_cifar.py", "--config.model=alexnet"),
        None,
        "config.model 'alexnet' is unknown",
        False,
    ),
    (
        "flops-rate",
        F,
        ("--config=configs/vgg16_cifar.py", "--config.cprate=[0.5]*3"),
        None,
        "needs 13",
        False,
    ),
]


def command(module, args, workdir, data, export):
    if module == M:
        return (*BASE, f"--workdir={workdir}", f"--config.data_dir={data}", *args)
    if module == E and not any(a.startswith("--checkpoint=") for a in args):
        return (f"--checkpoint={export}", *args)
    return args


@pytest.mark.slow
@pytest.mark.parametrize(
    "module,args,setup,message,needs_run",
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_user_error(module, args, setup, message, needs_run, data_dir, tmp_path, request):
    workdir = str(tmp_path / "wd")
    if needs_run:
        shutil.copytree(request.getfixturevalue("finished"), workdir)
    extra = setup(workdir, data_dir, tmp_path) if setup else ()
    before = manifest(workdir)
    argv = command(module, (*args, *extra), workdir, data_dir, os.path.join(workdir, "compact"))
    proc = run_module(module, *argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert message in proc.stderr[proc.stderr.index("error: ") :], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert_nothing_lost(before, manifest(workdir))


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.slow
def test_disk_full_names_the_path_and_the_last_good_checkpoint(finished, data_dir, tmp_path):
    """A write that fails for lack of space (here a file-size limit, which fails the same write
    calls with EFBIG without needing a small filesystem): one line naming the file, the cause and
    the checkpoint a rerun resumes from; the finished checkpoint is untouched."""
    workdir = str(tmp_path / "wd")
    shutil.copytree(finished, workdir)
    resume_from_epoch_one(workdir, data_dir, tmp_path)
    before = manifest(workdir)

    # Set the limit in a small launcher that then execs main (no Python code between fork and
    # exec in this multithreaded test process). SIGXFSZ ignored: the write fails, not the process.
    # 50 kB: under the largest data file of a ResNet-8 checkpoint (~180 kB), over everything the
    # resumed run writes before it (TensorBoard events, the log).
    launcher = (
        "import os, resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    main = ["-m", M, *BASE, f"--workdir={workdir}", f"--config.data_dir={data_dir}"]
    proc = subprocess.run(
        [sys.executable, "-c", launcher, *main],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = errors[0]
    assert f"could not write {workdir}/checkpoints/8" in line, line
    assert "a file-size limit was hit" in line, line
    assert f"the last good checkpoint, step 4 in {workdir}/checkpoints, is kept" in line, line
    assert_nothing_lost(before, manifest(workdir))


@pytest.mark.slow
def test_a_run_that_failed_before_training_can_be_retried_with_other_values(data_dir, tmp_path):
    """config.json is written with the first checkpoint: a start that fails earlier (here: no
    data) binds nothing, so the retry may change run-defining fields."""
    workdir = str(tmp_path / "wd")
    args = (*BASE, f"--workdir={workdir}", "--config.num_epochs=1")
    proc = run_module(M, *args, "--config.data_dir=/nonexistent")
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    proc = run_module(M, *args, f"--config.data_dir={data_dir}", "--config.learning_rate=0.05")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert '"learning_rate": 0.05' in f.read()
