"""Evaluate an exported compact model on its test split.

  python -m dcff_jax.evaluate --checkpoint=WORKDIR/compact [--data_dir=...] [--dataset=...]
  python -m dcff_jax.evaluate --checkpoint=WORKDIR/compact/vN/model.stablehlo [...]
  python -m dcff_jax.evaluate --checkpoint=WORKDIR/compact/vN/model.onnx [...]  (onnxruntime)

Prints a line per metric and, as the LAST line of stdout, {"top1", "top5", "loss", "examples"}.
"""

import functools
import json

from absl import app, flags

from dcff_jax import errors

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A compact export (WORKDIR/compact), its StableHLO file (.../vN/model.stablehlo) or its "
    "ONNX file (.../vN/model.onnx, written by dcff_jax.export_onnx).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides the data_dir recorded at export.")
_DATASET = flags.DEFINE_string("dataset", None, "Overrides the dataset recorded at export.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Evaluation batch size (global).")
flags.mark_flags_as_required(["checkpoint"])


def evaluate_compact(checkpoint: str, data_dir=None, dataset=None, batch_size: int = 250) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dcff_jax.data import loader, sources, transforms
    from dcff_jax.deploy import compact, onnx_file, stablehlo
    from dcff_jax.training import steps
    from dcff_jax.xla_options import compiler_options

    is_stablehlo = checkpoint.endswith(stablehlo.STABLEHLO)
    onnx = checkpoint.endswith(".onnx")
    if is_stablehlo or onnx:  # a deployable file, run as any user would: on one device
        mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    if is_stablehlo:  # jax alone
        exported, meta = stablehlo.load_stablehlo(checkpoint)
    elif onnx:  # onnxruntime on the host, called from the jitted step
        session, meta = onnx_file.load_onnx(checkpoint)
        classes = session.get_outputs()[0].shape[-1]
    else:
        model, variables, meta = compact.load_compact(checkpoint)
        mesh = steps.make_mesh()
        variables = jax.device_put(variables, NamedSharding(mesh, P()))
    config = ml_collections.ConfigDict(meta["config"])
    config.data_dir = data_dir if data_dir is not None else meta["data_dir"]
    config.dataset = dataset or meta["dataset"]
    data = sources.load_data(config)
    sources.check_fits(config, data, config.data_dir or config.dataset)
    devices = mesh.devices.size
    batch = batch_size - batch_size % devices or devices

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def step(images, labels, mask):
        if is_stablehlo:
            logits = exported.call(images)
        elif onnx:
            logits = jax.pure_callback(
                functools.partial(onnx_file.run_session, session),
                jax.ShapeDtypeStruct((images.shape[0], classes), jnp.float32),
                images,
            )
        else:
            x = transforms.normalize(images, data.mean, data.std, jnp.float32)
            logits = model.apply(variables, x, train=False)
        return steps.eval_sums(logits, labels, mask)

    batches = loader.eval_batches(data.test, batch)
    return steps.evaluate(lambda _, *b: step(*b), None, batches, mesh)


def main(argv):
    errors.no_positional_arguments(argv)
    if _BATCH.value < 1:
        raise errors.ConfigError(f"--batch_size must be >= 1, got {_BATCH.value}")
    result = evaluate_compact(_CHECKPOINT.value, _DATA_DIR.value, _DATASET.value, _BATCH.value)
    print(
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"examples {result['examples']}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(errors.cli(main), flags_parser=errors.parse_flags)
