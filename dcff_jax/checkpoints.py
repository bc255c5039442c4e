"""Orbax checkpoints: save the train state + progress, resume from the newest readable one.

Layout under WORKDIR/checkpoints/<step>/: "state" (params, batch stats, optimizer state, fusion
state, step) and "progress" (JSON: epoch, best accuracy, per-epoch history). Orbax commits a
checkpoint atomically, so a process killed mid-write leaves no half-checkpoint behind; a
checkpoint that is present but unreadable (corrupted on disk) is reported, moved aside to
WORKDIR/checkpoints_quarantine/ (so that its step can be saved again) and the previous one used.
Nothing here ever deletes a finished checkpoint except orbax's max_to_keep rotation.
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
    """(state, progress, best) of the newest readable checkpoint, or None when there is none.

    best: the checkpoint's "best" item restored into `abstract_best`, or None when either is
    absent (checkpoints written before the best epoch's variables were saved have none).

    An unreadable checkpoint is skipped in favour of the one before it, and once an older one has
    restored it is moved aside (quarantine) and logged with its path. When none is readable,
    nothing is moved and CheckpointError says so.
    """
    unreadable = []  # (step, error), newest first
    for step in sorted(mngr.all_steps(), reverse=True):
        # Shapes first, from the metadata: a checkpoint of another config is the user's to fix,
        # not a corrupt one (and a restore into the wrong shapes fails noisily in orbax's tasks).
        mismatch = shape_mismatches(mngr, step, abstract_state)
        if mismatch:
            raise ConfigError(
                f"checkpoint {os.path.join(str(mngr.directory), str(step))} was saved by a "
                f"run with another config: {'; '.join(mismatch[:5])}"
                f"{f' (and {len(mismatch) - 5} more)' if len(mismatch) > 5 else ''}; "
                "resume with that run's config (WORKDIR/config.json) or use a new --workdir"
            )
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "progress": ocp.args.JsonRestore(),
        }
        has_best = (epath.Path(mngr.directory) / str(step) / "best").exists()
        if abstract_best is not None and has_best:
            items["best"] = ocp.args.StandardRestore(abstract_best)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            unreadable.append((step, e))
            continue
        # Only now that an older step restored: move the newer unreadable ones aside.
        for bad, error in unreadable:
            moved = quarantine(mngr, bad)
            logging.error(
                "checkpoint %s is corrupt or unreadable (%s: %s); moved it to %s and resumed "
                "from step %d",
                os.path.join(str(mngr.directory), str(bad)),
                type(error).__name__,
                str(error)[:300],
                moved,
                step,
            )
        best = restored["best"] if "best" in items else None
        return restored["state"], dict(restored["progress"]), best
    if unreadable:
        first = unreadable[0][1]
        raise CheckpointError(
            f"no readable checkpoint in {mngr.directory}: steps "
            f"{sorted(s for s, _ in unreadable)} all failed (newest: {type(first).__name__}: "
            f"{str(first).splitlines()[0][:200]}). Nothing was moved or deleted; restore the "
            "directory from a backup, or use a new --workdir"
        )
    return None
