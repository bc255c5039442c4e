"""train_and_evaluate: one whole DCFF run (fuse, train, evaluate, checkpoint, export, resume).

The pieces live by role: dcff_jax.steps (train state, jitted steps, data parallelism),
dcff_jax.optim (optimizer and schedules), dcff_jax.logs (metrics, log lines, TensorBoard),
dcff_jax.checkpoints (orbax) and dcff_jax.export (the compact model). This module is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dcff_jax import (
    checkpoints,
    export,
    fusion,
    input_pipeline,
    logs,
    models,
    optim,
    steps,
    storage,
)
from dcff_jax.config import validate_config
from dcff_jax.errors import ConfigError, DataError


@dataclasses.dataclass
class Progress:
    """Host-side bookkeeping of a run, saved beside the state in every checkpoint (JSON)."""

    best_top1: float = 0.0
    history: list[dict] = dataclasses.field(default_factory=list)  # one record per epoch
    # What this epoch's fusion update did: {"changed": {layer: slots changed}, "frozen": n}.
    fusion_info: dict = dataclasses.field(default_factory=lambda: {"changed": {}, "frozen": 0})

    @classmethod
    def from_json(cls, saved: dict) -> Progress:
        progress = cls(float(saved.get("best_top1", 0.0)), list(saved.get("history", [])))
        progress.fusion_info = saved.get("fusion_info", progress.fusion_info)
        return progress

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Run:
    """What a run sets up once: data, mesh, model, optimizer, compiled steps, outputs."""

    config: ml_collections.ConfigDict
    workdir: str
    data: input_pipeline.Data
    steps_per_epoch: int
    last_batch: int  # global size of the epoch's final partial batch; 0: every batch is full
    mesh: Any
    model: Any
    tx: Any
    train_step: Any
    eval_step: Any
    checkpoints: Any  # orbax CheckpointManager
    writer: logs.Writer
    timer: checkpoints.Timer  # time-based checkpoints (config.checkpoint_every_minutes)
    config_saved: bool = False  # config.json is written with this start's first checkpoint

    @property
    def checkpoint_dir(self) -> str:
        return checkpoint_dir(self.workdir)

    def describe_last_checkpoint(self) -> str:
        return last_checkpoint(self.workdir)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    data = input_pipeline.load_data(config)
    input_pipeline.check_fits(config, data, config.data_dir or config.dataset)
    last = input_pipeline.last_batch_size(
        data.train, config.batch_size, jax.device_count(), config.drop_last_batch
    )
    spe = input_pipeline.steps_per_epoch(
        data.train, config.batch_size, config.steps_per_epoch, last
    )
    if spe * config.batch_size <= data.train.num_examples:  # capped: every step is full
        last = 0
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = models.create_model(
        config.model, config.cprate or None, "fused", num_classes=config.num_classes, dtype=dtype
    )
    mesh = steps.make_mesh()
    tx = optim.make_optimizer(config, spe)
    spec = steps.InputSpec(data.mean, data.std, data.device_augment, dtype)
    return Run(
        config=config,
        workdir=workdir,
        data=data,
        steps_per_epoch=spe,
        last_batch=last,
        mesh=mesh,
        model=model,
        tx=tx,
        train_step=steps.make_train_step(model, tx, spec, mesh, config.seed),
        eval_step=steps.make_eval_step(model, spec, mesh),
        checkpoints=checkpoints.manager(checkpoint_dir(workdir)),
        writer=logs.Writer(workdir),
        timer=checkpoints.Timer(config.checkpoint_every_minutes, config.log_every_steps),
    )


def checkpoint_dir(workdir: str) -> str:
    """Where a run's checkpoints live: WORKDIR/checkpoints (a path or a URI)."""
    return os.path.join(workdir, "checkpoints")


def last_checkpoint(workdir: str) -> str:
    """Which checkpoint a restart would resume from, as found in storage now (a sentence)."""
    directory = storage.resolve(checkpoint_dir(workdir))
    step = checkpoints.latest_step(directory)
    if step is None:
        return f"no checkpoint was saved yet in {directory}"
    return f"the last good checkpoint, step {step} in {directory}, is kept"


class Stopped(Exception):
    """The run stopped on request (SIGTERM, SIGINT) after saving a checkpoint at `step`."""

    def __init__(self, signal_name: str, step: int, checkpoint_dir: str):
        super().__init__(
            f"{signal_name}: saved a checkpoint at step {step} in {checkpoint_dir}; "
            "run the same command again to resume from it"
        )
        self.step = step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop=None) -> dict:
    """Train (or resume) the run in `workdir`; returns the final progress record.

    stop: an optional preemption.StopRequest; when it fires, the current step is finished and
    checkpointed, and Stopped is raised.
    """
    validate_config(config)
    _check_config(config, workdir)
    run = setup(config, workdir)
    state, progress = initial_or_restored_state(run)
    last_saved = int(state.step)
    for epoch in range(int(state.step) // run.steps_per_epoch, config.num_epochs):
        if int(state.step) == epoch * run.steps_per_epoch:
            state, progress.fusion_info = update_fusion(run, state, epoch)
        state, window, last_saved, stopping = train_epoch(
            run, state, epoch, progress, last_saved, stop
        )
        record = end_of_epoch(run, state, epoch, progress, window)
        save_checkpoint(run, int(state.step), state, progress)
        last_saved = int(state.step)
        if record["new_best"]:  # every process: the export's orbax save is collective
            export.save_compact(os.path.join(workdir, "compact"), state, config, record)
        if stopping and epoch + 1 < config.num_epochs:
            raise Stopped(stop.signal_name, last_saved, run.checkpoint_dir)
    run.writer.close()
    if jax.process_index() == 0:
        _final_report(config, workdir, progress)
    return progress.to_json()


def initial_or_restored_state(run: Run) -> tuple[steps.TrainState, Progress]:
    """A fresh state, or the newest readable checkpoint's state and progress."""
    image_size = run.data.train.image_size
    state = steps.create_train_state(run.model, run.tx, image_size, run.config.seed, run.mesh)
    restored = checkpoints.restore_latest(run.checkpoints, jax.tree.map(_abstract, state))
    if restored is None:
        return state, Progress()
    state = jax.device_put(restored[0], steps.replicated(run.mesh))
    progress = Progress.from_json(restored[1])
    logging.info(
        "resumed from step %d in %s (this epoch's fusion update: %d filters changed, "
        "%d layers frozen)",
        int(state.step),
        run.workdir,
        sum(progress.fusion_info["changed"].values()),
        progress.fusion_info["frozen"],
    )
    return state, progress


def save_checkpoint(run: Run, step: int, state, progress: Progress) -> None:
    """Checkpoint `step` (every process: the save is collective); config.json with the first."""
    checkpoints.save(run.checkpoints, step, state, progress.to_json())
    run.timer.reset()
    if not run.config_saved:
        _save_config(run.config, run.workdir)
        run.config_saved = True


def update_fusion(run: Run, state: steps.TrainState, epoch: int):
    """Re-fuse every fused layer before the epoch: (new state, JSON-able summary)."""
    config = run.config
    new_fusion, info = fusion.update_fusion(
        state.params,
        state.fusion,
        epoch,
        config.num_epochs,
        criterion=config.criterion,
        t_start=config.t_start,
        t_end=config.t_end,
        k=config.t_k,
    )
    info = jax.device_get(info)
    summary = {
        "changed": {layer: int(v["changed"]) for layer, v in info.items()},
        "frozen": sum(bool(v["frozen"]) for v in info.values()),
    }
    return state.replace(fusion=new_fusion), summary


def train_epoch(run: Run, state, epoch: int, progress: Progress, last_saved: int, stop=None):
    """The rest of an epoch from state.step: (state, its metrics window, last saved step,
    whether to stop after the epoch's evaluation and checkpoint).

    When `stop` asks for it mid-epoch: checkpoints the step just finished and raises Stopped."""
    config, spe = run.config, run.steps_per_epoch
    first_step = int(state.step) - epoch * spe
    step = epoch * spe + first_step  # counted on the host: no device sync per step
    window = logs.TrainWindow(step)
    batches = input_pipeline.train_batches(
        run.data.train, config.batch_size, config.seed, epoch, first_step, spe, run.last_batch
    )

    def place(batch):
        return steps.to_global(run.mesh, *batch)

    with contextlib.closing(input_pipeline.prefetch(batches, place)) as placed:
        for images, labels in placed:
            state, metrics = run.train_step(state, images, labels)
            window.add(metrics)
            step += 1
            at_epoch_end = step % spe == 0
            if step % config.log_every_steps == 0 or at_epoch_end:
                window.check_finite(step, epoch, run.describe_last_checkpoint)
                total = config.num_epochs * spe
                run.writer.scalars(step, window.flush(step, epoch, spe, total, config.batch_size))
            every = config.checkpoint_every_steps
            due = (every > 0 and step % every == 0) or run.timer.due(step)
            if due and not at_epoch_end:
                window.check_finite(step, epoch, run.describe_last_checkpoint)
                save_checkpoint(run, step, state, progress)
                last_saved = step
            # Asked every step: with several processes it is the preemption sync point.
            if stop is not None and stop.stop_at(step):
                if at_epoch_end:  # evaluate and checkpoint the epoch first
                    return state, window, last_saved, True
                window.check_finite(step, epoch, run.describe_last_checkpoint)
                if last_saved != step:
                    save_checkpoint(run, step, state, progress)
                raise Stopped(stop.signal_name, step, run.checkpoint_dir)
    return state, window, last_saved, False


def end_of_epoch(run: Run, state, epoch: int, progress: Progress, window) -> dict:
    """Evaluate, record the epoch in `progress`, log it; the epoch's record."""
    config = run.config
    batches = input_pipeline.eval_batches(run.data.test, config.batch_size)
    result = steps.evaluate(run.eval_step, state, batches, run.mesh)
    new_best = result["top1"] > progress.best_top1
    progress.best_top1 = max(progress.best_top1, result["top1"])
    temperature = fusion.temperature(
        epoch, config.num_epochs, config.t_start, config.t_end, config.t_k
    )
    record = {
        "epoch": epoch,
        "step": int(state.step),
        "temperature": float(temperature),
        "train_loss": window.epoch_loss(),
        "train_accuracy": window.epoch_accuracy(),
        "test_top1": result["top1"],
        "test_top5": result["top5"],
        "test_loss": result["loss"],
        "best_top1": progress.best_top1,
        "new_best": new_best,
        "filters_changed": dict(progress.fusion_info["changed"]),
        "frozen_layers": progress.fusion_info["frozen"],
    }
    progress.history.append(record)
    logs.log_epoch(record, config.num_epochs, show_top5=config.num_classes > 10)
    run.writer.scalars(int(state.step), logs.epoch_scalars(record))
    return record


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


# Fields that may differ when a run resumes: where things are read and written, how often, and
# how processes find each other. Every other field defines the run (model, plan, data, schedule,
# temperature, optimizer, seed, precision): a resumed run must keep it.
RESUMABLE_CHANGES = frozenset(
    {
        "data_dir",
        "download",
        "cifar10_url",
        "cifar10_md5",
        "val_labels",
        "data_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_minutes",
        "distributed",
        "coordinator_address",
        "num_processes",
        "process_id",
        "heartbeat_timeout_s",
    }
)


# Run-defining fields added after runs were saved without them: the value those runs had.
LEGACY_VALUES = {"drop_last_batch": True}


def changed_run_fields(saved: dict, config: dict) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, now)} for every run-defining field that differs (JSON values compared, so
    a tuple equals its saved list). A field the saved run did not have is not a change, except
    those of LEGACY_VALUES, which had a fixed value then."""
    now = json.loads(json.dumps(config))
    saved = {**LEGACY_VALUES, **saved}
    return {
        key: (saved[key], now[key])
        for key in sorted(now)
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != now[key]
    }


def _check_config(config, workdir: str) -> None:
    """Refuse to resume a workdir whose saved run differs in a run-defining field."""
    path = storage.resolve(workdir) / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); restore it from the run's first start, or use a "
            "new --workdir"
        ) from e
    changed = changed_run_fields(saved, config.to_dict())
    if changed:
        listed = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{workdir} holds a run with different settings ({listed}); resume with the saved "
            "values or use a new --workdir"
        )


def _save_config(config, workdir: str) -> None:
    """config.json, written by process 0 with the first checkpoint of each start (so a run that
    failed before saving anything can be retried with other values)."""
    if jax.process_index() == 0:
        storage.write_text_atomic(
            storage.resolve(workdir) / "config.json", config.to_json(indent=2)
        )


def _final_report(config, workdir: str, progress: Progress) -> None:
    from dcff_jax import flops, report

    counts = flops.model_counts(config.model, config.cprate or None)
    logging.info(
        "best test top-1 %.2f%%\n%s", progress.best_top1, flops.format_summary(config.model, counts)
    )
    layers = models.fused_layers(config.model, config.cprate or None)
    report.write_plots(
        workdir, progress.history, config, [(layer.kept, layer.filters) for layer in layers]
    )
