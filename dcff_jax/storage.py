"""Where a run's files live: a local directory or Google Cloud Storage (gs://), via etils.epath.

All workdir I/O (checkpoints, config.json, TensorBoard events, plots, the compact export) goes
through these paths, so `--workdir=gs://bucket/run` works like a local directory. epath reaches
gs:// through gcsfs (`pip install 'dcff-jax[gcs]'`); orbax writes the arrays through
tensorstore's own GCS driver.

Object stores have no atomic rename (a rename is a copy, then a delete) and no directories
(a "directory" exists while an object has its prefix). So nothing here relies on renaming a
directory into place: new versions are written beside the old and a small pointer object,
written last, says which one is current (see dcff_jax.deploy.versions).
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from etils import epath

from dcff_jax.errors import ConfigError, DataError, MissingFileError

# The URI schemes supported, and the package each needs. gs:// alone is tested (against a local
# GCS emulator); epath reaches other stores too, but nothing here has been tried on them.
_BACKENDS = {"gs": "gcsfs"}


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """An epath.Path: a URI as given, a local path made absolute (so it survives a chdir)."""
    path = os.fspath(path)
    if is_remote(path):
        check_backend(path)
        return epath.Path(path)
    return epath.Path(os.path.abspath(path))


def check_backend(path: str) -> None:
    """Raise ConfigError, before anything runs, when a URI's filesystem package is missing."""
    scheme = path.split("://", 1)[0]
    package = _BACKENDS.get(scheme)
    if package is None:
        raise ConfigError(f"{path}: {scheme}:// is not supported; use a local path or gs://")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{path} needs the {package} package for {scheme}:// paths, which is not installed: "
            "pip install 'dcff-jax[gcs]'"
        )


def read_json_object(path: epath.Path, what: str, remedy: str) -> dict:
    """The JSON object in the file at `path` (`what` it holds, e.g. "a run's config").

    Raises:
      MissingFileError: no such file.
      DataError: bytes that are not UTF-8 JSON, or JSON that is not an object; the message
        ends with `remedy` (what the user can do).
    """
    import json

    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__} where an object belongs")
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist; {remedy}") from e
    except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(
            f"{path} is not valid JSON for {what} ({type(e).__name__}: {e}); {remedy}"
        ) from e
    return data


def write_text_atomic(path: epath.Path, data: str | bytes | bytearray) -> None:
    """Readers see the old or the new contents (text or bytes), never a partial one: an
    object-store upload is atomic already; a local file is written beside it and renamed over
    it."""

    def write(target: epath.Path) -> None:
        if isinstance(data, (bytes, bytearray)):
            target.write_bytes(data)
        else:
            target.write_text(data)

    if is_remote(path):
        write(path)
        return
    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    write(staging)
    os.replace(staging, path)


def ensure_dir(path: epath.Path) -> epath.Path:
    """Make the directory (a no-op on object stores, where prefixes need no creation)."""
    path.mkdir(parents=True, exist_ok=True)
    return path
