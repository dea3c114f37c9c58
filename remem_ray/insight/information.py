"""Mutual information of a teacher's outputs with its inputs and labels.

A network's output F(X) is a deterministic function of X, so I(X; F) is
infinite or undefined for continuous data; the information-plane method (Saxe et al. 2018)
instead measures T = F(X) + N(0, sigma^2 I). Then H(T | X) is the entropy of one Gaussian and
T is a mixture of N Gaussians centred on the outputs, whose entropy has pairwise-distance
bounds (Kolchinsky and Tracey 2017). With D_ij = ||f_i - f_j||^2:

    I(X; T) <= -1/N sum_i log 1/N sum_j exp(-D_ij / (2 sigma^2))    (KL: upper bound)
    I(X; T) >= -1/N sum_i log 1/N sum_j exp(-D_ij / (8 sigma^2))    (Bhattacharyya: lower bound)

Both lie in [0, log N]: constant outputs give 0, outputs far apart relative to sigma give
log N, a noisier channel gives less. I(T; Y) = H(T) - H(T | Y) uses the same pairwise terms,
over all samples and within each class (Saxe et al.); with each kernel it is an estimate,
not a bound. Everything is in nats (divide by log 2 for bits).

The estimate depends on the output scale: with a fixed sigma it tracks the norm of the
teacher's logits. So report it on the distillation targets (softmax at the KD temperature) and
on logits, with sigma fixed and relative to the outputs' own median pairwise distance. The
headline, which compares teachers, is the fixed one on the targets: softmax outputs live in the
simplex, whose scale is the students' too. The relative one is blind to how far apart the
outputs are: near-uniform targets that barely vary (an untrained or collapsed teacher) read
close to log N there, the most information a teacher could carry, and about 0 here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

_KERNEL_DIVISOR = {"kl": 2.0, "bhattacharyya": 8.0}


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # exact, not cdist's matrix-product form (its default above 25 rows): that one gives a point a
    # distance to itself of about 1e-8, which for outputs that collapsed is as large as any other,
    # and the relative estimate then read 50 nats where log N is the ceiling (a review's finding)
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _pairwise_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _distances(a, b).pow_(2)


def _mean_neg_log_mixture(outputs: torch.Tensor, sigma: float, kernel: str, batch: int = 1024) -> float:
    """-1/N sum_i log 1/N sum_j exp(-D_ij / (c sigma^2)), in row batches (N can be thousands)."""
    n = outputs.shape[0]
    scale = _KERNEL_DIVISOR[kernel] * sigma * sigma
    total = 0.0
    for start in range(0, n, batch):
        d = _pairwise_sq(outputs[start : start + batch], outputs)
        total += float((torch.logsumexp(-d / scale, dim=1) - math.log(n)).sum())
    return max(0.0, -total / n)


def median_pairwise_distance(outputs: torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    if outputs.shape[0] > max_points:
        outputs = outputs[torch.randperm(outputs.shape[0], generator=g)[:max_points]]
    d = _distances(outputs, outputs)
    iu = torch.triu_indices(d.shape[0], d.shape[0], offset=1)
    return float(d[iu[0], iu[1]].median())


@dataclass(frozen=True)
class MutualInformation:
    """I(X; T) bounds and I(T; Y) estimates for T = outputs + N(0, sigma^2 I), in nats."""

    i_xt_lower: float
    i_xt_upper: float
    i_ty_kl: float
    i_ty_bhattacharyya: float
    sigma: float
    n: int
    unit: str = "nats"

    def to_dict(self) -> dict:
        return asdict(self)


def mutual_information(outputs: torch.Tensor, labels: torch.Tensor | None, sigma: float) -> MutualInformation:
    """Pairwise-distance (KDE) estimates for T = outputs + Gaussian noise of scale sigma."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    outputs = outputs.detach().double().reshape(outputs.shape[0], -1)
    ixt = {k: _mean_neg_log_mixture(outputs, sigma, k) for k in _KERNEL_DIVISOR}
    ity = {}
    for kernel, h_t in ixt.items():
        if labels is None:
            ity[kernel] = float("nan")
            continue
        h_t_given_y = 0.0
        for cls in torch.unique(labels):
            members = outputs[labels == cls]
            h_t_given_y += members.shape[0] / outputs.shape[0] * _mean_neg_log_mixture(members, sigma, kernel)
        ity[kernel] = max(0.0, h_t - h_t_given_y)
    return MutualInformation(ixt["bhattacharyya"], ixt["kl"], ity["kl"], ity["bhattacharyya"], sigma, outputs.shape[0])


# The noise scale of T = F(X) + N(0, sigma^2 I): fixed, and relative to the outputs' median pairwise distance.
FIXED_SIGMA = 0.1
RELATIVE_SIGMA = 0.1


def teacher_information(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, dict]:
    """MI on the distillation targets (softmax at T) and on logits, sigma fixed and relative.

    Keys: "<targets|logits>/<fixed|relative>", each a MutualInformation as a dict.
    """
    views = {"targets": torch.softmax(logits.double() / temperature, dim=-1), "logits": logits.double()}
    out = {}
    for name, values in views.items():
        out[f"{name}/fixed"] = mutual_information(values, labels, FIXED_SIGMA).to_dict()
        scale = median_pairwise_distance(values) or 1e-12
        out[f"{name}/relative"] = mutual_information(values, labels, RELATIVE_SIGMA * scale).to_dict()
    return out


LOGITS_BATCH = 256  # collect_logits' batch (remem_ray.train.memory_probe sizes GPU memory with it)


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    normalizer: nn.Module,
    dataset,
    device: torch.device,
    max_samples: int = 512,
    seed: int = 0,
    batch_size: int = LOGITS_BATCH,
):
    """(logits, labels) of a model over a fixed, seeded subset of a dataset, in eval mode (full
    precision: the MI figures are compared across runs and devices)."""
    g = torch.Generator().manual_seed(seed)
    n = len(dataset)
    indices = torch.randperm(n, generator=g)[:max_samples].tolist() if n > max_samples else list(range(n))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, targets in loader:
        logits.append(model(normalizer(images.to(device))).float().cpu())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


# Teachers' MI is measured on softmax targets at this one temperature, whatever KD temperature the
# trial that trained them used: a teacher is shared by trials that may search the temperature, and
# the information plane compares teachers, so they must all be measured alike.
MI_REFERENCE_TEMPERATURE = 4.0


def checkpoint_information(
    model: nn.Module,
    normalizer: nn.Module,
    dataset,
    device: torch.device,
    temperature: float = MI_REFERENCE_TEMPERATURE,
    max_samples: int = 512,
    seed: int = 0,
) -> dict[str, dict]:
    """The teacher MI family on a fixed subset (cheap enough to run at every saved checkpoint)."""
    logits, labels = collect_logits(model, normalizer, dataset, device, max_samples, seed)
    return teacher_information(logits, labels, temperature)
