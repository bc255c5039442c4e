"""Training: TrainState, the jitted train/eval steps, and train_and_evaluate (the whole run).

Data parallel with jax.sharding: a 1-D Mesh over every device of every host, the batch sharded
on its 'data' axis, the state replicated; XLA inserts the gradient all-reduce, and batch-norm
statistics are over the global batch. The same code serves 1 CPU, 8 GPUs and a TPU pod.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dcff_jax import checkpoints, export, fusion, input_pipeline, models
from dcff_jax.compiler_options import compiler_options
from dcff_jax.config import validate_config


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the optimizer itself is static)."""

    step: jax.Array  # int32 scalar, global step; with the seed it also keys the augmentation
    params: Any
    batch_stats: Any
    fusion: Any  # per fused layer: matrix (m, c), scores (c,), kept (m,)
    opt_state: Any


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The published schedules, per step: multistep / step (x gamma at epoch milestones) or
    cosine, after a linear warm-up of config.warmup_epochs."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    total = config.num_epochs * steps_per_epoch
    if config.lr_schedule in ("multistep", "step"):
        boundaries = {int(m * steps_per_epoch): config.lr_gamma for m in config.lr_milestones}
        main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
        if not warmup:
            return main
        warm = optax.linear_schedule(
            config.learning_rate / max(warmup, 1), config.learning_rate, warmup
        )
        return lambda step: jnp.where(step < warmup, warm(step), main(step))
    cosine = optax.cosine_decay_schedule(config.learning_rate, max(total - warmup, 1))
    if not warmup:
        return cosine
    warm = optax.linear_schedule(config.learning_rate / warmup, config.learning_rate, warmup)
    return optax.join_schedules([warm, cosine], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """PyTorch SGD: weight decay added to the gradient (coupled), then momentum, then the rate."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
    )


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def create_train_state(model, tx, image_size: int, seed: int, mesh: Mesh) -> TrainState:
    """Initialised state, replicated over the mesh."""

    def init():
        variables = model.init(
            jax.random.key(seed), jnp.zeros((1, image_size, image_size, 3)), train=False
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            fusion=variables.get(fusion.FUSION_COLLECTION, {}),  # {} for original/compact
            opt_state=tx.init(params),
        )

    return jax.jit(init, out_shardings=NamedSharding(mesh, P()))()


def make_train_step(
    model, tx, data: input_pipeline.Data, seed: int, dtype, mesh: Mesh, options: dict | None = None
):
    """The jitted (state, images uint8, labels) -> (state, metrics) step; the state is donated.

    options: XLA compile options; None means dcff_jax.compiler_options(), {} XLA's defaults.
    """

    def train_step(state: TrainState, images, labels):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        if data.device_augment:
            images = input_pipeline.augment_cifar(images, key)
        x = input_pipeline.normalize(images, data.mean, data.std, dtype)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats, "fusion": state.fusion}
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        # Counted so that no checkpoint is written with params that a finite loss did not reveal
        # as broken yet (an exploding update shows in the next step's loss only).
        nonfinite = sum(jnp.sum(~jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "nonfinite_params": nonfinite.astype(jnp.float32),
        }
        return new_state, metrics

    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        train_step,
        in_shardings=(replicated, batch, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=compiler_options() if options is None else options,
    )


def make_eval_step(
    model, data: input_pipeline.Data, dtype, mesh: Mesh, options: dict | None = None
):
    """(state, images, labels, mask) -> sums of loss, top-1 and top-5 hits over valid examples.

    options: as for make_train_step.
    """

    def eval_step(state: TrainState, images, labels, mask):
        x = input_pipeline.normalize(images, data.mean, data.std, dtype)
        variables = {
            "params": state.params,
            "batch_stats": state.batch_stats,
            "fusion": state.fusion,
        }
        return eval_sums(model.apply(variables, x, train=False), labels, mask)

    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        eval_step,
        in_shardings=(replicated, batch, batch, batch),
        out_shardings=replicated,
        compiler_options=compiler_options() if options is None else options,
    )


def eval_sums(logits, labels, mask) -> dict[str, jax.Array]:
    """Masked sums: loss, top-1 and top-5 hits, count. logits (n, k), labels (n,), mask (n,)."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def to_global(mesh: Mesh, *local_arrays: np.ndarray) -> list[jax.Array]:
    """This process's slices of a global batch -> arrays sharded over every device of every host."""
    sharding = NamedSharding(mesh, P("data"))
    return [jax.make_array_from_process_local_data(sharding, a) for a in local_arrays]


def evaluate(eval_step, state, split, global_batch: int, mesh: Mesh) -> dict[str, float]:
    """Top-1 / top-5 (%) and mean loss over the whole split."""
    totals = None
    for images, labels, valid in input_pipeline.eval_batches(split, global_batch):
        sums = eval_step(state, *to_global(mesh, images, labels, valid))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "top1": 100.0 * float(totals["top1"]) / count,
        "top5": 100.0 * float(totals["top5"]) / count,
        "loss": float(totals["loss"]) / count,
        "examples": int(count),
    }


class _Progress:
    """Host-side bookkeeping of one run: what is saved beside the state as JSON."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.best_top1 = float(saved.get("best_top1", 0.0))
        self.history: list[dict] = list(saved.get("history", []))

    def to_json(self) -> dict:
        return {"best_top1": self.best_top1, "history": self.history}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) the run in `workdir`; returns the final progress record."""
    validate_config(config)
    _check_or_save_config(config, workdir)
    data = input_pipeline.load_data(config)
    spe = input_pipeline.steps_per_epoch(data.train, config.batch_size, config.steps_per_epoch)
    mesh = make_mesh()
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = models.create_model(
        config.model, config.cprate or None, "fused", num_classes=config.num_classes, dtype=dtype
    )
    tx = make_optimizer(config, spe)
    state = create_train_state(model, tx, data.train.image_size, config.seed, mesh)
    mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"))
    best_mngr = checkpoints.manager(os.path.join(workdir, "checkpoints_best"), max_to_keep=1)
    restored = checkpoints.restore_latest(mngr, jax.tree.map(_abstract, state))
    progress = _Progress()
    if restored is not None:
        state = jax.device_put(restored[0], NamedSharding(mesh, P()))
        progress = _Progress(restored[1])
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    train_step = make_train_step(model, tx, data, config.seed, dtype, mesh)
    eval_step = make_eval_step(model, data, dtype, mesh)
    writer = _writer(workdir)
    last_saved = int(state.step)
    fusion_info: dict = {}

    for epoch in range(int(state.step) // spe, config.num_epochs):
        first_step = int(state.step) - epoch * spe
        if first_step == 0:
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
            state = state.replace(fusion=new_fusion)
            fusion_info = jax.device_get(info)
        step = epoch * spe + first_step  # counted on the host: no device sync per step
        window = _Window(time.time(), step)
        batches = input_pipeline.train_batches(
            data.train, config.batch_size, config.seed, epoch, first_step, spe
        )
        for images, labels in batches:
            state, metrics = train_step(state, *to_global(mesh, images, labels))
            window.add(metrics)
            step += 1
            at_epoch_end = step % spe == 0
            if step % config.log_every_steps == 0 or at_epoch_end:
                summary = window.flush(step, epoch, spe, config, last_saved, workdir)
                _write_scalars(writer, step, summary)
            if (
                config.checkpoint_every_steps > 0
                and step % config.checkpoint_every_steps == 0
                and not at_epoch_end
            ):
                window.check_finite(step, epoch, last_saved, workdir)
                checkpoints.save(mngr, step, state, progress.to_json())
                last_saved = step
        record = _end_of_epoch(
            config, epoch, state, eval_step, data, mesh, progress, fusion_info, window
        )
        _write_scalars(
            writer,
            int(state.step),
            {f"test/{k}": v for k, v in record.items() if isinstance(v, float)},
        )
        checkpoints.save(mngr, int(state.step), state, progress.to_json())
        last_saved = int(state.step)
        if record["new_best"]:
            checkpoints.save(best_mngr, int(state.step), state, progress.to_json())
            if jax.process_index() == 0:
                export.save_compact(os.path.join(workdir, "compact"), state, config, record)
    if writer is not None:
        writer.close()
    if jax.process_index() == 0:
        _final_report(config, workdir, progress)
    return progress.to_json()


def _end_of_epoch(
    config, epoch, state, eval_step, data, mesh, progress, fusion_info, window
) -> dict:
    result = evaluate(eval_step, state, data.test, config.batch_size, mesh)
    new_best = result["top1"] > progress.best_top1
    progress.best_top1 = max(progress.best_top1, result["top1"])
    changed = {k: int(v["changed"]) for k, v in fusion_info.items()}
    frozen = sum(bool(v["frozen"]) for v in fusion_info.values())
    record = {
        "epoch": epoch,
        "step": int(state.step),
        "temperature": float(
            fusion.temperature(epoch, config.num_epochs, config.t_start, config.t_end, config.t_k)
        ),
        "train_loss": window.epoch_loss(),
        "train_accuracy": window.epoch_accuracy(),
        "test_top1": result["top1"],
        "test_top5": result["top5"],
        "test_loss": result["loss"],
        "best_top1": progress.best_top1,
        "new_best": new_best,
        "filters_changed": changed,
        "frozen_layers": frozen,
    }
    progress.history.append(record)
    top5 = f" top-5 {result['top5']:.2f}%" if config.num_classes > 10 else ""
    logging.info(
        "epoch %d/%d: test top-1 %.2f%%%s (best %.2f%%), loss %.4f | T %.1f | "
        "filters changed %d in %d layers, %d layers frozen | per layer %s",
        epoch + 1,
        config.num_epochs,
        result["top1"],
        top5,
        progress.best_top1,
        result["loss"],
        record["temperature"],
        sum(changed.values()),
        sum(v > 0 for v in changed.values()),
        frozen,
        list(changed.values()),
    )
    return record


class _Window:
    """Train metrics accumulated on the device between log lines (no per-step host sync)."""

    def __init__(self, start_time: float, start_step: int):
        self.time, self.step = start_time, start_step
        self.sums: dict | None = None
        self.count = 0
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}

    def add(self, metrics):
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.count += 1

    def check_finite(self, step, epoch, last_saved, workdir):
        if self.sums is None:
            return
        loss, broken = float(self.sums["loss"]), float(self.sums["nonfinite_params"])
        if not math.isfinite(loss) or broken:
            what = (
                f"{loss}"
                if not math.isfinite(loss)
                else f"{loss} with {broken:.0f} non-finite parameters"
            )
            raise FloatingPointError(
                f"the training loss became {what} by step {step} (epoch {epoch + 1}): "
                f"stopping. The last good checkpoint (step {last_saved}) in "
                f"{os.path.join(workdir, 'checkpoints')} is kept; "
                "lower --config.learning_rate or check the data"
            )

    def flush(self, step, epoch, spe, config, last_saved, workdir) -> dict:
        if self.sums is None:
            return {}
        self.check_finite(step, epoch, last_saved, workdir)
        sums = jax.device_get(self.sums)
        now = time.time()
        images_per_s = (step - self.step) * config.batch_size / max(now - self.time, 1e-9)
        loss, acc = float(sums["loss"]) / self.count, float(sums["accuracy"]) / self.count
        self.epoch_sums["loss"] += float(sums["loss"])
        self.epoch_sums["accuracy"] += float(sums["accuracy"])
        self.epoch_sums["count"] += self.count
        remaining = config.num_epochs * spe - step
        eta = remaining * config.batch_size / max(images_per_s, 1e-9)
        logging.info(
            "epoch %d step %d/%d: loss %.4f, accuracy %.2f%%, %.1f images/s, ETA %s",
            epoch + 1,
            step - epoch * spe,
            spe,
            loss,
            100 * acc,
            images_per_s,
            _hms(eta),
        )
        self.sums, self.count, self.time, self.step = None, 0, now, step
        return {"train/loss": loss, "train/accuracy": acc, "train/images_per_sec": images_per_s}

    def epoch_loss(self) -> float:
        return self.epoch_sums["loss"] / max(self.epoch_sums["count"], 1)

    def epoch_accuracy(self) -> float:
        return 100.0 * self.epoch_sums["accuracy"] / max(self.epoch_sums["count"], 1)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


# Fields that decide the model, the data order or the schedule: a resumed run must keep them.
_RUN_DEFINING = (
    "model",
    "cprate",
    "criterion",
    "dataset",
    "batch_size",
    "num_epochs",
    "steps_per_epoch",
    "seed",
)


def _check_or_save_config(config, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [k for k in _RUN_DEFINING if k in saved and saved[k] != config.to_dict()[k]]
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different {', '.join(changed)} "
                f"(saved: {[saved[k] for k in changed]}, "
                f"now: {[config.to_dict()[k] for k in changed]}); "
                "use a new --workdir, or the saved values to resume"
            )
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json(indent=2))


def _writer(workdir: str):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _write_scalars(writer, step: int, scalars: dict) -> None:
    if writer is None:
        return
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    writer.flush()


def _final_report(config, workdir: str, progress: _Progress) -> None:
    from dcff_jax import flops, report

    counts = flops.model_counts(config.model, config.cprate or None)
    logging.info(
        "best test top-1 %.2f%%\n%s", progress.best_top1, flops.format_summary(config.model, counts)
    )
    layers = models.fused_layers(config.model, config.cprate or None)
    report.write_plots(
        workdir, progress.history, config, [(layer.kept, layer.filters) for layer in layers]
    )
