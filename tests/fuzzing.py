"""Seeded mutations for fuzzing the readers of files users hand us (test_torch_import_fuzz,
test_reader_fuzz). DCFF_FUZZ_MUTATIONS=N sets how many mutations each kind runs (default 25)."""

from __future__ import annotations

import copy
import json
import os
import pickletools
import struct

import numpy as np

from dcff_jax.errors import UserError

MUTATIONS = int(os.environ.get("DCFF_FUZZ_MUTATIONS", "25"))
INTERESTING = [0, 1, 2, -1, -(2**31), 2**31 - 1, 2**40, 2**63, 3, 64, 4096, 65537]
INT_OPS = ("BININT1", "BININT2", "BININT", "LONG1")


def int_op(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def str_op(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def ops(data: bytes):
    """(opcode name, argument, start, end) of every opcode of a pickle."""
    found = list(pickletools.genops(data))
    ends = [pos for _, _, pos in found[1:]] + [len(data)]
    return [(op.name, arg, pos, end) for (op, arg, pos), end in zip(found, ends, strict=True)]


def replace_ints(data: bytes, rng: np.random.Generator, pickle_ops=None) -> bytes:
    """1-2 of the pickle's integer opcodes replaced by an interesting value or a near one."""
    targets = [o for o in (pickle_ops or ops(data)) if o[0] in INT_OPS]
    chosen = rng.choice(len(targets), size=min(len(targets), rng.integers(1, 3)), replace=False)
    for _, value, start, end in sorted((targets[i] for i in chosen), key=lambda o: -o[2]):
        near = int(value) + int(rng.integers(-3, 4))
        new = int(rng.choice(INTERESTING)) if rng.random() < 0.5 else near
        data = data[:start] + int_op(new) + data[end:]
    return data


def flip_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    """1-3 bytes set to random values."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        data[rng.integers(len(data))] = rng.integers(256)
    return bytes(data)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: rng.integers(len(data))]


ODD_VALUES = [None, True, -1, 0, 1, 2**63, 1e308, -0.5, "", "x" * 300, "../..", [], {}, [1, "a"]]


def mutate_json(value, rng: np.random.Generator):
    """A deep copy of a JSON value with 1-2 random places changed: a value replaced by an odd
    one (another type, out of range, empty), a key dropped, or a list entry dropped."""
    value = copy.deepcopy(value)
    for _ in range(rng.integers(1, 3)):
        places = list(_places(value))
        if not places:
            return ODD_VALUES[rng.integers(len(ODD_VALUES))]
        parent, key = places[rng.integers(len(places))]
        if rng.random() < 0.25:
            del parent[key]
        else:
            parent[key] = copy.deepcopy(ODD_VALUES[rng.integers(len(ODD_VALUES))])
    return value


def _places(value):
    """(container, key) of every value inside a JSON value, depth first."""
    if not isinstance(value, (dict, list)):
        return
    for key, child in list(value.items() if isinstance(value, dict) else enumerate(value)):
        yield value, key
        yield from _places(child)


def mutate_json_bytes(text: str, kind: str, rng: np.random.Generator) -> bytes:
    """kind: "json" (mutate_json), "bytes" (flip_bytes) or "truncate", of a JSON document."""
    if kind == "json":
        return json.dumps(mutate_json(json.loads(text), rng)).encode()
    data = text.encode()
    return flip_bytes(data, rng) if kind == "bytes" else truncate(data, rng)


def fuzz(name: str, kind: str, mutations, read, check=lambda result: None, refused=UserError):
    """Read every mutation: the result passes `check`, or one one-line `refused` error is
    raised (any other exception fails the test). Prints and returns the read/refused counts,
    and asserts some were refused (the mutations reach the checks)."""
    outcomes = {"read": 0, "refused": 0}
    for blob in mutations:
        try:
            result = read(blob)
        except refused as error:
            assert "\n" not in str(error).strip(), error
            outcomes["refused"] += 1
            continue
        check(result)
        outcomes["read"] += 1
    print(name, kind, outcomes)
    assert outcomes["refused"] > 0, outcomes
    return outcomes
