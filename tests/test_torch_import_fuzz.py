"""Seeded mutations of the real published checkpoint: torch_import.read_state_dict gives the state
dict the file describes, each tensor re-derived here with explicit bounds checks, or one DataError;
never another exception, and never a read outside a storage.

DCFF_FUZZ_MUTATIONS=N runs N mutations per kind (default 25: 150 in all, ~20 s).
"""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from fuzzing import MUTATIONS, flip_bytes, fuzz, ops, replace_ints, str_op, truncate

from dcff_jax.deploy import torch_import
from dcff_jax.errors import DataError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "published_resnet56_compact.pt")
PICKLE = "model_best_compact/data.pkl"


def members() -> dict[str, bytes]:
    with zipfile.ZipFile(FIXTURE) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def zipped(files: dict[str, bytes], base: bytes | None = None) -> bytes:
    """A zip of `files`; with `base` (a zip of every file but the pickle), the pickle is
    appended to a copy of it (the reader finds */data.pkl by name)."""
    buffer = io.BytesIO(base or b"")
    with zipfile.ZipFile(buffer, "a" if base else "w", zipfile.ZIP_STORED) as archive:
        for name, data in files.items() if base is None else [(PICKLE, files[PICKLE])]:
            archive.writestr(name, data)
    return buffer.getvalue()


def mutate(kind: str, files: dict[str, bytes], rng: np.random.Generator, cache: dict) -> bytes:
    """One seeded mutation of the checkpoint, as zip bytes. cache: the fixture's opcodes and a
    zip of its other files, made on first use."""
    if not cache:
        cache["ops"] = ops(files[PICKLE])
        cache["base"] = zipped({k: v for k, v in files.items() if k != PICKLE})
    files, base = dict(files), cache["base"]
    data = files[PICKLE]
    if kind == "int":  # offsets, sizes, strides, counts
        data = replace_ints(data, rng, cache["ops"])
    elif kind == "string":  # storage types and keys
        targets = [o for o in cache["ops"] if o[0] == "BINUNICODE"]
        chosen = rng.choice(len(targets), size=rng.integers(1, 3), replace=False)
        for _, _, start, end in sorted((targets[i] for i in chosen), key=lambda o: -o[2]):
            data = data[:start] + replacement(rng) + data[end:]
    elif kind == "bytes":
        data = flip_bytes(data, rng)
    elif kind == "truncate":
        data = truncate(data, rng)
    elif kind == "storage":
        base = None
        storages = [n for n in files if "/data/" in n]
        name = storages[rng.integers(len(storages))]
        choice = rng.integers(4)
        if choice == 0:
            del files[name]
        elif choice == 1:
            files[name] = files[name][: rng.integers(len(files[name]) + 1)]
        elif choice == 2:
            files[name] += bytes(rng.integers(1, 9))
        else:
            files["model_best_compact/data/9999"] = b"\0" * 64
    files[PICKLE] = data
    blob = zipped(files, base)
    if kind == "archive":  # the zip itself: CRCs, headers, the central directory
        blob = flip_bytes(blob, rng)
        blob = blob if rng.random() < 0.7 else truncate(blob, rng)
    return blob


def replacement(rng: np.random.Generator) -> bytes:
    choices = [*torch_import._DTYPES, "Storage", "0", "1", "331", "999", "../data.pkl", ""]
    return str_op(str(rng.choice(choices)))


def rederived(storage, offset, size, stride) -> np.ndarray:
    """The tensor as flat indices into the storage, each checked to be inside it."""
    if not size:
        index = np.asarray(offset)
    else:
        grid = np.indices(tuple(size), dtype=np.int64)
        index = offset + sum(g * s for g, s in zip(grid, stride, strict=True))
    assert index.size == 0 or (index.min() >= 0 and index.max() < len(storage)), "out of bounds"
    return storage[index]


KINDS = ("int", "string", "bytes", "truncate", "storage", "archive")


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_checkpoints_read_exactly_or_fail_with_one_data_error(kind, monkeypatch):
    monkeypatch.setattr(torch_import, "MAX_ELEMENTS", 1 << 20)  # the oracle indexes them all
    original = torch_import._rebuild_tensor
    checked = []

    def rebuild(storage, offset, size, stride, *rest):
        out = original(storage, offset, size, stride, *rest)
        np.testing.assert_array_equal(out, rederived(storage, offset, size, stride))
        checked.append(out)
        return out

    monkeypatch.setitem(
        torch_import._TensorOnlyUnpickler._GLOBALS, ("torch._utils", "_rebuild_tensor_v2"), rebuild
    )
    files, rng, cache = members(), np.random.default_rng(KINDS.index(kind)), {}

    def check(state):
        assert all(isinstance(v, np.ndarray) for v in state.values())

    fuzz(
        "torch",
        kind,
        (mutate(kind, files, rng, cache) for _ in range(MUTATIONS)),
        lambda blob: torch_import.read_state_dict(io.BytesIO(blob)),
        check,
        refused=DataError,
    )
    print(len(checked), "tensors re-derived")


def test_the_unmutated_fixture_reads_through_the_oracle(monkeypatch):
    """The oracle itself agrees with the reader on the real file (332 entries)."""
    state = torch_import.read_state_dict(io.BytesIO(zipped(members())))
    assert len(state) == 332
    with pytest.raises(pickle.UnpicklingError, match="reads element"):
        torch_import.check_view(np.zeros(10, np.float32), 8, (2, 2), (1, 1))
    torch_import.check_view(np.zeros(10, np.float32), 0, (5, 3), (0, 1))  # expanded: legal
    with pytest.raises(pickle.UnpicklingError, match="invalid"):
        torch_import.check_view(np.zeros(10, np.float32), 0, (2,), (-1,))
