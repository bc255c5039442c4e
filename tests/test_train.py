import json
import os
import re
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import (
    SMOKE_MODEL,
    checkpoint_params,
    main_command,
    read_scalars,
    run_module,
    run_python,
    start_python,
    tiny_config,
    with_device_count,
    write_cifar_folder,
)

from dcff_jax import export, models
from dcff_jax.config import default_config, validate_config
from dcff_jax.training import optim, run_config, steps, train

HERE = os.path.dirname(os.path.abspath(__file__))


def test_optimizer_is_pytorch_sgd_with_coupled_weight_decay():
    config = default_config()
    config.learning_rate, config.momentum, config.weight_decay = 0.1, 0.9, 5e-4
    tx = optim.make_optimizer(config, steps_per_epoch=10)
    p = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(p)
    grads = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 0.75])]
    # PyTorch SGD: d = g + wd * p; buf = momentum * buf + d (buf = d at first); p -= lr * buf.
    w, buf = np.array([1.0, -2.0]), None
    for g in grads:
        d = np.asarray(g) + 5e-4 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
        updates, state = tx.update({"w": g}, state, p)
        p = optax.apply_updates(p, updates)
    # float32 against float64: ~5 rounded ops per step, 2 steps, values of the size of w.
    np.testing.assert_allclose(p["w"], w, rtol=16 * 2.0**-24)


def assert_rate(schedule, step: int, want: float, peak: float):
    """optax evaluates a schedule in a few float32 ops on values of the order of the peak rate
    (e.g. a warm-up as end + (start - end) * (1 - t / T)), each rounding by at most u * peak,
    and cos adds <= 2 ulps: 8 u * peak absolute."""
    got = float(schedule(step))
    assert got == pytest.approx(want, rel=0, abs=8 * 2.0**-24 * peak), (step, got, want)


def test_multistep_schedule_per_epoch():
    config = default_config()  # lr 0.1, x0.1 at epochs 150 and 225
    schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
    for step, want in [(0, 0.1), (1499, 0.1), (1500, 0.01), (2249, 0.01), (2250, 0.001)]:
        assert_rate(schedule, step, want, 0.1)


def test_step_schedule_warmup_ends_and_boundaries():
    config = default_config()
    config.lr_schedule, config.learning_rate, config.warmup_epochs = "step", 0.1, 5
    config.num_epochs, config.lr_milestones = 90, (30, 60, 80)
    schedule = optim.learning_rate_schedule(config, 10)
    # Linear warm-up over 50 steps from lr/50: lr/50 + (lr - lr/50) * step / 50.
    warm = [(0, 0.002), (25, 0.002 + 0.098 * 25 / 50), (49, 0.002 + 0.098 * 49 / 50)]
    after = [(50, 0.1), (299, 0.1), (300, 0.01), (599, 0.01), (600, 0.001), (799, 0.001)]
    for step, want in [*warm, *after, (800, 1e-4), (899, 1e-4)]:
        assert_rate(schedule, step, want, 0.1)


def test_cosine_schedule_warmup_ends_and_boundaries():
    config = default_config()
    config.lr_schedule, config.learning_rate, config.warmup_epochs = "cosine", 0.01, 5
    config.num_epochs = 180
    schedule = optim.learning_rate_schedule(config, 10)
    # 50 warm-up steps from lr/50, then lr * (1 + cos(pi * t / 1750)) / 2 for t = step - 50.
    for step, want in [(0, 0.0002), (49, 0.0002 + 0.0098 * 49 / 50)]:
        assert_rate(schedule, step, want, 0.01)
    for t in (0, 1, 875, 1749, 1750):
        assert_rate(schedule, 50 + t, 0.01 * (1 + np.cos(np.pi * t / 1750)) / 2, 0.01)


def test_eval_sums_count_top1_and_top5_separately():
    # Label 2 is the 3rd-highest logit of row 0: a top-5 hit, not a top-1 hit. Row 1 is a top-1
    # hit, row 2 a miss (6th), row 3 masked out (padding).
    logits = jnp.array(
        [
            [0.0, 5.0, 3.0, 4.0, 1.0, 2.0, -1.0],
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 7.0],
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    labels = jnp.array([2, 0, 5, 0])
    mask = jnp.array([1, 1, 1, 0])
    sums = jax.device_get(steps.eval_sums(logits, labels, mask))
    assert (float(sums["top1"]), float(sums["top5"]), float(sums["count"])) == (1.0, 2.0, 3.0)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # The same 3 positive float32 terms summed in another order: gamma_3 < 4 u relative.
    assert float(sums["loss"]) == pytest.approx(float(per_example[:3].sum()), rel=4 * 2.0**-24)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model", "alexnet", "config.model"),
        ("criterion", "kl", "criterion"),
        ("cprate", "[0.5]*3", "needs 6"),
        ("dataset", "mnist", "dataset"),
        ("num_epochs", 0, "num_epochs"),
        ("lr_schedule", "poly", "lr_schedule"),
    ],
)
def test_validate_config_names_the_field(field, value, message):
    config = tiny_config("/nonexistent")
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_missing_data_directory_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train.train_and_evaluate(tiny_config(str(tmp_path / "nope")), str(tmp_path / "wd"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("cifar")), train=64, test=24)


def stop_after_epoch_one(
    data_dir, workdir, sig, overrides=(), env=None, checkpoint=4
) -> tuple[int, str]:
    """Start main, send `sig` once the checkpoint of step `checkpoint` (default: epoch 1's)
    exists: (exit status, stderr)."""
    log = f"{workdir}.stderr"
    victim = start_python(
        main_command(data_dir, workdir, *overrides),
        log,
        env=env or {**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    deadline = time.time() + 600
    saved = os.path.join(workdir, "checkpoints", str(checkpoint))
    while not os.path.isdir(saved) and time.time() < deadline:
        assert victim.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.05)
    victim.send_signal(sig)
    victim.wait(timeout=600)
    with open(log) as f:
        err = f.read()
    return victim.returncode, err


def run_main(data_dir, workdir, *overrides):
    return run_module(*main_command(data_dir, workdir, *overrides)[2:])


def final_params(workdir):
    return checkpoint_params(workdir)


@pytest.mark.slow
def test_main_trains_exports_and_resumes_bit_identically_after_sigkill(data_dir, tmp_path):
    # Uninterrupted reference run: 2 epochs x 4 steps.
    ref = str(tmp_path / "ref")
    proc = run_main(data_dir, ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2/2: test top-1" in proc.stderr and "images/s" in proc.stderr
    # criterion=reference (the default): at T(1) ~ 6000 every layer's scores underflow to NaN
    # and the published freeze rule keeps them.
    assert frozen_layers_at_epoch(proc.stderr, 2) == len(models.conv_paths(SMOKE_MODEL))  # all
    for name in (
        "config.json",
        "accuracy.png",
        "temperature.png",
        "widths.png",
        "compact/LATEST",
    ):
        assert os.path.exists(os.path.join(ref, name)), name
    # TensorBoard: every scalar in its namespace, one train/loss per step (log_every_steps=1).
    scalars = read_scalars(os.path.join(ref, "tensorboard"))
    assert set(scalars) == {
        *(f"train/{k}" for k in ("loss", "accuracy", "images_per_sec")),
        *(f"train/{k}" for k in ("epoch_loss", "epoch_accuracy")),
        *(f"test/{k}" for k in ("top1", "top5", "loss", "best_top1")),
        *(f"fusion/{k}" for k in ("temperature", "filters_changed", "frozen_layers")),
    }
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in scalars["fusion/temperature"]] == [4, 8]
    assert scalars["fusion/temperature"][0][1] == 1.0  # T(0) = t_start, as a float32 scalar
    ref_epoch2 = epoch_line(proc.stderr, 2)
    ref_step, ref_params = final_params(ref)
    assert ref_step == 8

    # The same run, killed with SIGKILL mid-epoch 2 (after the checkpoint of step 6), then resumed.
    killed = str(tmp_path / "killed")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = f"--compilation_cache={tmp_path / 'xla_cache'}"  # empty at first
    every_2 = "--config.checkpoint_every_steps=2"
    log = tmp_path / "killed.log"
    victim = start_python(main_command(data_dir, killed, cache, every_2), str(log), env=env)
    deadline = time.time() + 600
    while not os.path.isdir(os.path.join(killed, "checkpoints", "6")) and time.time() < deadline:
        assert victim.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    first_log = log.read_text()
    assert not os.path.isdir(os.path.join(killed, "checkpoints", "8"))
    proc = run_main(data_dir, killed, cache, every_2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The train and eval loops were compiled once: the resumed start loads them all.
    # One line per event: no orbax bookkeeping ("Metadata file does not exist", read-only
    # managers) on a resume, nothing but our own modules' lines.
    assert "orbax" not in proc.stderr and "Metadata file" not in proc.stderr, proc.stderr
    hits, requests = compiles_from_cache(first_log)
    assert hits == 0 and requests >= 2
    assert compiles_from_cache(proc.stderr)[0] >= 2  # the train and eval loops (> 1 s each)
    # Resumed mid-epoch 2: the epoch's fusion update (made before the kill: nothing changed,
    # every layer frozen) is reported as it was, not as an empty update.
    resumed = f"resumed from step 6 in {killed} (this epoch's fusion update: 0 filters changed, "
    assert resumed + f"{len(models.conv_paths(SMOKE_MODEL))} layers frozen)" in proc.stderr
    assert epoch_line(proc.stderr, 2).split("| T")[1] == ref_epoch2.split("| T")[1]
    step, params = final_params(killed)
    assert step == ref_step
    for a, b in zip(ref_params.values(), params.values(), strict=True):
        np.testing.assert_array_equal(a, b)

    # The exported compact model loads in 3 lines and evaluates through the CLI.
    model, variables, meta = export.load_compact(os.path.join(ref, "compact"))
    assert meta["architecture"] == SMOKE_MODEL and meta["flops"] < meta["base_flops"]
    out = run_module("dcff_jax.evaluate", f"--checkpoint={ref}/compact")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""  # no orbax INFO line per file it reads
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["examples"] == 24
    assert result["top1"] == pytest.approx(meta["test_top1"], abs=1e-6)


def compiles_from_cache(log: str) -> tuple[int, int]:
    """(hits, requests) of the compilation cache at start-up, from main's log."""
    match = re.search(r"\((\d+) of (\d+) executables from the compilation cache\)", log)
    assert match, log[-2000:]
    return int(match.group(1)), int(match.group(2))


def epoch_line(log: str, epoch: int) -> str:
    match = re.search(rf"epoch {epoch}/\d+: test top-1.*", log)
    assert match, log[-2000:]
    return match.group(0)


def frozen_layers_at_epoch(log: str, epoch: int) -> int:
    match = re.search(rf"epoch {epoch}/\d+: .*?(\d+) layers frozen", log)
    assert match, log[-2000:]
    return int(match.group(1))


@pytest.mark.slow
def test_exact_criterion_end_to_end_through_main(data_dir, tmp_path):
    """--config.criterion=exact reaches the fusion update: nothing freezes at epoch 2, where the
    reference criterion freezes every layer (see the test above), and the run exports."""
    workdir = str(tmp_path / "exact")
    proc = run_main(data_dir, workdir, "--config.criterion=exact")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert frozen_layers_at_epoch(proc.stderr, 2) == 0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["criterion"] == "exact"
    assert os.path.exists(os.path.join(workdir, "compact", "LATEST"))


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    workdir = str(tmp_path / "nan")
    every_step = "--config.checkpoint_every_steps=1"
    proc = run_main(data_dir, workdir, "--config.learning_rate=1e30", every_step)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "training loss became" in proc.stderr and "last good checkpoint" in proc.stderr
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps, "no checkpoint kept"
    mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = mngr.restore(max(steps), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.all(np.isfinite(x)) for x in leaves)


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    from dcff_jax.training import checkpoints

    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    state = {"w": jnp.arange(4.0)}
    checkpoints.save(mngr, 1, state, {"best_top1": 1.0})
    checkpoints.save(mngr, 2, {"w": jnp.arange(4.0) + 1}, {"best_top1": 2.0})
    # Corrupt every data file of step 2.
    for dirpath, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"garbage")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    restored, progress, _ = checkpoints.restore_latest(mngr, abstract)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert progress["best_top1"] == 1.0
    assert "checkpoint" in caplog.text and "is corrupt (" in caplog.text
    # The bad step is kept, aside, and the run can save that step again (no crash loop).
    quarantined = sorted(os.listdir(tmp_path / "ckpt_quarantine"))
    assert len(quarantined) == 2 and quarantined[0].startswith("2-")
    assert quarantined[1] == "README.txt"
    assert mngr.all_steps() == [1]
    checkpoints.save(mngr, 2, {"w": jnp.arange(4.0) + 5}, {"best_top1": 3.0})
    restored, progress, _ = checkpoints.restore_latest(
        checkpoints.manager(str(tmp_path / "ckpt")), abstract
    )
    np.testing.assert_array_equal(restored["w"], np.arange(4.0) + 5)


@pytest.mark.parametrize(
    "error",
    [
        OSError(5, "Input/output error"),
        TimeoutError("read timed out"),
        ValueError("UNAVAILABLE: connection reset by peer"),  # tensorstore's wording
        type("ServiceUnavailable", (Exception,), {})("503 Service Unavailable"),
    ],
    ids=["EIO", "timeout", "tensorstore", "gcs-503"],
)
def test_an_io_error_is_retried_then_stops_the_run_and_moves_nothing(tmp_path, monkeypatch, error):
    """A failure to reach the newest checkpoint is not damage: it is retried with backoff and,
    when it persists, the run stops naming the checkpoint; nothing is moved aside."""
    from dcff_jax.training import checkpoints

    real_read = checkpoints.read_step
    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    for step in (1, 2):
        checkpoints.save(mngr, step, {"w": jnp.arange(4.0) + step}, {})
    tries, delays = [], []
    monkeypatch.setattr(checkpoints.time, "sleep", delays.append)

    def unreachable(mngr, step, args):
        tries.append(step)
        raise error

    monkeypatch.setattr(checkpoints, "read_step", unreachable)
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with pytest.raises(RuntimeError, match=r"could not read checkpoint .*ckpt/2 .*an I/O error"):
        checkpoints.restore_latest(checkpoints.manager(str(tmp_path / "ckpt")), abstract)
    assert tries == [2] * (len(checkpoints.RETRY_DELAYS_S) + 1)  # never fell back to step 1
    assert delays == list(checkpoints.RETRY_DELAYS_S)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and sorted(os.listdir(tmp_path / "ckpt")) == [
        "1",
        "2",
    ]
    # A transient error that clears restores the newest step.
    calls = []

    def flaky(mngr, step, args):
        calls.append(step)
        if len(calls) == 1:
            raise error
        return real_read(mngr, step, args)

    monkeypatch.setattr(checkpoints, "read_step", flaky)
    state, _, _ = checkpoints.restore_latest(checkpoints.manager(str(tmp_path / "ckpt")), abstract)
    np.testing.assert_array_equal(state["w"], np.arange(4.0) + 2)
    assert calls == [2, 2]


def test_a_missing_file_or_undecodable_data_is_damage_not_an_io_error():
    from dcff_jax.training import checkpoints

    assert not checkpoints.is_io_error(FileNotFoundError("gone"))
    assert not checkpoints.is_io_error(ValueError("Expecting value: line 1 column 1"))
    assert not checkpoints.is_io_error(RuntimeError("no cause"))
    wrapped = RuntimeError("orbax failed")
    wrapped.__cause__ = ConnectionResetError()
    assert checkpoints.is_io_error(wrapped)


def test_a_failed_checkpoint_read_leaves_no_orphaned_task_tracebacks(monkeypatch, caplog):
    """When one of orbax's array reads fails, asyncio logs each sibling read's unawaited error
    with a traceback whenever its task is collected (even after the run stopped in one line);
    once a checkpoint has been read, those are dropped, and other unawaited errors are not."""
    import asyncio
    import gc
    import logging

    from dcff_jax.training import checkpoints

    def failing(mngr, step, args):
        raise FileNotFoundError("gone")  # damage: returned at once, not retried

    monkeypatch.setattr(checkpoints, "read_step", failing)
    _, error = checkpoints.read_with_retries(None, 8, None)
    assert isinstance(error, FileNotFoundError)

    # A coroutine as orbax defines it (module level, in its serialization module).
    namespace = {}
    source = "async def async_deserialize():\n    raise ValueError('PERMISSION_DENIED: Forbidden')"
    orbax_file = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
    exec(compile(source, orbax_file, "exec"), namespace)  # noqa: S102
    async_deserialize = namespace["async_deserialize"]

    async def elsewhere():
        raise ValueError("an unrelated unawaited error")

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            tasks = [loop.create_task(c()) for c in (async_deserialize, elsewhere)]
            loop.run_until_complete(asyncio.sleep(0.01))
            del tasks
            gc.collect()
    finally:
        loop.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and "an unrelated unawaited error" in logged[0], logged


def test_checkpoint_of_another_config_names_the_arrays_and_shapes(tmp_path):
    from dcff_jax.training import checkpoints

    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    checkpoints.save(mngr, 1, {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)}, {})
    wanted = {
        "w": jax.ShapeDtypeStruct((3, 8), jnp.float32),
        "b": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    with pytest.raises(ValueError, match=r"w: saved \(3, 4\), config \(3, 8\)") as error:
        checkpoints.restore_latest(checkpoints.manager(str(tmp_path / "ckpt")), wanted)
    assert "b:" not in str(error.value)  # only the arrays that differ
    assert os.listdir(tmp_path / "ckpt") == ["1"]  # a config mismatch moves nothing aside


def test_no_readable_checkpoint_moves_nothing_and_says_so(tmp_path):
    from dcff_jax.training import checkpoints

    mngr = checkpoints.manager(str(tmp_path / "ckpt"))
    for step in (1, 2):
        checkpoints.save(mngr, step, {"w": jnp.arange(4.0)}, {})
        for dirpath, _, files in os.walk(tmp_path / "ckpt" / str(step) / "state"):
            for f in files:
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(b"garbage")
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with pytest.raises(RuntimeError, match=r"no readable checkpoint .* steps \[1, 2\] all failed"):
        checkpoints.restore_latest(checkpoints.manager(str(tmp_path / "ckpt")), abstract)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
    assert not os.path.exists(tmp_path / "ckpt_quarantine")


def test_changed_run_fields_lists_each_field_and_allows_only_the_allow_list():
    config = tiny_config("/data").to_dict()
    saved = json.loads(json.dumps(config))
    now = dict(config, learning_rate=0.05, weight_decay=1e-3, data_dir="/elsewhere")
    now.update(log_every_steps=7, checkpoint_every_minutes=5.0, lr_milestones=(150, 200))
    assert run_config.changed_run_fields(saved, now) == {
        "learning_rate": (0.1, 0.05),
        "lr_milestones": ([150, 225], [150, 200]),
        "weight_decay": (5e-4, 1e-3),
    }
    # Tuples saved as JSON lists are not changes; fields an older run lacked are not either.
    assert run_config.changed_run_fields(saved, config) == {}
    del saved["t_k"]
    assert run_config.changed_run_fields(saved, dict(config, t_k=2.0)) == {}
    # Runs saved before drop_last_batch existed dropped the last batch: resuming them keeping it
    # would change the steps per epoch.
    del saved["drop_last_batch"]
    assert run_config.changed_run_fields(saved, dict(config, drop_last_batch=False)) == {
        "drop_last_batch": (True, False)
    }
    assert run_config.changed_run_fields(saved, dict(config, drop_last_batch=True)) == {}


def test_time_based_checkpoints_are_due_once_the_interval_has_passed(monkeypatch):
    from dcff_jax.training import checkpoints

    now = [1000.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: now[0])
    timer = checkpoints.Timer(minutes=2)
    now[0] += 119
    assert not timer.due()
    now[0] += 2
    assert timer.due()
    timer.reset()
    assert not timer.due()
    assert not checkpoints.Timer(minutes=0).due()


def all_equations(jaxpr):
    """Every equation of a (closed) jaxpr, sub-jaxprs (pjit, custom_jvp, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from all_equations(sub)


def test_half_precision_step_computes_in_bfloat16_and_keeps_float32_state(data_dir):
    from dcff_jax import input_pipeline
    from dcff_jax.method import fusion

    config = tiny_config(data_dir, model="vgg16", cprate="[0.75]*13", half_precision=True)
    data = input_pipeline.load_data(config)
    mesh = steps.make_mesh()
    model = models.create_model(config.model, config.cprate, "fused", dtype=jnp.bfloat16)
    tx = optim.make_optimizer(config, 4)
    state = steps.create_train_state(model, tx, 32, 0, mesh)
    new_fusion, _ = fusion.update_fusion(state.params, state.fusion, 0, 2)
    state = state.replace(fusion=new_fusion)
    spec = steps.InputSpec(data.mean, data.std, data.device_augment, jnp.bfloat16)
    step = steps.make_train_step(model, tx, spec, mesh)
    images, labels = next(input_pipeline.train_batches(data.train, 16, 0, 0, 0, 1))
    batch = steps.to_global(mesh, images, labels)
    conv_dtypes = [
        (eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, eqn.outvars[0].aval.dtype)
        for eqn in all_equations(step.trace(state, *batch).jaxpr)
        if eqn.primitive.name == "conv_general_dilated"
    ]
    # 13 forward convs, and the backward's input- and kernel-gradient convs (no input gradient
    # for the first conv): every one in bfloat16.
    assert len(conv_dtypes) == 13 * 3 - 1, len(conv_dtypes)
    assert set(conv_dtypes) == {(np.dtype(jnp.bfloat16),) * 3}
    before = jax.tree.map(np.asarray, state.params)
    initial_opt_state = jax.device_get(state.opt_state)
    state, metrics = step(state, *steps.to_global(mesh, images, labels))
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(
        x.dtype == jnp.float32 for x in jax.tree.leaves(state.fusion) if x.dtype != jnp.int32
    )
    momentum = jax.tree.leaves(state.opt_state) + jax.tree.leaves(initial_opt_state)
    assert momentum and all(
        x.dtype == jnp.float32 for x in momentum if jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert any(
        np.any(a != np.asarray(b))
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))
    )


def test_evaluate_masks_the_padded_last_batch():
    """20 examples at batch 8: 3 batches, the last padded with 4 copies of example 0. Counting
    the padding would report 24 examples and add example 0's hit 4 times."""
    from dcff_jax import input_pipeline

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    predicted = images[:, 0, 0, 0].astype(np.int32) % 10
    # Every third example a hit, example 0 among them.
    labels = np.where(np.arange(20) % 3 == 0, predicted, (predicted + 1) % 10).astype(np.int32)
    split = input_pipeline.Split(20, lambda idx, _: (images[idx], labels[idx]), 4, (0, 9))
    mesh = steps.make_mesh()

    @jax.jit
    def eval_step(state, batch_images, batch_labels, mask):
        # Predicts class (first pixel value mod 10), with a margin for top-1.
        predicted = batch_images[:, 0, 0, 0].astype(jnp.int32) % 10
        logits = jax.nn.one_hot(predicted, 10) * 10.0
        return steps.eval_sums(logits, batch_labels, mask)

    result = steps.evaluate(eval_step, None, input_pipeline.eval_batches(split, 8), mesh)
    hits = predicted == labels
    assert result["examples"] == 20
    assert result["top1"] == pytest.approx(100.0 * hits.mean(), abs=1e-9)
    assert 0 < hits.sum() < 20


@pytest.mark.slow
def test_a_stop_signal_saves_that_step_and_the_resume_is_bit_identical(data_dir, tmp_path):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT), each after epoch 1 of 3 (4 steps each), with 3
    steps per call (calls end at steps 7, 8, 11, 12): the call in flight finishes, its step is
    checkpointed (no periodic checkpoint would cover it here), one line says where, exit 75.
    Resumed with 2 steps per call, each run ends with the parameters of one uninterrupted run of
    one step per call, bit for bit: the grouping of steps into calls changes nothing. (One test,
    so that both signals are compared with the same reference run.)"""
    sparse = "--config.checkpoint_every_steps=100", "--config.num_epochs=3"
    ref = str(tmp_path / "ref")
    proc = run_main(data_dir, ref, *sparse, "--config.steps_per_call=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, ref_params = final_params(ref)
    for sig in (signal.SIGTERM, signal.SIGINT):
        workdir = str(tmp_path / f"stopped_{sig.name}")
        returncode, err = stop_after_epoch_one(
            data_dir, workdir, sig, (*sparse, "--config.steps_per_call=3")
        )
        assert returncode == 75, (sig.name, err[-3000:])
        assert "Traceback" not in err
        match = re.search(r"saved a checkpoint at step (\d+) in .*checkpoints; run the same", err)
        assert match, err[-3000:]
        step = int(match.group(1))
        assert step in (7, 8, 11), (sig.name, step)  # a call boundary after the signal
        # The epochs' end checkpoints before it (the signal may land after epoch 2 ended), and it.
        saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
        assert saved == [s for s in (4, 8) if s < step] + [step], (sig.name, saved)
        proc = run_main(data_dir, workdir, *sparse, "--config.steps_per_call=2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from step {step}" in proc.stderr
        for a, b in zip(ref_params.values(), final_params(workdir)[1].values(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=sig.name)


def device_env(devices: int) -> dict[str, str]:
    return with_device_count({**os.environ, "JAX_PLATFORMS": "cpu"}, devices)


RESTORE_ELSEWHERE = """
import sys, jax, numpy as np
from dcff_jax import models
from dcff_jax.training import checkpoints, optim, steps
from helpers import tiny_config
from jax.sharding import Mesh
directory, saver, restorer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = tiny_config("/unused")
model = models.create_model(config.model, config.cprate, "fused")
tx = optim.make_optimizer(config, 4)
def state_on(devices, seed):
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    return steps.create_train_state(model, tx, 32, seed, mesh)
saved = state_on(saver, seed=1).replace(step=np.int32(6))
checkpoints.save(checkpoints.manager(directory), 6, saved, {"best_top1": 1.0})
target = state_on(restorer, seed=2)  # other values, the restoring topology's shardings
abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
)
state, progress, _ = checkpoints.restore_latest(checkpoints.manager(directory), abstract)
assert progress == {"best_top1": 1.0} and int(state.step) == 6
for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(b.sharding.device_set) == restorer, b.sharding
print("restored", len(jax.tree.leaves(state)), "arrays")
"""


@pytest.mark.parametrize("saver,restorer", [(8, 1), (1, 8), (8, 2)])
def test_a_checkpoint_restores_exactly_onto_another_device_count(tmp_path, saver, restorer):
    """The whole train state (params, BN statistics, momentum, fusion state, step) saved from a
    mesh of `saver` devices comes back bit for bit on a mesh of `restorer` devices."""
    proc = run_python(
        [
            sys.executable,
            "-c",
            RESTORE_ELSEWHERE,
            str(tmp_path / "ckpt"),
            str(saver),
            str(restorer),
        ],
        cwd=os.path.dirname(os.path.abspath(__file__)),
        env=device_env(8),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not an empty tree: ResNet-8's train state is 83 arrays (params, batch stats, momenta, the
    # fusion state).
    assert int(re.search(r"restored (\d+) arrays", proc.stdout).group(1)) > 50


@pytest.mark.slow
def test_main_stopped_on_one_device_count_resumes_on_another(data_dir, tmp_path):
    """Preempted on 8 devices, resumed through main on 1 and preempted again, resumed on 8, all
    with the same global batch: each start resumes at the step the last one saved, and the run
    finishes. (Its final params are not compared with an uninterrupted run's: two device counts
    sum in another order, and in these runs that float32 difference alone grows to ~0.15% of
    the params, resume or not; the exact part, the restore onto other devices, is the test
    above.)"""
    # 6 epochs of 4 steps: each signal is sent once the next epoch-end checkpoint exists, which
    # commits in the background, an epoch or more late on a loaded machine; a signal that lands
    # in the last epoch would end the run normally.
    sparse = "--config.checkpoint_every_steps=100", "--config.num_epochs=6"
    workdir = str(tmp_path / "moved")
    step = 0
    for devices in (8, 1):
        next_epoch_end = (step // 4 + 1) * 4
        returncode, err = stop_after_epoch_one(
            data_dir, workdir, signal.SIGTERM, sparse, device_env(devices), next_epoch_end
        )
        assert returncode == 75 and f"{devices} local / {devices} global" in err, err[-3000:]
        if step:
            assert f"resumed from step {step}" in err, err[-3000:]
        step = int(re.search(r"saved a checkpoint at step (\d+)", err).group(1))
        assert next_epoch_end <= step < 20, step
    proc = run_python(main_command(data_dir, workdir, *sparse), env=device_env(8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 local / 8 global devices" in proc.stderr
    assert f"resumed from step {step}" in proc.stderr
    assert "epoch 6/6: test top-1" in proc.stderr
    assert final_params(workdir)[0] == 24


@pytest.mark.slow
def test_the_last_partial_batch_is_trained_as_one_more_step(tmp_path):
    # 40 examples at batch 16: two full steps and one of 8 per epoch, as the published loaders
    # do; drop_last_batch=True trains the two full ones only.
    data_dir = write_cifar_folder(str(tmp_path / "data"), train=40, test=8)
    for drop, steps_per_epoch in ((False, 3), (True, 2)):
        workdir = str(tmp_path / f"drop_{drop}")
        config = tiny_config(
            data_dir,
            num_epochs=2,
            log_every_steps=1,
            checkpoint_every_steps=0,
            drop_last_batch=drop,
        )
        train.train_and_evaluate(config, workdir)
        losses = read_scalars(os.path.join(workdir, "tensorboard"))["train/loss"]
        assert [step for step, _ in sorted(losses)] == list(range(1, 2 * steps_per_epoch + 1))
        assert all(np.isfinite(loss) for _, loss in losses)
        step, _ = checkpoint_params(workdir)
        assert step == 2 * steps_per_epoch


def test_the_former_module_names_re_export_the_training_package():
    """dcff_jax.steps, .optim and .train (the README's custom loop imported the first two) keep
    the names users had; each is the one object in dcff_jax.training."""
    import dcff_jax.optim
    import dcff_jax.steps
    import dcff_jax.train
    from dcff_jax import training

    assert dcff_jax.steps.make_train_step is training.steps.make_train_step
    assert dcff_jax.steps.InputSpec is training.steps.InputSpec
    assert dcff_jax.optim.make_optimizer is training.optim.make_optimizer
    assert dcff_jax.train.train_and_evaluate is training.train.train_and_evaluate


def test_the_first_epoch_is_a_new_best_even_at_zero_top1():
    """A run whose epochs all score 0% still exports its first epoch's model (it used to export
    nothing and say an export was written before a resume); later epochs must beat the best."""
    from dcff_jax.training.train import Progress

    progress = Progress()
    assert progress.is_new_best(0.0)
    progress.history.append({"new_best": True})
    assert not progress.is_new_best(0.0)
    progress.best_top1 = 12.5
    assert not progress.is_new_best(12.5) and progress.is_new_best(12.6)


def test_the_best_epochs_copy_survives_the_next_call_donating_the_state():
    state = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3), "step": jnp.int32(4)}
    best = train.copied(state)
    # The next train call donates the state's buffers; the copy must not share them.
    jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)
    assert state["w"].is_deleted()
    np.testing.assert_array_equal(best["w"], np.arange(6.0).reshape(2, 3))
    assert int(best["step"]) == 4 and best["b"].dtype == jnp.float32
