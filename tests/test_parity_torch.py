"""Step-for-step parity with the published PyTorch code (experiments/parity_torch.py).

Opt-in: it needs torch and scipy beside dcff_jax, and a checkout of github.com/lmbxmu/DCFF
(its model classes are imported unchanged). Run it with one command in such a venv:

    DCFF_CHECKOUT=/path/to/DCFF python -m pytest tests/test_parity_torch.py

Elsewhere (CI has no torch) it is skipped, saying why. Every epoch starts ours from the
published model's state (params, batch-norm statistics, momentum), so each epoch's steps are
compared from one state: the published recipe's first epochs amplify any rounding difference
~10-100x per step (experiments/RESULTS.md), between the published code in float32 and itself in
float64 just as between it and us.
"""

import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.environ.get("DCFF_CHECKOUT", "")
MISSING = [name for name in ("torch", "scipy") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs {' and '.join(MISSING)} (a separate venv: torch is not a dependency)",
    ),
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(CHECKOUT, "models", "cifar", "fuse_modules.py")),
        reason="set DCFF_CHECKOUT to a checkout of github.com/lmbxmu/DCFF",
    ),
    pytest.mark.slow,
]

# Both fusion updates compute P in float32 (the published one from float64 distances, ours from
# float32 ones), summing in different orders: a few units in the last place of entries <= 1.
MATRIX_ULPS = 8 * 2.0**-24


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "experiments"))
    import parity_torch

    return parity_torch


@pytest.mark.parametrize("arch", ["resnet56", "vgg16"])
def test_float64_computes_the_published_function(parity, arch):
    # In float64 both sides compute the same function: the first loss of every epoch (from one
    # state) agrees to float64 rounding, 1e-10 (~10^6 units in the last place through a
    # 56-layer net); a different init, padding, statistic or update moves it by > 1e-3.
    report = parity.run(CHECKOUT, arch, epochs=3, steps=3, batch=16, data_dir="", float64=True,
                        resync=True)  # fmt: skip
    for epoch in report["epochs"]:
        assert epoch["kept_sets_agree"]
        assert epoch["fusion_matrix_max_abs_diff"] <= MATRIX_ULPS
        first, *rest = [s["relative_diff"] for s in epoch["steps"]]
        assert first <= 1e-10, epoch
        # Three steps of 10-100x growth from float64 rounding stay far below 1e-6.
        assert max(rest) <= 1e-6, epoch


def test_float32_steps_match_from_a_common_state(parity):
    # The target: the loss within 1e-4 (relative) per step for 50+ float32 steps: here
    # 50 steps once the temperature is high (T >= 7616 from epoch 2), in windows of 5 from the
    # published state. Rounding differences grow ~1.5-2x per step at lr 0.1, so over 20 free
    # steps they reach ~1e-3 between ours and the published code, as between the published code
    # in float32 and in float64 (experiments/RESULTS.md).
    report = parity.run(CHECKOUT, "resnet56", epochs=12, steps=5, batch=64, data_dir="",
                        resync=True, shadow=False)  # fmt: skip
    calm = [s["relative_diff"] for e in report["epochs"][2:] for s in e["steps"]]
    assert len(calm) == 50
    assert max(calm) <= 1e-4, calm
    assert all(e["kept_sets_agree"] for e in report["epochs"])
