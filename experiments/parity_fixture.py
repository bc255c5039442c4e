"""Record the published code's side of a parity check, so that CI checks ours against it
without torch (tests/test_parity_fixture.py reads what this writes).

Rerun it in a venv that has torch and scipy beside dcff_jax (torch is never a dependency):

    python3 -m venv --system-site-packages /tmp/torchvenv
    /tmp/torchvenv/bin/pip install 'torch==2.13.0+cpu' scipy
    /tmp/torchvenv/bin/python experiments/parity_fixture.py --dcff=/path/to/lmbxmu/DCFF

What it records, for the published fused ResNet-56 at the paper's rates (its classes imported
unchanged from the checkout; the fusion update restated by parity_torch.torch_update):
  - the initial state: every state-dict entry drawn from NumPy with a fixed seed (common_state),
    so ours starts from the same weights without the file holding them;
  - the fusion updates of epochs 0..max(EPOCHS) of 300 on those fixed weights (the published
    freeze rule carries the scores across them): at each of EPOCHS, every layer's matrix (rows in
    the slots dcff_jax.select_kept gives, as parity_torch places them) and its topk set;
  - at each of EPOCHS, one training-mode step from the common state with that epoch's matrices,
    in float64 and in float32: the loss, and of every gradient and every updated batch-norm
    statistic (in our layout, through dcff_jax.deploy.torch_import) its norm and two fixed
    random projections (summary), not the whole arrays.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dcff_jax import input_pipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parity_torch  # noqa: E402  (beside this script; NumPy only until torch is asked for)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "parity_published_resnet56.npz")
ARCH, SEED, BATCH, NUM_EPOCHS = "resnet56", 0, 16, 300
# T = 1, 4621.9, 7615.9 and 10000 (to float32): the dense first epoch, the freeze rule's epochs
# (the proxies underflow to one-hot rows and the KL scores turn non-finite), and the plateau.
EPOCHS = (0, 1, 2, 11)


def common_state(entries: list[tuple[str, list[int]]], seed: int = SEED) -> dict[str, np.ndarray]:
    """A published state dict drawn from NumPy: entry i from default_rng([seed, i]), in float32.

    Conv and linear weights He-normal over their fan-in, linear biases uniform, batch norm
    scales in [0.5, 1.5], shifts and running means ~0.1 N(0, 1), running variances in [0.5, 1.5]
    (so that every term of a layer computes something), the fusion buffers and counters zero.
    """
    state = {}
    for i, (name, shape) in enumerate(entries):
        rng = np.random.default_rng([seed, i])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif leaf == "weight":  # batch norm scale
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf in ("bias", "running_mean"):
            value = 0.1 * rng.normal(size=shape)
        else:  # layeri_softmaxP, fused_weight, fused_bias (set by the update), num_batches_tracked
            value = np.zeros(shape)
        dtype = np.int64 if leaf == "num_batches_tracked" else np.float32
        state[name] = value.astype(dtype)
    return state


def summary(path: str, array, seed: int = SEED) -> np.ndarray:
    """(norm, two projections) of an array in float64: the projections onto fixed standard
    normal vectors drawn from its path, so a change in any element shows."""
    a = np.asarray(array, np.float64).ravel()
    return np.concatenate([[np.linalg.norm(a)], projections(path, a.size, seed) @ a])


def projections(path: str, size: int, seed: int = SEED) -> np.ndarray:
    """summary's two fixed standard normal vectors for the array at `path`: (2, size)."""
    return np.random.default_rng([seed, zlib.crc32(path.encode())]).normal(size=(2, size))


def flat_paths(tree) -> dict[str, np.ndarray]:
    """{"a/b/c": leaf} of a nested dict."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def fixed_batch():
    """The step's batch: (uint8 (BATCH, 32, 32, 3), int32 (BATCH,)), augmented once, as
    parity_torch feeds both sides."""
    return parity_torch.fixed_batches("", 1, BATCH, SEED)[0]


def record(dcff_dir: str) -> dict[str, np.ndarray]:
    """The published side: {key: array} for the fixture (see the module docstring)."""
    import torch

    import dcff_jax

    torch.manual_seed(SEED)  # unused by the state (common_state) but fixes anything else
    rates = dcff_jax.layer_rates(ARCH, parity_torch.PAPER_RATES[ARCH])
    theirs = parity_torch.published_model(dcff_dir, ARCH, list(rates))
    ours = dcff_jax.create_model(ARCH, parity_torch.PAPER_RATES[ARCH], "fused")
    shape = dcff_jax.input_shape(ARCH)
    entries = [(k, list(v.shape)) for k, v in theirs.state_dict().items()]
    state = common_state(entries)
    layers = dcff_jax.models.fused_layers(ARCH, parity_torch.PAPER_RATES[ARCH])
    images, labels = fixed_batch()
    meta = {
        "arch": ARCH,
        "rates": parity_torch.PAPER_RATES[ARCH],
        "seed": SEED,
        "batch": BATCH,
        "num_epochs": NUM_EPOCHS,
        "epochs": EPOCHS,
        "state": entries,
        "torch": torch.__version__,
        "dcff_commit": _commit(dcff_dir),
    }
    out = {}

    # The fusion updates, on the fixed weights (the update reads the weights only).
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    modules = parity_torch.fused_modules(theirs)
    carried = [{"scores": None, "kept": np.arange(layer.kept)} for layer in layers]
    matrices = {}
    for epoch in range(max(EPOCHS) + 1):
        carried = [
            parity_torch.torch_update(module, epoch, NUM_EPOCHS, s)
            for module, s in zip(modules, carried, strict=True)
        ]
        if epoch in EPOCHS:  # each a concatenation over the layers, in plan order
            matrices[epoch] = [m.layeri_softmaxP.detach().clone() for m in modules]
            out[f"matrix/{epoch}"] = np.concatenate([m.numpy().ravel() for m in matrices[epoch]])
            out[f"slots/{epoch}"] = np.concatenate([s["kept"] for s in carried]).astype(np.int32)
            topk = [np.sort(s["published_kept"]) for s in carried]
            out[f"topk/{epoch}"] = np.concatenate(topk).astype(np.int32)

    # One step from the common state per epoch and dtype.
    loss_fn = torch.nn.CrossEntropyLoss()
    for dtype_name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        for epoch in EPOCHS:
            model = theirs.to(dtype)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
            for module, matrix in zip(modules, matrices[epoch], strict=True):
                module.layeri_softmaxP = matrix.to(dtype)
            model.train()
            model.zero_grad()
            loss = loss_fn(
                model(parity_torch.torch_input(images, dtype)), torch.from_numpy(labels).long()
            )
            loss.backward()
            prefix = f"{dtype_name}/{epoch}"
            out[f"{prefix}/loss"] = np.array(float(loss.detach()), np.float64)
            grads, _ = parity_torch.copy_torch_to_flax(model, ours, shape, lambda p: p.grad)
            _, stats = parity_torch.copy_torch_to_flax(model, ours, shape)
            for kind, tree in (("grad", grads), ("batch_stats", stats)):
                leaves = flat_paths(tree)  # one (n, 3) array: the rows in meta[kind] order
                meta[kind] = sorted(leaves)
                out[f"{prefix}/{kind}"] = np.stack([summary(p, leaves[p]) for p in meta[kind]])
    out["meta"] = np.array(json.dumps(meta))
    return out


# --------------------------------------------------------------------------------------------
# Ours against the recording (no torch): tests/test_parity_fixture.py checks what compare()
# measures; `--report` prints it.


def load(path: str = FIXTURE) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {key: array}) of a recording."""
    with np.load(path) as data:
        return json.loads(str(data["meta"])), {k: data[k] for k in data.files if k != "meta"}


def compare(path: str = FIXTURE, compiler_options: dict | None = None) -> dict:
    """Our side of a recording, measured against it; the step compiled with these XLA options
    (jax.jit's compiler_options) if given.

    Returns {"fusion": {epoch: {"sets_agree", "slots_agree", "matrix_max_abs_diff"}},
             "step": {(dtype, epoch): {"loss": relative error, "grad" / "batch_stats":
                      per-array relative errors (relative_errors), "published_float32_<kind>":
                      the published float32 step's, for float32}}},
    every step error against the published float64 step, from the common state with the
    published matrices (so that a matrix's last-place difference is not counted twice).
    """
    import dcff_jax
    from dcff_jax.deploy import torch_import

    meta, arrays = load(path)
    model = dcff_jax.create_model(meta["arch"], meta["rates"], "fused")
    variables = torch_import.variables_from_torch(
        model, common_state([(n, s) for n, s in meta["state"]], meta["seed"]), 32
    )
    layers = dcff_jax.models.fused_layers(meta["arch"], meta["rates"])
    fusion = traverse_util.unflatten_dict(
        {
            tuple(layer.path.split("/")): dcff_jax.init_fusion_state(layer.filters, layer.kept)
            for layer in layers
        }
    )
    images, labels = fixed_batch()
    report = {"fusion": {}, "step": {}}
    published = {}
    for epoch in range(max(meta["epochs"]) + 1):
        fusion, _ = dcff_jax.update_fusion(
            variables["params"], fusion, epoch, meta["num_epochs"], criterion="reference"
        )
        if epoch not in meta["epochs"]:
            continue
        published[epoch] = published_fusion(fusion, layers, arrays, epoch)
        mine = traverse_util.flatten_dict(jax.device_get(fusion))
        theirs = traverse_util.flatten_dict(published[epoch])
        topk = np.split(arrays[f"topk/{epoch}"], np.cumsum([x.kept for x in layers])[:-1])
        sets = slots = True
        difference = 0.0
        for layer, published_set in zip(layers, topk, strict=True):
            key = tuple(layer.path.split("/"))
            kept = np.asarray(mine[key + ("kept",)])
            sets &= bool(np.array_equal(np.sort(kept), published_set))
            slots &= bool(np.array_equal(kept, theirs[key + ("kept",)]))
            gap = np.abs(np.asarray(mine[key + ("matrix",)]) - theirs[key + ("matrix",)])
            difference = max(difference, float(gap.max()))
        report["fusion"][epoch] = {
            "sets_agree": sets,
            "slots_agree": slots,
            "matrix_max_abs_diff": difference,
        }
    for dtype_name in ("float64", "float32"):
        with jax.enable_x64(dtype_name == "float64"):
            dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
            for epoch in meta["epochs"]:
                loss, grads, stats = step(
                    model, variables, published[epoch], images, labels, dtype, compiler_options
                )
                exact = float(arrays[f"float64/{epoch}/loss"])
                measured = {"loss": abs(loss - exact) / abs(exact)}
                for kind, tree in (("grad", grads), ("batch_stats", stats)):
                    leaves = flat_paths(jax.device_get(tree))
                    if sorted(leaves) != meta[kind]:
                        raise ValueError(f"our {kind} arrays are not the recorded ones")
                    want = arrays[f"float64/{epoch}/{kind}"]
                    measured[kind] = relative_errors(leaves, None, want, meta[kind])
                    if dtype_name == "float32":
                        rows = arrays[f"float32/{epoch}/{kind}"]
                        measured[f"published_float32_{kind}"] = relative_errors(
                            leaves, rows, want, meta[kind]
                        )
                report["step"][dtype_name, epoch] = measured
    return report


def markdown(report: dict) -> str:
    """compare()'s figures as two tables."""
    lines = [
        "| epoch | T | kept sets agree | slots agree | max abs diff fusion matrices |",
        "|---|---|---|---|---|",
    ]
    for epoch, f in report["fusion"].items():
        lines.append(
            f"| {epoch} | {parity_torch.published_temperature(epoch, NUM_EPOCHS):.1f} | "
            f"{'yes' if f['sets_agree'] else 'NO'} | {'yes' if f['slots_agree'] else 'NO'} | "
            f"{f['matrix_max_abs_diff']:.2e} |"
        )
    lines += [
        "",
        "| dtype | epoch | loss rel. error | gradients: max (median) | batch statistics: max "
        "| published float32: gradients max (median) | batch statistics max |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dtype_name, epoch), m in report["step"].items():
        grad, stats = m["grad"], m["batch_stats"]
        line = (
            f"| {dtype_name} | {epoch} | {m['loss']:.1e} | {grad.max():.1e} "
            f"({np.median(grad):.1e}) | {stats.max():.1e} |"
        )
        if dtype_name == "float32":
            theirs, theirs_stats = m["published_float32_grad"], m["published_float32_batch_stats"]
            line += f" {theirs.max():.1e} ({np.median(theirs):.1e}) | {theirs_stats.max():.1e} |"
        else:
            line += " | |"
        lines.append(line)
    return "\n".join(lines)


def published_fusion(own: dict, layers, arrays: dict, epoch: int) -> dict:
    """Our fusion collection `own` with the recorded matrices and slots of `epoch`."""
    matrices, slots = arrays[f"matrix/{epoch}"], arrays[f"slots/{epoch}"]
    flat, at, row = traverse_util.flatten_dict(own), 0, 0
    for layer in layers:
        path, size = tuple(layer.path.split("/")), layer.kept * layer.filters
        flat[path + ("matrix",)] = matrices[at : at + size].reshape(layer.kept, layer.filters)
        flat[path + ("kept",)] = slots[row : row + layer.kept]
        at, row = at + size, row + layer.kept
    return traverse_util.unflatten_dict(flat)


def step(model, variables: dict, fusion: dict, images, labels, dtype, compiler_options=None):
    """One training-mode forward and backward from `variables` with `fusion`: (loss, gradients,
    the updated batch statistics), as the published step computes them before its update;
    compiled with `compiler_options` (XLA options) if given."""
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
    fusion = jax.tree.map(lambda a: a if a.dtype.kind == "i" else jnp.asarray(a, dtype), fusion)
    x = input_pipeline.normalize(
        jnp.asarray(images), input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, dtype
    )
    state = {"batch_stats": cast(variables["batch_stats"]), "fusion": fusion}
    options = tuple(sorted((compiler_options or {}).items()))
    loss_and_grads = _jitted_loss_and_grads(options)
    (loss, stats), grads = loss_and_grads(model, cast(variables["params"]), state, x, labels)
    return float(loss), grads, stats


@functools.lru_cache  # one compile per dtype and options, not one per epoch
def _jitted_loss_and_grads(compiler_options: tuple):
    return jax.jit(_loss_and_grads, static_argnums=0, compiler_options=dict(compiler_options))


def _loss_and_grads(model, params, state, x, labels):
    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, **state}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def relative_errors(tree, rows: np.ndarray, exact: np.ndarray, paths: list[str]) -> np.ndarray:
    """Per array of `tree` ({path: array}): how far `rows` (its recorded summaries, or ours
    when `rows` is None) are from `exact` (the published float64 summaries), relative to the
    summary's scale: |a| for the norm, |a| |r| for a projection onto r (Cauchy-Schwarz)."""
    out = []
    for i, path in enumerate(paths):
        size = np.asarray(tree[path]).size
        got = summary(path, tree[path]) if rows is None else rows[i]
        norms = np.linalg.norm(projections(path, size), axis=1)
        scale = exact[i][0] * np.concatenate([[1.0], norms]) + 1e-300
        out.append(float((np.abs(got - exact[i]) / scale).max()))
    return np.array(out)


def _commit(checkout: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dcff", default="", help="checkout of github.com/lmbxmu/DCFF")
    parser.add_argument(
        "--report", action="store_true", help="measure ours against --out instead (no torch)"
    )
    parser.add_argument("--commit", default="", help="the checkout's commit, if not a git tree")
    parser.add_argument("--out", default=FIXTURE)
    args = parser.parse_args()
    if args.report:
        print(markdown(compare(args.out)))
        return
    if not args.dcff:
        parser.error("give --dcff=CHECKOUT to record, or --report to compare")
    arrays = record(args.dcff)
    if args.commit:
        meta = json.loads(str(arrays["meta"]))
        meta["dcff_commit"] = args.commit
        arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {len(arrays)} arrays, {os.path.getsize(args.out)} bytes, to {args.out}")


if __name__ == "__main__":
    main()
