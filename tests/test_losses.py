"""KDLoss: golden values on fixed logits, its limits, argument checks and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.training.losses import FocalLoss, KDLoss, build_loss, class_weights

STUDENT = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]])
TEACHER = torch.tensor([[0.5, 0.0, 3.0], [-0.2, 1.5, 0.4]])
TARGETS = torch.tensor([2, 1])


def _by_hand(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, alpha: float) -> float:
    """alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE, batch-averaged, in float64."""
    s, t = s.double(), t.double()
    p_t = torch.softmax(t / T, dim=1)
    p_s = torch.softmax(s / T, dim=1)
    kl = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1).mean()
    ce = -torch.log(torch.softmax(s, dim=1))[torch.arange(len(y)), y].mean()
    return float(alpha * T**2 * kl + (1 - alpha) * ce)


@pytest.mark.parametrize(
    ("temperature", "alpha", "golden"),
    [(4.0, 0.7, 0.410791), (2.0, 0.5, 0.465177), (1.0, 1.0, 0.214937)],
)
def test_golden_values(temperature: float, alpha: float, golden: float) -> None:
    kd = KDLoss(temperature, alpha)
    exact = kd(STUDENT.double(), TEACHER.double(), TARGETS).item()
    assert exact == pytest.approx(
        _by_hand(STUDENT, TEACHER, TARGETS, temperature, alpha), abs=1e-12
    )
    assert exact == pytest.approx(golden, abs=5e-7)  # the golden value is rounded to 6 decimals
    # Training runs in float32: same number to float32 precision (T**2 amplifies rounding).
    assert kd(STUDENT, TEACHER, TARGETS).item() == pytest.approx(golden, abs=5e-6)


def test_kl_direction_matters() -> None:
    # The golden values would not catch a swapped KL unless the two directions differ here.
    forward = _by_hand(STUDENT, TEACHER, TARGETS, 4.0, 1.0)
    reverse = _by_hand(TEACHER, STUDENT, TARGETS, 4.0, 1.0)
    assert abs(forward - reverse) > 1e-3
    loss = KDLoss(4.0, 1.0)(STUDENT.double(), TEACHER.double(), TARGETS).item()
    assert loss == pytest.approx(forward, abs=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_alpha_zero_is_cross_entropy(label_smoothing: float) -> None:
    loss = KDLoss(4.0, 0.0, label_smoothing)(STUDENT, TEACHER, TARGETS)
    expected = F.cross_entropy(STUDENT, TARGETS, label_smoothing=label_smoothing)
    assert torch.allclose(loss, expected, atol=1e-7)


def test_identical_logits_have_no_soft_term() -> None:
    assert KDLoss(4.0, 1.0)(STUDENT, STUDENT, TARGETS).item() == pytest.approx(0.0, abs=1e-6)
    half = KDLoss(4.0, 0.5)(STUDENT, STUDENT, TARGETS)
    assert torch.allclose(half, 0.5 * F.cross_entropy(STUDENT, TARGETS), atol=1e-6)


@pytest.mark.parametrize(
    ("temperature", "alpha", "match"),
    [
        (0.0, 0.5, "temperature"),
        (-1.0, 0.5, "temperature"),
        (4.0, -0.1, "alpha"),
        (4.0, 1.5, "alpha"),
    ],
)
def test_invalid_arguments(temperature: float, alpha: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KDLoss(temperature, alpha)


def test_gradcheck_wrt_student_logits() -> None:
    student = STUDENT.double().requires_grad_(True)
    teacher = TEACHER.double()
    loss = KDLoss(3.0, 0.6, label_smoothing=0.05)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, TARGETS), (student,))


# ---------------------------------------------------------------- focal loss and class weights


def test_focal_at_gamma_zero_is_cross_entropy() -> None:
    weight = class_weights([50, 10, 5], "balanced")
    for smoothing in (0.0, 0.1):
        for w in (None, weight):
            focal = FocalLoss(0.0, w, smoothing)(STUDENT, TARGETS)
            ce = F.cross_entropy(STUDENT, TARGETS, weight=w, label_smoothing=smoothing)
            assert focal.item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_matches_a_hand_computed_value() -> None:
    # one sample, two classes: p_t = softmax([2, 0])[0] = 1 / (1 + e^-2)
    logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    p_t = 1.0 / (1.0 + math.exp(-2.0))
    expected = -((1.0 - p_t) ** 2) * math.log(p_t)
    assert FocalLoss(2.0)(logits, target).item() == pytest.approx(expected, rel=1e-5)
    # alpha weighs the sample by its class weight; the mean divides it back out
    alpha = torch.tensor([3.0, 1.0])
    assert FocalLoss(2.0, alpha)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_focal_down_weights_easy_examples() -> None:
    easy, hard = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    target = torch.tensor([0])
    ratio_ce = F.cross_entropy(hard, target) / F.cross_entropy(easy, target)
    ratio_focal = FocalLoss(2.0)(hard, target) / FocalLoss(2.0)(easy, target)
    assert ratio_focal > 10 * ratio_ce


def test_class_weights() -> None:
    counts = [100, 25, 4]
    assert class_weights(counts, "none") is None
    for method in ("balanced", "sqrt_inv", "effective_number"):
        weights = class_weights(counts, method, beta=0.99)
        assert weights.sum().item() == pytest.approx(3.0)
        assert weights[0] < weights[1] < weights[2]
    balanced = class_weights(counts, "balanced")
    assert balanced[2] / balanced[0] == pytest.approx(25.0)
    assert class_weights(counts, "sqrt_inv")[2] / class_weights(counts, "sqrt_inv")[0] == (
        pytest.approx(5.0)
    )
    # effective number: beta -> 0 is no weighting at all (every E_n = 1)
    assert torch.allclose(class_weights(counts, "effective_number", beta=0.0), torch.ones(3))
    assert class_weights([5, 0, 5], "balanced").tolist() == [1.5, 0.0, 1.5]


def test_build_loss_picks_by_name_and_rejects_unknown_names() -> None:
    ce = build_loss("ce", [10, 2], class_weight="balanced", beta=0.9, gamma=2, label_smoothing=0)
    assert isinstance(ce, torch.nn.CrossEntropyLoss)
    assert ce.weight.tolist() == pytest.approx([1 / 3, 5 / 3])
    focal = build_loss(
        "focal", [10, 2], class_weight="none", beta=0.9, gamma=1.5, label_smoothing=0
    )
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and focal.alpha is None
    with pytest.raises(ValueError, match=r"'cee'.*ce, focal"):
        build_loss("cee", [1], class_weight="none", beta=0.9, gamma=0, label_smoothing=0)
    with pytest.raises(ValueError, match=r"'inverse'.*none, balanced, sqrt_inv, effective_num"):
        class_weights([1], "inverse")
