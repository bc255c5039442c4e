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

import numpy as np

from dcff_jax.errors import DataError, MissingFileError

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


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied out."""
    del unused  # requires_grad, backward hooks, metadata
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset].copy()
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused) -> np.ndarray:
    """torch._utils._rebuild_parameter(_with_state): a parameter is its tensor here."""
    del unused
    return data


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Rebuilds tensors, parameters and (ordered) dicts; refuses every other global."""

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
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, storage_type.dtype)
        return self._storages[key]


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
        with archive.open(pickles[0]) as file:
            try:
                state = _TensorOnlyUnpickler(file, archive, prefix).load()
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
                raise DataError(f"{path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


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
