"""The experiment config: defaults shared by every experiment, and their validation.

configs/<name>.py start from `default_config()` and override what their recipe changes. It lives
in the package so that a config file loads from any working directory. Training fields follow the
published CIFAR-10 recipe (REFERENCE.md, "Training recipes").
"""

import ml_collections

from dcff_jax.data import download


def default_config() -> ml_collections.ConfigDict:
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
        "cifar10"  # "cifar10" (any copy, else downloaded) | "cifar10_folder" | "imagenet2012"
        # | "imagenet_folder" (train/<class>/ and val/ image files, as the published code reads)
    )
    config.data_dir = ""
    # cifar10 with no local copy (data_dir, tfds, the cache) fetches the official archive into
    # data_dir, or $XDG_CACHE_HOME/dcff_jax; the URL and md5 are torchvision's (mirrors: both).
    config.download = True
    config.cifar10_url = download.CIFAR10_URL
    config.cifar10_md5 = download.CIFAR10_MD5
    # imagenet_folder with a flat val folder: its label file (default: DATA_DIR/val_labels.txt
    # or DATA_DIR/LOC_val_solution.csv).
    config.val_labels = ""
    # ImageNet: > 0 decodes and crops in that many grain worker processes (one core each, whole
    # batches); 0 in this process, a thread per core.
    config.data_workers = 0
    # ImageNet: decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) wherever the scaled image
    # still holds every pixel the crop is resized to (images >= 2x the needed size; never for
    # 500x375 at 224 px). Off: decode and transforms are torchvision's, pixel for pixel. On:
    # within the tolerance stated in dcff_jax.data.transforms.DRAFT_TOLERANCE, where it applies.
    config.jpeg_draft = False
    # Where the training and test splits live: "device" (every device holds both; batches are
    # gathered there, no host work between steps), "host" (loaded and placed batch by batch), or
    # "auto": device for in-memory arrays (CIFAR-10) up to 2 GiB, host otherwise. The batches
    # are the same either way.
    config.data_placement = "auto"
    config.image_size = 32
    config.num_classes = 10
    # Optimisation: SGD, momentum, coupled (PyTorch-style) weight decay.
    config.batch_size = 256  # global, over all devices and hosts
    config.num_epochs = 300
    config.steps_per_epoch = -1  # -1: one pass over the training set; > 0 caps it (quick runs)
    # Keep the epoch's last partial batch as one more step (False, as the published DataLoaders:
    # 196 steps of CIFAR-10 at batch 256, the last of 80 images) or drop it (True: 195 steps).
    config.drop_last_batch = False
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
    config.checkpoint_every_steps = 1000  # 0: only at epoch ends (and on a stop signal)
    # Also checkpoint once this many minutes have passed since the last checkpoint (checked every
    # log_every_steps steps); 0 turns it off. For long epochs on preemptible machines.
    config.checkpoint_every_minutes = 0.0
    config.log_every_steps = 50
    # Train steps per jitted call (device-resident data; the host path runs one): 0 picks the
    # platform's default, 1 on a CPU and 65 on a GPU or TPU (a call of ~0.5 s there). Logging,
    # checkpoints and stop signals are handled between calls, so they happen at the first call
    # boundary at or after the step they are due. May change on resume (same results).
    config.steps_per_call = 0
    # Multi-host (TPU pods, GPU clusters): call jax.distributed.initialize() first. On a TPU pod it
    # needs no arguments; elsewhere give the coordinator, process count and this process's id.
    config.distributed = False
    config.coordinator_address = ""
    config.num_processes = -1
    config.process_id = -1
    # A process that stops answering (killed, preempted, hung host) is declared dead after this
    # many seconds; every other process then aborts instead of waiting in a collective forever.
    config.heartbeat_timeout_s = 100
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check a config before anything is compiled; raise ConfigError naming the bad field."""
    from dcff_jax import models
    from dcff_jax.data import sources
    from dcff_jax.errors import ConfigError
    from dcff_jax.method import fusion, rate_strings

    if config.model not in models.ARCHITECTURES:
        raise ConfigError(
            f"config.model {config.model!r} is unknown; "
            f"expected one of {sorted(models.ARCHITECTURES)}"
        )
    if config.cprate:
        rate_strings.layer_rates(config.model, config.cprate)
    arch = models.ARCHITECTURES[config.model]
    if arch.fixed_input_size and config.image_size != arch.image_size:
        raise ConfigError(
            f"{config.model} takes {arch.image_size} px images only (its classifier sees a fixed "
            f"spatial size), not config.image_size={config.image_size}"
        )
    checks = [
        (config.criterion in fusion.CRITERIA, f"config.criterion must be one of {fusion.CRITERIA}"),
        (
            config.dataset in sources.DATASETS,
            f"config.dataset must be one of {sources.DATASETS}",
        ),
        (
            config.lr_schedule in ("multistep", "step", "cosine"),
            "config.lr_schedule must be multistep, step or cosine",
        ),
        (config.num_epochs >= 1, "config.num_epochs must be >= 1"),
        (config.batch_size >= 1, "config.batch_size must be >= 1"),
        (config.num_classes >= 2, "config.num_classes must be >= 2"),
        (config.image_size >= 8, "config.image_size must be >= 8"),
        (config.data_workers >= 0, "config.data_workers must be >= 0 (0: threads in this process)"),
        (
            config.data_placement in ("auto", "device", "host"),
            "config.data_placement must be auto, device or host",
        ),
        (config.steps_per_call >= 0, "config.steps_per_call must be >= 0 (0: the default)"),
        (config.learning_rate > 0, "config.learning_rate must be > 0"),
        (0 <= config.momentum < 1, "config.momentum must be in [0, 1)"),
        (config.weight_decay >= 0, "config.weight_decay must be >= 0"),
        (config.log_every_steps >= 1, "config.log_every_steps must be >= 1"),
        (config.checkpoint_every_steps >= 0, "config.checkpoint_every_steps must be >= 0"),
        (config.checkpoint_every_minutes >= 0, "config.checkpoint_every_minutes must be >= 0"),
        (config.heartbeat_timeout_s >= 1, "config.heartbeat_timeout_s must be >= 1"),
        (
            config.steps_per_epoch == -1 or config.steps_per_epoch >= 1,
            "config.steps_per_epoch must be -1 or >= 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    import jax

    if config.batch_size % jax.device_count():
        raise ConfigError(
            f"config.batch_size {config.batch_size} must be divisible by the {jax.device_count()} "
            "devices it is split over"
        )


def load_config(path: str, argument: str | None = None) -> ml_collections.ConfigDict:
    """Load `get_config([argument])` from a config file, as `--config=path[:argument]` does."""
    import importlib.util
    import os

    if not os.path.isfile(path):
        from dcff_jax.errors import MissingFileError

        raise MissingFileError(
            f"config file {path!r} does not exist (expected e.g. configs/vgg16_cifar.py)"
        )
    spec = importlib.util.spec_from_file_location(f"dcff_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if argument is None else module.get_config(argument)
