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


def mlp(hidden: int = 256, num_classes: int = 10) -> nn.Module:
    """A different kind of teacher for multi-teacher distillation: flatten -> hidden -> logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, num_classes))


def sklearn_teacher(hidden: int = 128, seed: int = 0) -> nn.Module:
    """A teacher trained outside the pipeline, as pretrained teachers are: scikit-learn's
    MLPClassifier fitted on the labelled training part of the digits (the test part is never
    seen), its weights copied into the same torch MLP. Label-free distillation uses it: the
    pipeline itself sees only the unlabelled images."""
    import warnings

    import torch
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train / 16.0, y_train)
    model = mlp(hidden)
    with torch.no_grad():
        for layer, w, b in ((model[1], clf.coefs_[0], clf.intercepts_[0]),
                            (model[3], clf.coefs_[1], clf.intercepts_[1])):
            layer.weight.copy_(torch.tensor(w.T, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return model
