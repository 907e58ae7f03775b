"""Closed-form properties of the SVD factorisation (compresskit/ops/lowrank.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compresskit.ops import lowrank as lr


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10_000))
def test_full_rank_reconstructs_the_weight(out_f: int, in_f: int, seed: int) -> None:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = lr.factors(w, min(out_f, in_f))
    assert torch.allclose(b @ a, w, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 10_000), st.data())
def test_rank_r_error_is_the_tail_of_the_spectrum(out_f: int, in_f: int, seed: int,
                                                  data: st.DataObject) -> None:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = data.draw(st.integers(1, min(out_f, in_f)))
    a, b = lr.factors(w, r)
    s = lr.singular_values(w)
    assert float(torch.linalg.norm(w - b @ a)) == pytest.approx(lr.tail_norm(s, r), abs=1e-9)


def test_rank_for_energy_on_a_known_spectrum() -> None:
    s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14 -> 0.643, 0.929, 1.0
    assert lr.rank_for_energy(s, 0.5) == 1
    assert lr.rank_for_energy(s, 9 / 14) == 1
    assert lr.rank_for_energy(s, 0.9) == 2
    assert lr.rank_for_energy(s, 0.95) == 3
    assert lr.rank_for_energy(s, 1.0) == 3


def test_max_useful_rank_is_the_last_rank_that_saves_enough() -> None:
    for out_ch, fan_in, cut in [(64, 576, 0.25), (10, 64, 0.25), (128, 128, 0.5), (7, 3, 0.1)]:
        r = lr.max_useful_rank(out_ch, fan_in, cut)
        full = out_ch * fan_in
        assert r * (out_ch + fan_in) <= (1 - cut) * full
        assert (r + 1) * (out_ch + fan_in) > (1 - cut) * full


def test_factorised_layers_match_the_original_at_full_rank() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    assert torch.allclose(lr.factorize_linear(lin, 7)(x), lin(x), atol=1e-5)
    for conv in (nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, bias=False),
                 nn.Conv2d(3, 5, (3, 1), padding=(1, 0), dilation=2)):
        img = torch.randn(2, conv.in_channels, 9, 9)
        full = min(conv.out_channels, conv.weight[0].numel())
        assert torch.allclose(lr.factorize_conv(conv, full)(img), conv(img), atol=1e-5)


def test_grouped_convolutions_are_refused() -> None:
    with pytest.raises(ValueError, match="grouped"):
        lr.factorize_conv(nn.Conv2d(4, 4, 3, groups=4), 2)

