"""Every script in experiments/ runs on tiny inputs (a few steps, the smallest model) and prints
the figures it exists for, so none breaks unnoticed (benchmark.py --mode=train crashed for weeks
after the trainer split). A smoke test, not a benchmark: it checks the exit status, that nothing
was raised, and that the script's own table has a row of finite numbers; the timings themselves
are not looked at."""

import math
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, SMOKE_FLAGS, SMOKE_MODEL, run_python, write_cifar_folder

EXPERIMENTS = os.path.join(ROOT, "experiments")
NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?"

# The smallest model, where a script takes any (helpers.SMOKE_MODEL).
SMOKE_ARGS = " ".join(SMOKE_FLAGS)
# script -> [(arguments, a line its stdout must hold)]: {data} is a cifar-10-batches-py parent
# folder of 64 + 40 random images, {tmp} a scratch folder. Every number on a matched line must be
# finite (a nan or inf in a table means the script measured nothing).
SMOKE = {
    "ablate_cpu.py": [
        (
            f"--config=configs/resnet56_cifar.py {SMOKE_ARGS} --batch_size=2 --repeats=1",
            rf"^\| nn\.relu \| xla defaults \| {NUMBER} \| 1\.00x \|$",
        )
    ],
    "bench_build.py": [
        ("--archs=vgg16 --batch=2", rf"^vgg16 +{NUMBER} +{NUMBER} +{NUMBER}  [0-9a-f]{{16}}$")
    ],
    "bench_conv_latency.py": [
        (
            "--archs=vgg16 --batches=1 --steps=1 --chain=1",
            rf"^\| vgg16 \| 1 \| compact \| {NUMBER} \| {NUMBER} \|",
        )
    ],
    "bench_draft.py": [
        ("--images=2 --repeats=1", rf"^\| \d+x\d+ \| eval \| {NUMBER} \| {NUMBER} \|")
    ],
    "bench_epoch.py": [
        (
            "--data={data} --epochs=2 --placements=device,host "
            f"-- {SMOKE_ARGS} --config.batch_size=16 --config.steps_per_call=2",
            rf"^\| this checkout, data on the host \| 1 \| {NUMBER} \| {NUMBER} \|$",
        )
    ],
    "bench_input.py": [
        (
            "--images=4 --workers=0 --repeats=1 --sources=folder --dir={tmp}/jpegs",
            rf"^\| folder \| 0 \| - \| {NUMBER} \| {NUMBER} \| {NUMBER} \|$",
        )
    ],
    "bench_latency.py": [
        (
            "--archs=vgg16 --engines=jax,stablehlo --steps=1 --batches=1",
            rf"^\| vgg16 \| 1 \| stablehlo \| {NUMBER} \| {NUMBER} \| {NUMBER}x \|",
        )
    ],
    "bench_maxpool.py": [("--batch=16 --steps=1", rf"^\| \(\d+, \d+, \d+\) \| \d \| {NUMBER} \|")],
    "bench_padding.py": [
        (
            "--archs=vgg16 --steps=1 --batches=1",
            rf"^\| vgg16 \| widths to x8 \| {NUMBER} \| 1 \| {NUMBER} \| {NUMBER} \|$",
        )
    ],
    "benchmark.py": [
        (
            f"--config=configs/resnet56_cifar.py {SMOKE_ARGS} --mode=train --batch_size=2 "
            "--steps=2",
            rf"^images_per_sec +{NUMBER}$",
        ),
        (
            f"--config=configs/resnet56_cifar.py {SMOKE_ARGS} --mode=loop --batch_size=2 "
            "--per_call=1,2 --steps=2 --loop_form=rolled",
            rf"^k2_images_per_sec +{NUMBER}$",
        ),
    ],
    "compare_cpu.py": [
        (
            "--sections=overhead --configs=vgg16_cifar --batches=2 --steps=1",
            rf"^\| vgg16_cifar \| 2 \| {NUMBER} \| {NUMBER} \| [+-]{NUMBER}% \|$",
        )
    ],
    "faults.py": [
        (
            f"--sections=stop --processes=1 --model={SMOKE_MODEL}",
            rf"^\| 1 process\(es\) \| {NUMBER} \| \[75\] \|$",
        )
    ],
    "float64_distances.py": [
        (
            f"--models={SMOKE_MODEL} --devices=1 --run_model={SMOKE_MODEL}",
            rf"^\| 1 \| float32 \| {NUMBER} \| {NUMBER} \|$",
        )
    ],
    "module_map.py": [("HEAD", rf"^\| dcff_jax/flops.py \| {NUMBER} \| {NUMBER} `\w+` \|")],
    "plan_search_table.py": [("--archs=vgg16", r"^\| VGG-16 .*\| `\[.*\]` \|$")],
    "profile_forward.py": [("--arch=vgg16 --batch=1 --top=3", rf"^ +{NUMBER} +\S*conv\S*")],
    "trace_plans.py": [
        (
            "--archs=vgg16",
            r"^vgg16 +[\d.]+ +13 +13 +0 +(?P<a>[\d,]+) +(?P=a) +(?P<p>[\d,]+) +(?P=p)$",
        )
    ],
}
# Scripts with tests of their own, and the ones that need torch (not a dependency).
OWN_TESTS = {
    "bench_onnx_paths.py": "test_onnx.py",
    "fusion_picture.py": "test_docs.py",
    "gpu_row.py": "test_gpu_row.py",
    "learning_curves.py": "test_learning_curves.py",
    "parity_fixture.py": "test_parity_fixture.py",
}
NEEDS_TORCH = {"parity_torch.py", "make_torch_import_fixture.py"}


def test_every_experiment_script_is_covered():
    scripts = {n for n in os.listdir(EXPERIMENTS) if n.endswith((".py", ".sh"))}
    covered = set(SMOKE) | set(OWN_TESTS) | NEEDS_TORCH | {"reproduce.sh"}
    assert scripts == covered, (scripts - covered, covered - scripts)
    for test in OWN_TESTS.values():
        assert os.path.isfile(os.path.join(ROOT, "tests", test)), test


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar")))


def run_script(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, **(env or {})}
    return run_python(argv, env=env)


def finite_numbers(line: str) -> list[float]:
    # Not a number: a 16-hex-digit content hash (bench_build's "4e675a103811900e" would read as
    # 4e675 = inf).
    line = re.sub(r"\b[0-9a-f]{16}\b", "", line)
    cells = re.findall(NUMBER + r"|\bnan\b|\binf\b", line, flags=re.IGNORECASE)
    return [float(c.replace(",", "")) for c in cells]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,expected",
    [(s, a, e) for s, runs in SMOKE.items() for a, e in runs],
    ids=[f"{s}:{i}" for s, runs in SMOKE.items() for i in range(len(runs))],
)
def test_an_experiment_runs_small_and_prints_its_figures(script, args, expected, data, tmp_path):
    argv = [sys.executable, os.path.join(EXPERIMENTS, script)]
    argv += args.format(data=data, tmp=tmp_path).split()
    proc = run_script(argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [m.group(0) for m in re.finditer(expected, proc.stdout, flags=re.MULTILINE)]
    assert lines, f"no line matches {expected!r} in:\n{proc.stdout[-3000:]}"
    for line in lines:
        numbers = finite_numbers(line)
        assert numbers and all(math.isfinite(x) for x in numbers), line


@pytest.mark.slow
def test_reproduce_sh_trains_a_row_and_exports_it(data, tmp_path):
    workdir = tmp_path / "run"
    argv = ["bash", os.path.join(EXPERIMENTS, "reproduce.sh"), "vgg16", str(workdir)]
    argv += ["--config.num_epochs=1", "--config.batch_size=16"]
    proc = run_script(argv, env={"CIFAR_DIR": os.path.join(data, "cifar-10-batches-py")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "epoch 1/1: test top-1" in proc.stderr
    assert (workdir / "compact" / "LATEST").is_file()
    # And a wrong architecture is one line, exit 2.
    proc = run_script(["bash", os.path.join(EXPERIMENTS, "reproduce.sh"), "vgg19", str(workdir)])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ARCH must be"), proc.stderr
