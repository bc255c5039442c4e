"""The data: where the splits come from, how images are transformed, how batches are made.

- sources: the dataset names (cifar10, cifar10_folder, imagenet2012, imagenet_folder),
  Split and Data, load_data and the checks that a config can train on the data;
- cifar: CIFAR-10's python pickles, read with a restricted unpickler;
  download: CIFAR-10 fetched on first use (resumable, checked, extracted by name);
- tfds_reader and tfrecord: tfds datasets by random access, tfrecord without TensorFlow;
- image_files: ImageNet-sized data read one image at a time: class folders (torchvision
  ImageFolder's layout), the per-example transform, unreadable records skipped;
- transforms: torchvision's train and eval crops (with JPEG draft decoding) on the host;
  CIFAR's pad-crop-flip and the normalisation on the device;
- loader: batches from a per-epoch permutation seeded by (seed, epoch), so they depend only on
  (seed, epoch, step) and a resumed run sees the same ones; grain worker processes and a
  background prefetch; the step counts;
- feeds: how the train loop gets its batches: CIFAR-10 held on every device and gathered
  there (DeviceFeed), or loaded on the host, each host reading its own slice of each global
  batch (HostFeed).
"""

from dcff_jax.data.cifar import (
    read_cifar10,
    read_cifar_folder,
)
from dcff_jax.data.image_files import (
    IMAGE_EXTENSIONS,
    ImageExample,
    ImageFiles,
    decode_image,
    image_folder_splits,
    read_or_skip,
    skipped_count,
    stack_examples,
)
from dcff_jax.data.loader import (
    epoch_permutation,
    eval_batches,
    last_batch_size,
    load_batches,
    prefetch,
    steps_per_epoch,
    train_batches,
)
from dcff_jax.data.sources import (
    CIFAR_MEAN,
    CIFAR_STD,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Data,
    Split,
    array_split,
    check_fits,
    imagenet_split,
    load_data,
    normalization,
)
from dcff_jax.data.tfds_reader import (
    class_count,
    read_tfds_arrays,
    tfds_source,
)
from dcff_jax.data.transforms import (
    DRAFT_TOLERANCE,
    augment_cifar,
    center_crop_geometry,
    decode_transformed,
    normalize,
    random_resized_crop,
    resize_center_crop,
    resized_crop_box,
    transform_array,
)

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASETS",
    "DRAFT_TOLERANCE",
    "Data",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageExample",
    "ImageFiles",
    "Split",
    "array_split",
    "augment_cifar",
    "center_crop_geometry",
    "check_fits",
    "class_count",
    "decode_image",
    "decode_transformed",
    "epoch_permutation",
    "eval_batches",
    "image_folder_splits",
    "imagenet_split",
    "last_batch_size",
    "load_batches",
    "load_data",
    "normalization",
    "normalize",
    "prefetch",
    "random_resized_crop",
    "read_cifar10",
    "read_cifar_folder",
    "read_or_skip",
    "read_tfds_arrays",
    "resize_center_crop",
    "resized_crop_box",
    "skipped_count",
    "stack_examples",
    "steps_per_epoch",
    "tfds_source",
    "train_batches",
    "transform_array",
]
