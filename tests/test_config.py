import os

import pytest

from dcff_jax.config import default_config, load_config
from dcff_jax.method import rate_strings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    "vgg16_cifar",
    "resnet56_cifar",
    "resnet110_cifar",
    "googlenet_cifar",
    "resnet50_imagenet",
    "mobilenetv2_imagenet",
    "default",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_its_rates_fit_its_model(name):
    config = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    # Exactly the default fields: a misspelt override (config.lr_milestone = ...) would otherwise
    # add a field that nothing reads, and the recipe would silently keep the default.
    assert sorted(config.keys()) == sorted(default_config().keys())
    rate_strings.layer_rates(
        config.model, config.cprate or [0.0] * rate_strings.LAYOUTS[config.model].num_rates
    )


def test_published_cifar_recipe():
    config = load_config(os.path.join(ROOT, "configs", "resnet56_cifar.py"))
    assert (config.learning_rate, config.momentum, config.weight_decay) == (0.1, 0.9, 5e-4)
    assert (config.batch_size, config.num_epochs, tuple(config.lr_milestones)) == (
        256,
        300,
        (150, 225),
    )


def test_resnet50_presets_and_unknown_preset():
    path = os.path.join(ROOT, "configs", "resnet50_imagenet.py")
    cos = load_config(path, "cos-1.52B")
    assert (cos.lr_schedule, cos.learning_rate, cos.momentum, cos.num_epochs) == (
        "cosine",
        0.01,
        0.99,
        180,
    )
    step = load_config(path)
    assert (step.lr_schedule, step.num_epochs, tuple(step.lr_milestones)) == (
        "step",
        90,
        (30, 60, 80),
    )
    with pytest.raises(ValueError, match="unknown ResNet-50 preset 'cos-9B'"):
        load_config(path, "cos-9B")


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(os.path.join(ROOT, "configs", "nope.py"))


def test_a_misspelt_field_in_a_config_file_is_caught(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from dcff_jax.config import default_config\n"
        "def get_config():\n"
        "    config = default_config()\n"
        "    config.lr_milestone = (10, 20)\n"
        "    return config\n"
    )
    config = load_config(str(path))
    assert sorted(config.keys()) != sorted(default_config().keys())
