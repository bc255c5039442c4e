"""The ONNX export's former module name, kept so that `dcff_jax.onnx_export.jaxpr_to_onnx` and
the other names it had keep working: they live in dcff_jax.deploy (onnx_graph, onnx_file)."""

from dcff_jax.deploy.onnx_file import (  # noqa: F401
    ONNX,
    describe,
    load_onnx,
    onnx_bytes,
    run_session,
    write_onnx,
)
from dcff_jax.deploy.onnx_graph import OPSET, UnsupportedOp, jaxpr_to_onnx  # noqa: F401
