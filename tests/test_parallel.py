"""Data parallelism: 8 simulated devices and two processes agree with one device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_cifar_folder

HERE = os.path.dirname(os.path.abspath(__file__))


def run_steps(data_dir, steps, devices=1, extra=(), wait=True):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)]),
    }
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, os.path.join(HERE, "run_steps.py"), data_dir, str(steps), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc if not wait else finish(proc)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar")), train=64, test=16)


@pytest.mark.slow
def test_eight_devices_match_one_device(data_dir):
    one = run_steps(data_dir, 4, devices=1)
    eight = run_steps(data_dir, 4, devices=8)
    assert (one["devices"], eight["devices"]) == (1, 8)
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-4)
    assert eight["checksum"] == pytest.approx(one["checksum"], rel=1e-4)
    assert len(set(one["losses"])) > 1  # it trained


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_each_other_and_one_process(data_dir):
    address = f"127.0.0.1:{free_port()}"
    procs = [
        run_steps(data_dir, 3, devices=1, extra=(address, "2", str(i)), wait=False)
        for i in range(2)
    ]
    results = [finish(p) for p in procs]
    assert [r["processes"] for r in results] == [2, 2]
    assert results[0]["checksum"] == results[1]["checksum"]
    assert results[0]["losses"] == results[1]["losses"]
    single = run_steps(data_dir, 3, devices=2)
    np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=2e-4)
