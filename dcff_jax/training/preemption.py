"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C: finish the step, save, exit.

One process: our own handlers set a flag that the loop checks after every step. Several
processes (jax.distributed): SIGTERM goes through JAX's preemption notifier, and
`reached_preemption_sync_point` makes every process agree on the step to stop at; a SIGINT there
is not synchronised, so it stops that process at once (the others then exit as for a lost peer).
A second SIGINT always exits at once.
"""

from __future__ import annotations

import signal
import sys

import jax

# Exit status after a stop the same command resumes from (EX_TEMPFAIL): a stop signal, or in a
# multi-process run a lost peer (dcff_jax.main).
EXIT_STOPPED = 75


class StopRequest:
    """Install with `install()`; `stop_at(step)` after each step says whether to stop there."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        multi = jax.process_count() > 1
        # Under jax.distributed, JAX's own notifier owns SIGTERM: leave it alone.
        signals = (signal.SIGINT,) if multi else (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        del frame
        if self.signal_name is not None or jax.process_count() > 1:
            sys.stderr.write("stopping at once, without a checkpoint\n")
            sys.exit(128 + signum)
        self.signal_name = signal.Signals(signum).name
        sys.stderr.write(
            f"{self.signal_name}: finishing this step and saving a checkpoint "
            "(press Ctrl-C again to stop at once)\n"
        )

    def stop_at(self, step: int) -> bool:
        """Whether to stop after `step`; a collective with several processes (call it on all)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
                return True
            return False
        return self.signal_name is not None
