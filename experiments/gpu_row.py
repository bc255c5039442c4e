"""One of the paper's CIFAR-10 rows per GPU window: train it (or resume it), and report it as JSON.

The GPU machine takes at most 64 MiB per command and keeps files only while it stays busy, so
the window is three commands sent back to back (each within ~30 s of the last reply):

  # Here, once: split the exact CIFAR-10 files (140 MB of xz) into three ignored folders, and
  # fetch the two packages the GPU image lacks (it has jax, flax, optax, orbax; Python 3.12).
  python experiments/gpu_row.py stage ../shared/data .gpu_data        # --jpeg: the 18.8 MB copy
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d .whl ml-collections tensorboardX
  # On the GPU machine (carry one folder each; a folder sent again replaces the earlier one):
  #   1. carry .gpu_data/part1: ls .gpu_data
  #   2. carry .gpu_data/part2: ls .gpu_data
  #   3. carry .gpu_data/part3, .whl (and .gpu_resume, if an earlier attempt left one):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
  PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 experiments/gpu_row.py run resnet56 \
      --data .gpu_data --out "$OUT" [--resume .gpu_resume]

`run` trains the row with `python -m dcff_jax.main` and the row's config (the paper's recipe)
until the run ends or --limit seconds have passed since the script started; then SIGTERM stops
it at a call boundary with a checkpoint. It writes to --out:
  machine.json     the GPU, driver, CPU count, package versions
  ROW.log          the run's log
  ROW.json         best and final test top-1, epochs done, wall time, compile time, train
                   images/s, epoch time, time outside the train and eval steps, the compact
                   model's FLOPs/params, seed, data copy, precision, commit
  resume/ROW.tar.NN  an unfinished run's newest checkpoint (with its compilation cache when it
                   fits), in parts of at most 16 MiB: carry that folder as --resume next time.
--dry_run trains 2 epochs on the data given (a tiny folder) through the same path (the CPU test).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("resnet56", "vgg16", "resnet110", "googlenet")
PART_BYTES = 16 << 20  # the largest file that comes back from the GPU machine
RESUME_BYTES = 60 << 20  # all of resume/ (64 MiB come back per command, logs included)
CIFAR_PARTS = {  # the exact files' xz, at most ~47 MB per part
    "part1": ["data_batch_1", "data_batch_2"],
    "part2": ["data_batch_3", "data_batch_4"],
    "part3": ["data_batch_5", "test_batch", "batches.meta"],
}


def stage(shared_data: str, into: str, jpeg: bool) -> None:
    """Copy make_cifar10.py and the data into `into`/part*/, each part under 64 MiB."""
    parts = {"part1": ["cifar10-jpeg.npz"]} if jpeg else CIFAR_PARTS
    for part, names in parts.items():
        folder = os.path.join(into, part)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(os.path.join(folder, "cifar-10-batches-py"))
        shutil.copy(os.path.join(shared_data, "make_cifar10.py"), folder)
        for name in names:
            source = os.path.join(shared_data, name if jpeg else f"cifar-10-batches-py/{name}.xz")
            target = os.path.join(folder, name if jpeg else f"cifar-10-batches-py/{name}.xz")
            shutil.copy(source, target)
        print(f"{folder}: {_size(folder) / 2**20:.1f} MiB")


def assemble(data: str, scratch: str) -> tuple[str, str]:
    """The data for the run: (folder holding cifar-10-batches-py, which copy it is).

    `data` is either staged parts (made into a folder here, checksums verified by
    make_cifar10.py) or a folder that already holds cifar-10-batches-py."""
    if os.path.isfile(os.path.join(data, "cifar-10-batches-py", "test_batch")):
        return data, "given folder"
    source = os.path.join(scratch, "source")
    os.makedirs(os.path.join(source, "cifar-10-batches-py"), exist_ok=True)
    jpeg = False
    for part in sorted(glob.glob(os.path.join(data, "part*"))):
        for path in glob.glob(os.path.join(part, "**", "*"), recursive=True):
            if os.path.isfile(path):
                relative = os.path.relpath(path, part)
                jpeg |= relative == "cifar10-jpeg.npz"
                os.makedirs(os.path.dirname(os.path.join(source, relative)), exist_ok=True)
                shutil.copy(path, os.path.join(source, relative))
    out = os.path.join(scratch, "cifar10")
    command = [sys.executable, os.path.join(source, "make_cifar10.py")]
    command += [os.path.join(out, "cifar-10-batches-py")] + (["--jpeg"] if jpeg else [])
    subprocess.run(command, check=True)
    return out, "lossy JPEG copy" if jpeg else "exact CIFAR-10"


def machine() -> dict:
    """This machine's GPU, CPUs and package versions (the devices JAX sees are in ROW.log)."""
    from importlib import metadata

    smi = shutil.which("nvidia-smi")
    gpu = ""
    if smi:
        query = "--query-gpu=name,driver_version,memory.total"
        gpu = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        gpu = gpu.stdout.strip()
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "gpu": gpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def unpack(resume: str, workdir: str) -> bool:
    """An earlier attempt's resume/ROW.tar.NN parts -> workdir (unless it holds a checkpoint)."""
    parts = sorted(glob.glob(os.path.join(resume, "*.tar.[0-9][0-9]")))
    if not parts or os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    blob = b"".join(open(p, "rb").read() for p in parts)
    os.makedirs(workdir, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(workdir, filter="data")
    return True


def pack(workdir: str, out: str, name: str) -> list[str]:
    """The newest checkpoint, config.json and (when everything fits) the compilation cache, as a
    tar in parts of PART_BYTES under out/; the part paths."""
    from dcff_jax.training import checkpoints

    step = checkpoints.latest_step(os.path.join(workdir, "checkpoints"))
    if step is None:
        return []
    members = [os.path.join("checkpoints", str(step)), "config.json"]
    blob = _tar(workdir, members)
    if len(blob) + _size(os.path.join(workdir, "xla_cache")) <= RESUME_BYTES:
        blob = _tar(workdir, [*members, "xla_cache"])
    if len(blob) > RESUME_BYTES:
        raise SystemExit(
            f"the checkpoint packs to {len(blob):,} bytes, over the {RESUME_BYTES:,} that come "
            "back from the GPU machine"
        )
    os.makedirs(out, exist_ok=True)
    paths = []
    for index, start in enumerate(range(0, len(blob), PART_BYTES)):
        paths.append(os.path.join(out, f"{name}.tar.{index:02d}"))
        with open(paths[-1], "wb") as f:
            f.write(blob[start : start + PART_BYTES])
    return paths


def _tar(root: str, members: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            if os.path.exists(os.path.join(root, member)):
                tar.add(os.path.join(root, member), member)
    return buffer.getvalue()


def _size(path: str) -> int:
    files = glob.glob(os.path.join(path, "**", "*"), recursive=True)
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def read_progress(workdir: str) -> dict:
    """The newest checkpoint's progress record (epoch history), {} when there is none."""
    import orbax.checkpoint as ocp

    from dcff_jax.training import checkpoints

    directory = os.path.join(workdir, "checkpoints")
    step = checkpoints.latest_step(directory)
    if step is None:
        return {}
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as m:
        args = ocp.args.Composite(progress=ocp.args.JsonRestore())
        return dict(m.restore(step, args=args)["progress"])


def summary(row: str, config, progress: dict, log: str, attempt: dict) -> dict:
    """The row's JSON: accuracy, epochs, and where the time went (this attempt's epochs)."""
    from dcff_jax import flops

    history = progress.get("history", [])
    mine = [r for r in history if r["epoch"] >= attempt["first_epoch"]]
    steady = mine[1:] or mine  # the attempt's first epoch carries the start-up
    seconds = [r["seconds"] for r in steady if "seconds" in r]
    images = config["images_per_epoch"]
    compiled = [line for line in log.splitlines() if "compiled in" in line]
    return {
        "row": row,
        "cprate": config["cprate"],
        "data": attempt["data"],
        "precision": "bfloat16" if config["half_precision"] else "float32 (TF32 convs on GPUs)",
        "seed": config["seed"],
        "epochs_done": len(history),
        "num_epochs": config["num_epochs"],
        "finished": len(history) == config["num_epochs"],
        "best_top1": progress.get("best_top1"),
        "final_top1": history[-1]["test_top1"] if history else None,
        "attempt_wall_s": attempt["wall_s"],
        "attempt_epochs": len(mine),
        "compile_s": float(compiled[-1].split("compiled in ")[1].split(" s")[0])
        if compiled
        else None,
        "start_to_first_epoch_s": attempt.get("first_epoch_s"),
        "epoch_s_median": statistics.median(s["epoch"] for s in seconds) if seconds else None,
        "train_images_per_s_median": statistics.median(images / s["train"] for s in seconds)
        if seconds
        else None,
        "outside_steps_fraction_median": statistics.median(
            s["outside"] / s["epoch"] for s in seconds
        )
        if seconds
        else None,
        **flops.model_counts(row, config["cprate"] or None),
        "exit_status": attempt["exit_status"],
        **attempt["machine"],
    }


def run(args) -> int:
    start = time.monotonic()
    # The GPU is the training process's: this one reads checkpoints and counts FLOPs on the CPU
    # (a JAX backend started here would take most of the GPU's memory).
    child_env = dict(os.environ)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.makedirs(args.out, exist_ok=True)
    scratch = args.scratch or os.path.join("/tmp", "dcff_rows")
    data_dir, copy = assemble(args.data, scratch)
    workdir = os.path.join(scratch, args.row + ("_bf16" if args.bf16 else ""))
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    resumed = bool(args.resume) and unpack(args.resume, workdir)
    info = machine()
    with open(os.path.join(args.out, "machine.json"), "w") as f:
        json.dump(info, f, indent=2)
    overrides = [
        "--config.dataset=cifar10_folder",
        f"--config.data_dir={data_dir}",
        f"--config.seed={args.seed}",
        f"--config.half_precision={args.bf16}",
        "--config.log_every_steps=1000",
    ]
    if args.dry_run:
        overrides += ["--config.num_epochs=2", "--config.batch_size=16"]
    command = [
        sys.executable,
        "-m",
        "dcff_jax.main",
        f"--config={os.path.join(REPO, 'configs', args.row + '_cifar.py')}",
        f"--workdir={workdir}",
        f"--compilation_cache={os.path.join(workdir, 'xla_cache')}",
        *overrides,
    ]
    first_epoch = len(read_progress(workdir).get("history", []))
    log_path = os.path.join(args.out, f"{args.row}.log")
    status, first_epoch_s = _train(command, child_env, log_path, start, args.limit)
    with open(log_path) as f:
        log = f.read()
    progress = read_progress(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    config["images_per_epoch"] = _images_per_epoch(data_dir, config)
    attempt = {
        "data": copy,
        "wall_s": time.monotonic() - start,
        "first_epoch": first_epoch,
        "first_epoch_s": first_epoch_s,
        "exit_status": status,
        "resumed_from_pack": resumed,
        "machine": info,
    }
    result = summary(args.row, config, progress, log, attempt)
    if not result["finished"]:
        result["resume_parts"] = pack(workdir, os.path.join(args.out, "resume"), args.row)
    with open(os.path.join(args.out, f"{args.row}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0 if status in (0, 75) else 1


def _train(command, env, log_path, start, limit) -> tuple[int, float | None]:
    """Run main until it exits or `limit` s after `start`; then SIGTERM (it checkpoints the
    step reached). (exit status, seconds from start to the first epoch's line)."""
    first_epoch_s = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        while proc.poll() is None:
            if time.monotonic() - start > limit:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)  # a call takes ~1 s there, a save a few
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            if first_epoch_s is None and _has_epoch_line(log_path):
                first_epoch_s = time.monotonic() - start
            time.sleep(0.5)
        return proc.wait(), first_epoch_s


def _has_epoch_line(log_path: str) -> bool:
    with open(log_path) as f:
        return "test top-1" in f.read()


def _images_per_epoch(data_dir: str, config: dict) -> int:
    """Training images seen per epoch: the split (the partial last batch kept) or the cap."""
    from dcff_jax import input_pipeline

    count = len(input_pipeline.read_cifar_folder(data_dir, "train")[1])
    if config["steps_per_epoch"] > 0:
        return min(count, config["steps_per_epoch"] * config["batch_size"])
    return count - count % config["batch_size"] if config["drop_last_batch"] else count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    staging = sub.add_parser("stage", help="split the data into parts under 64 MiB")
    staging.add_argument("shared_data")
    staging.add_argument("into")
    staging.add_argument("--jpeg", action="store_true")
    running = sub.add_parser("run", help="train one row (or resume it) and report it")
    running.add_argument("row", choices=ROWS)
    running.add_argument("--data", required=True)
    running.add_argument("--out", required=True)
    running.add_argument("--resume", default="")
    running.add_argument("--limit", type=float, default=530.0, help="seconds until SIGTERM")
    running.add_argument("--seed", type=int, default=0)
    running.add_argument("--bf16", action="store_true", help="half_precision=True")
    running.add_argument("--dry_run", action="store_true", help="2 epochs at batch 16")
    running.add_argument("--scratch", default="", help="default /tmp/dcff_rows")
    running.add_argument("--fresh", action="store_true", help="discard an earlier workdir")
    args = parser.parse_args(argv)
    if args.command == "stage":
        stage(args.shared_data, args.into, args.jpeg)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
