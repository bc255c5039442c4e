import pytest

from dcff_jax.method import rate_strings
from dcff_jax.models import resnet_cifar

PAPER = {
    "vgg16": "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6",
    "googlenet": "[0.0]*2+[0.8]+[0.0]+[0.8]*2+[0.0]*2+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*3"
    "+([0.0]+[0.8]+[0.0]+[0.8]*2+[0.0]*2)*3+([0.0]+[0.9]+[0.0]+[0.9]*2+[0.0]*2)*2",
}


def test_parse_published_strings():
    assert (
        rate_strings.parse_rates(PAPER["vgg16"])
        == (0.5,) * 2 + (0.4,) * 2 + (0.35,) * 3 + (0.85,) * 6
    )
    googlenet = rate_strings.parse_rates(PAPER["googlenet"])
    assert len(googlenet) == 64
    assert googlenet[:8] == (0.0, 0.0, 0.8, 0.0, 0.8, 0.8, 0.0, 0.0)
    assert googlenet[8:15] == (0.0, 0.9, 0.0, 0.9, 0.9, 0.0, 0.0)


@pytest.mark.parametrize(
    "text,want",
    [
        ("[0.1]", (0.1,)),
        (" [ 0.1 , .2 ] * 2 ", (0.1, 0.2, 0.1, 0.2)),
        ("2*[0.3]+[0]", (0.3, 0.3, 0.0)),
        ("([0.1]+[0.2]*2)*2", (0.1, 0.2, 0.2, 0.1, 0.2, 0.2)),
        ("[1e-1]*3*2", (0.1,) * 6),
        ("[]+[0.5]", (0.5,)),
        ("[0.5]*0+[0.25]", (0.25,)),
    ],
)
def test_grammar(text, want):
    assert rate_strings.parse_rates(text) == want


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("[0.5", "end of the string"),
        ("[0.5]*", "end of the string"),
        ("[0.5]*2.5", "integer"),
        ("[0.5]+", "end of the string"),
        ("[0.5]]", "unexpected ']'"),
        ("[0.5] [0.4]", "unexpected '\\['"),
        ("__import__('os')", "unexpected character '_'"),
        ("[0.5]*-1", "integer"),
        ("[1.0]", "outside \\[0, 1\\)"),
        ("[0.3, 1.5]", "outside \\[0, 1\\)"),
        ("[0.5]*1000000", "absurd"),
        ("([0.5]*90000)*90000", "entries"),
        ("[0.5;0.4]", "unexpected character ';'"),
        ("[0.5]-[0.4]", "unexpected character '-'"),
    ],
)
def test_parser_rejections_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        rate_strings.parse_rates(text)


def test_parser_error_points_at_the_position():
    with pytest.raises(ValueError) as err:
        rate_strings.parse_rates("[0.5]*2+[0.4]*x")
    assert "character 14" in str(err.value)


def test_parser_never_evaluates_python():
    with pytest.raises(ValueError):
        rate_strings.parse_rates("[0.1]*__import__('sys').exit(1)")


def test_keep_width_truncates_like_python_int():
    assert rate_strings.keep_width(64, 0.7) == int(64 * (1 - 0.7)) == 19
    assert rate_strings.keep_width(512, 0.85) == 76
    assert rate_strings.keep_width(16, 0.0) == 16
    assert rate_strings.keep_width(4, 0.9) == 1  # at least one filter


@pytest.mark.parametrize(
    "arch,count,layers",
    [
        ("vgg16", 13, 13),
        ("resnet56", 30, 55),
        ("resnet110", 57, 109),
        ("googlenet", 64, 64),
        ("resnet50", 37, 49),
        ("mobilenetv2", 25, 35),
    ],
)
def test_wrong_number_of_entries_is_explained(arch, count, layers):
    assert len(rate_strings.layer_rates(arch, [0.1] * count)) == layers
    with pytest.raises(ValueError, match=f"{arch} needs {count} pruning rates, got {count + 1}"):
        rate_strings.layer_rates(arch, [0.1] * (count + 1))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'vgg19'"):
        rate_strings.layer_rates("vgg19", "[0.1]")


def test_resnet_cifar_expansion_matches_published_rule():
    conv1 = [i / 100 for i in range(27)]
    stages = [0.5, 0.6, 0.7]
    got = rate_strings.layer_rates("resnet56", conv1 + stages)
    # Published: [stage1] + interleave(conv1 rates, each stage rate repeated per block).
    want = [0.5]
    for i, r in enumerate(conv1):
        want += [r, stages[i // 9]]
    assert list(got) == want
    assert resnet_cifar.STAGE_WIDTHS == (16, 32, 64)


def test_resnet50_expansion_matches_published_rule():
    rates = (
        [0.01]
        + [0.1 + i / 1000 for i in range(16)]
        + [0.2 + i / 1000 for i in range(16)]
        + [0.3, 0.4, 0.5, 0.6]
    )
    got = rate_strings.layer_rates("resnet50", rates)
    assert got[0] == 0.01
    blocks = [got[1 + 3 * b : 4 + 3 * b] for b in range(16)]
    stage_of_block = [0] * 3 + [1] * 4 + [2] * 6 + [3] * 3
    for b, (c1, c2, c3) in enumerate(blocks):
        assert (c1, c2, c3) == (rates[1 + b], rates[17 + b], rates[33 + stage_of_block[b]])


def test_mobilenetv2_expansion_order():
    rates = [0.01] + [0.1 + i / 100 for i in range(16)] + [0.5 + i / 100 for i in range(7)] + [0.9]
    got = rate_strings.layer_rates("mobilenetv2", rates)
    assert got[:4] == (0.01, 0.5, 0.1, 0.51)  # stem, block0.project, block1.expand, block1.project
    assert got[-3:] == (0.25, 0.56, 0.9)  # block16.expand, block16.project (stage 7), last
