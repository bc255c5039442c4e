"""End-of-run plots (PNG): accuracy per epoch, the temperature schedule, kept widths per layer."""

from __future__ import annotations

from dcff_jax.method import fusion


def write_plots(
    workdir: str, history: list[dict], config, widths: list[tuple[int, int]]
) -> list[str]:
    """Write accuracy.png, temperature.png and widths.png into workdir; returns their paths.

    widths: (kept m, original c) per fused layer, in plan order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    epochs = [h["epoch"] + 1 for h in history]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["test_top1"] for h in history], marker="o", label="test top-1")
    ax.plot(epochs, [h["train_accuracy"] for h in history], marker=".", label="train (running)")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{config.model} DCFF")
    ax.legend()
    paths.append(_save(fig, workdir, "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    e = list(range(config.num_epochs + 1))
    ax.plot(
        e,
        [
            fusion.temperature(i, config.num_epochs, config.t_start, config.t_end, config.t_k)
            for i in e
        ],
    )
    ax.set(xlabel="epoch", ylabel="temperature T", yscale="log", title="temperature schedule")
    paths.append(_save(fig, workdir, "temperature.png"))

    fig, ax = plt.subplots(figsize=(max(6, len(widths) * 0.12), 4))
    index = list(range(len(widths)))
    ax.bar(index, [c for _, c in widths], color="lightgray", label="original")
    ax.bar(index, [m for m, _ in widths], color="tab:blue", label="kept")
    ax.set(xlabel="fused layer", ylabel="filters", title="kept widths per layer")
    ax.legend()
    paths.append(_save(fig, workdir, "widths.png"))
    return paths


def _save(fig, workdir: str, name: str) -> str:
    import io

    import matplotlib.pyplot as plt

    from dcff_jax import storage

    path = storage.resolve(workdir) / name
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return str(path)
