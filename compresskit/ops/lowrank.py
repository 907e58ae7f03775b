"""Truncated-SVD factorisation of Linear and Conv2d layers: the math, and the modules it builds.

A weight W (out x in; a k x k convolution reshaped to out x (in*k*k)) is approximated by
B @ A with A (r x in) and B (out x r), each carrying the square root of the singular values, so
neither factor's scale dwarfs the other's during recovery training.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().flatten(1).double())


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values hold `energy` of the squared spectrum."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * min(out_features, in_features)))


def factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of weight.flatten(1) (Eckart-Young)."""
    w = weight.detach().flatten(1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a.to(weight.dtype), b.to(weight.dtype)


def tail_norm(s: torch.Tensor, rank: int) -> float:
    """Frobenius error of the rank-`rank` approximation: the norm of the dropped values."""
    return float(s[rank:].double().norm())


def max_useful_rank(out_ch: int, fan_in: int, min_reduction: float) -> int:
    """The largest rank whose factorisation still cuts the layer's MACs by `min_reduction`.

    fan_in is in_features, or in_channels * kh * kw for a convolution: per output row or pixel
    the layer costs out * fan_in MACs, its rank-r factorisation r * (fan_in + out)."""
    return math.floor((1.0 - min_reduction) * out_ch * fan_in / (fan_in + out_ch))


def factorize_linear(layer: nn.Linear, rank: int, weights: bool = True) -> nn.Sequential:
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    if weights:
        a, b = factors(layer.weight, rank)
        with torch.no_grad():
            first.weight.copy_(a)
            second.weight.copy_(b)
            if layer.bias is not None:
                second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device)


def factorize_conv(layer: nn.Conv2d, rank: int, weights: bool = True) -> nn.Sequential:
    """k x k (stride, padding, dilation kept) to `rank` channels, then 1 x 1 to out_channels."""
    if layer.groups != 1:
        raise ValueError("grouped convolutions are not factorised")
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size,  # type: ignore[arg-type]
                      stride=layer.stride, padding=layer.padding,  # type: ignore[arg-type]
                      dilation=layer.dilation,  # type: ignore[arg-type]
                      bias=False, padding_mode=layer.padding_mode)
    second = nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None)
    if weights:
        a, b = factors(layer.weight, rank)
        with torch.no_grad():
            first.weight.copy_(a.reshape(first.weight.shape))
            second.weight.copy_(b[:, :, None, None])
            if layer.bias is not None and second.bias is not None:
                second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device)
