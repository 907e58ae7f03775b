"""Scores by task, and the helpers that carry several model inputs through every stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compresskit.config import InputConfig
from compresskit.measure import quality
from compresskit.models import inputs


def test_cosine_and_nearest_neighbour_agreement() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    assert quality.mean_cosine(a, 3 * a) == pytest.approx(1.0)
    assert quality.mean_cosine(a, -a) == pytest.approx(-1.0)
    # Under a, 0 and 2 are each other's nearest and 1's nearest is 2; under b, 1's nearest is
    # 0 (cosine 0.894 against 0.845): two of three neighbours agree.
    b = np.array([[1.0, 0.0], [1.0, -0.5], [1.0, 0.1]])
    assert quality.nn_agreement(a, a) == 1.0
    assert quality.nn_agreement(a, b) == pytest.approx(2 / 3)
    scores = quality.score("embed", a, b)
    assert set(scores) == {"cosine", "nn_agreement"} and quality.primary("embed") == "cosine"
    assert quality.score("classify", np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == {
        "accuracy": 0.5}


def test_several_inputs_travel_as_tuples() -> None:
    ids, mask = torch.arange(12).reshape(3, 4), torch.ones(3, 4, dtype=torch.long)
    x = (ids, mask)
    assert inputs.count(x) == 3 and inputs.count(ids) == 3
    assert inputs.call(lambda a, b: a + b, x).shape == (3, 4)
    assert torch.equal(inputs.take(x, slice(1, 2))[0], ids[1:2])
    batch = inputs.stack([(ids[0], mask[0]), (ids[1], mask[1])])
    assert [t.shape for t in batch] == [(2, 4), (2, 4)]
    assert inputs.feeds(["a", "b"], inputs.numpy(x)).keys() == {"a", "b"}
    noisy = inputs.perturb((ids, torch.zeros(3, 4)), 1.0)
    assert torch.equal(noisy[0], ids) and noisy[1].abs().sum() > 0  # token ids keep their values


def test_resize_cuts_and_pads_dynamic_axes_only() -> None:
    specs = [InputConfig(name="ids", shape=[4], dtype="int64", dynamic={0: "sequence"}),
             InputConfig(name="extra", shape=[3], dtype="float32")]
    x = (np.ones((2, 4), np.int64), np.ones((2, 3), np.float32))
    short = inputs.resize(x, specs, 2)
    long = inputs.resize(x, specs, 6)
    assert short[0].shape == (2, 2) and long[0].shape == (2, 6)
    assert long[0][:, 4:].sum() == 0 and long[1].shape == (2, 3)


def test_entry_picks_and_pools_outputs() -> None:
    from torch import nn

    from compresskit.config import OutputConfig
    from compresskit.models.loading import Entry, ModelError, select

    class Tokens(nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
            hidden = input_ids.float().unsqueeze(-1).repeat(1, 1, 2)
            return hidden, {"unused": hidden}

    ids = torch.tensor([[1, 2, 9], [4, 6, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    entry = Entry(Tokens(), ["input_ids", "attention_mask"], OutputConfig(key=0, pool="mean"),
                  keyword=True)
    # The padded 9 of the first row is left out of its mean; the second row counts all three.
    assert torch.allclose(entry(ids, mask), torch.tensor([[1.5, 1.5], [19 / 3, 19 / 3]]))
    first = Entry(Tokens(), ["input_ids", "attention_mask"], OutputConfig(key=0, pool="cls"),
                  keyword=True)
    assert torch.equal(first(ids, mask), torch.tensor([[1.0, 1.0], [4.0, 4.0]]))
    with pytest.raises(ModelError, match="does not index the model's 2 outputs"):
        select((ids, ids), "logits")
    with pytest.raises(ModelError, match="returns a tuple of 2, not one tensor"):
        select((ids, ids), None)


def test_a_sample_or_two_fewer_right_is_not_worse_beyond_chance():
    """keep: better's rule. A sample or two fewer right of 144 is chance (the digits run lost 2
    and gained 1; its calibrated weights were kept on that and lost 0.8 points on the test
    split); twelve lost and none gained is not; disagreements that cancel are not."""
    right = np.ones(144, bool)
    one_fewer = right.copy()
    one_fewer[:1] = False
    worse, why = quality.worse_beyond_chance(right, one_fewer)
    assert not worse and why["lost"] == 1 and why["gained"] == 0 and why["p_value"] == 0.5
    wrecked = right.copy()
    wrecked[:12] = False
    worse, why = quality.worse_beyond_chance(right, wrecked)
    assert worse and why["p_value"] == 0.5 ** 12
    swapped = np.r_[np.zeros(10, bool), np.ones(10, bool)]
    assert not quality.worse_beyond_chance(swapped, swapped[::-1])[0]
    assert not quality.worse_beyond_chance(right, right)[0]  # no disagreement at all
    # Seven lost, one gained: P(X >= 7 | n=8) = 9/256 < 0.05.
    mixed_before, mixed_after = right.copy(), right.copy()
    mixed_after[:7] = False
    mixed_before[7] = False
    worse, why = quality.worse_beyond_chance(mixed_before, mixed_after)
    assert worse and why["p_value"] == 9 / 256
