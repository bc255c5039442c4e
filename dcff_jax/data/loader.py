"""Batches: the per-epoch permutation, train and eval batches, grain worker processes (with
SIGINT masked) and a background prefetch; the step counts."""

from __future__ import annotations

import dataclasses
import functools
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import resource_tracker
from typing import Any

import jax
import numpy as np

from dcff_jax.data.image_files import stack_examples
from dcff_jax.data.sources import Split
from dcff_jax.errors import ConfigError

# --- Batching (host) ------------------------------------------------------------------------


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training set in an epoch: depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    split: Split,
    global_batch: int,
    seed: int,
    epoch: int,
    start_step: int,
    num_steps: int,
    last_batch: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's slices of the epoch's global batches, from `start_step` (for resume).

    Each process yields 1 / process_count of every global batch. Steps 0..num_steps-1 take
    `global_batch` examples in the epoch's order, except that with last_batch > 0 the final step
    takes the `last_batch` examples left over (see last_batch_size).
    """
    order = epoch_permutation(split.num_examples, seed, epoch)
    index_batches = []
    for step in range(start_step, num_steps):
        size = last_batch if last_batch and step == num_steps - 1 else global_batch
        local = size // jax.process_count()
        start = step * global_batch + jax.process_index() * local
        index_batches.append(order[start : start + local])
    return load_batches(split, index_batches, epoch)


def load_batches(
    split: Split, index_batches: list[np.ndarray], epoch: int, threads_per_worker: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """split.load of each index array in order: in grain worker processes when the split has
    workers (each makes whole batches; order kept; workers ignore SIGINT, so Ctrl-C reaches
    only this process), else here.

    Each worker builds one batch at a time (threads_per_worker=1) and keeps one ready: a worker
    is one core, and a worker holds 2 batches, not grain's default of 16 threads and up to 500
    batches in flight (gigabytes per worker for ImageNet batches).
    """
    if not (split.workers and split.example is not None):
        for indices in index_batches:
            yield split.load(indices, epoch)
        return
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its own absl flags (programmatic use)
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.source(index_batches).map(
        functools.partial(_load_in_worker, split.example, epoch)
    )
    options = grain.MultiprocessingOptions(num_workers=split.workers)
    read = grain.ReadOptions(num_threads=threads_per_worker, prefetch_buffer_size=1)
    iterator = iter(dataset.to_iter_dataset(read).mp_prefetch(options, worker_init_fn=_worker_init))
    try:
        # Workers start here. A Ctrl-C while one is still importing (before _worker_init runs)
        # would kill it, so they are started with SIGINT blocked in this thread: the processes
        # and helper threads it creates inherit the block, and a Ctrl-C meanwhile reaches
        # this process as soon as the first batch is in.
        first = _with_sigint_blocked(lambda: next(iterator, _END))
        if first is not _END:
            yield first
            yield from iterator
    finally:
        iterator.close()  # stops the workers, also when the consumer stops early


_END = object()


def _with_sigint_blocked(fn: Callable[[], Any]) -> Any:
    """fn() with SIGINT blocked in the calling thread (deferred, not lost), where POSIX allows."""
    if not hasattr(signal, "pthread_sigmask"):
        return fn()
    # The thread that starts multiprocessing's resource tracker leaves with SIGINT unblocked
    # (CPython's ensure_running unblocks it unconditionally); started first, outside the
    # block, it is not started again by a thread inside it.
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return fn()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _load_in_worker(example, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return stack_examples([example(i, epoch) for i in indices])


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prefetch(batches: Iterable, place: Callable, size: int = 2) -> Iterator:
    """`place(batch)` for each batch, in order, computed up to `size` batches ahead by a
    background thread: loading (decoding, cropping) and the host-to-device copy of the next
    batches overlap the device's work on this one (double-buffered at size 2).

    An exception while producing a batch is raised here where that batch would have come;
    closing the iterator early (a stop signal, an error in the loop) stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=size)
    closed = threading.Event()
    done = object()

    def put(item) -> bool:
        while not closed.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in batches:
                if not put(place(batch)):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, raised there
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        closed.set()
        thread.join()


@dataclasses.dataclass
class _Failed:
    error: BaseException


def last_batch_size(split: Split, global_batch: int, devices: int, drop_last: bool) -> int:
    """The global size of an epoch's final partial batch, 0 when there is none.

    The published loaders keep it (PyTorch DataLoader, drop_last=False: 196 steps of CIFAR-10 at
    batch 256, the last of 80 images, whose batch-norm statistics are over those 80). It is split
    evenly over the devices, so it keeps a multiple of `devices` examples (80 on 1-16 devices;
    with more, the few left over are dropped, as is a batch that would be smaller than that).
    """
    if drop_last:
        return 0
    left = split.num_examples % global_batch
    return left - left % devices


def eval_batches(
    split: Split, global_batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """This process's slices of the test set in order; the last batch is padded, with a mask."""
    local = global_batch // jax.process_count()
    offset = jax.process_index() * local
    starts = range(offset, split.num_examples + offset, global_batch)
    wanted = [np.arange(start, start + local) for start in starts]
    valid = [w < split.num_examples for w in wanted]
    index_batches = [np.where(v, w, 0) for w, v in zip(wanted, valid, strict=True)]
    for (images, labels), mask in zip(load_batches(split, index_batches, 0), valid, strict=True):
        yield images, labels, mask


def steps_per_epoch(split: Split, global_batch: int, cap: int = -1, last_batch: int = 0) -> int:
    """Steps of an epoch: the full global batches, plus one when a partial last batch of
    `last_batch` examples is kept; at most `cap` (> 0), which then leaves the partial one out."""
    steps = split.num_examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"the training set has {split.num_examples} examples, fewer than one global batch "
            f"of {global_batch}: lower --config.batch_size"
        )
    if cap > 0 and cap <= steps:
        return cap
    return steps + (1 if last_batch else 0)
