"""ResNet-50 on ImageNet, the six published rows.

Pick a row by preset: `--config=configs/resnet50_imagenet.py:cos-1.52B` (default: step-0.96B), or
give any string with `--config.cprate='...'`. "step" presets train 90 epochs at lr 0.1 (x0.1 every
30 epochs and again at 80); "cos" presets 180 epochs at lr 0.01, momentum 0.99, cosine; both with a
5-epoch linear warm-up.
"""

from dcff_jax.config import default_config

# name: (cprate, lr_schedule). Paper FLOPs / params / top-1 of each row: README and
# tests/test_flops.py; the name is the row's FLOPs.
PRESETS = {
    "step-0.96B": ("[0.0]+[0.8]*10+[0.7]*6+[0.6]*10+[0.4]*6+[0.3]*4", "step"),
    "step-1.49B": ("[0.0]+[0.6]*10+[0.5]*6+[0.5]*10+[0.4]*6+[0.2]*4", "step"),
    "step-2.25B": ("[0.0]+[0.35]*10+[0.3]*6+[0.4]*10+[0.3]*6+[0.1]*4", "step"),
    "cos-1.52B": ("[0.0]+([0.5]*10+[0.5]*6)*2+[0.25]*3+[0.0]", "cosine"),
    "cos-1.38B": ("[0.0]+([0.7]*7+[0.45]*9)*2+[0.24]*3+[0.0]", "cosine"),
    "cos-1.02B": ("[0.0]+([0.43]*7+[0.73]*9)*2+[0.45]*3+[0.0]", "cosine"),
}


def get_config(preset: str = "step-0.96B"):
    if preset not in PRESETS:
        raise ValueError(f"unknown ResNet-50 preset {preset!r}; known: {sorted(PRESETS)}")
    cprate, schedule = PRESETS[preset]
    config = default_config()
    config.model = "resnet50"
    config.cprate = cprate
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.num_classes = 1000
    config.batch_size = 256
    config.weight_decay = 1e-4
    config.warmup_epochs = 5
    config.lr_schedule = schedule
    if schedule == "step":
        config.num_epochs = 90
        config.learning_rate = 0.1
        config.lr_milestones = (30, 60, 80)
    else:
        config.num_epochs = 180
        config.learning_rate = 0.01
        config.momentum = 0.99
        config.lr_milestones = ()
    return config
