"""ResNet-56 on CIFAR-10: 55.84M FLOPs (55.88%), 0.38M params (54.95%); paper top-1 93.26%."""

from dcff_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "resnet56"
    config.cprate = (
        "[0.7]*2+[0.5]*3+[0.3]*2+[0.4]+[0.8]+[0.7]*2+[0.8]*4+[0.4]+[0.2]*2+[0.7]+[0.3]+[0.8]"
        "+[0.4]*2+[0.7]+[0.3]+[0.4]+[0.8]+[0.0]*3"
    )
    return config
