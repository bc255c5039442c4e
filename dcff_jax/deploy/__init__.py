"""Deployment: what a trained DCFF model becomes, and what reads it.

  compact          fused -> compact variables; save and load a compact export
  versions         WORKDIR/compact/LATEST -> v<N>/: versions, metadata.json, SHA-256 checks
  stablehlo        the export as one StableHLO file (jax alone loads it)
  onnx_graph       a jaxpr-to-ONNX converter for the ops compact CNNs use
  onnx_file        the export as model.onnx, run with onnxruntime
  channel_padding  any function with its conv widths rounded up by zero filters
  torch_import     the published PyTorch checkpoints, read without torch

The command-line entry points stay at the top: dcff_jax.export_stablehlo, .export_onnx,
.import_torch.
"""

from dcff_jax.deploy.channel_padding import pad_channels
from dcff_jax.deploy.compact import compact_variables, load_compact, save_compact

__all__ = ["compact_variables", "load_compact", "pad_channels", "save_compact"]
