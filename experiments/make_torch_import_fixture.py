"""Make tests/fixtures/published_resnet56_compact.{pt,npz} once (torch venv, a DCFF checkout):
a compact ResNet-56 state dict as the published main_cifar.py writes it (model_best_compact.pt of
its own run, given), and the published CompactResNet's eval logits for 4 fixed images.

  python experiments/make_torch_import_fixture.py DCFF_DIR MODEL_BEST_COMPACT_PT
"""

import importlib
import os
import shutil
import sys

import numpy as np
import torch

from dcff_jax import layer_rates
from dcff_jax.input_pipeline import CIFAR_MEAN, CIFAR_STD

PLAN = (
    "[0.7]*2+[0.5]*3+[0.3]*2+[0.4]+[0.8]+[0.7]*2+[0.8]*4+[0.4]+[0.2]*2+[0.7]+[0.3]+[0.8]"
    "+[0.4]*2+[0.7]+[0.3]+[0.4]+[0.8]+[0.0]*3"
)
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "published_resnet56_compact")


def main() -> None:
    dcff_dir, checkpoint = sys.argv[1:]
    sys.path.insert(0, os.path.abspath(dcff_dir))
    resnet = importlib.import_module("models.cifar.resnet")
    model = resnet.compact_resnet56(list(layer_rates("resnet56", PLAN)))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    model.eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x).numpy()
    shutil.copyfile(checkpoint, OUT + ".pt")
    np.savez(OUT + ".npz", images=images, logits=logits, plan=PLAN)
    print("logits", logits.shape, "max |logit|", np.abs(logits).max())


if __name__ == "__main__":
    main()
