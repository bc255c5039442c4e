"""DCFF in your own Flax CNN: train fused with your own optax loop, export the compact network."""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import dcff_jax


class SmallCNN(nn.Module):
    variant: str = "fused"  # "fused" to train, "compact" to deploy: one definition for both
    rates: tuple = (0.5, 0.75)  # fraction of filters pruned per conv

    @nn.compact
    def __call__(self, x):
        for i, (filters, rate) in enumerate(zip((16, 32), self.rates, strict=True)):
            conv = dcff_jax.prunable_conv(
                self.variant, filters, rate, 3, padding=1, name=f"conv{i}"
            )
            x = nn.max_pool(nn.relu(conv(x)), (2, 2), (2, 2))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def train(images, labels, num_epochs=3, steps_per_epoch=20, batch_size=32, seed=0):
    model = SmallCNN("fused")
    variables = model.init(jax.random.key(seed), images[:1])
    params, fusion = variables["params"], variables["fusion"]
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)

    # compiler_options: XLA:CPU settings that make conv steps ~2x faster ({} elsewhere).
    @functools.partial(jax.jit, compiler_options=dcff_jax.compiler_options())
    def step(params, opt_state, fusion, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p, "fusion": fusion}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for epoch in range(num_epochs):
        # Once per epoch, before training it: re-fuse every FusedConv (one jitted call).
        fusion, info = dcff_jax.update_fusion(params, fusion, epoch, num_epochs)
        for s in range(steps_per_epoch):
            i = (epoch * steps_per_epoch + s) * batch_size % (len(images) - batch_size)
            params, opt_state, loss = step(
                params, opt_state, fusion, images[i : i + batch_size], labels[i : i + batch_size]
            )
            losses.append(float(loss))
    compact = dcff_jax.compact_variables({"params": params, "fusion": fusion})
    return model, {"params": params, "fusion": fusion}, SmallCNN("compact"), compact, losses


if __name__ == "__main__":
    key_x, key_w = jax.random.split(jax.random.key(0))
    images = jax.random.normal(key_x, (2048, 16, 16, 3))
    labels = jnp.argmax(images.mean(axis=(1, 2)) @ jax.random.normal(key_w, (3, 10)), axis=-1)
    fused, fused_vars, compact, compact_vars, losses = train(images, labels)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(
        "conv1 kernel",
        fused_vars["params"]["conv1"]["kernel"].shape,
        "->",
        compact_vars["params"]["conv1"]["kernel"].shape,
    )
