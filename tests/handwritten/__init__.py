"""The paper's architectures as written before issue 24: every prunable conv a
`prunable_conv(variant, ...)` with its layer-wise rate threaded through the definition, built as
"original", "fused" or "compact". Kept only as the oracle that `create_model`'s fused and compact
models (DCFF's rewrites of the plain definitions) must match bit for bit (tests/test_auto.py)."""

from dcff_jax.method import rate_strings
from handwritten.googlenet import GoogLeNet
from handwritten.mobilenetv2 import MobileNetV2
from handwritten.resnet_cifar import CifarResNet
from handwritten.resnet_imagenet import ImageNetResNet
from handwritten.vgg import VGG

# architecture -> (layer-wise rates, variant=, num_classes=, dtype=) -> module
BUILD = {
    "vgg16": VGG,
    "resnet56": lambda r, **kw: CifarResNet(r, rate_strings.RESNET_CIFAR_BLOCKS["resnet56"], **kw),
    "resnet110": lambda r, **kw: CifarResNet(
        r, rate_strings.RESNET_CIFAR_BLOCKS["resnet110"], **kw
    ),
    "googlenet": GoogLeNet,
    "resnet50": ImageNetResNet,
    "mobilenetv2": MobileNetV2,
}
