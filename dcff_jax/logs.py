"""Metrics and logging of a run: train windows, epoch lines, TensorBoard scalars.

TensorBoard namespaces: train/ (per log window: loss, accuracy, images_per_sec; per epoch:
epoch_loss, epoch_accuracy), test/ (top1, top5, loss, best_top1) and fusion/ (temperature,
filters_changed, frozen_layers). Only process 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dcff_jax.errors import DivergedError


class TrainWindow:
    """Train metrics accumulated on the device between log lines (no per-step host sync)."""

    def __init__(self, start_step: int):
        self.time, self.step = time.time(), start_step
        self.sums: dict | None = None
        self.count = 0
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}

    def add(self, metrics: dict) -> None:
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.count += 1

    def check_finite(self, step: int, epoch: int, last_checkpoint: Callable[[], str]) -> None:
        """Raise DivergedError (a FloatingPointError) on a non-finite loss or parameter in this
        window; last_checkpoint() says which checkpoint on disk is the last good one."""
        if self.sums is None:
            return
        loss, broken = float(self.sums["loss"]), float(self.sums["nonfinite_params"])
        if math.isfinite(loss) and not broken:
            return
        what = (
            f"{loss}"
            if not math.isfinite(loss)
            else f"{loss} with {broken:.0f} non-finite parameters"
        )
        raise DivergedError(
            f"the training loss became {what} by step {step} (epoch {epoch + 1}): stopping. "
            f"{last_checkpoint()}; lower --config.learning_rate or check the data"
        )

    def flush(self, step: int, epoch: int, steps_per_epoch: int, total_steps: int, batch: int):
        """Log the window's means and start a new window; the train/ scalars."""
        if self.sums is None:
            return {}
        sums = jax.device_get(self.sums)
        now = time.time()
        images_per_s = (step - self.step) * batch / max(now - self.time, 1e-9)
        loss, acc = float(sums["loss"]) / self.count, float(sums["accuracy"]) / self.count
        self.epoch_sums["loss"] += float(sums["loss"])
        self.epoch_sums["accuracy"] += float(sums["accuracy"])
        self.epoch_sums["count"] += self.count
        eta = (total_steps - step) * batch / max(images_per_s, 1e-9)
        logging.info(
            "epoch %d step %d/%d: loss %.4f, accuracy %.2f%%, %.1f images/s, ETA %s",
            epoch + 1,
            step - epoch * steps_per_epoch,
            steps_per_epoch,
            loss,
            100 * acc,
            images_per_s,
            hms(eta),
        )
        self.sums, self.count, self.time, self.step = None, 0, now, step
        return {"train/loss": loss, "train/accuracy": acc, "train/images_per_sec": images_per_s}

    def epoch_loss(self) -> float:
        return self.epoch_sums["loss"] / max(self.epoch_sums["count"], 1)

    def epoch_accuracy(self) -> float:
        return 100.0 * self.epoch_sums["accuracy"] / max(self.epoch_sums["count"], 1)


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_epoch(record: dict, num_epochs: int, show_top5: bool) -> None:
    """The end-of-epoch line: accuracy, temperature and what the epoch's fusion update did."""
    changed = record["filters_changed"]
    top5 = f" top-5 {record['test_top5']:.2f}%" if show_top5 else ""
    logging.info(
        "epoch %d/%d: test top-1 %.2f%%%s (best %.2f%%), loss %.4f | T %.1f | "
        "filters changed %d in %d layers, %d layers frozen | per layer %s",
        record["epoch"] + 1,
        num_epochs,
        record["test_top1"],
        top5,
        record["best_top1"],
        record["test_loss"],
        record["temperature"],
        sum(changed.values()),
        sum(v > 0 for v in changed.values()),
        record["frozen_layers"],
        list(changed.values()),
    )


def epoch_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of an epoch record, by namespace."""
    return {
        "test/top1": record["test_top1"],
        "test/top5": record["test_top5"],
        "test/loss": record["test_loss"],
        "test/best_top1": record["best_top1"],
        "train/epoch_loss": record["train_loss"],
        "train/epoch_accuracy": record["train_accuracy"],
        "fusion/temperature": record["temperature"],
        "fusion/filters_changed": float(sum(record["filters_changed"].values())),
        "fusion/frozen_layers": float(record["frozen_layers"]),
    }


class Writer:
    """TensorBoard scalars under WORKDIR/tensorboard, written by process 0 only."""

    def __init__(self, workdir: str):
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            from dcff_jax import storage

            # tensorboardX writes gs:// itself (google-cloud-storage, part of the gcs extra).
            self._writer = SummaryWriter(str(storage.resolve(workdir) / "tensorboard"))

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
