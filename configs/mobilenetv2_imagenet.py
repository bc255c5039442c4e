"""MobileNetV2 on ImageNet (ours: the published code has no MobileNetV2).

25 rates: stem, 16 expansion convs, 7 per-stage projection rates, the last 1x1 conv (see
dcff_jax/models/mobilenetv2.py). The paper's MobileNetV2 string is unpublished; this default
prunes the expansion convs only. Cosine schedule as the paper's "cos" ResNet-50 rows.
"""

from dcff_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "mobilenetv2"
    config.cprate = "[0.0]+[0.5]*16+[0.0]*7+[0.0]"
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.num_classes = 1000
    config.batch_size = 256
    config.num_epochs = 180
    config.learning_rate = 0.01
    config.momentum = 0.99
    config.weight_decay = 4e-5
    config.warmup_epochs = 5
    config.lr_schedule = "cosine"
    config.lr_milestones = ()
    return config
