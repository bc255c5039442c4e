import json, sys
def bucket(shape):
    (h, w, c), f = shape[0], shape[1]
    if shape[5] > 1:
        return "dw"
    n = min(c, f)
    return "<8" if n < 8 else "8-15" if n < 16 else "16-31" if n < 32 else ">=32"
print("| model | batch | variant | whole ms | convs ms | outside convs ms | conv GMAC/s | < 8 | 8-15 | 16-31 | >= 32 | depthwise |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    for r in json.load(open(path)):
        for variant in ("original", "compact"):
            v = r[variant]
            agg = {}
            for row in v["rows"]:
                b = bucket(row["shape"])
                ms, macs = agg.get(b, (0.0, 0))
                agg[b] = (ms + row["ms"] * row["count"], macs + row["macs"] * row["count"])
            cells = []
            for b in ("<8", "8-15", "16-31", ">=32", "dw"):
                if b in agg:
                    ms, macs = agg[b]
                    cells.append(f"{macs / ms / 1e6:.1f} ({ms:.1f} ms)")
                else:
                    cells.append("-")
            print(f"| {r['arch']} | {r['batch']} | {variant} | {v['whole_ms']:.2f} | {v['conv_ms']:.2f} | {v['whole_ms'] - v['conv_ms']:.2f} | {v['macs'] / v['conv_ms'] / 1e6:.1f} | " + " | ".join(cells) + " |")
