"""A small ResNet on scikit-learn's bundled digits, with top-5 accuracy.

Mirrors the original ResNet-CIFAR10 usage of Swift for TensorFlow's ``TrainingLoop``:
a residual network of basic blocks (two 3x3 convolutions with batch norm and an
identity or 1x1-projection shortcut), trained with SGD, momentum and weight decay,
measured with ``metrics=["accuracy", "top5_accuracy"]``.

CIFAR-10 is not downloaded: the network is sized for scikit-learn's 1,797 real 8x8
digits instead (a 3x3 stem, then three stages of 16, 32 and 64 channels at 8x8, 4x4
and 2x2, global average pooling and a linear classifier). With ten classes top-5
accuracy saturates quickly; it is here because the original reported it::

    python examples/resnet_digits.py           # 5 epochs
    python examples/resnet_digits.py --smoke   # 1 epoch on a few hundred digits
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from statemachine_loop import Event, TrainingLoop


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to a (projected) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, one basic block per stage, global average pooling and a classifier."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        blocks = []
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks.append(BasicBlock(channels, width, stride=1 if index == 0 else 2))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        logits: torch.Tensor = self.head(features.mean(dim=(2, 3)))
        return logits


def print_validation(loop: TrainingLoop, event: Event) -> None:
    """A plain-function observer: print each validation phase's metrics."""
    if event is Event.VALIDATION_END and loop.history.validation:
        values = loop.history.validation[-1]
        print(
            f"epoch {loop.epoch_index + 1}/{loop.epoch_count}  validation "
            f"loss {values['loss']:.4f}  accuracy {values['accuracy']:.4f}  "
            f"top-5 {values['top5_accuracy']:.4f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 epoch")
    parser.add_argument("--epochs", type=int, default=None, help="default 5 (1 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Train the ResNet and return its final validation accuracy."""
    args = parse_args(argv)
    epochs = args.epochs or (1 if args.smoke else 5)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=generator)
    if args.smoke:
        order = order[:384]
    cut = len(order) * 4 // 5
    train_idx, valid_idx = order[:cut], order[cut:]
    training = DataLoader(
        TensorDataset(images[train_idx], labels[train_idx]),
        batch_size=64,
        shuffle=True,
        generator=generator,
    )
    validation = DataLoader(TensorDataset(images[valid_idx], labels[valid_idx]), batch_size=256)

    model = ResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loop = TrainingLoop(
        training=training,
        validation=validation,
        optimizer=optimizer,
        loss_fn=F.cross_entropy,
        metrics=["accuracy", "top5_accuracy"],
        callbacks=[print_validation],
    )
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"ResNet ({parameters:,} parameters): {len(train_idx)} digits, {len(valid_idx)} held out."
    )
    history = loop.fit(model, epochs=epochs)
    final = history.validation[-1]
    print(
        f"final validation accuracy {final['accuracy']:.4f}, "
        f"top-5 accuracy {final['top5_accuracy']:.4f}"
    )
    return final["accuracy"]


if __name__ == "__main__":
    main()
