"""MobileNetV2 on ImageNet (ours: the published code has no MobileNetV2).

25 rates: stem, 16 expansion convs, 7 per-stage projection rates, the last 1x1 conv (see
dcff_jax/models/mobilenetv2.py). The paper's MobileNetV2 string is unpublished; this one is what
dcff_jax.search_plan finds for the paper's row, 53.3% of the FLOPs (multiply-accumulates, of
300.77M) and 25.1% of the params removed: it reaches 140.2M (53.39%) and 2.63M (25.05%)
(experiments/RESULTS.md). Cosine schedule as the paper's "cos" ResNet-50 rows.
"""

from dcff_jax.config import default_config


def get_config():
    config = default_config()
    config.model = "mobilenetv2"
    config.cprate = (
        "[0.5]+[0.54]+[0.5]+[0.48]+[0.43]+[0.42]+[0.39]+[0.25]*3+[0.29]+[0.32]*2+[0.21]+[0.11]*2"
        "+[0.15]+[0.57]+[0.51]+[0.45]+[0.35]+[0.37]+[0.17]+[0.19]+[0.08]"
    )
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
