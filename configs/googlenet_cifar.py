"""GoogLeNet on CIFAR-10: 457.22M FLOPs (70.11%), 2.08M params (66.28%); paper top-1 94.92%."""

from dcff_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "googlenet"
    config.cprate = (
        "[0.0]*2+[0.8]+[0.0]+[0.8]*2+[0.0]*2+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*3"
        "+([0.0]+[0.8]+[0.0]+[0.8]*2+[0.0]*2)*3+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*2"
    )
    return config
