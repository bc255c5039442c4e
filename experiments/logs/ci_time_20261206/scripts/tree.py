"""tree.py PY_SPY_RAW_FILE DEPTH MIN_FRACTION [RATE_HZ]: the main thread's time by call path."""

import sys

path, depth, minfrac = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
rate = int(sys.argv[4]) if len(sys.argv) > 4 else 200  # py-spy -r
tree = {}
total = 0
for line in open(path):
    stack, _, n = line.rpartition(" ")
    n = int(n)
    frames = stack.split(";")
    if not frames[0].startswith("_run_module_as_main"):
        continue
    total += n
    node = tree
    for f in frames[:depth]:
        e = node.setdefault(f, [0, {}])
        e[0] += n
        node = e[1]


def show(node, ind):
    for k, (n, ch) in sorted(node.items(), key=lambda kv: -kv[1][0]):
        if n < minfrac * total:
            continue
        print(f"{n / rate:6.2f} {'  ' * ind}{k[:130]}")
        show(ch, ind + 1)


print("main thread", total / rate)
show(tree, 0)
