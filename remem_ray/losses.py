"""Distillation losses: Hinton KD and DIST, each mixed with cross-entropy by a weight.

loss = (1 - weight) * CE(student, y) + weight * distill(student, teacher)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch.

    The T^2 keeps the soft-target gradients on the scale of the hard-label ones as T grows.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    corr = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return (1.0 - corr).mean()


def dist_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al. 2022): match Pearson correlations of the softened predictions,
    inter-class (per sample, across classes) and intra-class (per class, across the batch)."""
    t = temperature
    p_s = F.softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    inter = _pearson_distance(p_s, p_t, dim=1)
    intra = _pearson_distance(p_s, p_t, dim=0)
    return (beta * inter + gamma * intra) * (t * t)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "kd": kd_divergence,
    "dist": dist_divergence,
}


class DistillationLoss:
    """CE on labels mixed with a divergence to the teacher's logits."""

    def __init__(self, kind: str = "kd", temperature: float = 4.0, weight: float = 0.9) -> None:
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown distillation loss {kind!r}; known: {sorted(DIVERGENCES)}")
        self.divergence = DIVERGENCES[kind]
        self.temperature = temperature
        self.weight = weight

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        ce = F.cross_entropy(student_logits.float(), labels)
        if self.weight == 0.0:
            return ce
        distill = self.divergence(student_logits, teacher_logits, self.temperature)
        return (1.0 - self.weight) * ce + self.weight * distill


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    weight: float = 0.9,
) -> torch.Tensor:
    """Functional form of DistillationLoss('kd', ...)."""
    return DistillationLoss("kd", temperature, weight)(student_logits, teacher_logits, labels)
