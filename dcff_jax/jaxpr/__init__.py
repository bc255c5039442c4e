"""Reading jaxprs: what dcff-jax learns from a traced function.

  walk            the one walk over equations (calls and platform-dependent branches inlined),
                  CHANNEL_RULE (what each primitive does to the channel axis), weight folding
  channels        the channel analysis: which convs can be fused, how their widths couple
                  (analyze, analyze_function), built from channel_types (its records),
                  channel_walker and channel_shapes (its rules)

Users of the walk: the channel analysis, channel padding (dcff_jax.deploy.channel_padding) and
the ONNX converter (dcff_jax.deploy.onnx_graph).
"""
