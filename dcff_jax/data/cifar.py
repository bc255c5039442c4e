"""CIFAR-10's python pickles (cifar-10-batches-py), read without trusting them: a restricted
unpickler that builds only byte strings, lists and plain arrays, of checked sizes."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
from absl import logging
from etils import epath

from dcff_jax.data.tfds_reader import read_tfds_arrays
from dcff_jax.errors import DAMAGED_PICKLE, DataError, MissingFileError

# --- CIFAR-10 -------------------------------------------------------------------------------

_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _is_cifar_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "data_batch_1")) or os.path.isdir(
        os.path.join(path, "cifar-10-batches-py")
    )


def read_cifar10(config) -> list[tuple[np.ndarray, np.ndarray]]:
    """[train, test] as (uint8 (n, 32, 32, 3), int32 (n,)) from the first copy found: a
    cifar-10-batches-py folder at config.data_dir, tfds' cifar10 there (or in its default data
    dir), the folder or archive in the cache (config.data_dir, else download.default_cache_dir()),
    else one downloaded into that cache when config.download is on."""
    from dcff_jax.data import download

    splits = ("train", "test")
    if config.data_dir and _is_cifar_folder(config.data_dir):
        return [read_cifar_folder(config.data_dir, s) for s in splits]
    try:
        return [read_tfds_arrays("cifar10", s, config.data_dir) for s in splits]
    except MissingFileError:
        pass  # not prepared for tfds: the cache, or a download
    cache = config.data_dir or download.default_cache_dir()
    folder = download.ensure_cifar10(
        cache, config.cifar10_url, config.cifar10_md5, download=config.download
    )
    logging.info("CIFAR-10 from %s", folder)
    return [read_cifar_folder(folder, s) for s in splits]


def read_cifar_folder(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the standard `cifar-10-batches-py` folder (data_dir may be it or its parent).

    Returns:
      images uint8 (n, 32, 32, 3) and labels int32 (n,).
    """
    from dcff_jax import storage

    # epath: a local folder or one on an object store (read whole: 150 MB in all).
    if storage.is_remote(data_dir):
        storage.check_backend(data_dir)
    folder = epath.Path(data_dir)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    expected = _CIFAR_FILES[split]
    missing = [f for f in expected if not (folder / f).is_file()]
    if not folder.is_dir() or missing:
        local = not storage.is_remote(data_dir) and not os.path.isabs(data_dir)
        relative = f" (relative to {os.getcwd()})" if local else ""
        what = f"lacks {missing}" if folder.is_dir() else "does not exist"
        raise MissingFileError(
            f"CIFAR-10 folder {str(folder)!r}{relative} {what}: expected "
            "the standard cifar-10-batches-py folder (data_batch_1..5, test_batch), e.g. from "
            "`python ../shared/data/make_cifar10.py DIR`, given as --config.data_dir=DIR"
        )
    images, labels = [], []
    for name in expected:
        path = folder / name
        try:
            with path.open("rb") as f:
                batch = _SafeUnpickler(f, encoding="bytes").load()
            if not isinstance(batch, dict):
                raise TypeError(f"a {type(batch).__name__}, not a dict")
            data = _exact_array(_unpickled_array(batch[b"data"]), np.uint8, 2)
            data = data.reshape(-1, 3, 32, 32)
            batch_labels = _exact_array(_unpickled_array(batch[b"labels"]), np.int64, 1)
        except DAMAGED_PICKLE as e:
            raise DataError(f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from e
        if len(batch_labels) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(batch_labels)} labels")
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < 10:
            raise DataError(
                f"{path}: labels outside 0..9 ({batch_labels.min()}..{batch_labels.max()})"
            )
        batch_labels = batch_labels.astype(np.int32)
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _exact_array(value, dtype, ndim: int) -> np.ndarray:
    """value as an array of `dtype`, refused (ValueError) unless it is `ndim`-dimensional and
    every element converts exactly (no wrap-around of a 300 into a uint8 44)."""
    array = np.asarray(value)
    if array.ndim != ndim or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"a {array.ndim}-d {array.dtype} array, expected {ndim}-d integers")
    if array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ValueError(f"values outside {np.dtype(dtype).name}")
    return array.astype(dtype, copy=False)


class _SafeUnpickler(pickle._Unpickler):
    """The official files are pickles of dicts of NumPy arrays, bytes, lists and ints. Only those
    are built: arrays through the stand-ins below, never NumPy's own unpickling (a crafted dtype
    state can mark uint8 as holding object pointers), and nothing else, so a tampered file can
    neither run code nor build a broken array. Python's unpickler, not C's: the C one sizes its
    memo table by the largest index a file names, so one damaged byte can ask for gigabytes."""

    def find_class(self, module, name):
        if (module, name) in _ARRAY_GLOBALS:
            return _ARRAY_GLOBALS[module, name]
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 file")


# Integer dtypes a CIFAR-10 file may hold ('|u1' pixels; labels pickled as arrays by some tools).
_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_ELEMENT_CAP = 1 << 31  # all of CIFAR-10's pixels are 1.8e8 elements


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("a bytes object pickled in an unknown way")
    return text.encode("latin1")


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


class _DtypeStandIn:
    """numpy.dtype(name, align, copy) + BUILD: an integer dtype, its state checked whole."""

    def __init__(self, name, align=False, copy=True):
        name = _text(name)  # Python 2's files give bytes (encoding="bytes")
        if name not in _DTYPES:
            raise pickle.UnpicklingError(f"dtype {name!r} is not an integer type")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        order = "|" if self.dtype.itemsize == 1 else "<"
        state = tuple(_text(x) for x in state) if isinstance(state, tuple) else state
        if state not in (
            (3, order, None, None, None, -1, -1, 0),
            (3, "=", None, None, None, -1, -1, 0),
        ):
            raise pickle.UnpicklingError(f"dtype state {state!r} is not a plain integer type's")


class _ArrayStandIn:
    """numpy's _reconstruct(ndarray, (0,), b'b') + BUILD: the array its state describes, read
    with np.frombuffer after its shape, dtype and byte count agree."""

    def __init__(self, cls, shape, code):
        if cls is not _ndarray:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")
        self.array = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("an array state that is not (version, shape, ...)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStandIn) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("an array state without a dtype and its bytes")
        if not isinstance(shape, tuple) or not all(
            isinstance(n, int) and 0 <= n <= _ELEMENT_CAP for n in shape
        ):
            raise pickle.UnpicklingError(f"an array shape {shape!r}")
        count = math.prod(shape)
        if count > _ELEMENT_CAP or count * dtype.dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(
                f"an array of shape {shape} holds {len(raw)} bytes, not {count} elements'"
            )
        order = "F" if fortran is True else "C"
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


def _ndarray(*_):
    raise pickle.UnpicklingError("numpy.ndarray called directly")


_ARRAY_GLOBALS = {
    **{
        (m, "_reconstruct"): _ArrayStandIn
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _DtypeStandIn,
}


def _unpickled_array(value):
    """An array stand-in's array (a list stays a list); ValueError for one never built."""
    if isinstance(value, _ArrayStandIn):
        if value.array is None:
            raise ValueError("an array without its data")
        return value.array
    return value
