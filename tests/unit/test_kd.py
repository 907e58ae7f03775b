"""The distillation loss against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
