"""Losses as ``nn.Module``s whose docstrings carry the formula and the paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    r"""Knowledge distillation loss (Hinton, Vinyals & Dean, "Distilling the Knowledge
    in a Neural Network", 2015, arXiv:1503.02531).

    .. math::
        L = \alpha\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(t/T)\,\|\,\mathrm{softmax}(s/T)\big)
            + (1-\alpha)\,\mathrm{CE}(s, y)

    with ``t`` the teacher's logits, ``s`` the student's, ``y`` the labels.

    - ``T`` (temperature) > 1 softens both distributions so the student also
      learns how the teacher ranks the wrong classes ("dark knowledge").
    - The soft term's gradients scale as ``1/T**2``; multiplying by ``T**2``
      keeps its weight relative to the hard term unchanged when ``T`` is tuned.
    - ``alpha`` in [0, 1] weighs soft targets against the labels; ``alpha=0``
      is plain cross-entropy.

    The KL term is averaged over the batch (``reduction="batchmean"``, the
    mathematically correct KL), matching the mean-reduced cross-entropy.
    """

    def __init__(self, temperature: float, alpha: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

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
        hard = F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)
        return self.alpha * t * t * soft + (1.0 - self.alpha) * hard
