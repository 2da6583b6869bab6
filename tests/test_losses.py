"""Teacher-target rebuild (storage/targets.py) and DeiT losses (student/losses.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from student.losses import DistillationLoss
from storage.targets import (
    TeacherTargets,
    hard_targets,
    soft_targets,
    teacher_logits_from_topk,
    topk_from_logits,
)

C = 20


def _peaked_logits(batch=64, classes=100, seed=0):
    """Logits shaped like a trained ImageNet teacher: one class well above a Gaussian floor."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g) * 2.0
    top = torch.randint(0, classes, (batch,), generator=g)
    logits[torch.arange(batch), top] += 8.0 + 4.0 * torch.rand(batch, generator=g)
    return logits


# --- storage/targets.py -----------------------------------------------------------------

def test_soft_targets_exact_on_topk_at_tau1_and_normalised():
    logits = _peaked_logits(classes=C)
    lp, idx = topk_from_logits(logits, 5)
    p = soft_targets(lp, idx, C, tau=1.0)
    true = F.softmax(logits, dim=-1)
    torch.testing.assert_close(p.gather(1, idx), true.gather(1, idx), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.sum(-1), torch.ones(len(p)), rtol=0, atol=1e-5)
    # The tail keeps its true total mass, split uniformly.
    tail_true = 1 - true.gather(1, idx).sum(-1)
    torch.testing.assert_close(1 - p.gather(1, idx).sum(-1), tail_true, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_soft_targets_k_equals_c_is_exact(tau):
    logits = _peaked_logits(classes=C)
    lp, idx = topk_from_logits(logits, C)
    p = soft_targets(lp, idx, C, tau)
    torch.testing.assert_close(p, F.softmax(logits / tau, dim=-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_soft_targets_error_bound_for_k_below_c(k, tau):
    """Documented bound: TV(rebuilt, true) <= max(true tail mass, rebuilt tail mass) at tau;
    at tau=1 additionally TV < m (the true tail mass)."""
    classes = 100
    logits = _peaked_logits(classes=classes)
    lp, idx = topk_from_logits(logits, k)
    p = soft_targets(lp, idx, classes, tau)
    q = F.softmax(logits / tau, dim=-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    tail_p = 1 - p.gather(1, idx).sum(-1)
    tail_q = 1 - q.gather(1, idx).sum(-1)
    assert torch.all(tv <= torch.maximum(tail_p, tail_q) + 1e-6)
    # Relative probabilities inside the top-k are exact at any tau.
    torch.testing.assert_close(
        p.gather(1, idx) / p.gather(1, idx[:, :1]), q.gather(1, idx) / q.gather(1, idx[:, :1]),
        rtol=1e-4, atol=1e-7,
    )
    if tau == 1.0:
        assert torch.all(tv <= tail_q + 1e-6)
    if tau > 1.0:  # Jensen: a uniform tail over-estimates the tempered tail mass
        assert torch.all(tail_p >= tail_q - 1e-6)
    if tau == 1.0:
        # KL(true || rebuilt) = m * KL(tail | uniform) <= m * log(C - k)  (module doc), and on
        # these peaked logits (mean top-1 prob ~0.86) it is small on average at k = 10.
        kl = (q * (q.log() - p.log())).sum(-1)
        assert torch.all(kl <= tail_q * math.log(classes - k) + 1e-5)
        if k == 10:
            assert kl.mean() < 0.05, kl.mean()


def test_teacher_logits_and_hard_targets():
    lp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.1]]))
    idx = torch.tensor([[3, 1], [0, 2]])
    z = teacher_logits_from_topk(lp, idx, 4)
    torch.testing.assert_close(z[0], torch.log(torch.tensor([0.05, 0.3, 0.05, 0.6])))
    torch.testing.assert_close(z[1], torch.log(torch.tensor([0.5, 0.2, 0.1, 0.2])))
    assert hard_targets(idx).tolist() == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        teacher_logits_from_topk(lp, torch.tensor([[4, 1], [0, 2]]), 4)


def test_soft_targets_tolerates_topk_mass_above_one():
    # Quantised storage can make the stored top-k sum to slightly more than 1.
    lp = torch.log(torch.tensor([[0.7, 0.3001]]))
    p = soft_targets(lp, torch.tensor([[0, 1]]), 5, tau=2.0)
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6


# --- student/losses.py --------------------------------------------------------------------

def _batch(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(batch, C, generator=g)
    dist = torch.randn(batch, C, generator=g)
    a = torch.randint(0, C, (batch,), generator=g)
    b = torch.randint(0, C, (batch,), generator=g)
    lam = 0.7
    target = lam * F.one_hot(a, C).float() + (1 - lam) * F.one_hot(b, C).float()
    teacher_logits = torch.randn(batch, C, generator=g) * 3
    return cls, dist, target, teacher_logits


def _ce(logits, y):
    return -(y * logits.log_softmax(-1)).sum(-1).mean()


def _smooth(y, eps):
    return y * (1 - eps) + eps / y.shape[-1]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_none_loss(eps):
    cls, dist, target, _ = _batch()
    out = DistillationLoss("none", C, label_smoothing=eps)(cls, target)
    torch.testing.assert_close(out["loss"], _ce(cls, _smooth(target, eps)))
    assert float(out["distill"]) == 0.0
    out2 = DistillationLoss("none", C, label_smoothing=eps)((cls, dist), target)
    want = 0.5 * (_ce(cls, _smooth(target, eps)) + _ce(dist, _smooth(target, eps)))
    torch.testing.assert_close(out2["loss"], want)


def test_label_smoothing_matches_timm_mixup_target():
    from timm.data.mixup import mixup_target

    y = torch.tensor([3, 7])
    lam = 0.6
    timm_target = mixup_target(y, C, lam=lam, smoothing=0.1)
    ours = (lam * F.one_hot(y, C) + (1 - lam) * F.one_hot(y.flip(0), C)).float()
    from student.losses import smooth_soft_target

    torch.testing.assert_close(smooth_soft_target(ours, 0.1), timm_target)


@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("with_dist", [False, True])
def test_soft_loss_matches_deit_formula(tau, with_dist):
    cls, dist, target, tl = _batch(1)
    alpha, eps = 0.3, 0.1
    lp, idx = topk_from_logits(tl, C)  # k = C: the teacher distribution is exact
    outputs = (cls, dist) if with_dist else cls
    kd = dist if with_dist else cls
    out = DistillationLoss("soft", C, alpha=alpha, tau=tau, label_smoothing=eps)(
        outputs, target, TeacherTargets(lp, idx)
    )
    base = _ce(cls, _smooth(target, eps))
    # deit/losses.py verbatim, with the teacher's full logits.
    distill = F.kl_div(
        F.log_softmax(kd / tau, dim=1), F.log_softmax(tl / tau, dim=1),
        reduction="sum", log_target=True,
    ) * (tau * tau) / kd.numel()
    # Same thing by hand: Σ_b Σ_c p (log p - log q) τ² / (B·C).
    p = F.softmax(tl / tau, -1)
    by_hand = (p * (p.log() - F.log_softmax(kd / tau, -1))).sum() * tau**2 / kd.numel()
    torch.testing.assert_close(distill, by_hand)
    torch.testing.assert_close(out["base"], base)
    torch.testing.assert_close(out["distill"], distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], (1 - alpha) * base + alpha * distill, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_eps", [0.0, 0.1])
@pytest.mark.parametrize("with_dist", [False, True])
def test_hard_loss_matches_deit_formula(teacher_eps, with_dist):
    cls, dist, target, tl = _batch(2)
    lp, idx = topk_from_logits(tl, 3)
    outputs = (cls, dist) if with_dist else cls
    kd = dist if with_dist else cls
    out = DistillationLoss("hard", C, label_smoothing=0.1, teacher_label_smoothing=teacher_eps)(
        outputs, target, (lp, idx)
    )
    base = _ce(cls, _smooth(target, 0.1))
    t_label = F.one_hot(tl.argmax(-1), C).float()
    distill = _ce(kd, _smooth(t_label, teacher_eps))
    torch.testing.assert_close(out["loss"], 0.5 * base + 0.5 * distill)
    torch.testing.assert_close(out["distill"], distill)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradients_reach_the_right_heads(mode):
    cls, dist, target, tl = _batch(3)
    cls.requires_grad_(True)
    dist.requires_grad_(True)
    teacher = topk_from_logits(tl, 5)
    loss_fn = DistillationLoss(mode, C, alpha=1.0, tau=2.0)
    loss_fn((cls, dist), target, teacher)["loss"].backward()
    # alpha = 1: only the distillation term, which reads the dist head only.
    assert cls.grad is None or torch.all(cls.grad == 0)
    assert dist.grad.abs().sum() > 0
    cls.grad = dist.grad = None
    DistillationLoss(mode, C, alpha=0.0)((cls, dist), target, teacher)["loss"].backward()
    assert cls.grad.abs().sum() > 0
    assert dist.grad is None or torch.all(dist.grad == 0)


def test_loss_errors():
    with pytest.raises(ValueError, match="mode"):
        DistillationLoss("kl", C)
    cls, _, target, _ = _batch()
    with pytest.raises(ValueError, match="needs teacher"):
        DistillationLoss("soft", C)(cls, target, None)
    with pytest.raises(ValueError, match="target"):
        DistillationLoss("none", C)(cls, target[:, :5])
    assert math.isfinite(float(DistillationLoss("none", C)(cls, target)["loss"]))
