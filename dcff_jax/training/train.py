"""train_and_evaluate: one whole DCFF run (fuse, train, evaluate, checkpoint, export, resume).

The pieces live by role, beside it in dcff_jax.training: steps (train state, jitted steps,
data parallelism), optim (optimizer and schedules), logs (metrics, log lines, TensorBoard),
checkpoints (orbax), preemption and report (end-of-run plots); and dcff_jax.deploy.compact (the
compact model). This module is the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dcff_jax import models, storage, xla_options
from dcff_jax.config import validate_config
from dcff_jax.data import feeds, loader, sources
from dcff_jax.deploy import compact
from dcff_jax.method import fusion
from dcff_jax.training import checkpoints, logs, optim, run_config, steps


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

    def is_new_best(self, top1: float) -> bool:
        """Whether an epoch's test top-1 is a new best: above the best so far, or the run's
        first recorded epoch even at 0% (a run always has a model to export)."""
        return top1 > self.best_top1 or not any(r["new_best"] for r in self.history)


@dataclasses.dataclass
class Run:
    """What a run sets up once: data, mesh, model, optimizer, compiled steps, outputs."""

    config: ml_collections.ConfigDict
    workdir: str
    data: sources.Data
    steps_per_epoch: int
    last_batch: int  # global size of the epoch's final partial batch; 0: every batch is full
    mesh: Any
    model: Any
    tx: Any
    spec: steps.InputSpec
    on_device: bool  # the splits live on the devices (feeds.on_device)
    checkpoints: Any  # orbax CheckpointManager
    writer: logs.Writer
    timer: checkpoints.Timer  # time-based checkpoints (config.checkpoint_every_minutes)
    feed: Any = None  # feeds.DeviceFeed or feeds.HostFeed, made by prepare()
    evaluate: Any = None  # state -> steps.eval_result, made by prepare()
    compile_seconds: float = 0.0  # prepare()'s up-front compilation
    calls: int = 0  # train calls made since this start: the multi-process preemption sync point
    config_saved: bool = False  # config.json is written with this start's first checkpoint

    @property
    def checkpoint_dir(self) -> str:
        return checkpoint_dir(self.workdir)

    def describe_last_checkpoint(self) -> str:
        self.checkpoints.wait_until_finished()  # a save in flight counts once it has committed
        return last_checkpoint(self.workdir)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    data = sources.load_data(config)
    sources.check_fits(config, data, config.data_dir or config.dataset)
    last = loader.last_batch_size(
        data.train, config.batch_size, jax.device_count(), config.drop_last_batch
    )
    spe = loader.steps_per_epoch(data.train, config.batch_size, config.steps_per_epoch, last)
    if spe * config.batch_size <= data.train.num_examples:  # capped: every step is full
        last = 0
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    # The model's dtype None, not float32: the same computation from the float32 images, and the
    # model that the export and the counts trace (models.paper_dcff traces once per dtype).
    model_dtype = jnp.bfloat16 if config.half_precision else None
    model = models.create_model(
        config.model,
        config.cprate or None,
        "fused",
        num_classes=config.num_classes,
        dtype=model_dtype,
    )
    return Run(
        config=config,
        workdir=workdir,
        data=data,
        steps_per_epoch=spe,
        last_batch=last,
        mesh=steps.make_mesh(),
        model=model,
        tx=optim.make_optimizer(config, spe),
        spec=steps.InputSpec(data.mean, data.std, data.device_augment, dtype),
        on_device=feeds.on_device(config, data),
        checkpoints=checkpoints.manager(checkpoint_dir(workdir)),
        writer=logs.Writer(workdir),
        timer=checkpoints.Timer(config.checkpoint_every_minutes),
    )


def prepare(run: Run, state) -> None:
    """Make the run's feed and evaluation; on the device path, compile every step function now
    (one train loop per batch size and the eval loop), so no compile stalls an epoch."""
    config, mesh = run.config, run.mesh
    if not run.on_device:
        train_step = steps.make_train_step(run.model, run.tx, run.spec, mesh, config.seed)
        run.feed = feeds.HostFeed(
            train=run.data.train,
            batch=config.batch_size,
            seed=config.seed,
            steps_per_epoch=run.steps_per_epoch,
            last_batch=run.last_batch,
            mesh=mesh,
            train_step=train_step,
            full_steps=feeds.full_steps(run.steps_per_epoch, run.last_batch),
        )
        eval_step = steps.make_eval_step(run.model, run.spec, mesh)

        def evaluate(state):
            batches = loader.eval_batches(run.data.test, config.batch_size)
            return steps.evaluate(eval_step, state, batches, mesh)

        run.evaluate = evaluate
        return
    start = time.perf_counter()
    with xla_options.CompileCounter() as compiles:
        run.feed, run.evaluate = feeds.device_path(
            run.model,
            run.tx,
            run.spec,
            mesh,
            config,
            state,
            run.data,
            run.last_batch,
            run.steps_per_epoch,
        )
    run.compile_seconds = time.perf_counter() - start
    cached = (
        f"{compiles.hits} of {compiles.requests} executables from the compilation cache"
        if compiles.requests
        else "no compilation cache"
    )
    logging.info(
        "training and test data on the devices; %d train steps per call; compiled in %.1f s (%s)",
        run.feed.per_call,
        run.compile_seconds,
        cached,
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

    stop: an optional preemption.StopRequest; when it fires, the current call's steps are
    finished and checkpointed, and Stopped is raised. The compact model of the best epoch is
    exported to WORKDIR/compact when the last epoch ends.
    """
    validate_config(config)
    run_config.check_resumable(config, workdir)
    run = setup(config, workdir)
    state, progress, best = initial_or_restored_state(run)
    if int(state.step) < config.num_epochs * run.steps_per_epoch:  # else: finished, no compile
        prepare(run, state)
    last_saved = int(state.step)
    clock = logs.EpochClock()
    try:
        for epoch in range(int(state.step) // run.steps_per_epoch, config.num_epochs):
            if int(state.step) == epoch * run.steps_per_epoch:
                state, progress.fusion_info = update_fusion(run, state, epoch)
            state, window, last_saved, stopping = train_epoch(
                run, state, epoch, progress, last_saved, best, clock, stop
            )
            record = end_of_epoch(run, state, epoch, progress, window, clock)
            if record["new_best"]:  # a copy: the next call donates the state's buffers
                best = copied(steps.model_variables(state))
            save_checkpoint(run, int(state.step), state, progress, best)
            last_saved = int(state.step)
            if stopping and epoch + 1 < config.num_epochs:
                run.checkpoints.wait_until_finished()
                raise Stopped(stop.signal_name, last_saved, run.checkpoint_dir)
    finally:
        run.writer.close()
    run.checkpoints.wait_until_finished()
    export_best(run, progress, best)
    if jax.process_index() == 0:
        _final_report(config, workdir, progress)
    return progress.to_json()


@jax.jit
def copied(tree):
    """A copy of every array of `tree`, in one call: eagerly, each leaf shape is a compile of
    its own (0.7 s at a ResNet-56's first new best, -O0)."""
    return jax.tree.map(jnp.copy, tree)


def export_best(run: Run, progress: Progress, best) -> None:
    """Write the best epoch's compact model to WORKDIR/compact (every process: collective),
    unless the current export there already holds that epoch (a finished run started again).
    Without `best` (a run resumed from a checkpoint that predates it, with no better epoch
    since) the export that run wrote at its best epoch stands."""
    if best is None:
        logging.info("the best epoch's compact model was exported before this run resumed")
        return
    record = next(r for r in reversed(progress.history) if r["new_best"])
    directory = os.path.join(run.workdir, "compact")
    # A finished run started again. Every process must decide alike (the save is collective):
    # one that cannot read the export (a transient error) makes them all write it again.
    exported = compact.exported_epoch(directory) == record["epoch"]
    if all(checkpoints.agree(int(exported))):
        logging.info(
            "the compact model of epoch %d was exported before, to %s",
            record["epoch"] + 1,
            directory,
        )
        return
    version = compact.save_compact(directory, best, run.config, record)
    logging.info(
        "exported the compact model of epoch %d (test top-1 %.2f%%) to %s",
        record["epoch"] + 1,
        record["test_top1"],
        version,
    )


def initial_or_restored_state(run: Run):
    """A fresh state, or the newest readable checkpoint's: (state, progress, best variables or
    None)."""
    image_size = run.data.train.image_size
    state = steps.create_train_state(run.model, run.tx, image_size, run.config.seed, run.mesh)
    abstract = jax.tree.map(_abstract, state)
    restored = checkpoints.restore_latest(
        run.checkpoints, abstract, steps.model_variables(abstract)
    )
    if restored is None:
        return state, Progress(), None
    state = jax.device_put(restored[0], steps.replicated(run.mesh))
    progress = Progress.from_json(restored[1])
    best = None if restored[2] is None else jax.device_put(restored[2], steps.replicated(run.mesh))
    logging.info(
        "resumed from step %d in %s (this epoch's fusion update: %d filters changed, "
        "%d layers frozen)",
        int(state.step),
        run.workdir,
        sum(progress.fusion_info["changed"].values()),
        progress.fusion_info["frozen"],
    )
    return state, progress, best


def save_checkpoint(run: Run, step: int, state, progress: Progress, best) -> None:
    """Checkpoint `step` in the background (every process: the save is collective); config.json
    with the first."""
    checkpoints.save(run.checkpoints, step, state, progress.to_json(), best, wait=False)
    run.timer.reset()
    if not run.config_saved:
        run_config.save_config(run.config, run.workdir)
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


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` (> 0) lies in (before, after]."""
    return every > 0 and after // every > before // every


def train_epoch(run: Run, state, epoch, progress, last_saved, best, clock, stop=None):
    """The rest of an epoch from state.step, call by call: (state, its metrics window, last
    saved step, whether to stop after the epoch's evaluation and checkpoint).

    Logging, checkpoints and stop requests are handled at call boundaries, at the first one at
    or after the step they are due. When `stop` asks for it mid-epoch: checkpoints the step
    reached and raises Stopped."""
    config, spe, feed = run.config, run.steps_per_epoch, run.feed
    epoch_start, epoch_end = epoch * spe, (epoch + 1) * spe
    step = int(state.step)  # counted on the host from here: no device read per call
    window = logs.TrainWindow(step)
    with feed.epoch(epoch, step - epoch_start) as calls:
        while step < epoch_end:
            count = feeds.call_length(step - epoch_start, feed.full_steps, feed.per_call)
            with clock.phase("train"):
                state, sums = calls.call(state, step - epoch_start, count)
                window.add(sums)  # the call's one host read
            before, step = step, step + count
            run.calls += 1
            window.check_finite(step, epoch, run.describe_last_checkpoint)
            at_epoch_end = step == epoch_end
            if crossed(before, step, config.log_every_steps) or at_epoch_end:
                total = config.num_epochs * spe
                run.writer.scalars(step, window.flush(step, epoch, spe, total, config.batch_size))
            due = crossed(before, step, config.checkpoint_every_steps) or run.timer.due()
            if due and not at_epoch_end:
                save_checkpoint(run, step, state, progress, best)
                last_saved = step
            # Asked at every call boundary: with several processes it is the preemption sync
            # point, keyed by the call count (JAX's sync point needs ids that rise by one).
            if stop is not None and stop.stop_at(run.calls):
                if at_epoch_end:  # evaluate and checkpoint the epoch first
                    return state, window, last_saved, True
                if last_saved != step:
                    save_checkpoint(run, step, state, progress, best)
                run.checkpoints.wait_until_finished()
                raise Stopped(stop.signal_name, step, run.checkpoint_dir)
    return state, window, last_saved, False


def end_of_epoch(run: Run, state, epoch: int, progress: Progress, window, clock) -> dict:
    """Evaluate, record the epoch in `progress`, log it; the epoch's record."""
    config = run.config
    with clock.phase("eval"):
        result = run.evaluate(state)
    new_best = progress.is_new_best(result["top1"])
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
        # Since the previous epoch's record: wall time, time in train and eval calls, the rest.
        "seconds": clock.lap(),
    }
    progress.history.append(record)
    logs.log_epoch(record, config.num_epochs, show_top5=config.num_classes > 10)
    run.writer.scalars(int(state.step), logs.epoch_scalars(record))
    return record


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _final_report(config, workdir: str, progress: Progress) -> None:
    from dcff_jax import flops
    from dcff_jax.training import report

    counts = flops.model_counts(config.model, config.cprate or None)
    logging.info(
        "best test top-1 %.2f%%\n%s", progress.best_top1, flops.format_summary(config.model, counts)
    )
    layers = models.fused_layers(config.model, config.cprate or None)
    report.write_plots(
        workdir, progress.history, config, [(layer.kept, layer.filters) for layer in layers]
    )
