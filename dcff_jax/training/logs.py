"""Metrics and logging of a run: train windows, epoch lines, TensorBoard scalars.

TensorBoard namespaces: train/ (per log window: loss, accuracy, images_per_sec; per epoch:
epoch_loss, epoch_accuracy), test/ (top1, top5, loss, best_top1) and fusion/ (temperature,
filters_changed, frozen_layers). Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import jax

from dcff_jax.errors import DivergedError


class TrainWindow:
    """Train metrics between log lines, added once per jitted call (one host read per call)."""

    def __init__(self, start_step: int):
        self.time, self.step = time.time(), start_step
        self.sums = {"loss": 0.0, "accuracy": 0.0, "nonfinite_params": 0.0}
        self.count = 0
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}

    def add(self, sums: dict) -> None:
        """A call's metrics summed over its steps ("steps" says how many), on host or device."""
        sums = jax.device_get(sums)
        for name in self.sums:
            self.sums[name] += float(sums[name])
        self.count += int(sums["steps"])

    def check_finite(self, step: int, epoch: int, last_checkpoint: Callable[[], str]) -> None:
        """Raise DivergedError (a FloatingPointError) on a non-finite loss or parameter in this
        window; last_checkpoint() says which checkpoint on disk is the last good one."""
        loss, broken = self.sums["loss"], self.sums["nonfinite_params"]
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
        if not self.count:
            return {}
        sums = self.sums
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
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.count, self.time, self.step = 0, now, step
        return {"train/loss": loss, "train/accuracy": acc, "train/images_per_sec": images_per_s}

    def epoch_loss(self) -> float:
        return self.epoch_sums["loss"] / max(self.epoch_sums["count"], 1)

    def epoch_accuracy(self) -> float:
        return 100.0 * self.epoch_sums["accuracy"] / max(self.epoch_sums["count"], 1)


class EpochClock:
    """Where an epoch's wall time goes: the time inside train and eval calls (measured until
    their results are read), and the rest ("outside": fusion updates, checkpoints, logging)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.spent = {"train": 0.0, "eval": 0.0}

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] += time.perf_counter() - start

    def lap(self) -> dict[str, float]:
        """Seconds since the last lap (or the start): epoch, train, eval, outside; restarts."""
        now = time.perf_counter()
        epoch = now - self.start
        lap = {"epoch": epoch, **self.spent, "outside": epoch - sum(self.spent.values())}
        self.start, self.spent = now, dict.fromkeys(self.spent, 0.0)
        return lap


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def log_epoch(record: dict, num_epochs: int, show_top5: bool) -> None:
    """The end-of-epoch line: accuracy, temperature and what the epoch's fusion update did."""
    changed = record["filters_changed"]
    top5 = f" top-5 {record['test_top5']:.2f}%" if show_top5 else ""
    seconds = record["seconds"]
    logging.info(
        "epoch %d/%d: test top-1 %.2f%%%s (best %.2f%%), loss %.4f, %.1f s (%.1f%% outside the "
        "train and eval steps) | T %.1f | filters changed %d in %d layers, %d layers frozen | "
        "per layer %s",
        record["epoch"] + 1,
        num_epochs,
        record["test_top1"],
        top5,
        record["best_top1"],
        record["test_loss"],
        seconds["epoch"],
        100 * seconds["outside"] / max(seconds["epoch"], 1e-9),
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
