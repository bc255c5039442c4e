"""Entries of a JAX persistent compilation cache, counted by program name (the key's prefix).

    python experiments/logs/ci_time_20261207b/cache_entries.py CACHE_DIR

(JAX stores each entry's compile time in whole seconds, too coarse to sum here.)"""

import collections
import os
import sys


def main():
    count = collections.Counter()
    for _, _, files in os.walk(sys.argv[1]):
        for name in files:
            if name.endswith("-cache"):
                count[name.split("-", 1)[0]] += 1
    print(f"{sum(count.values())} entries")
    for program, n in count.most_common():
        print(f"{n:6d}  {program}")


if __name__ == "__main__":
    main()
