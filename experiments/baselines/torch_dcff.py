"""A small PyTorch transcription of the published fused VGG-16 / ResNet-56 train step, for timing.

Our own transcription of the published method (fused kernel = P @ W computed in every forward,
compact BN widths, option-A shortcuts, SGD momentum 0.9 with coupled weight decay), written to
be timed side by side with experiments/benchmark.py. It is not a dependency of the package:

  python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python experiments/baselines/torch_dcff.py --model=vgg16 --batch_size=64

Last line of stdout: {"images_per_sec", "step_ms_median", "device", "torch"} as JSON.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_RATES = [0.5] * 2 + [0.4] * 2 + [0.35] * 3 + [0.85] * 6
RESNET56_RATES = (
    [0.7] * 2
    + [0.5] * 3
    + [0.3] * 2
    + [0.4]
    + [0.8]
    + [0.7] * 2
    + [0.8] * 4
    + [0.4]
    + [0.2] * 2
    + [0.7]
    + [0.3]
    + [0.8]
    + [0.4] * 2
    + [0.7]
    + [0.3]
    + [0.4]
    + [0.8]
    + [0.0] * 3
)


class FusedConv(nn.Module):
    def __init__(self, cin, cout, kept, k, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.register_buffer("matrix", torch.softmax(torch.randn(kept, cout), dim=1))
        self.stride, self.padding = stride, padding

    def forward(self, x):
        cout, cin, k, _ = self.weight.shape
        w = (self.matrix @ self.weight.reshape(cout, -1)).reshape(-1, cin, k, k)
        b = self.matrix @ self.bias if self.bias is not None else None
        return F.conv2d(x, w, b, self.stride, self.padding)


def keep(c, r):
    return max(1, int(c * (1 - r)))


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        layers, cin, i = [], 3, 0
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            m = keep(item, VGG16_RATES[i])
            conv = FusedConv(cin, item, m, 3, padding=1)
            layers += [conv, nn.BatchNorm2d(m), nn.ReLU(inplace=True)]
            cin, i = m, i + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class Block(nn.Module):
    def __init__(self, cin, planes, r1, r2, stride):
        super().__init__()
        m1, m2 = keep(planes, r1), keep(planes, r2)
        self.conv1 = FusedConv(cin, planes, m1, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(m1)
        self.conv2 = FusedConv(m1, planes, m2, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(m2)
        self.stride, self.cin, self.cout = stride, cin, m2

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.cin != self.cout:
            diff = self.cout - self.cin
            x = x[:, :, :: self.stride, :: self.stride]
            x = F.pad(x, (0, 0, 0, 0, diff // 2, diff - diff // 2))
        return F.relu(out + x)


class ResNet56(nn.Module):
    def __init__(self):
        super().__init__()
        conv1, stages = RESNET56_RATES[:-3], RESNET56_RATES[-3:]
        m = keep(16, stages[0])
        self.conv1, self.bn1 = FusedConv(3, 16, m, 3, 1, 1, bias=False), nn.BatchNorm2d(m)
        blocks, cin, i = [], m, 0
        for s, planes in enumerate((16, 32, 64)):
            for b in range(9):
                blocks.append(Block(cin, planes, conv1[i], stages[s], 2 if s > 0 and b == 0 else 1))
                cin, i = blocks[-1].cout, i + 1
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def time_conv_shapes(path, steps):
    """Forward + backward of each conv shape alone (as benchmark.py --mode=conv_layers)."""
    with open(path) as f:
        shapes = json.load(f)
    rows = []
    for spec in shapes:
        n, h, w, c = spec["input"]
        x = torch.randn(n, c, h, w, requires_grad=True)
        k = torch.randn(
            spec["filters"], c // spec["groups"], spec["kernel"], spec["kernel"], requires_grad=True
        )
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            y = F.conv2d(x, k, None, spec["stride"], spec["padding"], groups=spec["groups"])
            (y.square().sum() / 2).backward()
            x.grad = k.grad = None
            times.append(time.perf_counter() - start)
        rows.append({"path": spec["path"], "fwd_bwd_ms": 1e3 * statistics.median(times[1:])})
    total = sum(r["fwd_bwd_ms"] for r in rows)
    print(json.dumps({"rows": rows, "total_ms": total, "torch": torch.__version__}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["vgg16", "resnet56"], default="vgg16")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--conv_shapes", default="", help="time each conv shape of this JSON file")
    args = parser.parse_args()
    if args.conv_shapes:
        return time_conv_shapes(args.conv_shapes, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VGG() if args.model == "vgg16" else ResNet56()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    model.train()
    times = []
    for _ in range(args.steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[2:])
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "images_per_sec": args.batch_size / median,
        "step_ms_median": 1e3 * median,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "torch": torch.__version__,
    }
    rate = result["images_per_sec"]
    print(f"{args.model} fused train step, batch {args.batch_size}: {rate:.1f} images/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
