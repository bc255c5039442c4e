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
