"""Shared test helpers: tiny CIFAR folders in the official format, tiny configs, tfds
imagenet2012 datasets in both file formats (also used by experiments/bench_input.py)."""

import contextlib
import json
import os
import pickle
import shutil
import struct
import sys
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from dcff_jax.config import default_config


def write_cifar_folder(root: str, train: int = 64, test: int = 40, seed: int = 0) -> str:
    """A cifar-10-batches-py folder with random images in the official pickle layout."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_batch = [train // 5 + (1 if i < train % 5 else 0) for i in range(5)]
    for name, n in [(f"data_batch_{i + 1}", per_batch[i]) for i in range(5)] + [
        ("test_batch", test)
    ]:
        labels = rng.integers(0, 10, n)
        # Images whose mean colour depends on the label, so that a few steps can learn something.
        base = (labels[:, None] * 25).astype(np.float32)
        data = np.clip(base + rng.normal(0, 40, (n, 3072)), 0, 255).astype(np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return root


def evaluate_result(checkpoint: str) -> dict:
    """{"top1", "top5", "loss", "examples"} of `python -m dcff_jax.evaluate` on checkpoint."""
    out = run_module("dcff_jax.evaluate", f"--checkpoint={checkpoint}")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# The smallest model that runs every code path of training, checkpoints, resume and export
# (fused convs, residual adds tied to one width, option-A shortcuts): ResNet-8, one block per
# stage. A main run of it takes ~6 s warm here against ResNet-56's ~15 s (RESULTS.md, issue 25).
SMOKE_MODEL, SMOKE_CPRATE = "resnet8", "[0.5]*6"
# The main flags that train it, after any --config=configs/<cifar config>.py.
SMOKE_FLAGS = (f"--config.model={SMOKE_MODEL}", f"--config.cprate={SMOKE_CPRATE}")
# The rate strings of the tiny step-by-step runs (tests/run_steps.py, experiments/faults.py) by
# model: VGG-16's, as the multi-process tests train it, and the smoke model's.
TINY_RUN_RATES = {"vgg16": "[0.75]*13", SMOKE_MODEL: SMOKE_CPRATE}


def tiny_config(data_dir: str, **overrides):
    config = default_config()
    config.model = SMOKE_MODEL
    config.cprate = SMOKE_CPRATE
    config.dataset = "cifar10_folder"
    config.data_dir = data_dir
    config.batch_size = 16
    config.num_epochs = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, timeout: int = 900, env: dict | None = None):
    """`python -m module args...` from the repo root on the CPU (plus `env`); the
    CompletedProcess."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return run_python([sys.executable, "-m", module, *args], env=env, timeout=timeout)


def run_python(argv: list[str], *, cwd: str | None = None, env=None, timeout: float = 900):
    """subprocess.run(argv, capture_output=True, text=True) for `python -m ...`, `python -c ...`
    or `python script ...`, forked from this worker's warm server for env (tests/warm_python.py:
    the heavy imports done once); any other command, or with DCFF_TESTS_COLD=1, a cold
    subprocess."""
    import subprocess

    cwd = cwd or ROOT
    env = dict(os.environ if env is None else env)
    server = _warm_server(argv, env)
    if server is not None:
        return server.run(argv, cwd, env, timeout)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _warm_server(argv: list[str], env: dict[str, str]) -> "_WarmServer | None":
    """The idle warm server that can start argv in env: argv is `python -m module ...`,
    `python -c code ...` or `python script ...` (what tests/warm_python.py serves); None for any
    other command, while the server waits for a child, or with DCFF_TESTS_COLD=1."""
    if len(argv) < 2 or argv[0] != sys.executable or os.environ.get("DCFF_TESTS_COLD") == "1":
        return None
    if argv[1].startswith("-") and not (argv[1] in ("-m", "-c") and len(argv) > 2):
        return None
    server = _WarmServer.for_env(env)
    return None if server.busy else server


class _WarmServer:
    """This worker's tests/warm_python.py process, and the protocol to it."""

    _started: dict[tuple, "_WarmServer"] = {}  # by environment, least recently used first
    KEEP = 3  # servers per worker (0.22 GB resident each); the least recently used one stops

    @classmethod
    def for_env(cls, env: dict[str, str]) -> "_WarmServer":
        """The server started with env, started on first use. The libraries read some variables
        when imported; not these, which the child gets: XLA reads XLA_FLAGS when a backend
        starts, and pytest changes PYTEST_CURRENT_TEST in every test."""
        key = {k: v for k, v in env.items() if k not in ("XLA_FLAGS", "PYTEST_CURRENT_TEST")}
        name = tuple(sorted(key.items()))
        server = cls._started.pop(name, None)
        if server is None or server.process.poll() is not None:
            idle = [other for other, started in cls._started.items() if not started.busy]
            for other in idle[: max(0, len(cls._started) - cls.KEEP + 1)]:
                cls._started.pop(other).stop()
            server = cls(key)
        cls._started[name] = server
        return server

    def __init__(self, env: dict[str, str]):
        import atexit
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "warm_python.py")],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._pending = b""
        self.busy = False
        atexit.register(self.process.stdin.close)  # the server exits at end of input

    def stop(self) -> None:
        self.process.stdin.close()  # idle: the server exits at end of input
        self.process.wait(timeout=60)
        self.process.stdout.close()

    def _reply(self, timeout: float | None) -> dict:
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"warm_python exited with {self.process.wait()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def start(self, argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str):
        """Forks argv with its output in the files stdout and stderr; a WarmProcess."""
        request = {"argv": argv, "cwd": cwd, "env": env, "stdout": stdout, "stderr": stderr}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        self.busy = True  # until its exit is read: the server waits for one child at a time
        return WarmProcess(self, argv, self._reply(60)["pid"])

    def run(self, argv: list[str], cwd: str, env: dict[str, str], timeout: float):
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory(prefix="warm_python_") as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            child = self.start(argv, cwd, env, out, err)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(60)
                raise

            def text(path):
                with open(path, encoding="utf-8", errors="replace", newline=None) as f:
                    return f.read()

            return subprocess.CompletedProcess(argv, child.returncode, text(out), text(err))


class WarmProcess:
    """A command a warm server forked: the part of subprocess.Popen the tests use."""

    def __init__(self, server: _WarmServer, argv: list[str], pid: int):
        self._server, self.args, self.pid, self.returncode = server, argv, pid, None

    def _read_exit(self, timeout: float | None) -> None:
        self.returncode = self._server._reply(timeout)["returncode"]
        self._server.busy = False

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._read_exit(0.0)
            except TimeoutError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        if self.returncode is None:
            try:
                self._read_exit(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


def start_python(argv: list[str], stderr: str, *, env=None, cwd: str | None = None):
    """subprocess.Popen(argv, stdout=DEVNULL, stderr=<the file `stderr`>) for a `python` command
    (run_python's rules: warm where it can be, else cold): an object with pid, poll(), wait(),
    send_signal(), kill() and returncode."""
    import subprocess

    cwd = cwd or ROOT
    env = dict(os.environ if env is None else env)
    server = _warm_server(argv, env)
    if server is not None:
        open(stderr, "w").close()  # there at once, as Popen's is; the child opens it later
        return server.start(argv, cwd, env, os.devnull, stderr)
    with open(stderr, "w") as err:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of a directory: {tag: [(step, value)]}.

    Reads the TFRecord framing (length, crc, payload, crc) directly; no TensorFlow needed.
    """
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(event_dir)):
        with open(os.path.join(event_dir, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


# Unit roundoff of float32 and float64.
U32, U64 = 2.0**-24, 2.0**-53


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): a sum of n products computed in floating point, in any
    order (blocked, pairwise, FMA), is within gamma_n * sum |x_i y_i| of the exact value."""
    return n * u / (1 - n * u)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The float32 error budget of a few SGD steps, relative: 2^14 u ~ 1e-3. Batch-norm gradients
# cancel and ReLU/max-pool kinks make the gradient jump wherever rounding moves an activation
# across one, so a correct float32 run is 3e-8..1.4e-5 away from float64 after 4 steps
# (measured over 6 device counts, compile options and ISA caps: 70x under the budget); the
# less accurate reductions our compile options used before issue 10 were 1.6e-3 away
# (experiments/RESULTS.md).
F32_BUDGET = 2**14 * U32


def relative_distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every parameter."""
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b))
    return float(diff / np.sqrt(sum(np.sum(b[k] ** 2) for k in b)))


def checkpoint_params(workdir: str) -> tuple[int, dict[str, np.ndarray]]:
    """(step, {path: array}) of the newest checkpoint's params, read as NumPy arrays: the saving
    run's devices (another device count, other processes) need not exist here."""
    import jax
    import orbax.checkpoint as ocp

    steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    path = os.path.join(workdir, "checkpoints", str(max(steps)), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
        tree,
        is_leaf=lambda x: hasattr(x, "shape"),
    )
    params = checkpointer.restore(path, restore_args=as_numpy)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return max(steps), {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


# XLA:CPU's elemental emitters, not its fusion emitters: faster compiles (tests/conftest.py).
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def users_compile_env(env: dict[str, str]) -> dict[str, str]:
    """env with the tests' fast-compile settings (tests/conftest.py) taken out, for the runs
    that measure float32 accuracy: XLA compiles them as it does for users (-O2, fusion
    emitters); other XLA_FLAGS are kept."""
    flags = env.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAG, "").strip()
    return {**env, "JAX_DISABLE_MOST_OPTIMIZATIONS": "0", "XLA_FLAGS": flags}


@contextlib.contextmanager
def users_compile():
    """In this process, compile as XLA does for users (-O2; with the fusion emitters that
    tests/conftest.py turned off in XLA_FLAGS, which only a jit's compiler_options can turn back
    on). Yields those compiler_options, for the jits under test."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        emitters_off = FAST_COMPILE_FLAG in os.environ.get("XLA_FLAGS", "")
        yield {"xla_cpu_use_fusion_emitters": True} if emitters_off else {}
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def with_device_count(env: dict[str, str], devices: int) -> dict[str, str]:
    """env with `devices` CPU devices: appended to its XLA_FLAGS, so that the flags set outside
    or by tests/conftest.py (e.g. --xla_cpu_max_isa) reach the run too."""
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**env, "XLA_FLAGS": flags.strip()}


def main_command(data_dir, workdir, *overrides):
    """`python -m dcff_jax.main` on a tiny SMOKE_MODEL run (2 epochs of the folder at data_dir, a
    checkpoint per epoch); later overrides win."""
    return [
        sys.executable,
        "-m",
        "dcff_jax.main",
        "--config=configs/resnet56_cifar.py",
        f"--workdir={workdir}",
        "--config.dataset=cifar10_folder",
        f"--config.data_dir={data_dir}",
        "--config.batch_size=16",
        "--config.num_epochs=2",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=0",
        *SMOKE_FLAGS,
        *overrides,
    ]


def write_tfds_imagenet(
    data_dir: str,
    splits: dict[str, Callable[[], Iterable[tuple[bytes, int]]]],
    num_classes: int,
) -> str:
    """A tfds dataset named imagenet2012 (version 1.0.0, array_record: JPEG bytes in, so no
    TensorFlow is needed) under data_dir, written by tfds itself; splits[name]() yields its
    (JPEG bytes, label) examples. Returns the version directory."""
    import io

    import tensorflow_datasets as tfds

    class Imagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "imagenet2012"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(make) for name, make in splits.items()}

        def _generate_examples(self, make):
            for i, (jpeg, label) in enumerate(make()):
                yield i, {"image": io.BytesIO(jpeg), "label": label}

    Imagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return os.path.join(data_dir, "imagenet2012", "1.0.0")


def write_tfrecord(path: str, records: list[bytes]) -> None:
    """records framed as TensorFlow writes them: length, its CRC, data, its CRC."""
    from dcff_jax.data import tfrecord  # imports tensorflow_datasets: only where needed

    with open(path, "wb") as f:
        for record in records:
            length = struct.pack("<Q", len(record))
            f.write(length + struct.pack("<I", tfrecord.masked_crc32c(length)))
            f.write(record + struct.pack("<I", tfrecord.masked_crc32c(record)))


def imagenet_to_tfrecord(array_record_dir: str, out_dir: str, shards: dict[str, list[int]]):
    """write_tfds_imagenet's dataset (under array_record_dir) with the same serialized examples
    in tfrecord shards under out_dir, its dataset_info.json saying so; shards[split] lists the
    record count of each shard."""
    from array_record.python import array_record_module

    version = os.path.join("imagenet2012", "1.0.0")
    out = os.path.join(out_dir, version)
    shutil.copytree(os.path.join(array_record_dir, version), out)
    with open(os.path.join(out, "dataset_info.json")) as f:
        info = json.load(f)
    info["fileFormat"] = "tfrecord"
    for split in info["splits"]:
        name = split["name"]
        source = os.path.join(out, f"imagenet2012-{name}.array_record-00000-of-00001")
        reader = array_record_module.ArrayRecordReader(source)
        records = reader.read_all()
        reader.close()
        os.remove(source)
        counts = shards[name]
        assert sum(counts) == len(records)
        start = 0
        for k, count in enumerate(counts):
            path = f"imagenet2012-{name}.tfrecord-{k:05d}-of-{len(counts):05d}"
            write_tfrecord(os.path.join(out, path), records[start : start + count])
            start += count
        split["shardLengths"] = [str(c) for c in counts]
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f)


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): a few smooth colour fields at several scales, a hard-edged
    shape, and pixel noise; JPEG sizes at quality 90 land near real photographs'."""
    image = np.zeros((height, width, 3), np.float32)
    # Weights and noise chosen so that quality-90 files average ~110 KB at 500x375 (ImageNet's).
    for cells, weight in ((3, 90.0), (12, 40.0), (48, 18.0), (160, 60.0)):
        coarse = rng.uniform(-1, 1, (cells, int(cells * width / height) + 1, 3))
        field = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        image += (np.asarray(field, np.float32) / 127.5 - 1) * weight
    ys, xs = np.mgrid[:height, :width]
    cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(40, 160)
    image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] += rng.uniform(-60, 60, 3)
    image += rng.normal(0, 10, image.shape)
    return np.clip(image + 128, 0, 255).astype(np.uint8)


# The config of each architecture's paper run (configs/<name>.py, its cprate the published plan).
PAPER_CONFIGS = {
    "vgg16": "vgg16_cifar",
    "resnet56": "resnet56_cifar",
    "resnet110": "resnet110_cifar",
    "googlenet": "googlenet_cifar",
    "resnet50": "resnet50_imagenet",
    "mobilenetv2": "mobilenetv2_imagenet",
}


# The architectures the numeric per-architecture tests (logits, gradients, exports) run on. Not
# ResNet-110: it is ResNet-56's CifarResNet with 18 blocks a stage instead of 9 (the same code,
# at twice the compile time); its plan and counts are checked in test_plans.py and
# test_flops.py, its shapes in test_models.py.
NUMERIC_ARCHS = tuple(a for a in PAPER_CONFIGS if a != "resnet110")


def paper_config(arch: str):
    from dcff_jax.config import load_config

    return load_config(os.path.join(ROOT, "configs", f"{PAPER_CONFIGS[arch]}.py"))


def handwritten_model(arch: str, cprate, variant: str, num_classes: int | None = None):
    """The hand-written variant of an architecture (plans' layer-wise rates threaded through
    the definition): the oracle that create_model's traced fused and compact models match."""
    import handwritten

    from dcff_jax import models
    from dcff_jax.method import rate_strings

    return handwritten.BUILD[arch](
        rate_strings.layer_rates(arch, cprate)
        if cprate is not None
        else rate_strings.uniform_rates(arch),
        variant=variant,
        num_classes=num_classes or models.ARCHITECTURES[arch].num_classes,
    )


def handwritten_fused_layers(arch: str, cprate) -> dict[str, int]:
    """{path: kept} of the hand-written fused model's FusedConv layers."""
    from dcff_jax import models
    from dcff_jax.method.layers import FusedConv

    calls, _ = models.trace_calls(
        handwritten_model(arch, cprate, "fused"), models.input_shape(arch)
    )
    return {c.path: c.module.kept for c in calls if isinstance(c.module, FusedConv)}


def pure_macs(model, shape) -> int:
    """Conv and dense multiply-accumulates of a linen model's own layer calls (no bias adds),
    counted independently of dcff_jax.jaxpr.channels."""
    import math

    from flax import linen as nn

    from dcff_jax import models

    calls, _ = models.trace_calls(model, shape)
    total = 0
    for c in calls:
        if isinstance(c.module, nn.Conv):
            per_output = c.input_shape[-1] // c.module.feature_group_count
            total += math.prod(c.output_shape) * per_output * math.prod(c.module.kernel_size)
        elif isinstance(c.module, nn.Dense):
            total += math.prod(c.output_shape) * c.input_shape[-1]
    return total


def init_jitted(model, x, seed: int = 0, **kwargs) -> dict:
    """`model.init(jax.random.key(seed), x, **kwargs)` as one compiled program. Called eagerly,
    init compiles every distinct op shape on its own: ~720 compiles (~40 s) for GoogLeNet."""
    import jax

    return jax.jit(lambda x: model.init(jax.random.key(seed), x, **kwargs))(x)


def trees_equal(a, b) -> bool:
    """Same structure and every leaf equal bit for bit, compared in NumPy (jnp.array_equal
    would compile once per distinct leaf shape: hundreds of compiles for a model's variables)."""
    import jax

    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def random_rate_string(arch: str, seed: int) -> str:
    """A rate string of the architecture's layout with every entry drawn from [0, 0.9)."""
    from dcff_jax.method import rate_strings

    rng = np.random.default_rng(seed)
    entries = rng.uniform(0.0, 0.9, rate_strings.LAYOUTS[arch].num_rates)
    return "+".join(f"[{r:.3f}]" for r in entries)
