"""A run's config.json: written with the first checkpoint of each start, and checked when the
run resumes (a resumed run keeps every run-defining field)."""

from __future__ import annotations

import json
from typing import Any

import jax

from dcff_jax import storage
from dcff_jax.errors import ConfigError

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
        "data_placement",
        "steps_per_call",
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


def check_resumable(config, workdir: str) -> None:
    """Refuse to resume a workdir whose saved run differs in a run-defining field."""
    path = storage.resolve(workdir) / "config.json"
    if not path.exists():
        return
    remedy = "restore it from the run's first start, or use a new --workdir"
    saved = storage.read_json_object(path, "a run's config", remedy)
    changed = changed_run_fields(saved, config.to_dict())
    if changed:
        listed = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(
            f"{workdir} holds a run with different settings ({listed}); resume with the saved "
            "values or use a new --workdir"
        )


def save_config(config, workdir: str) -> None:
    """config.json, written by process 0 with the first checkpoint of each start (so a run that
    failed before saving anything can be retried with other values)."""
    if jax.process_index() == 0:
        storage.write_text_atomic(
            storage.resolve(workdir) / "config.json", config.to_json(indent=2)
        )
