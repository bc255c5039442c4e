"""Defaults shared by every experiment; each configs/<name>.py overrides what its recipe changes.

Training fields follow the published CIFAR-10 recipe (REFERENCE.md, "Training recipes").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model and plan.
    config.model = "vgg16"
    config.cprate = ""  # the published rate string; "" prunes nothing
    config.criterion = "reference"  # "reference" (published, freeze rule) | "exact" (log-space KL)
    config.t_start = 1.0
    config.t_end = 1e4
    config.t_k = 1.0
    # Data.
    config.dataset = (
        "cifar10"  # "cifar10" (tfds) | "cifar10_folder" (cifar-10-batches-py) | "imagenet2012"
    )
    config.data_dir = ""
    config.image_size = 32
    config.num_classes = 10
    # Optimisation: SGD, momentum, coupled (PyTorch-style) weight decay.
    config.batch_size = 256  # global, over all devices and hosts
    config.num_epochs = 300
    config.steps_per_epoch = -1  # -1: one pass over the training set; > 0 caps it (quick runs)
    config.learning_rate = 0.1
    config.lr_schedule = "multistep"  # "multistep" | "step" | "cosine"
    config.lr_milestones = (150, 225)  # epochs at which multistep multiplies the rate by lr_gamma
    config.lr_gamma = 0.1
    config.warmup_epochs = 0
    config.momentum = 0.9
    config.weight_decay = 5e-4
    # Run.
    config.seed = 0
    config.half_precision = False  # bfloat16 conv compute; params and fusion math stay float32
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    return config
