import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcff_jax import compact_variables, create_model, update_fusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location(
        "own_cnn", os.path.join(ROOT, "examples", "own_cnn.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "arch,cprate",
    [
        ("vgg16", "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6"),
        ("resnet56", "[0.6]*27+[0.3]+[0.5]+[0.2]"),
        ("googlenet", "([0.5]+[0.3]*6)*9+[0.4]"),
    ],
)
def test_compact_logits_equal_fused_eval_logits(arch, cprate):
    fused = create_model(arch, cprate, "fused")
    compact = create_model(arch, cprate, "compact")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
    variables = jax.jit(lambda x: fused.init(jax.random.key(0), x))(x)
    # Soft fusion (T = 1), real batch statistics: the hardest case for the export.
    variables["fusion"], _ = update_fusion(variables["params"], variables["fusion"], 0, 300)
    _, stats = jax.jit(lambda v, x: fused.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    variables["batch_stats"] = stats["batch_stats"]
    want = jax.jit(lambda v, x: fused.apply(v, x, train=False))(variables, x)
    exported = compact_variables(variables)
    assert "fusion" not in exported
    got = jax.jit(lambda v, x: compact.apply(v, x, train=False))(exported, x)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-4
    # And the exported tree is exactly the compact model's structure.
    abstract = jax.eval_shape(lambda: compact.init(jax.random.key(0), x))
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, exported)


def test_export_rejects_non_fused_variables():
    with pytest.raises(ValueError, match="fusion"):
        compact_variables({"params": {}})


def test_user_cnn_example_trains_and_exports():
    example = load_example()
    key_x, key_w = jax.random.split(jax.random.key(0))
    images = jax.random.normal(key_x, (1024, 16, 16, 3))
    labels = jnp.argmax(images.mean(axis=(1, 2)) @ jax.random.normal(key_w, (3, 10)), axis=-1)
    fused, fused_vars, compact, compact_vars, losses = example.train(
        images, labels, num_epochs=3, steps_per_epoch=15
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2
    assert fused_vars["params"]["conv1"]["kernel"].shape == (3, 3, 8, 32)
    assert compact_vars["params"]["conv1"]["kernel"].shape == (3, 3, 8, 8)
    x = images[:8]
    np.testing.assert_allclose(
        compact.apply(compact_vars, x), fused.apply(fused_vars, x), atol=1e-4
    )


def test_readme_shows_the_example_verbatim():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "examples", "own_cnn.py")) as f:
        source = f.read()
    body = source.split('if __name__ == "__main__":')[0].strip()
    assert body.split('"""', 2)[2].strip() in readme
