"""Fused -> compact: turn a trained fused model's variables into the compact model's variables.

The compact model is the same definition built with plain convs at the kept widths (same module
names), so the mapping is per layer: every FusedConv's kernel becomes its fused kernel F @ W (and
its bias F @ b); everything else (batch norm, dense, plain convs) is copied as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import traverse_util

from dcff_jax.fusion import FUSION_COLLECTION, fuse_kernel


def compact_variables(fused_variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of the compact model whose eval-mode logits equal the fused model's.

    Args:
      fused_variables: {"params": ..., "fusion": ..., and e.g. "batch_stats": ...} of a model
        built with FusedConv layers (a dcff_jax model's "fused" variant or your own).

    Returns:
      The same collections without "fusion"; each fused layer's "kernel" (kh, kw, c_in, c) is now
      (kh, kw, c_in, m) and its "bias" (c,) is (m,).
    """
    if FUSION_COLLECTION not in fused_variables:
        raise ValueError(
            f"no {FUSION_COLLECTION!r} collection in the variables "
            f"(found {sorted(fused_variables)}): "
            "pass the variables of a fused model"
        )
    flat_params = traverse_util.flatten_dict(_plain(fused_variables["params"]))
    flat_fusion = traverse_util.flatten_dict(_plain(fused_variables[FUSION_COLLECTION]))
    for path, matrix in flat_fusion.items():
        if path[-1] != "matrix":
            continue
        layer = path[:-1]
        for name in ("kernel", "bias"):
            if layer + (name,) in flat_params:
                flat_params[layer + (name,)] = fuse_kernel(flat_params[layer + (name,)], matrix)
    out = {k: v for k, v in fused_variables.items() if k not in ("params", FUSION_COLLECTION)}
    out["params"] = traverse_util.unflatten_dict(flat_params)
    return out


def _plain(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)
