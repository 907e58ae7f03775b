"""The distillation loss against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compresskit.ops import kd
from compresskit.ops.kd import hinton_loss, soft_kl


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g),
            torch.randint(0, 5, (8,), generator=g))


def test_alpha_zero_is_cross_entropy(logits):
    s, t, y = logits
    loss, terms = hinton_loss(s, t, y, temperature=4.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(s, y))
    assert set(terms) == {"kd", "ce"}


def test_alpha_one_and_no_labels_is_pure_soft_term(logits):
    s, t, y = logits
    assert torch.allclose(hinton_loss(s, t, y, 2.0, 1.0)[0], soft_kl(s, t, 2.0))
    assert torch.allclose(hinton_loss(s, t, None, 2.0, 0.5)[0], soft_kl(s, t, 2.0))


def test_soft_kl_closed_form(logits):
    s, t, _ = logits
    temp = 3.0
    p = torch.softmax(t / temp, 1)
    q = torch.softmax(s / temp, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * temp**2
    assert torch.allclose(soft_kl(s, t, temp), expected, atol=1e-6)
    assert float(soft_kl(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 4.0, 20.0])
def test_gradient_is_t_times_softmax_difference(logits, temp):
    """d/ds of T^2 KL = T (softmax(s/T) - softmax(t/T)) / batch: the T^2 factor keeps scale."""
    s, t, _ = logits
    s = s.clone().requires_grad_(True)
    soft_kl(s, t, temp).backward()
    expected = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / len(s)
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_gradient_scale_roughly_independent_of_temperature(logits):
    """For large T the gradient tends to (s - t) / (C * batch), whatever T is."""
    s, t, _ = logits
    norms = []
    for temp in (10.0, 100.0):
        x = s.clone().requires_grad_(True)
        soft_kl(x, t, temp).backward()
        norms.append(float(x.grad.norm()))
    assert norms[0] == pytest.approx(norms[1], rel=0.05)


def test_teacher_gets_no_gradient(logits):
    s, t, y = logits
    t = t.clone().requires_grad_(True)
    hinton_loss(s.requires_grad_(True), t, y, 4.0, 0.9)[0].backward()
    assert t.grad is None


# -- the other distillation terms, each against its closed form ---------------------------------


def test_kl_to_target_equals_soft_kl_for_one_teacher(logits):
    s, t, _ = logits
    for temp in (1.0, 3.0):
        target = F.softmax(t / temp, dim=-1)
        assert torch.allclose(kd.kl_to_target(s, target, temp), soft_kl(s, t, temp), atol=1e-6)


def test_combined_targets_is_the_weighted_mean_of_softened_teachers(logits):
    s, t, _ = logits
    one = kd.combined_targets([t], [3.0], [2.0])
    assert torch.allclose(one, F.softmax(t / 2.0, dim=-1))
    both = kd.combined_targets([t, s], [3.0, 1.0], [2.0, 1.0])
    expected = 0.75 * F.softmax(t / 2.0, dim=-1) + 0.25 * F.softmax(s, dim=-1)
    assert torch.allclose(both, expected, atol=1e-6)
    assert torch.allclose(both.sum(dim=-1), torch.ones(len(t)))


def test_confidence_weighting_uses_each_teachers_top1_probability(logits):
    s, t, _ = logits
    got = kd.combined_targets([t, s], [1.0, 1.0], [4.0, 4.0], confidence=True)
    ct, cs = F.softmax(t, -1).amax(-1, keepdim=True), F.softmax(s, -1).amax(-1, keepdim=True)
    expected = (ct * F.softmax(t / 4, -1) + cs * F.softmax(s / 4, -1)) / (ct + cs)
    assert torch.allclose(got, expected, atol=1e-6)


def test_multi_teacher_of_identical_teachers_is_the_single_teacher(logits):
    s, t, _ = logits
    target = kd.combined_targets([t, t.clone()], [0.3, 0.7], [4.0, 4.0], confidence=True)
    assert torch.allclose(kd.kl_to_target(s, target, 4.0), soft_kl(s, t, 4.0), atol=1e-5)


def test_feature_distances():
    a = torch.randn(4, 3, 5, 5)
    assert float(kd.feature_distance(a, a, "mse")) == 0.0
    assert torch.allclose(kd.feature_distance(a, a + 2, "mse"), torch.tensor(4.0))
    assert torch.allclose(kd.feature_distance(a, a - 3, "l1"), torch.tensor(3.0))
    assert torch.allclose(kd.feature_distance(a, 5 * a, "cosine"), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(kd.feature_distance(a, -a, "cosine"), torch.tensor(2.0), atol=1e-6)


def test_sequence_feature_distances_leave_padding_out():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = s.clone()
    noisy[0, 3:] = 1e3  # padded tokens: nothing to match
    for kind in ("mse", "l1", "cosine"):
        assert torch.allclose(kd.feature_distance(noisy, t, kind, mask),
                              kd.feature_distance(s, t, kind, mask)), kind
    real = mask.bool()
    assert torch.allclose(kd.feature_distance(s, t, "mse", mask), (s - t)[real].pow(2).mean())
    # cosine compares token by token: a per-token rescaling costs nothing
    assert float(kd.feature_distance(t * torch.rand(2, 5, 1) + 0.0, t, "cosine", mask)) < 1e-6
    assert torch.allclose(kd.feature_distance(s, t, "mse", torch.ones(2, 5)),
                          kd.feature_distance(s, t, "mse"))


def test_attention_maps_are_unit_norm_and_scale_free():
    f = torch.randn(2, 8, 4, 4)
    amap = kd.attention_map(f)
    assert amap.shape == (2, 16)
    assert torch.allclose(amap.norm(dim=1), torch.ones(2))
    assert torch.allclose(amap, kd.attention_map(f.pow(2).mean(1, keepdim=True).sqrt()))
    assert float(kd.attention_loss(3 * f, f)) < 1e-10  # channel count and scale do not matter
    assert float(kd.attention_loss(torch.randn(2, 5, 4, 4), f)) > 0


def test_attention_pools_the_larger_map():
    small = torch.rand(2, 4, 4, 4)
    large = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # same map, 8x8
    assert float(kd.attention_loss(large, small)) < 1e-10


def test_pooled_and_cosine():
    assert kd.pooled(torch.ones(2, 6, 3, 3)).shape == (2, 6)
    assert kd.pooled(torch.ones(2, 7, 5)).shape == (2, 5)  # tokens averaged
    e = torch.randn(3, 5)
    assert float(kd.cosine_loss(e, 2 * e)) < 1e-6
    assert torch.allclose(kd.cosine_loss(e, -e), torch.tensor(2.0))


def test_mutual_terms_are_each_peers_kl_from_the_others(logits):
    s, t, _ = logits
    a, b = kd.mutual_terms(torch.stack([s, t]), 2.0)
    assert torch.allclose(a, soft_kl(s, t, 2.0)) and torch.allclose(b, soft_kl(t, s, 2.0))
    three = kd.mutual_terms(torch.stack([s, t, s + t]), 1.0)
    assert torch.allclose(three[0], (soft_kl(s, t, 1.0) + soft_kl(s, s + t, 1.0)) / 2)


def test_mix_with_labels(logits):
    s, _, y = logits
    d = torch.tensor(2.0)
    loss, terms = kd.mix_with_labels(d, s, y, 0.25, {"kd": 2.0})
    assert torch.allclose(loss, 0.25 * d + 0.75 * F.cross_entropy(s, y))
    assert set(terms) == {"kd", "ce"}
    assert kd.mix_with_labels(d, s, None, 0.25, {})[0] is d  # label-free: distillation alone


def test_ema_update_closed_form():
    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(2.0)
    student.num_batches_tracked.fill_(7)
    kd.ema_update(teacher, student, decay=0.9)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.1))
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.2))
    assert int(teacher.num_batches_tracked) == 7
