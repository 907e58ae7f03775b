"""CNNs for 8x8 digits, referenced from pipelines/digits.yaml as models/digits.py:teacher etc.

Plain nn.Modules (not a bare nn.Sequential: NNCF needs a top-level module with its own forward).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """conv-bn-relu x2 -> maxpool (8x8 -> 4x4) -> conv-bn-relu -> global average -> linear."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.stem = _block(1, width)
        self.features = nn.Sequential(_block(width, 2 * width), nn.MaxPool2d(2),
                                      _block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def teacher(width: int = 64) -> nn.Module:
    return DigitsCNN(width)


def student(width: int = 16) -> nn.Module:
    return DigitsCNN(width)
