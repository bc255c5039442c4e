"""Random access to a tfds dataset prepared in tfrecord (tfds' default format), without TensorFlow.

tfds reads tfrecord only through TensorFlow, and sequentially; `tfds.data_source` refuses it.
The records are the same serialized tf.train.Example as in array_record, so this module indexes
each shard once (one pass over the 12-byte record headers, `os.pread`, no data read) and serves
record i by one positioned read; tfds' own `BaseDataSource` then deserializes and decodes it with
the dataset's features (NumPy, no TensorFlow). Thread-safe (no shared file position) and
picklable (worker processes open their own descriptors). Imported only for tfds datasets.

Record framing (TFRecord): uint64 length (little-endian), uint32 masked CRC-32C of the length,
the data, uint32 masked CRC-32C of the data. Each length's CRC is checked while indexing (a
damaged length would otherwise shift every later record); the data's is not (it would read the
whole file): a damaged record fails to deserialize or decode, which the loader reports.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct

import numpy as np
from tensorflow_datasets.core.data_sources import base

from dcff_jax.errors import DataError

_HEADER = 12  # length + its CRC
_FOOTER = 4  # the data's CRC


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_by_table(data: bytes) -> int:
    """CRC-32C by a 256-entry table: fast enough for the 8-byte lengths indexing checks."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC32C_TABLE[(crc ^ byte) & 0xFF]
    return crc ^ 0xFFFFFFFF


try:  # google_crc32c's C code when installed (the gcs extra brings it); chosen once
    import google_crc32c

    def _crc32c(data: bytes) -> int:
        return google_crc32c.value(bytes(data))

except ImportError:
    _crc32c = crc32c_by_table


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) int64 arrays of every record's data in a tfrecord file.

    Raises:
      DataError: a truncated file (a header or record running past its end) or a damaged
        header (its length's CRC does not match).
    """
    size = os.path.getsize(path)
    starts, lengths = [], []
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position < size:
            header = os.pread(fd, _HEADER, position)
            if len(header) < _HEADER:
                raise DataError(f"{path} is truncated: a record header at byte {position}")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                raise DataError(
                    f"{path} is damaged: the record header at byte {position} fails its CRC"
                )
            end = position + _HEADER + length + _FOOTER
            if end > size:
                raise DataError(
                    f"{path} is truncated: the record at byte {position} needs {end} bytes, "
                    f"the file has {size}"
                )
            starts.append(position + _HEADER)
            lengths.append(length)
            position = end
    finally:
        os.close(fd)
    return np.asarray(starts, np.int64), np.asarray(lengths, np.int64)


class Records:
    """The serialized records of a split, `records[i]` -> bytes, from tfds file instructions
    (each: a shard file, how many of its records to skip and take)."""

    def __init__(self, instructions):
        self._files, self._starts, self._lengths, self._ends = [], [], [], []
        total = 0
        for instruction in instructions:
            starts, lengths = record_offsets(instruction.filename)
            if len(starts) != instruction.examples_in_shard:
                raise DataError(
                    f"{instruction.filename} holds {len(starts)} records, its dataset_info.json "
                    f"says {instruction.examples_in_shard}: a damaged or partly copied shard"
                )
            take = slice(instruction.skip, instruction.skip + instruction.take)
            self._files.append(instruction.filename)
            self._starts.append(starts[take])
            self._lengths.append(lengths[take])
            total += len(self._starts[-1])
            self._ends.append(total)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = bisect.bisect_right(self._ends, index)
        local = index - (self._ends[shard - 1] if shard else 0)
        if shard not in self._fds:  # a benign race opens a file twice; both descriptors work
            self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
        length = int(self._lengths[shard][local])
        return os.pread(self._fds[shard], length, int(self._starts[shard][local]))

    def __getitems__(self, indices) -> list[bytes]:
        return [self[int(i)] for i in indices]

    def __getstate__(self) -> dict:
        # Descriptors are per process: a worker process opens its own.
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


@dataclasses.dataclass(repr=False)
class TFRecordDataSource(base.BaseDataSource):
    """A tfds random-access data source (as `tfds.data_source` returns for array_record) over a
    split prepared in tfrecord: source[i] -> the decoded example dict. Picklable."""

    def __post_init__(self):
        self.data_source = Records(base.file_instructions(self.dataset_info, self.split))


def data_source(dataset_info, split: str, decoders=None) -> TFRecordDataSource:
    return TFRecordDataSource(dataset_info=dataset_info, split=split, decoders=decoders)


def prepared_builder(name: str, data_dir: str):
    """tfds' builder for the newest prepared version of `name` in data_dir (or tfds' default
    data dir), read from its dataset_info.json; None when there is none."""
    import tensorflow_datasets as tfds
    from etils import epath

    root = epath.Path(data_dir or tfds.core.constants.DATA_DIR) / name
    if not root.is_dir():
        return None
    versions = [d for d in root.iterdir() if (d / "dataset_info.json").is_file()]
    if not versions:
        return None
    newest = max(versions, key=lambda d: tuple(int(p) for p in d.name.split(".") if p.isdigit()))
    return tfds.builder_from_directory(str(newest))
