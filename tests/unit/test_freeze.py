"""`freeze`: parameters matched by glob patterns keep their values while a stage trains, the
rest train, and every parameter requires gradients again afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compresskit.config.base import TrainingOptions
from compresskit.errors import ConfigError
from compresskit.train.loop import cross_entropy_step, fit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


def _train(model: nn.Module, freeze: list[str]) -> None:
    fit(model, _data(), TrainingOptions(epochs=2, lr=1e-2, freeze=freeze), batch_size=32,
        step=cross_entropy_step, device=torch.device("cpu"), seed=0)


def test_frozen_parameters_keep_their_values_and_the_rest_train():
    model = _net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, ["0.*"])
    after = dict(model.named_parameters())
    for name in ("0.weight", "0.bias"):
        assert torch.equal(after[name], before[name]), name
    for name in ("2.weight", "2.bias"):
        assert not torch.equal(after[name], before[name]), name
    assert all(p.requires_grad for p in model.parameters())  # given back afterwards


def test_a_pattern_that_matches_nothing_is_the_users_error_naming_what_exists():
    with pytest.raises(ConfigError, match=r"'embeddings\.\*' matches none.*0\.weight"):
        _train(_net(), ["embeddings.*"])
