"""The published code's checkpoints in our compact format, without torch and without unpickling
code.

A torch checkpoint (`torch.save`, zip format) is a pickle (`<archive>/data.pkl`) whose tensors
point at raw storages (`<archive>/data/<key>`). `read_state_dict` unpickles it with an allow-list
that rebuilds only tensors (as NumPy arrays), parameters and ordered dicts: anything else, which
is where a malicious checkpoint would put code, is refused. `variables_from_torch` then
seats a published state dict (a compact `model_best_compact.pt`, or a fused model's) in our model
of the same architecture, plan and variant, layer by layer in call order, every shape checked.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
import zlib

import numpy as np

from dcff_jax.errors import DAMAGED_PICKLE, DataError, MissingFileError

_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


# Refused before anything is allocated: a state dict's tensors are far smaller (ResNet-50's
# largest has 2.4M elements), and a crafted file could otherwise ask for terabytes.
MAX_ELEMENTS = 1 << 28
MAX_MEMBER_BYTES = 1 << 31  # one storage file or the pickle, as the zip declares it


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_DTYPES[name])


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied out.

    Every element the view would read is checked to lie inside the storage first (offset and
    offset + sum((size - 1) * stride)), with strides >= 0 (0: an expanded tensor) and at most
    MAX_ELEMENTS elements; anything else is refused (pickle.UnpicklingError)."""
    del unused  # requires_grad, backward hooks, metadata
    check_view(storage, offset, size, stride)
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset])  # 0-d
    if 0 in size:
        return np.zeros(size, storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def check_view(storage, offset, size, stride) -> None:
    """Raise pickle.UnpicklingError unless (offset, size, stride) views only `storage`'s
    elements (see _rebuild_tensor)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise pickle.UnpicklingError(f"a tensor's size {size!r} or stride {stride!r} is no tuple")
    numbers = [offset, *size, *stride]
    if len(size) != len(stride) or not all(_is_int(n) and n >= 0 for n in numbers):
        raise pickle.UnpicklingError(
            f"a tensor's offset {offset!r}, size {size!r} or stride {stride!r} is invalid"
        )
    elements = int(np.prod(size, dtype=object))
    if elements > MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"a tensor of {elements} elements (size {tuple(size)})")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if elements and last >= len(storage):
        raise pickle.UnpicklingError(
            f"a tensor (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reads "
            f"element {last} of a storage of {len(storage)}"
        )


def _rebuild_parameter(data, *unused) -> np.ndarray:
    """torch._utils._rebuild_parameter(_with_state): a parameter is its tensor here."""
    del unused
    return data


class _TensorOnlyUnpickler(pickle._Unpickler):  # noqa: SLF001
    """Rebuilds tensors, parameters and (ordered) dicts; refuses every other global.

    Python's own unpickler, not the C one: the C unpickler sizes its memo table by the largest
    memo index in the file, so one flipped byte in a LONG_BINPUT asks for tens of gigabytes
    (seen: the process killed for memory). Python's keeps the memo in a dict."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module, name):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing {module}.{name}: a torch state dict holds only tensors and dicts"
        )

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:100]}")
        storage_type, key, _, elements = pid[1:]
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str)):
            raise pickle.UnpicklingError(f"a storage of type {storage_type!r} at key {key!r}")
        if not _is_int(elements) or elements < 0:
            raise pickle.UnpicklingError(f"storage {key} claims {elements!r} elements")
        dtype = storage_type.dtype
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            expected = elements * dtype.itemsize
            # The zip's declared size first: no read (or decompression) past what the pickle
            # says the storage holds; zipfile checks the size and CRC of what it reads.
            if self._archive.getinfo(name).file_size != expected:
                raise pickle.UnpicklingError(
                    f"storage {key}: the archive holds {self._archive.getinfo(name).file_size} "
                    f"bytes, the pickle says {elements} x {dtype.itemsize}"
                )
            self._storages[key] = np.frombuffer(self._archive.read(name), dtype)
        storage = self._storages[key]
        if storage.dtype != dtype or len(storage) != elements:
            raise pickle.UnpicklingError(f"storage {key} is read as two different types")
        return storage


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a torch checkpoint holding a state dict (or {"state_dict": ...}).

    Raises:
      MissingFileError: no such file.
      DataError: not a torch zip checkpoint, or it holds anything but tensors and dicts.
    """
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError as e:
        raise MissingFileError(f"{path} does not exist") from e
    except zipfile.BadZipFile as e:
        raise DataError(
            f"{path} is not a torch checkpoint in the zip format (torch.save since 1.6): {e}"
        ) from e
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise DataError(f"{path}: expected one */data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            if archive.getinfo(pickles[0]).file_size > MAX_MEMBER_BYTES:
                raise pickle.UnpicklingError(f"{pickles[0]} claims over {MAX_MEMBER_BYTES} bytes")
            with archive.open(pickles[0]) as file:
                state = _TensorOnlyUnpickler(file, archive, prefix).load()
        except _DAMAGED as e:
            raise DataError(
                f"{path} is damaged or not a torch state dict ({type(e).__name__}: {str(e)[:200]})"
            ) from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path} holds a {type(state).__name__}, not a state dict")
    wrong = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if wrong:
        raise DataError(f"{path}: entries {wrong[:3]!r} of its state dict are not named tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


# What a damaged checkpoint raises: damaged pickle bytes, and damaged zip members (BadZipFile:
# CRC or size mismatch; zlib.error).
_DAMAGED = (*DAMAGED_PICKLE, zipfile.BadZipFile, zlib.error)


def _torch_layers(state: dict[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(module name, {field: array})] of conv, batch-norm and linear layers, in saved order."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        module, _, field = key.rpartition(".")
        if field != "num_batches_tracked":
            layers.setdefault(module, {})[field] = value
    return list(layers.items())


def variables_from_torch(model, state: dict[str, np.ndarray], image_size: int) -> dict:
    """{"params", "batch_stats"} of our `model` holding a published state dict of the same layers.

    Compact models take `model_best_compact.pt`; fused models take the published fused model's
    state dict (its FuseConv2d buffers are ignored: ours recomputes them). Layers are matched in
    order: ours in call order (traced), theirs in saved order (the published models register
    them in the order they run); kinds and every shape must agree.
    Conv kernels OIHW -> HWIO, Linear (out, in) -> (in, out).
    """
    from flax import linen as nn
    from flax import traverse_util

    from dcff_jax.models import trace_calls

    calls, variables = trace_calls(model, (1, image_size, image_size, 3))
    ours = [c for c in calls if isinstance(c.module, (nn.Conv, nn.BatchNorm, nn.Dense))]
    theirs = _torch_layers(state)
    if len(ours) != len(theirs):
        raise DataError(
            f"the state dict has {len(theirs)} conv/bn/linear layers, the model {len(ours)}: "
            "another architecture or plan (check --model and --cprate)"
        )
    params, stats = {}, {}
    for call, (name, fields) in zip(ours, theirs, strict=True):
        path = tuple(call.path.split("/"))
        if isinstance(call.module, nn.BatchNorm):
            if "running_mean" not in fields:
                raise DataError(f"{name}: a batch norm here, not in the state dict")
            params[path + ("scale",)], params[path + ("bias",)] = fields["weight"], fields["bias"]
            stats[path + ("mean",)], stats[path + ("var",)] = (
                fields["running_mean"],
                fields["running_var"],
            )
            continue
        weight = fields["weight"]
        dense = isinstance(call.module, nn.Dense)
        if weight.ndim != (2 if dense else 4):
            raise DataError(f"{name}.weight {weight.shape} where ours is {call.path}")
        params[path + ("kernel",)] = weight.T if dense else weight.transpose(2, 3, 1, 0)
        if "bias" in fields:
            params[path + ("bias",)] = fields["bias"]
    want = traverse_util.flatten_dict(variables["params"])
    if set(want) != set(params):
        raise DataError(
            f"unmatched parameters: {sorted('/'.join(k) for k in set(want) ^ set(params))}"
        )
    for key, value in params.items():
        if want[key].shape != value.shape:
            raise DataError(
                f"{'/'.join(key)}: the state dict gives {value.shape}, the model needs "
                f"{want[key].shape} (another plan? check --cprate)"
            )
    unflatten = traverse_util.unflatten_dict
    return {"params": unflatten(params), "batch_stats": unflatten(stats)}
