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
from typing import Any

import orbax.checkpoint as ocp

from dcff_jax.errors import CheckpointError


def manager(directory: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, progress: dict) -> None:
    """Save synchronously (the next step may donate the state's buffers)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
        ),
        force=True,
    )
    mngr.wait_until_finished()


def quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move an unreadable step out of the manager's directory (never delete it: it may be
    recoverable), so that the step can be saved again instead of failing with
    StepAlreadyExistsError on every restart. Returns where it went."""
    import time

    import jax

    source = os.path.join(str(mngr.directory), str(step))
    target = os.path.join(
        str(mngr.directory) + "_quarantine", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
    barrier(f"dcff_quarantine_{step}")
    mngr.reload()
    return target


def barrier(name: str) -> None:
    """Every process waits here for the others (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, progress) of the newest readable checkpoint, or None when there is none.

    An unreadable checkpoint is logged with its path and skipped in favour of the one before it.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            moved = quarantine(mngr, step)
            logging.error(
                "checkpoint %s is corrupt or unreadable (%s: %s); moved it to %s and falling "
                "back to the previous one",
                os.path.join(str(mngr.directory), str(step)),
                type(e).__name__,
                str(e)[:300],
                moved,
            )
            continue
        return restored["state"], dict(restored["progress"])
    if mngr.all_steps():
        raise CheckpointError(
            f"no readable checkpoint in {mngr.directory} "
            f"(all of {sorted(mngr.all_steps())} failed); "
            "start a new run in another --workdir, or restore the directory from a backup"
        )
    return None
