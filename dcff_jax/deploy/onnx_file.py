"""The compact model as an ONNX file (dcff_jax.deploy.onnx_graph converts it), written beside
the export's metadata with its SHA-256, and run with onnxruntime alone.

Needs the optional extra `dcff-jax[onnx]` (onnx; onnxruntime to run the file).
"""

from __future__ import annotations

import numpy as np

from dcff_jax.deploy.onnx_graph import closed_to_onnx
from dcff_jax.errors import DataError

ONNX = "model.onnx"


def onnx_bytes(model, variables, image_size: int, mean, std, pad_to: int = 8) -> bytes:
    """The compact model as ONNX: images uint8 (batch, image_size, image_size, 3) NHWC, any
    batch -> logits float32 (batch, classes), eval mode, the weights and the normalisation
    ((x / 255 - mean) / std) inside: the same contract as deploy.stablehlo.stablehlo_bytes.

    pad_to > 1: the function converted is channel_padding.pad_channels's, with conv widths
    rounded up to a multiple of pad_to (8 by default: on the CPU this measured up to 1.5x
    faster and never slower than 5%, experiments/RESULTS.md). The file's metadata then records
    both MAC counts (dcff_jax.macs_paper_widths, .macs_padded; flops.jaxpr_macs).

    Run it with onnxruntime alone:
        session = onnxruntime.InferenceSession(path)
        logits = session.run(None, {"images": images})[0]
    """
    import jax
    import jax.numpy as jnp
    from jax.extend.core import jaxpr_as_fun

    from dcff_jax import flops
    from dcff_jax.data import transforms
    from dcff_jax.deploy.channel_padding import pad_channels
    from dcff_jax.jaxpr.walk import trace_any_batch

    def logits(images):
        x = transforms.normalize(images, mean, std, jnp.float32)
        return model.apply(variables, x, train=False).astype(jnp.float32)

    # The model is traced once; padding re-runs its jaxpr, and each trace is both converted
    # and counted.
    closed = trace_any_batch(logits, (None, image_size, image_size, 3), np.uint8)
    if pad_to <= 1:
        return closed_to_onnx(closed).SerializeToString()
    padded = pad_channels(lambda x: jaxpr_as_fun(closed)(x)[0], pad_to)
    (images,) = closed.in_avals
    closed_padded = jax.make_jaxpr(padded)(jax.ShapeDtypeStruct(images.shape, images.dtype))
    proto = closed_to_onnx(closed_padded)
    for key, value in (
        ("dcff_jax.pad_channels_to", pad_to),
        ("dcff_jax.macs_paper_widths", flops.jaxpr_macs(closed)),
        ("dcff_jax.macs_padded", flops.jaxpr_macs(closed_padded)),
    ):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    return proto.SerializeToString()


def write_onnx(directory: str, pad_to: int = 8) -> str:
    """Write `model.onnx` (see onnx_bytes) into the current export version under `directory`
    (WORKDIR/compact), atomically; returns its path. One process only."""
    from dcff_jax.data import sources
    from dcff_jax.deploy import versions
    from dcff_jax.deploy.compact import load_compact

    model, variables, metadata = load_compact(directory)
    mean, std = sources.normalization(metadata["dataset"])
    data = onnx_bytes(model, variables, metadata["image_size"], mean, std, pad_to)
    version = versions.current_version_dir(directory)
    versions.write_beside_metadata(version, ONNX, data, versions.with_digest(metadata, ONNX, data))
    return str(version / ONNX)


def describe(path: str) -> str:
    """One line on an ONNX export's padding and MACs, from its metadata."""
    import onnx
    from etils import epath

    meta = {
        p.key: p.value for p in onnx.load_from_string(epath.Path(path).read_bytes()).metadata_props
    }
    if "dcff_jax.pad_channels_to" not in meta:
        return "conv widths as the plan gives them (no padding)"
    paper, padded = int(meta["dcff_jax.macs_paper_widths"]), int(meta["dcff_jax.macs_padded"])
    return (
        f"conv widths padded to multiples of {meta['dcff_jax.pad_channels_to']}: "
        f"{padded / 1e6:.1f}M MACs per image (the plan's widths: {paper / 1e6:.1f}M, "
        f"+{100 * (padded / paper - 1):.1f}%)"
    )


def load_onnx(path: str):
    """(onnxruntime.InferenceSession, metadata) of a `model.onnx` and the metadata.json beside
    it, its SHA-256 checked (deploy.versions.read_verified) before onnxruntime parses it; the
    session runs on the CPU."""
    from dcff_jax.deploy import versions

    try:
        import onnxruntime
    except ImportError as e:
        raise DataError(
            "running an ONNX export needs onnxruntime: pip install 'dcff-jax[onnx]'"
        ) from e
    data, metadata = versions.read_verified(path)
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DataError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    return session, metadata


def run_session(session, images: np.ndarray) -> np.ndarray:
    """Logits float32 (b, classes) of a session from load_onnx for uint8 images (b, s, s, 3)."""
    return session.run(None, {"images": np.ascontiguousarray(images, np.uint8)})[0]
