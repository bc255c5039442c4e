"""The method: DCFF's math and the pieces that apply it to a conv.

  fusion        pure, jit-able functions of arrays: distances, temperature, proxies, importance,
                kept filters, the fusion matrix and the fused kernel
  layers        FusedConv (a flax.linen Conv whose kernel is fused), and Conv/Dense with
                PyTorch's default initialisation
  rate_strings  the published pruning-rate strings, parsed safely, and each architecture's
                mapping of its string to conv paths

dcff_jax.fusion, .layers and .plans (rate_strings' former name) re-export their names for code
written against the former layout.
"""
