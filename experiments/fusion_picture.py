"""The README's picture of what fusion does to one conv layer, computed by dcff_jax's own math:
4 filters (3x3 over 16 inputs, Kaiming-normal, seed 0), rate 0.5, so 2 fused filters; the
filters kept by the importance at the first epoch's temperature, and each fused filter's weights
at the first and the last epoch of 300.

  python experiments/fusion_picture.py   # prints the picture's lines (tests/test_docs.py
                                         # checks that the README shows these lines)
"""

from __future__ import annotations

import jax
import numpy as np

from dcff_jax.method import fusion

C, M, FAN_IN, NUM_EPOCHS = 4, 2, 3 * 3 * 16, 300


def blend(row: np.ndarray) -> str:
    """'0.71 W2 + 0.10 W1 + ...': a fused filter as weights of the c filters, largest first."""
    order = np.argsort(-row, kind="stable")
    return " + ".join(f"{row[j]:.2f} W{j + 1}" for j in order if round(float(row[j]), 2) > 0)


def picture_lines() -> list[str]:
    filters = jax.random.normal(jax.random.key(0), (C, FAN_IN)) * np.sqrt(2 / FAN_IN)
    distances = fusion.pairwise_distances(filters)
    first, last = (fusion.temperature(e, NUM_EPOCHS) for e in (0, NUM_EPOCHS))
    scores = fusion.importance(distances, first)
    kept = np.sort(np.asarray(fusion.select_kept(scores, np.arange(M, dtype=np.int32))))
    lines = [
        "D[j,k] = |Wj - Wk|: "
        + ", ".join(f"{d:.2f}" for d in np.asarray(distances)[0, 1:])
        + " (W1 to W2, W3, W4)",
        "importance at T = 1: "
        + ", ".join(f"{s:.3f}" for s in np.asarray(scores))
        + " -> keep "
        + ", ".join(f"W{k + 1}" for k in kept),
    ]
    for name, t in (("first epoch, T = 1", first), (f"last epoch, T = {last:.0e}", last)):
        matrix = np.asarray(fusion.fusion_matrix(fusion.proxies(distances, t), kept))
        lines += [f"{name}: F{r + 1} = {blend(row)}" for r, row in enumerate(matrix)]
    return lines


if __name__ == "__main__":
    print("\n".join(picture_lines()))
