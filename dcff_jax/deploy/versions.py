"""Versioned exports: WORKDIR/compact/LATEST names the current version, v<N>/ holds it
(variables/, metadata.json, model.stablehlo, model.onnx), with the SHA-256 of every file a
native parser reads recorded in metadata.json and checked before it is parsed.

Object stores have no atomic rename, so a version is complete before LATEST names it, and
LATEST is written last, in one write (dcff_jax.storage).
"""

from __future__ import annotations

from dcff_jax.errors import DataError, MissingFileError

# The compact export's layout: DIRECTORY/LATEST names the current version, DIRECTORY/v<N>/ holds
# it (variables/ and metadata.json). LATEST is written last, in one write, so a reader never
# sees a half-written version, on a local disk or on an object store without atomic renames.
POINTER = "LATEST"
KEEP_VERSIONS = 2  # the current one and the one before (a reader may be loading it)


METADATA_REMEDY = "restore the file or export the model again"
# metadata.json's fields that readers use: (type, lowest, highest) for numbers.
_METADATA_FIELDS = {
    "architecture": (str, None, None),
    "cprate": (str, None, None),  # or null
    "num_classes": (int, 1, 1 << 20),
    "image_size": (int, 1, 1 << 14),
    "dataset": (str, None, None),
}


def read_metadata(path) -> dict:
    """An export's metadata.json, with the fields readers use checked (types, ranges).

    Raises:
      MissingFileError: no such file.
      DataError: not a JSON object, or a field missing or out of range."""
    from dcff_jax import storage
    from dcff_jax.errors import expect

    metadata = storage.read_json_object(path, "a dcff-jax export's metadata", METADATA_REMEDY)
    for key, (kind, low, high) in _METADATA_FIELDS.items():
        if key == "cprate" and metadata.get(key) is None:
            continue
        try:
            expect(metadata.get(key), kind, key, low, high)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: {e}; {METADATA_REMEDY}") from e
    return metadata


def latest_version(root) -> str | None:
    """The version LATEST names ('v3'), or None before the first export."""
    pointer = root / POINTER
    if not pointer.exists():
        return None
    version = pointer.read_text().strip()
    if not (version.startswith("v") and version[1:].isdigit()):
        raise DataError(f"{pointer} names {version!r}, not an export version (v1, v2, ...)")
    return version


def remove_old_versions(root, keep: str) -> None:
    versions = sorted(
        (int(p.name[1:]) for p in root.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()),
        reverse=True,
    )
    for number in versions:
        if number <= int(keep[1:]) - KEEP_VERSIONS:
            (root / f"v{number}").rmtree()


# metadata.json's {file name: SHA-256 hex} of the files native parsers read (StableHLO, ONNX):
# a damaged file must be refused before it reaches C++ code that Python cannot catch.
DIGESTS = "sha256"


def with_digest(metadata: dict, name: str, data: bytes) -> dict:
    """A copy of `metadata` recording data's SHA-256 as the digest of file `name`."""
    import hashlib

    digests = metadata.get(DIGESTS)
    digests = dict(digests) if isinstance(digests, dict) else {}
    return {**metadata, DIGESTS: {**digests, name: hashlib.sha256(data).hexdigest()}}


def write_beside_metadata(version, name: str, data: bytes, metadata: dict) -> None:
    """Write version/name, then version/metadata.json recording its digest, each atomically.
    Interrupted between the two, the file and its digest disagree and readers refuse it with
    a line that says to write it again."""
    import json

    from dcff_jax import storage

    storage.write_text_atomic(version / name, data)
    storage.write_text_atomic(
        version / "metadata.json", json.dumps(metadata, indent=2, default=str)
    )


def read_verified(path: str) -> tuple[bytes, dict]:
    """(bytes, metadata) of an export's file and the metadata.json beside it (read_metadata),
    refused with DataError unless metadata.json records the file's SHA-256 and the bytes match
    it; MissingFileError if either file is missing."""
    import hashlib

    from etils import epath

    file = epath.Path(path)
    meta_path = file.parent / "metadata.json"
    try:
        data = file.read_bytes()
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist") from e
    metadata = read_metadata(meta_path)
    digests = metadata.get(DIGESTS)
    expected = digests.get(file.name) if isinstance(digests, dict) else None
    rewrite = (
        "python -m dcff_jax.export_onnx"
        if file.name.endswith(".onnx")
        else "python -m dcff_jax.export_stablehlo"
    ) + f" --checkpoint={file.parent.parent}"
    if expected is None:
        raise DataError(
            f"{meta_path} records no SHA-256 for {file.name} (written before dcff-jax checked "
            f"them, or edited): write the file again with {rewrite}"
        )
    if hashlib.sha256(data).hexdigest() != expected:
        raise DataError(
            f"{path} does not match the SHA-256 in {meta_path}: it was damaged or changed "
            f"after it was written; write it again with {rewrite}"
        )
    return data, metadata


def current_version_dir(directory: str):
    """The epath of the current export version under `directory` (WORKDIR/compact)."""
    from dcff_jax import storage

    return export_version(storage.resolve(directory), directory)


def export_version(root, given: str):
    """The directory holding the current export under `root`: the version LATEST names, or
    root itself for an export written before versions (metadata.json directly inside)."""
    version = latest_version(root)
    if version is not None:
        return root / version
    if (root / "metadata.json").exists():
        return root
    raise MissingFileError(
        f"{given} is not a compact export: no {POINTER} or metadata.json (expected WORKDIR/compact)"
    )
