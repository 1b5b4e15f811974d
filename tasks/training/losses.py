"""Losses as ``nn.Module``s whose docstrings carry the formula and the paper.

``build_loss`` picks the supervised loss (``train.loss``/``distill.loss``) and its
per-class weights (``class_weight``) from the class counts the model trains on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    r"""Knowledge distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge
    in a Neural Network", 2015, arXiv:1503.02531).

    .. math::
        L = \alpha\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T)\big)
            + (1-\alpha)\,\mathrm{CE}(s, y)

    with ``t`` the teacher's logits, ``s`` the student's, ``y`` the labels. The
    label term can be any supervised loss (``hard``): a class-weighted or focal
    loss for imbalanced data.

    - ``T`` (temperature) > 1 softens both distributions so the student also
      learns how the teacher ranks the wrong classes ("dark knowledge").
    - The soft term's gradients scale as ``1/T**2``; multiplying by ``T**2``
      keeps its weight relative to the hard term unchanged when ``T`` is tuned.
    - ``alpha`` in [0, 1] weighs soft targets against the labels; ``alpha=0``
      is plain cross-entropy.

    The KL term is averaged over the batch (``reduction="batchmean"``, the
    mathematically correct KL), matching the mean-reduced cross-entropy.
    """

    def __init__(
        self,
        temperature: float,
        alpha: float,
        label_smoothing: float = 0.0,
        hard: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        # The label term: plain cross-entropy unless a weighted or focal loss is given.
        self.hard = hard

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        hard = (
            F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)
            if self.hard is None
            else self.hard(student_logits, targets)
        )
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of a (N, C, H, W) feature map: mean over channels of the squared
    activations, flattened and L2-normalised per image -> (N, H*W)."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


class AttentionTransferLoss(nn.Module):
    r"""Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More
    Attention to Attention", ICLR 2017, arXiv:1612.03928).

    .. math::
        L_{AT} = rac{eta}{2} \sum_j \operatorname{mean}\Big(
            ig(	frac{Q_S^j}{\|Q_S^j\|_2} - 	frac{Q_T^j}{\|Q_T^j\|_2}ig)^2\Big),
        \qquad Q^j = \operatorname{vec}ig(	frac{1}{C}	extstyle\sum_c A_c^{j\,2}ig)

    over pairs ``j`` of student/teacher feature maps at the same resolution:
    the student learns *where* the teacher looks, whatever its channel count,
    so no adapter layer is needed (unlike FitNets hints). The mean over batch
    and positions and ``beta = 1000`` follow the authors' reference code.
    Student maps at another resolution than their teacher's are resized
    (bilinear) to the teacher's.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    def forward(
        self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        if len(student_features) != len(teacher_features) or not student_features:
            raise ValueError(
                f"attention transfer needs pairs of feature maps, got {len(student_features)} "
                f"student and {len(teacher_features)} teacher maps"
            )
        total = student_features[0].new_zeros(())
        for s, t in zip(student_features, teacher_features, strict=True):
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
        return self.beta / 2 * total


def class_weights(counts: Sequence[int], method: str, beta: float = 0.999) -> torch.Tensor | None:
    r"""Per-class loss weights from the class counts ``n_c`` the model trains on.

    - ``balanced``: :math:`w_c \propto 1/n_c` (scikit-learn's ``n / (C n_c)``);
    - ``sqrt_inv``: :math:`w_c \propto 1/\sqrt{n_c}`, a milder correction;
    - ``effective_number``: :math:`w_c \propto (1-\beta)/(1-\beta^{n_c})`, the inverse
      "effective number of samples" (Cui et al., "Class-Balanced Loss Based on
      Effective Number of Samples", CVPR 2019); :math:`\beta \to 1` approaches
      ``balanced``, :math:`\beta = 0` is no weighting.

    Normalised to sum to the number of classes (mean 1), so the loss keeps its
    scale and the learning rate its meaning. ``none`` gives None. A class with
    no images gets weight 0.
    """
    if method not in CLASS_WEIGHTS:
        raise ValueError(
            f"class_weight: unknown {method!r}; valid choices: {', '.join(CLASS_WEIGHTS)}"
        )
    rule = CLASS_WEIGHTS[method]
    if rule is None:
        return None
    n = np.asarray(counts, dtype=np.float64)
    raw = np.zeros_like(n)
    raw[n > 0] = rule(n[n > 0], beta)
    return torch.as_tensor(raw * len(n) / raw.sum(), dtype=torch.float32)


# class_weight name -> (counts, beta) -> unnormalised weights (None: no weighting)
CLASS_WEIGHTS: dict[str, Callable[[np.ndarray, float], np.ndarray] | None] = {
    "none": None,
    "balanced": lambda n, beta: 1.0 / n,
    "sqrt_inv": lambda n, beta: 1.0 / np.sqrt(n),
    "effective_number": lambda n, beta: (1.0 - beta) / (1.0 - np.power(beta, n)),
}


class FocalLoss(nn.Module):
    r"""Focal loss (Lin, Goyal, Girshick, He & Dollár, "Focal Loss for Dense Object
    Detection", ICCV 2017, arXiv:1708.02002).

    .. math::
        \mathrm{FL}(p_t) = -\alpha_t\,(1 - p_t)^{\gamma}\,\log p_t

    ``p_t`` is the predicted probability of the true class. ``gamma`` > 0
    down-weights examples the model already gets right, so the rare and hard
    ones dominate the gradient; ``gamma = 0`` is cross-entropy. ``alpha`` is an
    optional per-class weight (here: ``class_weight``).

    With label smoothing ``eps`` the target is ``q = (1 - eps) onehot + eps / C``
    and every class term is focused, ``-sum_c alpha_c q_c (1 - p_c)^gamma log p_c``;
    the mean is normalised by the summed weight of the true classes. At
    ``gamma = 0`` this is exactly ``F.cross_entropy(weight=alpha,
    label_smoothing=eps)``, which the tests check.
    """

    def __init__(
        self, gamma: float, alpha: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        q = F.one_hot(targets, num_classes).float() * (1.0 - self.label_smoothing)
        q = q + self.label_smoothing / num_classes
        focus = (1.0 - log_p.exp()).pow(self.gamma) if self.gamma else 1.0
        weight = torch.ones(num_classes, device=logits.device) if self.alpha is None else self.alpha
        per_sample = -(weight * q * focus * log_p).sum(dim=1)
        return per_sample.sum() / weight[targets].sum()


def build_loss(
    name: str,
    counts: Sequence[int],
    *,
    class_weight: str,
    beta: float,
    gamma: float,
    label_smoothing: float,
) -> nn.Module:
    """The supervised loss ``loss`` names, weighted per ``class_weight`` over ``counts``."""
    if name not in LOSSES:
        raise ValueError(f"loss: unknown {name!r}; valid choices: {', '.join(LOSSES)}")
    return LOSSES[name](class_weights(counts, class_weight, beta), gamma, label_smoothing)


# loss name -> (class weights, focal gamma, label smoothing) -> loss module
LOSSES: dict[str, Callable[[torch.Tensor | None, float, float], nn.Module]] = {
    "ce": lambda weight, gamma, smoothing: nn.CrossEntropyLoss(
        weight=weight, label_smoothing=smoothing
    ),
    "focal": lambda weight, gamma, smoothing: FocalLoss(gamma, weight, smoothing),
}
