"""Rate strings: the published pruning-rate strings, parsed safely, and their layer-wise expansion.

A rate string such as "[0.5]*2+[0.4]*2+[0.35]*3+[0.85]*6" is parsed by a tiny grammar, never
eval()ed:

  expr   := term ("+" term)*
  term   := factor ("*" INT)*  |  INT "*" factor
  factor := "[" [NUMBER ("," NUMBER)*] "]"  |  "(" expr ")"

Each architecture then expands the parsed list to one rate per fused conv, in the order the
model creates them (REFERENCE.md, "Pruning-rate strings"), and the kept width of a layer with c
filters is m = max(1, int(c * (1 - rate))).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence

from dcff_jax.errors import ConfigError

MAX_REPEAT = 100_000
MAX_ENTRIES = 100_000

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)|(?P<op>[\[\]\(\)\+\*,]))"
)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = self._tokenize(text)
        self.pos = 0

    def _tokenize(self, text: str) -> list[tuple[str, str, int]]:
        tokens, pos = [], 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            match = _TOKEN.match(text, pos)
            if not match:
                raise self.error(f"unexpected character {text[pos:].lstrip()[0]!r}", pos)
            kind = "num" if match.group("num") else "op"
            start = match.start(kind)
            tokens.append((kind, match.group(kind), start))
            pos = match.end()
        return tokens

    def error(self, what: str, pos: int | None = None) -> ConfigError:
        if pos is None:
            pos = self.tokens[self.pos][2] if self.pos < len(self.tokens) else len(self.text)
        return ConfigError(
            f"bad pruning-rate string at character {pos}: {what}\n  {self.text}\n  {' ' * pos}^\n"
            "expected e.g. '[0.5]*2+[0.4]*2' "
            "(lists of rates, '*' integer repetition, '+', parentheses)"
        )

    def peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str, int]:
        if self.pos >= len(self.tokens):
            raise self.error(f"expected {expected or 'more'}, found the end of the string")
        token = self.tokens[self.pos]
        if expected is not None and token[1] != expected:
            raise self.error(f"expected {expected!r}, found {token[1]!r}")
        self.pos += 1
        return token

    def parse(self) -> list[float]:
        if not self.tokens:
            raise self.error("the string is empty")
        values = self.expr()
        if self.pos != len(self.tokens):
            raise self.error(f"unexpected {self.peek()!r} after a complete expression")
        return values

    def expr(self) -> list[float]:
        values = self.term()
        while self.peek() == "+":
            self.take("+")
            values = values + self.term()
            _check_size(len(values), self)
        return values

    def term(self) -> list[float]:
        if self.pos < len(self.tokens) and self.tokens[self.pos][0] == "num":
            count = self.repeat_count()
            self.take("*")
            return self.repeated(self.factor(), count)
        values = self.factor()
        while self.peek() == "*":
            self.take("*")
            values = self.repeated(values, self.repeat_count())
        return values

    def repeated(self, values: list[float], count: int) -> list[float]:
        _check_size(len(values) * count, self)
        return values * count

    def repeat_count(self) -> int:
        kind, text, pos = self.take()
        if kind != "num" or not text.isdigit():
            raise self.error(
                f"repetition count must be a non-negative integer, found {text!r}", pos
            )
        count = int(text)
        if count > MAX_REPEAT:
            raise self.error(f"repetition count {count} is absurd (at most {MAX_REPEAT})", pos)
        return count

    def factor(self) -> list[float]:
        if self.peek() == "(":
            self.take("(")
            values = self.expr()
            self.take(")")
            return values
        self.take("[")
        values: list[float] = []
        while self.peek() != "]":
            if values:
                self.take(",")
            kind, text, pos = self.take()
            if kind != "num":
                raise self.error(f"expected a rate, found {text!r}", pos)
            values.append(_check_rate(float(text), pos, self))
        self.take("]")
        return values


def _check_size(n: int, parser: _Parser) -> None:
    if n > MAX_ENTRIES:
        raise parser.error(f"the string expands to {n} entries (at most {MAX_ENTRIES})")


def _check_rate(rate: float, pos: int, parser: _Parser) -> float:
    if not 0.0 <= rate < 1.0:
        raise parser.error(
            f"rate {rate} is outside [0, 1): a rate is the fraction of filters pruned", pos
        )
    return rate


def parse_rates(text: str) -> tuple[float, ...]:
    """Parse a published pruning-rate string into a tuple of rates in [0, 1).

    Raises:
      ConfigError (a ValueError) naming the position and the problem: bad syntax, a rate
      outside [0, 1), a non-integer or absurd repetition count.
    """
    if not isinstance(text, str):
        raise ConfigError(f"a pruning-rate string must be a str, got {type(text).__name__}")
    return tuple(_Parser(text).parse())


def keep_width(filters: int, rate: float) -> int:
    """m = int(c * (1 - rate)) as in the published code (truncation), at least 1."""
    return max(1, int(filters * (1.0 - rate)))


# --- Per-architecture layouts -------------------------------------------------------------

# The CIFAR ResNet-(6n+2) family (He et al. 2016), n blocks per stage. The paper trains 56 and
# 110; 20/32/44 are the usual smaller baselines, and 8 the smallest member, for smoke runs.
RESNET_CIFAR_BLOCKS = {
    "resnet8": 1,
    "resnet20": 3,
    "resnet32": 5,
    "resnet44": 7,
    "resnet56": 9,
    "resnet110": 18,
}
RESNET50_BLOCKS = (3, 4, 6, 3)
GOOGLENET_INCEPTIONS = 9
GOOGLENET_CONVS_PER_INCEPTION = 7
VGG16_CONVS = 13
# MobileNetV2 (ours, no published code): (expansion t, channels, blocks, stride) per stage.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _interleave(*columns: Sequence[float]) -> list[float]:
    return [rate for row in zip(*columns, strict=True) for rate in row]


def _per_block(stage_rates: Sequence[float], blocks: Sequence[int]) -> list[float]:
    return [rate for rate, n in zip(stage_rates, blocks, strict=True) for _ in range(n)]


def _expand_resnet_cifar(rates: Sequence[float], blocks: int) -> list[float]:
    conv1, stages = rates[:-3], rates[-3:]
    return [stages[0], *_interleave(conv1, _per_block(stages, (blocks,) * 3))]


def _expand_resnet50(rates: Sequence[float]) -> list[float]:
    n = sum(RESNET50_BLOCKS)
    conv1, conv2, stages = rates[1 : 1 + n], rates[1 + n : 1 + 2 * n], rates[1 + 2 * n :]
    return [rates[0], *_interleave(conv1, conv2, _per_block(stages, RESNET50_BLOCKS))]


def _expand_mobilenetv2(rates: Sequence[float]) -> list[float]:
    blocks = [n for _, _, n, _ in MOBILENETV2_STAGES]
    expanding = sum(blocks) - blocks[0]  # the first stage (t = 1) has no expansion conv
    stem, expand, project, last = (
        rates[0],
        rates[1 : 1 + expanding],
        rates[1 + expanding : -1],
        rates[-1],
    )
    project_per_block = _per_block(project, blocks)
    layerwise = [stem, project_per_block[0]]
    layerwise += _interleave(expand, project_per_block[1:])
    return [*layerwise, last]


@dataclasses.dataclass(frozen=True)
class RateLayout:
    """How an architecture's rate string maps to its fused convs.

    unfused: glob over conv paths -> the path of the conv whose rate (and width) it takes; such
    a conv is trained at that width without fusion (the published ResNet-50's downsample convs,
    which its rate string names together with their stage's conv3s).
    """

    num_rates: int
    why: str
    expand: Callable[[Sequence[float]], list[float]]
    unfused: Mapping[str, Callable[[str], str]] = dataclasses.field(default_factory=dict)


_MBV2_EXPANDING = sum(n for _, _, n, _ in MOBILENETV2_STAGES) - 1

LAYOUTS: dict[str, RateLayout] = {
    "vgg16": RateLayout(VGG16_CONVS, "one rate per conv layer (13)", list),
    **{
        name: RateLayout(
            3 * blocks + 3,
            f"one rate per block conv1 ({3 * blocks}) + one per stage (3) shared by the stage's "
            "conv2s and, for the first stage, the stem conv",
            lambda r, b=blocks: _expand_resnet_cifar(r, b),
        )
        for name, blocks in RESNET_CIFAR_BLOCKS.items()
    },
    "googlenet": RateLayout(
        1 + GOOGLENET_INCEPTIONS * GOOGLENET_CONVS_PER_INCEPTION,
        "one rate per conv: the 192-filter pre-layer + 9 Inception blocks x 7 convs",
        list,
    ),
    "resnet50": RateLayout(
        1 + 2 * sum(RESNET50_BLOCKS) + len(RESNET50_BLOCKS),
        "stem (1) + block conv1 (16) + block conv2 (16) + one per stage (4) shared by the stage's "
        "conv3s and its downsample",
        _expand_resnet50,
        {"*/downsample_conv": lambda path: path.rsplit("/", 1)[0] + "/conv3"},
    ),
    "mobilenetv2": RateLayout(
        1 + _MBV2_EXPANDING + len(MOBILENETV2_STAGES) + 1,
        f"stem (1) + one per expansion 1x1 conv ({_MBV2_EXPANDING}) + one per stage (7) shared by "
        "the stage's projection convs + the last 1x1 conv (1)",
        _expand_mobilenetv2,
    ),
}


def layer_rates(architecture: str, rates: str | Sequence[float]) -> tuple[float, ...]:
    """Expand a rate string (or parsed list) to one rate per fused conv, in model order.

    Raises:
      ConfigError (a ValueError) for an unknown architecture, a bad string, or the wrong number
      of entries (the message says how many were expected and why).
    """
    layout = rate_layout(architecture)
    parsed = parse_rates(rates) if isinstance(rates, str) else tuple(float(r) for r in rates)
    for r in parsed:
        if not 0.0 <= r < 1.0:
            raise ConfigError(
                f"rate {r} is outside [0, 1): a rate is the fraction of filters pruned"
            )
    if len(parsed) != layout.num_rates:
        raise ConfigError(
            f"{architecture} needs {layout.num_rates} pruning rates, got {len(parsed)}: "
            f"{layout.why}"
        )
    return tuple(layout.expand(parsed))


def rate_layout(architecture: str) -> RateLayout:
    """LAYOUTS[architecture]; ConfigError naming the known ones for an unknown architecture."""
    if architecture not in LAYOUTS:
        raise ConfigError(f"unknown architecture {architecture!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[architecture]


def uniform_rates(architecture: str, rate: float = 0.0) -> tuple[float, ...]:
    """The same rate for every entry of the architecture's rate string (layer-wise expanded)."""
    return layer_rates(architecture, [rate] * rate_layout(architecture).num_rates)


def path_rates(
    architecture: str, rates: str | Sequence[float] | None, conv_paths: Sequence[str]
) -> dict[str, float]:
    """The rate string as {conv path: rate} of the architecture's original (unpruned) model, for
    dcff_jax.DCFF with `unfused=LAYOUTS[architecture].unfused`.

    Args:
      rates: the published rate string (or its parsed list); None prunes nothing (rate 0).
      conv_paths: the original model's convs in call order, depthwise convs left out (they
        follow their input's width). The i-th layer-wise rate is that of the i-th conv that no
        `unfused` pattern matches; an unfused conv takes the rate of the conv its rule names.

    Raises:
      ConfigError as layer_rates does; ValueError when the model's convs do not match the
      layout (a model that is not the architecture's).
    """
    expanded = uniform_rates(architecture) if rates is None else layer_rates(architecture, rates)
    layout = rate_layout(architecture)
    shares = {
        path: rule(path)
        for path in conv_paths
        for pattern, rule in layout.unfused.items()
        if fnmatch.fnmatchcase(path, pattern)
    }
    fused = [path for path in conv_paths if path not in shares]
    if len(fused) != len(expanded):
        raise ValueError(
            f"{architecture}'s layout has {len(expanded)} fused convs, the model {len(fused)}"
        )
    by_path = dict(zip(fused, expanded, strict=True))
    return by_path | {path: by_path[other] for path, other in shares.items()}
