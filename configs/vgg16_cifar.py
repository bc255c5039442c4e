"""VGG-16 on CIFAR-10: 72.77M FLOPs (76.83%), 1.07M params (92.73%); paper top-1 93.47%."""

from dcff_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "vgg16"
    config.cprate = "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6"
    return config
