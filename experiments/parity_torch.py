"""Step-for-step parity with the published PyTorch code, from one set of initial weights.

Runs in a venv that has torch AND dcff_jax (torch is never a dependency of the package):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 scipy -e .
    /tmp/torchvenv/bin/python experiments/parity_torch.py --dcff=/path/to/lmbxmu/DCFF \
        --arch=resnet56 --epochs=3 --steps=20 --batch=128 --data=../shared/data/cifar-10-batches-py

What it does:
  - imports the published fused model classes unchanged from the checkout (models/cifar/*.py),
    builds one with the paper's rate string and copies its initial weights into ours;
  - feeds both the same batches (real CIFAR-10 with a fixed pad-4 crop + flip drawn once on the
    host) with the published recipe (SGD lr 0.1, momentum 0.9, coupled weight decay 5e-4);
  - before each short "epoch" runs the fusion update on both: ours is dcff_jax.update_fusion; the
    published update lives in main_cifar.py's training loop (not importable), so `torch_update`
    restates it step for step (scipy cdist, softmax(-D / t) with t = 1 / T, the O(c^3) KL with
    1e-7, the freeze rule, topk);
  - reports per step the loss difference, per epoch the fusion matrices' and params' max |diff|.

Row order: the published code places the fused rows in torch.topk(sorted=False) order, ours in
stable slots (a filter that stays selected keeps its output channel). Both are a relabelling of
the same compact channels at epoch 0; for a step-for-step comparison the torch side puts its rows
in our slots (`dcff_jax.select_kept`), the report says whether the two kept SETS agree, and the
matrices are compared row by row for the same filter (near-tied scores, rounded differently,
can order the entering filters, hence the slots, differently: a relabelling).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PAPER_RATES = {
    "resnet56": (
        "[0.7]*2+[0.5]*3+[0.3]*2+[0.4]+[0.8]+[0.7]*2+[0.8]*4+[0.4]+[0.2]*2+[0.7]+[0.3]+[0.8]"
        "+[0.4]*2+[0.7]+[0.3]+[0.4]+[0.8]+[0.0]*3"
    ),
    "vgg16": "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6",
}


# --------------------------------------------------------------------------------------------
# Data: the same augmented batches for both.


def fixed_batches(data_dir: str, steps: int, batch: int, seed: int) -> list[tuple]:
    """`steps` batches of (uint8 (n, 32, 32, 3) augmented images, int32 labels), drawn once.

    Pad-4 zero crop and a horizontal flip with p = 0.5, as the published RandomCrop(32, padding=4)
    and RandomHorizontalFlip do on the uint8 image. Without data_dir: a fixed random set.
    """
    rng = np.random.default_rng(seed)
    if data_dir:
        from dcff_jax.input_pipeline import read_cifar_folder

        images, labels = read_cifar_folder(data_dir, "train")
    else:
        images = rng.integers(0, 256, (steps * batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, (steps * batch,), dtype=np.int32)
    order = rng.permutation(len(images))[: steps * batch]
    padded = np.pad(images[order], ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy, dx = rng.integers(0, 9, (2, len(order)))
    flip = rng.random(len(order)) < 0.5
    out = np.stack([padded[i, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(len(order))])
    out[flip] = out[flip, :, ::-1]
    labels = labels[order].astype(np.int32)
    return [
        (out[s * batch : (s + 1) * batch], labels[s * batch : (s + 1) * batch])
        for s in range(steps)
    ]


def torch_input(images: np.ndarray, dtype):
    """uint8 NHWC -> normalised NCHW in `dtype`: ToTensor + Normalize, in float32 as published
    (in float64 for float64 runs, as dcff_jax.input_pipeline.normalize does then)."""
    import torch

    from dcff_jax.input_pipeline import CIFAR_MEAN, CIFAR_STD

    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
    mean = torch.tensor(CIFAR_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# The published models, imported unchanged.


def published_model(dcff_dir: str, arch: str, layer_rates: list[float]):
    """The published fused model class for `arch`, from the checkout at dcff_dir."""
    if not os.path.isfile(os.path.join(dcff_dir, "models", "cifar", "fuse_modules.py")):
        raise SystemExit(f"error: {dcff_dir} is not a checkout of lmbxmu/DCFF (no models/cifar)")
    sys.path.insert(0, os.path.abspath(dcff_dir))
    if arch == "vgg16":
        return importlib.import_module("models.cifar.vgg").Fused_VGG("vgg16", layer_rates)
    resnet = importlib.import_module("models.cifar.resnet")
    return getattr(resnet, f"fused_{arch}")(layer_rates)


def fused_modules(model) -> list:
    """The published FuseConv2d layers in registration (= plan) order."""
    return [m for m in model.modules() if type(m).__name__ == "FuseConv2d"]


def torch_state(model, param_value=None) -> dict[str, np.ndarray]:
    """The torch model's state dict as NumPy copies, for torch_import.variables_from_torch.

    param_value(p): what to give for each parameter p instead of p itself (e.g. its SGD momentum
    buffer). Copies, because .numpy() shares the tensor's memory, which jnp.asarray may alias in
    turn, and the torch optimizer updates it in place.
    """
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if param_value is not None:
        for name, param in model.named_parameters():
            state[name] = param_value(param).detach().numpy().copy()
    return state


def copy_torch_to_flax(model, jax_model, shape, param_value=None) -> tuple[dict, dict]:
    """Our (params, batch_stats) holding the torch model's current weights (or param_value's)."""
    from dcff_jax.deploy import torch_import

    variables = torch_import.variables_from_torch(
        jax_model, torch_state(model, param_value), shape[1]
    )
    return variables["params"], variables["batch_stats"]


# --------------------------------------------------------------------------------------------
# The published per-epoch update (main_cifar.py), restated.


def published_temperature(epoch: int, num_epochs: int) -> float:
    t_start, t_end, k = 1.0, 10000.0, 1.0
    a = 2 * (t_end - t_start) * (1 + math.exp(-k * num_epochs)) / (1 - math.exp(-k * num_epochs))
    return a / (1 + math.exp(-k * epoch)) + t_start - a / 2


def torch_update(module, epoch: int, num_epochs: int, state: dict) -> dict:
    """One FuseConv2d's update as main_cifar.py computes it; rows placed in our stable slots.

    state: {"scores": torch (c,) or None before epoch 0, "kept": np (m,) our slots}. Sets
    module.layeri_softmaxP and returns the new state with "published_kept", the topk set.
    """
    import torch
    from scipy.spatial.distance import cdist

    import dcff_jax

    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    distances = torch.from_numpy(cdist(weight, weight, metric="euclidean").astype(np.float32))
    t = 1 / published_temperature(epoch, num_epochs)
    proxy = torch.softmax(-distances / t, dim=1)
    kl = torch.mean(proxy[:, None, :] * (proxy[:, None, :] / (proxy + 1e-7)).log(), dim=2)
    scores = torch.sum(kl, dim=1)
    if state["scores"] is not None and not bool(torch.isfinite(scores).all()):
        scores = state["scores"]  # the published freeze rule
    m = module.layeri_softmaxP.shape[0]
    published_kept = torch.topk(scores, m, sorted=False).indices.numpy()
    kept = np.asarray(dcff_jax.select_kept(scores.numpy(), state["kept"]))
    module.layeri_softmaxP = proxy[torch.from_numpy(kept).long(), :].to(module.weight.dtype)
    return {"scores": scores, "kept": kept, "published_kept": published_kept}


# --------------------------------------------------------------------------------------------


def run(
    dcff_dir: str,
    arch: str,
    epochs: int,
    steps: int,
    batch: int,
    data_dir: str,
    seed: int = 0,
    float64: bool = False,
    shadow: bool = True,
    resync: bool = False,
    learning_rate: float = 0.1,
    num_epochs: int = 300,
    threads: int = 0,
) -> dict:
    """Train both models side by side; returns per-step losses and per-epoch differences.

    float64: both sides compute in float64 (an implementation check: any gap is a difference in
    what is computed, not rounding). shadow (float32 runs): also train a float64 copy of the
    published model on the same batches, the yardstick for how far float32 rounding alone moves
    a run. resync: every epoch starts ours from the published model's params, batch-norm
    statistics and momentum buffers, so that each epoch's steps are compared from one state
    (the T = 1 epoch amplifies rounding differences too fast for a longer comparison).
    """
    import copy

    import jax

    if float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import torch
    from flax import traverse_util

    import dcff_jax
    from dcff_jax import input_pipeline
    from dcff_jax.config import default_config
    from dcff_jax.training import optim
    from dcff_jax.training import steps as steps_lib

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rates = dcff_jax.layer_rates(arch, PAPER_RATES[arch])
    theirs = published_model(dcff_dir, arch, list(rates))
    ours = dcff_jax.create_model(arch, PAPER_RATES[arch], "fused")
    shape = dcff_jax.input_shape(arch)
    params, batch_stats = copy_torch_to_flax(theirs, ours, shape)
    if float64:
        torch_dtype, jax_dtype = torch.float64, jnp.float64
    else:
        torch_dtype, jax_dtype = torch.float32, jnp.float32
    theirs = theirs.to(torch_dtype)
    models = {"torch": theirs}
    if shadow and not float64:
        models["torch64"] = copy.deepcopy(theirs).to(torch.float64)

    config = default_config()
    config.num_epochs = num_epochs
    config.learning_rate = learning_rate
    tx = optim.make_optimizer(config, steps)
    mesh = steps_lib.make_mesh()
    state = steps_lib.create_train_state(ours, tx, 32, seed, mesh)
    cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jax_dtype), tree)  # noqa: E731
    params = cast(params)
    state = state.replace(params=params, batch_stats=cast(batch_stats), opt_state=tx.init(params))
    spec = steps_lib.InputSpec(
        input_pipeline.CIFAR_MEAN, input_pipeline.CIFAR_STD, augment=False, dtype=jax_dtype
    )
    train_step = steps_lib.make_train_step(ours, tx, spec, mesh)
    optimizers = {
        name: torch.optim.SGD(
            m.parameters(),
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        for name, m in models.items()
    }
    loss_fn = torch.nn.CrossEntropyLoss()
    layers = dcff_jax.models.fused_layers(arch, PAPER_RATES[arch])
    torch_states = {
        name: [{"scores": None, "kept": np.arange(layer.kept)} for layer in layers]
        for name in models
    }

    report = {
        "arch": arch,
        "batch": batch,
        "steps_per_epoch": steps,
        "seed": seed,
        "dtype": "float64" if float64 else "float32",
        "learning_rate": learning_rate,
        "resync": resync,
        "epochs": [],
    }
    data = fixed_batches(data_dir, steps * epochs, batch, seed)
    for m in models.values():
        m.train()
    for epoch in range(epochs):
        if resync and epoch > 0:
            buffers = optimizers["torch"].state
            now_params, now_stats = copy_torch_to_flax(theirs, ours, shape)
            momentum, _ = copy_torch_to_flax(
                theirs, ours, shape, lambda p, b=buffers: b[p]["momentum_buffer"]
            )
            state = state.replace(
                params=cast(now_params),
                batch_stats=cast(now_stats),
                opt_state=_with_trace(state.opt_state, cast(momentum)),
            )
            if "torch64" in models:  # the yardstick starts from the same state too
                _resync_torch(models["torch64"], optimizers["torch64"], theirs, buffers)
        own_fusion, _ = dcff_jax.update_fusion(
            state.params, state.fusion, epoch, num_epochs, criterion="reference"
        )
        for name, m in models.items():
            torch_states[name] = [
                torch_update(module, epoch, num_epochs, s)
                for module, s in zip(fused_modules(m), torch_states[name], strict=True)
            ]
        # Our update is compared with the published one here; the steps then run with the
        # published matrices on both sides, so that a 1-ulp difference in a matrix (which the
        # T = 1 epoch amplifies, see the report) does not masquerade as a step difference.
        flat_own = traverse_util.flatten_dict(jax.device_get(own_fusion))
        matrix_diff, sets_agree, slots_agree = 0.0, True, True
        for layer, module, s in zip(
            layers, fused_modules(theirs), torch_states["torch"], strict=True
        ):
            path = tuple(layer.path.split("/"))
            published = module.layeri_softmaxP.detach().double().numpy()
            own = np.asarray(flat_own[path + ("matrix",)], np.float64)
            kept = np.asarray(flat_own[path + ("kept",)])
            same_set = set(kept.tolist()) == set(s["published_kept"].tolist())
            sets_agree &= same_set
            slots_agree &= bool(np.array_equal(kept, s["kept"]))
            if same_set:  # compare each kept filter's row, whichever slot it sits in
                own = own[np.argsort(kept)]
                published_rows = published[np.argsort(s["kept"])]
            else:
                published_rows = published
            difference = np.abs(own - published_rows).max()
            matrix_diff = max(matrix_diff, float(difference))
            flat_own[path + ("matrix",)] = published.astype(jax_dtype)
            flat_own[path + ("kept",)] = s["kept"].astype(np.int32)  # and its slots
        state = state.replace(fusion=traverse_util.unflatten_dict(flat_own))
        record = {
            "epoch": epoch,
            "temperature": published_temperature(epoch, num_epochs),
            "fusion_matrix_max_abs_diff": matrix_diff,
            "kept_sets_agree": bool(sets_agree),
            "kept_slots_agree": bool(slots_agree),
            "steps": [],
        }
        start = time.time()
        for s in range(steps):
            images, labels = data[epoch * steps + s]
            losses = {}
            for name, m in models.items():
                optimizers[name].zero_grad()
                x = torch_input(images, next(m.parameters()).dtype)
                loss = loss_fn(m(x), torch.from_numpy(labels).long())
                loss.backward()
                optimizers[name].step()
                losses[name] = float(loss.detach())
            state, metrics = train_step(state, *steps_lib.to_global(mesh, images, labels))
            step = {"torch": losses["torch"], "jax": float(metrics["loss"])}
            step["relative_diff"] = abs(step["torch"] - step["jax"]) / abs(step["torch"])
            if "torch64" in losses:
                step["torch64"] = losses["torch64"]
                step["torch32_vs_64"] = abs(losses["torch"] - losses["torch64"]) / losses["torch64"]
            record["steps"].append(step)
        record["seconds"] = time.time() - start
        flat_params = traverse_util.flatten_dict(jax.device_get(state.params))
        now, _ = copy_torch_to_flax(theirs, ours, shape)
        flat_now = traverse_util.flatten_dict(now)
        record["params_max_abs_diff"] = max(
            float(np.abs(np.asarray(flat_params[k], np.float64) - flat_now[k]).max())
            for k in flat_now
        )
        record["params_max_abs"] = max(float(np.abs(v).max()) for v in flat_now.values())
        report["epochs"].append(record)
        worst = max(x["relative_diff"] for x in record["steps"])
        print(
            f"epoch {epoch}: T={record['temperature']:.1f} |dF|max={matrix_diff:.2e} "
            f"sets agree={sets_agree} loss {record['steps'][0]['torch']:.4f} -> "
            f"{record['steps'][-1]['torch']:.4f}, worst step rel diff {worst:.2e}, "
            f"|dparams|max={record['params_max_abs_diff']:.2e} ({record['seconds']:.0f} s)",
            flush=True,
        )
    return report


def _resync_torch(model, optimizer, source, source_buffers) -> None:
    """Copy source's weights, statistics and momentum buffers into model (any dtype)."""
    import torch

    model.load_state_dict(source.state_dict())  # copy_ casts to model's dtype
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), source.parameters(), strict=True):
            buffer = source_buffers[theirs]["momentum_buffer"].to(mine.dtype).clone()
            optimizer.state[mine]["momentum_buffer"] = buffer


def _with_trace(opt_state, trace):
    """The optax state with its momentum (optax.trace's TraceState) replaced."""
    import jax
    import optax

    def swap(node):
        return node._replace(trace=trace) if isinstance(node, optax.TraceState) else node

    return jax.tree.map(swap, opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))


def markdown(report: dict) -> str:
    """Per-step and per-epoch tables of one run."""
    lines = [
        f"### {report['arch']}, {report['dtype']}: batch {report['batch']}, "
        f"{report['steps_per_epoch']} steps per epoch, lr {report['learning_rate']}, "
        f"seed {report['seed']}"
        + (", each epoch from the published state" if report["resync"] else ""),
        "",
        "| epoch | T | max abs diff fusion matrices | kept sets agree | steps | "
        "worst step loss rel diff | median | max abs diff params (max abs param) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["epochs"]:
        rel = [s["relative_diff"] for s in e["steps"]]
        lines.append(
            f"| {e['epoch']} | {e['temperature']:.1f} | {e['fusion_matrix_max_abs_diff']:.2e} | "
            f"{'yes' if e['kept_sets_agree'] else 'NO'} | {len(rel)} | {max(rel):.2e} | "
            f"{float(np.median(rel)):.2e} | {e['params_max_abs_diff']:.2e} "
            f"({e['params_max_abs']:.2f}) |"
        )
    shadow = "torch64" in report["epochs"][0]["steps"][0]
    head = "| step | torch loss | dcff-jax loss | relative diff |"
    rule = "|---|---|---|---|"
    if shadow:
        head += " torch float64 loss | torch float32 vs float64 |"
        rule += "---|---|"
    lines += ["", head, rule]
    step = 0
    for e in report["epochs"]:
        for s in e["steps"]:
            line = f"| {step} | {s['torch']:.6f} | {s['jax']:.6f} | {s['relative_diff']:.2e} |"
            if shadow:
                line += f" {s['torch64']:.6f} | {s['torch32_vs_64']:.2e} |"
            lines.append(line)
            step += 1
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dcff", required=True, help="checkout of github.com/lmbxmu/DCFF")
    parser.add_argument("--arch", default="resnet56", choices=sorted(PAPER_RATES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per short epoch")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data", default="", help="cifar-10-batches-py folder ('' = random)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="the published recipe: 0.1")
    parser.add_argument("--float64", action="store_true", help="both sides in float64")
    parser.add_argument(
        "--no_shadow", action="store_true", help="float32: skip the float64 torch yardstick"
    )
    parser.add_argument(
        "--resync", action="store_true", help="start every epoch from the published state"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="", help="write the JSON report here")
    args = parser.parse_args()
    report = run(
        args.dcff,
        args.arch,
        args.epochs,
        args.steps,
        args.batch,
        args.data,
        args.seed,
        float64=args.float64,
        shadow=not args.no_shadow,
        resync=args.resync,
        learning_rate=args.lr,
        threads=args.threads,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))


if __name__ == "__main__":
    main()
