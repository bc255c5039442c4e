import json
import os

import pytest
from helpers import run_module

from dcff_jax import flops
from dcff_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name, argument=None):
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"), argument)


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def pct(counts, key):
    return f"{100 * (1 - counts[key] / counts['base_' + key]):.2f}"


# (config, compact FLOPs, FLOPs reduction %, compact params, params reduction %,
#  base FLOPs, base params)
# Paper table / official README; VGG-16 params as the published model has them (1.07M, 92.73%),
# not the paper's misprinted 1.06M (92.80%). Baselines: thop 0.0.31 on the published originals.
CIFAR_ROWS = [
    ("vgg16_cifar", "72.77M", "76.83", "1.07M", "92.73", "314.03M", "14.73M"),
    ("resnet56_cifar", "55.84M", "55.88", "0.38M", "54.95", "126.55M", "0.85M"),
    ("resnet110_cifar", "85.30M", "66.55", "0.56M", "67.86", "254.98M", "1.73M"),
    ("googlenet_cifar", "457.22M", "70.11", "2.08M", "66.28", "1529.42M", "6.17M"),
]


@pytest.mark.parametrize("row", CIFAR_ROWS, ids=lambda r: r[0])
def test_cifar_rows_reproduce_paper(row):
    name, f, fr, p, pr, bf, bp = row
    cfg = config(name)
    counts = flops.model_counts(cfg.model, cfg.cprate)
    assert (human(counts["flops"]), pct(counts, "flops")) == (f, fr)
    assert (human(counts["params"]), pct(counts, "params")) == (p, pr)
    assert (f"{counts['base_flops'] / 1e6:.2f}M", human(counts["base_params"])) == (bf, bp)


def test_vgg16_compact_params_exact():
    # The figure README.md quotes against the paper's misprint.
    assert flops.model_counts("vgg16", config("vgg16_cifar").cprate)["params"] == 1_071_248


RESNET50_ROWS = {
    "step-0.96B": ("0.96B", "76.70", "7.40M", "71.03"),
    "step-1.49B": ("1.49B", "63.75", "10.58M", "58.60"),
    "step-2.25B": ("2.25B", "45.30", "15.16M", "40.67"),
    "cos-1.52B": ("1.52B", "62.96", "11.05M", "56.77"),
    "cos-1.38B": ("1.38B", "66.41", "11.81M", "53.77"),
    "cos-1.02B": ("1.02B", "75.11", "6.56M", "74.33"),
}


@pytest.mark.parametrize("preset", sorted(RESNET50_ROWS))
def test_resnet50_rows_reproduce_paper(preset):
    counts = flops.model_counts("resnet50", config("resnet50_imagenet", preset).cprate)
    got = (
        f"{counts['flops'] / 1e9:.2f}B",
        pct(counts, "flops"),
        human(counts["params"]),
        pct(counts, "params"),
    )
    assert got == RESNET50_ROWS[preset]
    assert f"{counts['base_flops'] / 1e6:.2f}M" == "4111.41M"
    assert human(counts["base_params"]) == "25.56M"


# Every row's exact integers (compact FLOPs, compact params, original FLOPs, original params),
# counted at 6fff617, before the plans counted their compact models from the original's trace
# (DCFF.counts): the two decimals of M above cannot see an off-by-a-bias-add.
R50_BASE = (4_111_414_272, 25_557_032)
EXACT_ROWS = {
    ("vgg16_cifar", None): ("thop", 72_771_956, 1_071_248, 314_031_616, 14_728_266),
    ("resnet56_cifar", None): ("thop", 55_835_840, 384_316, 126_550_656, 853_018),
    ("resnet110_cifar", None): ("thop", 85_297_568, 555_368, 254_984_832, 1_727_962),
    ("googlenet_cifar", None): ("thop", 457_215_424, 2_079_250, 1_529_421_824, 6_166_250),
    ("mobilenetv2_imagenet", None): ("macs", 140_181_082, 2_626_759, 300_774_272, 3_504_872),
    **{
        ("resnet50_imagenet", preset): ("thop", flops_, params, *R50_BASE)
        for preset, flops_, params in [
            ("step-0.96B", 958_066_431, 7_403_402),
            ("step-1.49B", 1_490_505_520, 10_581_581),
            ("step-2.25B", 2_248_778_112, 15_163_623),
            ("cos-1.52B", 1_522_959_872, 11_047_336),
            ("cos-1.38B", 1_380_916_957, 11_813_898),
            ("cos-1.02B", 1_023_260_224, 6_560_781),
        ]
    },
}


# He et al. 2016 (arXiv 1512.03385), Table 6: the CIFAR ResNet-(6n+2) family's parameters, to the
# table's precision (ResNet-8 is not in it: n = 1 by the same rule, 7 convs and the classifier).
# {architecture: (millions, decimals)}
CIFAR_RESNET_PARAMS_M = {
    "resnet20": (0.27, 2),
    "resnet32": (0.46, 2),
    "resnet44": (0.66, 2),
    "resnet56": (0.85, 2),
    "resnet110": (1.7, 1),
}


@pytest.mark.parametrize("arch", sorted(CIFAR_RESNET_PARAMS_M))
def test_the_cifar_resnet_family_has_the_papers_parameter_counts(arch):
    millions, decimals = CIFAR_RESNET_PARAMS_M[arch]
    assert round(flops.original_counts(arch).params / 1e6, decimals) == millions


def test_resnet8_is_the_family_with_one_block_per_stage():
    from dcff_jax import models

    paths = models.conv_paths("resnet8")
    assert len(paths) == 7 and sum("block0" in p for p in paths) == 6
    # Stem 3x3x3x16; per stage s two 3x3 convs, the first from the previous stage's width;
    # each conv is followed by a BatchNorm (scale and bias); the 64 -> 10 classifier has a bias.
    convs = 9 * (3 * 16 + 16 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64)
    norms = 2 * (16 + 16 + 16 + 32 + 32 + 64 + 64)
    assert flops.original_counts("resnet8").params == convs + norms + 64 * 10 + 10


@pytest.mark.parametrize("row", sorted(EXACT_ROWS, key=str), ids=str)
def test_every_row_exact(row):
    convention, *want = EXACT_ROWS[row]
    cfg = config(*row)
    counts = flops.model_counts(cfg.model, cfg.cprate, convention)
    got = [counts[k] for k in ("flops", "params", "base_flops", "base_params")]
    assert got == want


@pytest.mark.parametrize("arch", ["vgg16", "resnet56", "googlenet", "resnet50", "mobilenetv2"])
def test_a_plans_counts_are_its_built_compact_models(arch):
    """DCFF.counts (the original's one trace at the plan's widths) equals counting the compact
    model built from the plan, layer by layer, in both conventions, at a random rate string."""
    from helpers import random_rate_string

    from dcff_jax import models

    cprate = random_rate_string(arch, 7)
    dcff = models.paper_dcff(arch, cprate)
    compact = dcff.compact_model()
    for convention in flops.CONVENTIONS:
        built = flops.count(compact, models.input_shape(arch), convention)
        planned = dcff.counts(convention)
        assert (planned.flops, planned.params) == (built.flops, built.params), convention
        assert [(r.kind, r.output_shape, r.flops) for r in planned.layers] == [
            (r.kind, r.output_shape, r.flops) for r in built.layers
        ], convention
    assert dcff.counts("macs").flops == dcff.plan.compact_macs


def test_conv_bn_dense_pool_conventions_on_a_tiny_model():
    from flax import linen as nn

    from dcff_jax.models import common

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), padding=1, use_bias=True)(x)  # 8*8*4 * (3*9 + 1)
            x = common.batch_norm(train)(x)  # 2 * 8*8*4
            x = nn.relu(x)  # 0
            x = common.MaxPool(2, 2)(x)  # 0
            x = common.AvgPool(2, 2)(x)  # 2*2*4
            x = common.GlobalAvgPool()(x)  # (4 + 1) * 4
            return nn.Dense(3)(x)  # 3 * 4

    counts = flops.count(Tiny(), (1, 8, 8, 3))
    assert counts.flops == 256 * 28 + 512 + 16 + 20 + 12
    assert counts.params == (27 * 4 + 4) + 8 + (4 * 3 + 3)
    assert [r.kind for r in counts.layers] == [
        "conv",
        "batch_norm",
        "avg_pool",
        "global_avg_pool",
        "dense",
    ]


def run_cli(*args):
    proc = run_module("dcff_jax.flops", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_prints_table_and_json_last_line():
    out = run_cli("--config=configs/vgg16_cifar.py")
    assert "vgg16 compact" in out and "76.83%" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["flops"] == flops.model_counts("vgg16", config("vgg16_cifar").cprate)["flops"]
    assert set(last) == {"flops", "params", "base_flops", "base_params"}


def test_cli_cprate_override_and_bad_string():
    out = run_cli("--config=configs/vgg16_cifar.py", "--config.cprate=[0.0]*13")
    last = json.loads(out.strip().splitlines()[-1])
    assert last["flops"] == last["base_flops"]
    proc = run_module(
        "dcff_jax.flops", "--config=configs/vgg16_cifar.py", "--config.cprate=[0.5]*12"
    )
    # A user error: one message, no traceback, exit status 2.
    assert proc.returncode == 2
    assert "error: vgg16 needs 13 pruning rates, got 12" in proc.stderr
    assert "Traceback" not in proc.stderr


def mobilenetv2_counts_by_hand(rates=None, batch_norm=True):
    """MobileNetV2 (torchvision's layout) at 224x224 in the thop convention, from its table of
    inverted residual settings: convs without bias, BN 2 x elements, the classifier; torchvision's
    global pool is functional, which thop does not count. batch_norm=False: the "macs"
    convention. rates=None: the original widths."""
    flops, params = 0, 0

    def conv(hw, cin, cout, k, stride, groups=1):
        nonlocal flops, params
        out = hw // stride
        flops += out * out * cout * (cin // groups * k * k) + 2 * out * out * cout * batch_norm
        params += cout * cin // groups * k * k + 2 * cout
        return out

    hw, cin = conv(224, 3, 32, 3, 2), 32
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    for t, c, n, s in [*settings, (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            hidden = cin * t
            if t != 1:
                conv(hw, cin, hidden, 1, 1)
            hw = conv(hw, hidden, hidden, 3, s if i == 0 else 1, groups=hidden)
            conv(hw, hidden, c, 1, 1)
            cin = c
    conv(hw, cin, 1280, 1, 1)
    flops += 1280 * 1000
    params += 1280 * 1000 + 1000
    return flops, params


def test_mobilenetv2_original_counts():
    counts = flops.model_counts("mobilenetv2", None)
    # 3,504,872 params is torchvision's mobilenet_v2() exactly.
    assert counts["base_params"] == counts["params"] == 3_504_872
    assert (counts["base_flops"], counts["base_params"]) == mobilenetv2_counts_by_hand()
    # Without batch norm: the 300M multiply-accumulates of the MobileNetV2 paper, which DCFF's
    # 140M (53.3%) row is a reduction of.
    macs = flops.model_counts("mobilenetv2", None, convention="macs")
    assert (macs["base_flops"], macs["base_params"]) == mobilenetv2_counts_by_hand(batch_norm=False)
    assert round(macs["base_flops"] / 1e6) == 301


def test_function_macs_counts_a_functions_convs_and_matmuls_once():
    """flops.function_macs: the counter on a function with its weights bound (an export, a
    padded function). A conv and a matmul on the input itself (no conv's channels before it)
    are both counted; a CPU-only rewrite in a platform-dependent branch is counted once, as the
    other platforms' conv."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dcff_jax.deploy.channel_padding import pad_channels

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32)
    depthwise = jnp.asarray(rng.normal(size=(3, 3, 1, 5)), jnp.float32)
    dense = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    side = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    nhwc = ("NHWC", "HWIO", "NHWC")

    def fn(x):
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=nhwc)
        y = jax.lax.conv_general_dilated(
            y, depthwise, (1, 1), "SAME", dimension_numbers=nhwc, feature_group_count=5
        )
        return jnp.mean(y, axis=(1, 2)) @ dense, jnp.mean(x, axis=(1, 2)) @ side

    example = jax.ShapeDtypeStruct((1, 6, 6, 2), jnp.float32)
    positions = 6 * 6
    want = positions * 9 * 2 * 5 + positions * 9 * 5 + 5 * 3 + 2 * 4
    assert flops.function_macs(fn, example) == want
    padded = positions * 9 * 2 * 8 + positions * 9 * 8 + 8 * 3 + 2 * 4  # widths 5 -> 8
    assert flops.function_macs(pad_channels(fn, 8), example) == padded
    # Traced once at a symbolic batch (as the ONNX export does), the MACs of one example.
    from dcff_jax.jaxpr.walk import trace_any_batch

    closed = trace_any_batch(pad_channels(fn, 8), (None, 6, 6, 2), jnp.float32)
    assert flops.jaxpr_macs(closed) == padded
    assert flops.function_macs(fn, jax.ShapeDtypeStruct((3, 6, 6, 2), jnp.float32)) == 3 * want
