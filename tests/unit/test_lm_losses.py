"""The token-level divergences: their definitions, the top-k cache's coarse-grained form, and
the chunked loss against the plain one (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compresskit.lm.losses import Objective, TopK, chunked_loss, divergence, top_k


def _pair(v: int = 11, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2


def test_forward_and_reverse_kl_are_the_textbook_ones():
    t, s = _pair()
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    want_fwd = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    want_rev = F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(divergence(lp, lq, "forward_kl"), want_fwd, atol=1e-6)
    assert torch.allclose(divergence(lp, lq, "reverse_kl"), want_rev, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl"])
def test_every_divergence_is_zero_on_equal_and_positive_on_different(kind: str):
    t, s = _pair()
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    assert divergence(lp, lp, kind).abs().max() < 1e-6
    assert (divergence(lp, lq, kind) > 1e-3).all()


def test_jsd_and_skew_limits():
    t, s = _pair()
    lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
    assert torch.allclose(divergence(lp, lq, "jsd", beta=0.0), divergence(lp, lq, "forward_kl"))
    assert torch.allclose(divergence(lp, lq, "jsd", beta=1.0), divergence(lp, lq, "reverse_kl"))
    assert torch.allclose(divergence(lp, lq, "skew_kl", skew=0.0),
                          divergence(lp, lq, "forward_kl"), atol=1e-6)
    # JSD is bounded by log 2 (beta 0.5), KL is not
    assert (divergence(lp, lq, "jsd", beta=0.5) <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_top_k_with_the_whole_vocabulary_is_the_full_divergence():
    t, s = _pair(v=13)
    obj = Objective("forward_kl", temperature=2.0, alpha=1.0)
    head = torch.nn.Identity()
    full = obj.chunk(s, head, torch.zeros(5, dtype=torch.long), torch.ones(5), t)
    cached = obj.chunk(s, head, torch.zeros(5, dtype=torch.long), torch.ones(5),
                       top_k(t, 13, 2.0))
    assert torch.allclose(full, cached, rtol=1e-4)
    few = top_k(t, 4, 2.0)  # the tail bucket holds the rest of the mass
    assert torch.allclose(torch.logsumexp(torch.cat([few.logp, few.log_tail[:, None]], -1), -1),
                          torch.zeros(5), atol=1e-5)


def test_chunked_loss_equals_the_unchunked_loss_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 17, bias=False)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    ids = torch.randint(0, 17, (2, 9))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    teacher = torch.randn(2, 9, 17)
    obj = Objective("jsd", temperature=1.5, alpha=0.7, beta=0.3)
    grads = []
    values = []
    for chunk in (3, 1000):
        hidden.grad = None
        head.zero_grad()
        loss = chunked_loss(obj, hidden, head, ids, mask, teacher, chunk)
        loss.backward()
        values.append(loss.detach())
        grads.append((hidden.grad.clone(), head.weight.grad.clone()))
    assert torch.allclose(values[0], values[1], atol=1e-6)
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    # masked positions do not count: changing their teacher changes nothing
    teacher2 = teacher.clone()
    teacher2[1, 7:] = 100.0
    assert torch.allclose(chunked_loss(obj, hidden, head, ids, mask, teacher2, 4),
                          values[0], atol=1e-6)


def test_cross_entropy_alone_is_the_language_model_loss():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 17, bias=False)
    hidden = torch.randn(2, 6, 8)
    ids = torch.randint(0, 17, (2, 6))
    loss = chunked_loss(Objective(alpha=0.0), hidden, head, ids, torch.ones(2, 6), None, 4)
    want = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6)


def test_top_k_keeps_fp16_friendly_values():
    t, _ = _pair(v=50)
    found = top_k(t, 8, 1.0)
    assert isinstance(found, TopK) and found.ids.shape == (5, 8)
    assert (found.logp <= 0).all() and (found.log_tail <= 0).all()
