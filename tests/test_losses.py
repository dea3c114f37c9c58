import math

import pytest
import torch

from remem_ray.losses import DistillationLoss, dist_divergence, kd_divergence, kd_loss


def _softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_kd_matches_hand_computation_with_t_squared():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    labels = [1, 2]
    t, w = 3.0, 0.7
    kl = 0.0
    for s_row, t_row in zip(student, teacher):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    kl /= len(student)
    ce = -sum(math.log(_softmax(row, 1.0)[y]) for row, y in zip(student, labels)) / len(student)
    expected = (1 - w) * ce + w * t * t * kl
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature=t, weight=w)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(kd_divergence(torch.tensor(student), torch.tensor(teacher), t)) == pytest.approx(t * t * kl, rel=1e-6)


def test_kd_is_zero_when_student_matches_teacher_and_weight_zero_is_ce():
    logits = torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    assert float(kd_divergence(logits, logits.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(DistillationLoss("kd", 4.0, 0.0)(logits, torch.randn(8, 10), labels)) == pytest.approx(float(ce))


def test_dist_is_invariant_to_shift_and_zero_at_match():
    s = torch.randn(16, 10)
    assert float(dist_divergence(s, s.clone(), 1.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(dist_divergence(s, torch.randn(16, 10), 1.0)) > 0.1


def test_distillation_gradient_pulls_student_toward_teacher():
    teacher = torch.tensor([[4.0, 0.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    DistillationLoss("kd", 2.0, 1.0)(student, teacher, torch.tensor([2])).backward()
    assert student.grad[0, 0] < 0  # descent raises the teacher's top class


def test_unknown_loss_refused():
    with pytest.raises(ValueError, match="unknown distillation loss"):
        DistillationLoss("mse")
