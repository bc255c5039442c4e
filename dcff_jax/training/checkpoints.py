"""Orbax checkpoints: save the train state + progress, resume from the newest readable one.

Layout under WORKDIR/checkpoints/<step>/: "state" (params, batch stats, optimizer state, fusion
state, step) and "progress" (JSON: epoch, best accuracy, per-epoch history). Orbax commits a
checkpoint atomically, so a process killed mid-write leaves no half-checkpoint behind. On
resume (restore_latest), a checkpoint whose data no process can decode is reported, moved aside
to WORKDIR/checkpoints_quarantine/ (so that its step can be saved again) and the previous one
used; an I/O error (unreachable storage, a timeout) is retried and then stops the run with
nothing moved; all processes restore the same step. Nothing here ever deletes a finished
checkpoint except orbax's max_to_keep rotation.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from dcff_jax import storage
from dcff_jax.errors import CheckpointError, ConfigError


def manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(storage.resolve(directory), options=options)


def latest_step(directory: str) -> int | None:
    """The newest committed step in `directory` (orbax's own rule: on object stores a step
    folder may exist before its save has committed), without creating anything."""
    path = storage.resolve(directory)
    if not path.exists():
        return None
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(path, options=options) as mngr:
        return mngr.latest_step()


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    state: Any,
    progress: dict,
    best: Any = None,
    wait: bool = True,
) -> None:
    """Save `state`, `progress` and optionally `best` (the best epoch's model variables).

    wait=False returns once the arrays are copied to the host and writes them in the background
    (orbax's async save); the caller may then donate the state's buffers, and must call
    mngr.wait_until_finished() before it relies on the checkpoint or exits.
    """
    items = {"state": ocp.args.StandardSave(state), "progress": ocp.args.JsonSave(progress)}
    if best is not None:
        items["best"] = ocp.args.StandardSave(best)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
        mngr.wait_until_finished()


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move an unreadable step out of the manager's directory (never delete it: it may be
    recoverable), so that the step can be saved again instead of failing with
    StepAlreadyExistsError on every restart. Returns where it went."""
    import jax

    source = epath.Path(mngr.directory) / str(step)
    aside = epath.Path(str(mngr.directory) + "_quarantine")
    target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        # A file first: on an object store a folder exists only once something is in it.
        storage.ensure_dir(aside)
        (aside / "README.txt").write_text(
            "Checkpoints found unreadable when the run resumed, moved here intact; see its log.\n"
        )
        source.rename(target)
    barrier(f"dcff_quarantine_{step}")
    mngr.reload()
    return target


class Timer:
    """Time-based checkpoints: due once `minutes` have passed since the last checkpoint.

    Asked at every call boundary of the train loop; with several processes process 0's clock
    decides (a broadcast), so every process saves at the same step; 0 minutes turns it off."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        if self.seconds <= 0:
            return False
        import jax

        due = time.monotonic() - self.last >= self.seconds
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due


def barrier(name: str) -> None:
    """Every process waits here for the others (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shape_mismatches(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> list[str]:
    """'name: saved (a, b), config (c, d)' for each array whose saved shape differs from the one
    the config builds (also arrays present on one side only); [] when the metadata is unreadable
    (then the checkpoint is damaged, not from another config)."""

    try:
        saved = ocp.StandardCheckpointer().metadata(
            epath.Path(mngr.directory) / str(step) / "state"
        )
        saved = _flat_shapes(getattr(saved, "item_metadata", saved).tree)
    except Exception:  # noqa: BLE001 - no readable metadata: a damaged checkpoint
        return []
    wanted = _flat_shapes(abstract_state)
    return [
        f"{name}: saved {saved.get(name, 'absent')}, config {wanted.get(name, 'absent')}"
        for name in sorted(set(saved) | set(wanted), key=lambda n: (not n.startswith("params"), n))
        if saved.get(name) != wanted.get(name)
    ]


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(leaf.shape)
        for path, leaf in flat
    }


def restore_latest(
    mngr: ocp.CheckpointManager, abstract_state: Any, abstract_best: Any = None
) -> tuple[Any, dict, Any] | None:
    """(state, progress, best) of the newest checkpoint every process can read, or None when
    there is none.

    best: the checkpoint's "best" item restored into `abstract_best`, or None when either is
    absent (checkpoints written before the best epoch's variables were saved have none).

    Each step is tried newest first, on every process, and the processes agree on the outcome
    (an all-gather), so they all resume from the same step:
      - read by all: restored;
      - damaged (its data read but failed to decode) on some process: skipped for an older
        step; once one restores, the newer steps that no process could read are moved aside
        (quarantine) and logged; a step another process read is never moved;
      - an I/O error (storage unreachable, a timeout, a 503), retried with backoff on the
        process that met it: the run stops with CheckpointError, naming the checkpoint; nothing
        is moved.
    When no step is readable, nothing is moved and CheckpointError says so.
    """
    damaged = []  # (step, error) that no process could read, newest first
    for step in sorted(mngr.all_steps(), reverse=True):
        check_shapes(mngr, step, abstract_state)
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "progress": ocp.args.JsonRestore(),
        }
        has_best = (epath.Path(mngr.directory) / str(step) / "best").exists()
        if abstract_best is not None and has_best:
            items["best"] = ocp.args.StandardRestore(abstract_best)
        restored, error = read_with_retries(mngr, step, ocp.args.Composite(**items))
        outcome = READ if error is None else IO_ERROR if is_io_error(error) else DAMAGED
        outcomes = agree(outcome)
        where = os.path.join(str(mngr.directory), str(step))
        if IO_ERROR in outcomes:
            raise CheckpointError(
                f"could not read checkpoint {where} (process(es) "
                f"{[i for i, o in enumerate(outcomes) if o == IO_ERROR]}: an I/O error"
                f"{f', {type(error).__name__}: {_first_line(error)}' if error else ''}), after "
                f"{len(RETRY_DELAYS_S) + 1} tries. Nothing was moved; run the same command "
                "again once the storage is reachable"
            )
        if all(o == READ for o in outcomes):
            _quarantine_all(mngr, damaged, step)
            best = restored["best"] if "best" in items else None
            return restored["state"], dict(restored["progress"]), best
        if all(o == DAMAGED for o in outcomes):
            damaged.append((step, error))
        else:  # read elsewhere: not this process's to move
            logging.error(
                "checkpoint %s could not be decoded on process(es) %s (%s); the others read "
                "it, so it is kept, and every process resumes from an older step",
                where,
                [i for i, o in enumerate(outcomes) if o == DAMAGED],
                _first_line(error) if error else "see that process's log",
            )
    if damaged:
        first = damaged[0][1]
        raise CheckpointError(
            f"no readable checkpoint in {mngr.directory}: steps "
            f"{sorted(s for s, _ in damaged)} all failed (newest: {type(first).__name__}: "
            f"{_first_line(first)}). Nothing was moved or deleted; restore the "
            "directory from a backup, or use a new --workdir"
        )
    return None


READ, DAMAGED, IO_ERROR = 0, 1, 2
RETRY_DELAYS_S = (1.0, 4.0, 15.0)  # backoff between tries after an I/O error
# Errors of storage clients that mean "try again" (google-api-core, gcsfs, aiohttp), by name:
# none of these packages is needed to recognise them.
_TRANSIENT_NAMES = {
    "ServiceUnavailable",
    "TooManyRequests",
    "InternalServerError",
    "GatewayTimeout",
    "DeadlineExceeded",
    "RetryError",
    "HttpError",
    "TransportError",
    "ClientError",
    "ClientConnectionError",
    "ServerDisconnectedError",
}
# Status words tensorstore puts first in the ValueErrors it raises for failed I/O: the storage
# did not answer, or refused us (access is not damage).
_TRANSIENT_STATUS = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
)


def is_io_error(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a failure to reach the data, not data
    that failed to decode. A file missing from a committed checkpoint is damage."""
    while error is not None:
        missing = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        if isinstance(error, OSError) and not isinstance(error, missing):
            return True
        if type(error).__name__ in _TRANSIENT_NAMES or str(error).startswith(_TRANSIENT_STATUS):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_step(mngr: ocp.CheckpointManager, step: int, args) -> Any:
    """One process's read of a step: no barrier with the others (orbax's restore waits for
    every process, which would hang the processes that read it while one failed)."""
    import jax

    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        ),
    )
    with ocp.CheckpointManager(mngr.directory, options=options) as reader:
        return reader.restore(step, args=args)


class _OrphanedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's array reads: when one
    read of a checkpoint fails, its sibling reads fail too, and asyncio logs each one whose
    error nobody awaited (with a traceback) whenever the task is collected, even after the run
    has stopped in one line. The restore raises the first of them, which read_with_retries
    reports; the rest say the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Task exception was never retrieved")
            and "coro=<async_deserialize()" in message
        )


_ORPHANED_READS = _OrphanedReads()


def read_with_retries(mngr, step: int, args) -> tuple[Any, BaseException | None]:
    """(restored, None), or (None, the error): I/O errors retried after RETRY_DELAYS_S."""
    logging.getLogger("asyncio").addFilter(_ORPHANED_READS)  # once: a filter is added once
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return read_step(mngr, step, args), None
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            if delay is None or not is_io_error(e):
                return None, e
            logging.warning(
                "reading checkpoint %s/%d: %s; trying again in %.0f s",
                mngr.directory,
                step,
                _first_line(e),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def agree(outcome: int) -> list[int]:
    """Every process's outcome, in process order (an all-gather; [outcome] with one)."""
    import jax

    if jax.process_count() == 1:
        return [outcome]
    import numpy as np
    from jax.experimental import multihost_utils

    return [int(o) for o in multihost_utils.process_allgather(np.int32(outcome))]


def check_shapes(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Shapes first, from the metadata: a checkpoint of another config is the user's to fix,
    not a damaged one (and a restore into the wrong shapes fails noisily in orbax's tasks)."""
    mismatch = shape_mismatches(mngr, step, abstract_state)
    if mismatch:
        raise ConfigError(
            f"checkpoint {os.path.join(str(mngr.directory), str(step))} was saved by a "
            f"run with another config: {'; '.join(mismatch[:5])}"
            f"{f' (and {len(mismatch) - 5} more)' if len(mismatch) > 5 else ''}; "
            "resume with that run's config (WORKDIR/config.json) or use a new --workdir"
        )


def _quarantine_all(mngr, damaged: list, restored_step: int) -> None:
    """Move aside the newer steps no process could read, now that an older one restored."""
    for bad, error in damaged:
        moved = quarantine(mngr, bad)
        logging.error(
            "checkpoint %s is corrupt (%s: %s); moved it to %s and resumed from step %d",
            os.path.join(str(mngr.directory), str(bad)),
            type(error).__name__,
            _first_line(error)[:300],
            moved,
            restored_step,
        )


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]
