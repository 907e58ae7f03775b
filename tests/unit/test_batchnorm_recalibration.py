"""BatchNorm statistics re-estimated after training (`bn_recalibration`): the plain average
over training batches for the final weights, dropout off, the model's modes restored."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compresskit.config.base import TrainingOptions
from compresskit.train.loop import cross_entropy_step, fit, recalibrate_batchnorm


def _net(momentum: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, 8),
                         nn.BatchNorm1d(8, momentum=momentum), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 4, generator=g) * 3 + 5
    return TensorDataset(x, (x.flatten(1).sum(1) > 80).long())


def test_the_statistics_are_the_average_over_the_batches_for_the_weights_as_they_are():
    model, data = _net(0.01), _data()
    bn = model[3]
    bn.running_mean.fill_(100.0)
    model.train()
    assert recalibrate_batchnorm(model, data, 64, torch.device("cpu"), batches=4) == 1
    with torch.no_grad():  # what the BatchNorm reads, dropout off: all 256 samples, 4 x 64
        seen = model[2](data.tensors[0].flatten(1))
    torch.testing.assert_close(bn.running_mean, seen.mean(0), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.01 and model.training and model[1].training  # modes restored
    # Dropout was off: doing it again gives the same statistics.
    first = bn.running_var.clone()
    recalibrate_batchnorm(model, data, 64, torch.device("cpu"), batches=4)
    torch.testing.assert_close(bn.running_var, first)


def test_training_ends_with_statistics_that_match_the_weights():
    """A BatchNorm with momentum 0.001 barely moves from its initial statistics in 8 steps;
    re-estimated, evaluation sees what training saw."""
    data = _data()

    def trained(batches: int) -> nn.Module:
        model = _net(0.001)
        fit(model, data, TrainingOptions(epochs=2, lr=1e-3, bn_recalibration=batches),
            batch_size=64, step=cross_entropy_step, device=torch.device("cpu"), seed=0)
        return model

    stale, fresh = trained(0), trained(4)
    with torch.no_grad():
        inputs = fresh[2](data.tensors[0].flatten(1))
    gap = (stale[3].running_mean - stale[2](data.tensors[0].flatten(1)).mean(0)).abs().max()
    assert gap > 1.0  # the moving average is still near its initial zeros
    torch.testing.assert_close(fresh[3].running_mean, inputs.mean(0), rtol=1e-4, atol=1e-4)
