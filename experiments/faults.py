"""Issue 11's measurements, on this machine's CPU, one run after another:

1. wall time of the whole `main` (VGG-16, or --model's ResNet-8; tiny CIFAR folder, 2 epochs x
   4 steps, export) on 1 process x 2 devices and on 2 jax.distributed processes x 1 device
   (localhost);
2. time from SIGTERM to exit (1 process; and 2 processes, the signal to process 1);
3. every user error of tests/test_user_errors.py with the line it printed.

python experiments/faults.py [--sections wall,stop,errors] [--model vgg16|resnet8] \
    > experiments/logs/faults.md
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import TINY_RUN_RATES, write_cifar_folder  # noqa: E402

ARGS = [
    "--config=configs/vgg16_cifar.py",
    "--config.dataset=cifar10_folder",
    "--config.batch_size=16",
    "--config.num_epochs=2",
    "--config.steps_per_epoch=4",
    "--config.learning_rate=0.002",
]


def model_args(model: str) -> list[str]:
    return [f"--config.model={model}", f"--config.cprate={TINY_RUN_RATES[model]}"]


# Gloo prints its rendezvous on stdout: keep it out of the report.
QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}


def env(devices: int) -> dict:
    flags = f"--xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, data, model, processes, devices, extra=()):
    command = [sys.executable, "-m", "dcff_jax.main", *ARGS, *model_args(model)]
    command += [f"--workdir={workdir}"]
    command += [f"--config.data_dir={data}", *extra]
    if processes == 1:
        return [
            subprocess.Popen(command, cwd=ROOT, env=env(devices), stderr=subprocess.PIPE, text=True)
        ]
    address = f"127.0.0.1:{free_port()}"
    dist = ["--config.distributed=True", f"--config.coordinator_address={address}"]
    return [
        subprocess.Popen(
            [*command, *dist, f"--config.num_processes={processes}", f"--config.process_id={i}"],
            cwd=ROOT,
            env=env(devices),
            **QUIET,
        )
        for i in range(processes)
    ]


def wall_time(data, model, processes, devices) -> float:
    workdir = tempfile.mkdtemp()
    began = time.perf_counter()
    procs = start(workdir, data, model, processes, devices)
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    shutil.rmtree(workdir)
    return time.perf_counter() - began


def sigterm_to_exit(data, model, processes) -> tuple[float, list[int]]:
    """SIGTERM to the last process at step 10 of a 40-step epoch; until every process exited."""
    workdir = tempfile.mkdtemp()
    extra = ["--config.steps_per_epoch=40", "--config.log_every_steps=1"]
    procs = start(workdir, data, model, processes, 1, extra)
    for line in procs[0].stderr:
        if "epoch 1 step 10/40" in line:
            break
    else:
        raise RuntimeError("the run ended before step 10")
    sent = time.perf_counter()
    procs[-1].send_signal(15)
    for p in procs:
        p.wait()
    elapsed = time.perf_counter() - sent
    shutil.rmtree(workdir)
    return elapsed, [p.returncode for p in procs]


def user_errors(data) -> list[tuple[str, str]]:
    import test_user_errors as t

    finished = tempfile.mkdtemp()
    workdir = os.path.join(finished, "wd")
    base = [*t.BASE, f"--workdir={workdir}", f"--config.data_dir={data}"]
    subprocess.run(
        [sys.executable, "-m", t.M, *base], cwd=ROOT, env=env(1), check=True, capture_output=True
    )
    rows = []
    for case_id, module, args, setup, _, needs_run in t.CASES:
        tmp = tempfile.mkdtemp()
        wd = os.path.join(tmp, "wd")
        if needs_run:
            shutil.copytree(workdir, wd)
        from pathlib import Path

        extra = setup(wd, data, Path(tmp)) if setup else ()
        argv = t.command(module, (*args, *extra), wd, data, os.path.join(wd, "compact"))
        proc = subprocess.run(
            [sys.executable, "-m", module, *argv],
            cwd=ROOT,
            env=env(1),
            capture_output=True,
            text=True,
        )
        line = next((x for x in proc.stderr.splitlines() if x.startswith("error: ")), "(none)")
        rows.append((case_id, f"{proc.returncode}", line))
        shutil.rmtree(tmp)
    return rows


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="wall,stop,errors")
    parser.add_argument("--processes", default="1,2", help="process counts of wall and stop")
    parser.add_argument("--repeats", type=int, default=2, help="wall-time runs per setting")
    parser.add_argument(
        "--model", default="vgg16", choices=sorted(TINY_RUN_RATES), help="wall and stop's"
    )
    args = parser.parse_args()
    sections = args.sections.split(",")
    counts = [int(p) for p in args.processes.split(",")]
    data = write_cifar_folder(tempfile.mkdtemp(), train=64, test=24)
    if "wall" in sections:
        print("| run | wall time (s) |\n|---|---|")
        for _ in range(args.repeats):
            for processes in counts:
                devices = 2 // processes  # two devices in all
                seconds = wall_time(data, args.model, processes, devices)
                print(f"| {processes} process(es) x {devices} device(s) | {seconds:.1f} |")
    if "stop" in sections:
        print("\n| stop | SIGTERM to exit (s) | exit statuses |\n|---|---|---|")
        big = write_cifar_folder(tempfile.mkdtemp(), train=640, test=24)  # 40 steps an epoch
        for processes in counts:
            elapsed, codes = sigterm_to_exit(big, args.model, processes)
            print(f"| {processes} process(es) | {elapsed:.2f} | {codes} |")
    if "errors" in sections:
        print("\n| fault | exit | what it printed |\n|---|---|---|")
        for case_id, code, line in user_errors(data):
            print(f"| {case_id} | {code} | `{line.replace('|', '/')}` |")


if __name__ == "__main__":
    main()
