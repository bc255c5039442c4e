"""dcff-jax: DCFF (dynamic-coded filter fusion, arXiv 2107.06916) in JAX/Flax.

Public API (everything a user needs to train DCFF models, or add DCFF to their own Flax CNN):

Fusion math (pure, jit-able):
  pairwise_distances, temperature, proxies, importance, select_kept, fusion_matrix, fuse_kernel,
  init_fusion_state, update_layer, update_fusion (every fused layer of a model, one jitted call)
Layers and models:
  FusedConv, prunable_conv, create_model, ARCHITECTURES, VARIANTS
Plans:
  parse_rates, layer_rates, keep_width, search_plan / search_rates (rates for a target FLOPs
  and/or params reduction), rate_string
FLOPs, params and export:
  count_flops, model_counts, compact_variables, load_compact (an exported compact model),
  pad_channels (any function with its conv widths rounded up by zero filters: same values,
  faster CPU convs; the StableHLO export does it)
Any Flax model (linen or nnx), unmodified (dcff_jax.any_model):
  DCFF (trace a plan; fused training model; save/load with the plan; compact export),
  Plan, make_plan, update_fusion_nnx, compact_nnx
Compiling:
  compiler_options (pass to jax.jit: XLA:CPU settings that make conv-net steps ~2x faster)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The public names, each with the module that defines it (and its name there), imported on first
# use (PEP 562): `import dcff_jax` stays cheap, and `python -m dcff_jax.flops` (or any CLI) runs
# a module the package has not imported already, which runpy warns about.
_PUBLIC = {
    "DCFF": "dcff_jax.any_model",
    "Plan": "dcff_jax.any_model",
    "compact_nnx": "dcff_jax.any_model",
    "make_plan": "dcff_jax.any_model",
    "update_fusion_nnx": "dcff_jax.any_model",
    "compact_variables": "dcff_jax.deploy",
    "load_compact": "dcff_jax.deploy",
    "pad_channels": "dcff_jax.deploy",
    "count_flops": ("dcff_jax.flops", "count"),
    "model_counts": "dcff_jax.flops",
    "FUSION_COLLECTION": "dcff_jax.method.fusion",
    "fuse_kernel": "dcff_jax.method.fusion",
    "fusion_matrix": "dcff_jax.method.fusion",
    "importance": "dcff_jax.method.fusion",
    "init_fusion_state": "dcff_jax.method.fusion",
    "pairwise_distances": "dcff_jax.method.fusion",
    "proxies": "dcff_jax.method.fusion",
    "select_kept": "dcff_jax.method.fusion",
    "temperature": "dcff_jax.method.fusion",
    "update_fusion": "dcff_jax.method.fusion",
    "update_layer": "dcff_jax.method.fusion",
    "FusedConv": "dcff_jax.method.layers",
    "keep_width": "dcff_jax.method.rate_strings",
    "layer_rates": "dcff_jax.method.rate_strings",
    "parse_rates": "dcff_jax.method.rate_strings",
    "ARCHITECTURES": "dcff_jax.models",
    "VARIANTS": "dcff_jax.models",
    "create_model": "dcff_jax.models",
    "input_shape": "dcff_jax.models",
    "prunable_conv": "dcff_jax.models",
    "SearchResult": "dcff_jax.plan_search",
    "rate_string": "dcff_jax.plan_search",
    "search_plan": "dcff_jax.plan_search",
    "search_rates": "dcff_jax.plan_search",
    "compiler_options": "dcff_jax.xla_options",
}


def __getattr__(name: str):
    """A public name (imported from its module and kept), or a submodule (dcff_jax.steps)."""
    if name in _PUBLIC:
        module, attribute = (
            _PUBLIC[name] if isinstance(_PUBLIC[name], tuple) else (_PUBLIC[name], name)
        )
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise  # a submodule that exists failed to import
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # what static tools (type checkers, IDEs) see
    from dcff_jax.any_model import DCFF, Plan, compact_nnx, make_plan, update_fusion_nnx
    from dcff_jax.deploy import compact_variables, load_compact, pad_channels
    from dcff_jax.flops import count as count_flops
    from dcff_jax.flops import model_counts
    from dcff_jax.method.fusion import (
        FUSION_COLLECTION,
        fuse_kernel,
        fusion_matrix,
        importance,
        init_fusion_state,
        pairwise_distances,
        proxies,
        select_kept,
        temperature,
        update_fusion,
        update_layer,
    )
    from dcff_jax.method.layers import FusedConv
    from dcff_jax.method.rate_strings import keep_width, layer_rates, parse_rates
    from dcff_jax.models import ARCHITECTURES, VARIANTS, create_model, input_shape, prunable_conv
    from dcff_jax.plan_search import SearchResult, rate_string, search_plan, search_rates
    from dcff_jax.xla_options import compiler_options

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "DCFF",
    "Plan",
    "compact_nnx",
    "make_plan",
    "update_fusion_nnx",
    "FUSION_COLLECTION",
    "VARIANTS",
    "FusedConv",
    "compact_variables",
    "compiler_options",
    "load_compact",
    "count_flops",
    "create_model",
    "fuse_kernel",
    "fusion_matrix",
    "importance",
    "init_fusion_state",
    "input_shape",
    "keep_width",
    "layer_rates",
    "model_counts",
    "pad_channels",
    "pairwise_distances",
    "parse_rates",
    "rate_string",
    "search_plan",
    "search_rates",
    "SearchResult",
    "proxies",
    "prunable_conv",
    "select_kept",
    "temperature",
    "update_fusion",
    "update_layer",
]
