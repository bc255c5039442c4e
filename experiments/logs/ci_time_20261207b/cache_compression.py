"""What JAX's persistent compilation cache spends on compression in one tier-1 run, with zlib
(JAX's fallback) and with zstandard (what JAX uses when the module is installed).

    python experiments/logs/ci_time_20261207b/cache_compression.py CACHE_DIR [--programs]

CACHE_DIR: a copy of the run-wide cache a tier-1 run leaves (tests/conftest.py removes it at the
end; cache_keep_plugin.py in this folder copies it first). Each entry, as JAX stores it, is zlib's
compression of (4-byte compile seconds + the serialized executable): the script decompresses
every entry, then compresses and decompresses them all with each library, timing each pass in
one process. With --programs it prints instead how many entries each program name (the key's
prefix) has; JAX stores compile times in whole seconds, too coarse to sum."""

import collections
import os
import sys
import time
import zlib

import zstandard


def entry_paths(root: str) -> list[str]:
    return [
        os.path.join(folder, name)
        for folder, _, files in os.walk(root)
        for name in files
        if name.endswith("-cache")
    ]


def entries(root: str) -> list[bytes]:
    raw = []
    for path in entry_paths(root):
        with open(path, "rb") as f:
            raw.append(zlib.decompress(f.read()))
    return raw


def print_programs(root: str) -> None:
    count = collections.Counter(os.path.basename(p).split("-", 1)[0] for p in entry_paths(root))
    print(f"{sum(count.values())} entries")
    for program, n in count.most_common():
        print(f"{n:6d}  {program}")


def timed(function, items):
    start = time.perf_counter()
    out = [function(x) for x in items]
    return out, time.perf_counter() - start


def main():
    if sys.argv[2:] == ["--programs"]:
        print_programs(sys.argv[1])
        return
    raw = entries(sys.argv[1])
    print(f"{len(raw)} entries, {sum(map(len, raw)) / 1e6:.0f} MB uncompressed")
    zl, zl_c = timed(zlib.compress, raw)
    _, zl_d = timed(zlib.decompress, zl)
    compressor, decompressor = zstandard.ZstdCompressor(), zstandard.ZstdDecompressor()
    zs, zs_c = timed(compressor.compress, raw)
    _, zs_d = timed(decompressor.decompress, zs)
    print("| library | compress all, s | decompress all, s | compressed MB |\n|---|---|---|---|")
    for name, packed, c, d in (("zlib", zl, zl_c, zl_d), ("zstandard", zs, zs_c, zs_d)):
        print(f"| {name} (default level) | {c:.1f} | {d:.1f} | {sum(map(len, packed)) / 1e6:.0f} |")


if __name__ == "__main__":
    main()
