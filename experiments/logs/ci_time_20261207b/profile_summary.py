"""Sums a Perfetto trace's complete events by name (ci_time_20261207/compile_sweep.py's TRACE_DIR).

python experiments/logs/ci_time_20261207b/profile_summary.py DIR"""

import collections
import glob
import gzip
import json
import sys


def main():
    (path,) = glob.glob(f"{sys.argv[1]}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    seconds, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            seconds[event["name"]] += event.get("dur", 0) / 1e6
            count[event["name"]] += 1
    for name, s in seconds.most_common(25):
        print(f"{s:8.3f} s {count[name]:5d}  {name[:100]}")


if __name__ == "__main__":
    main()
