"""The published optimizers: PyTorch SGD (coupled weight decay, momentum) and its schedules."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """The published schedules, per step: multistep / step (x gamma at epoch milestones) or
    cosine, after a linear warm-up of config.warmup_epochs."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    total = config.num_epochs * steps_per_epoch
    if config.lr_schedule in ("multistep", "step"):
        boundaries = {int(m * steps_per_epoch): config.lr_gamma for m in config.lr_milestones}
        main = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
        if not warmup:
            return main
        warm = optax.linear_schedule(
            config.learning_rate / max(warmup, 1), config.learning_rate, warmup
        )
        return lambda step: jnp.where(step < warmup, warm(step), main(step))
    cosine = optax.cosine_decay_schedule(config.learning_rate, max(total - warmup, 1))
    if not warmup:
        return cosine
    warm = optax.linear_schedule(config.learning_rate / warmup, config.learning_rate, warmup)
    return optax.join_schedules([warm, cosine], [warmup])


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """PyTorch SGD: weight decay added to the gradient (coupled), then momentum, then the rate."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum),
    )
