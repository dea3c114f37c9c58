"""Expertness of a ViT's MLP blocks: how much each hidden neuron fires for one class only.

Per MLP block, the neuron-by-class matrix of mean hidden activations is
co-clustered (spectral co-clustering, Dhillon 2001) into as many clusters as classes; the
score is the share of activation mass inside the co-clusters. Neurons that each fire for one
class score near 1; dense, class-agnostic neurons near 1 / n_classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def expertness_score(neuron_by_class: np.ndarray, seed: int = 0) -> float:
    """Share of (non-negative) activation mass inside n_classes spectral co-clusters."""
    from sklearn.cluster import SpectralCoclustering

    m = np.asarray(neuron_by_class, dtype=np.float64)
    m = m - min(0.0, float(m.min()))  # activations such as GELU dip below 0
    m = m[m.sum(axis=1) > 0]
    n_classes = m.shape[1]
    if m.shape[0] < n_classes or m.sum() == 0:
        return float("nan")
    model = SpectralCoclustering(n_clusters=n_classes, random_state=seed).fit(m + 1e-12)
    inside = model.row_labels_[:, None] == model.column_labels_[None, :]
    return float(m[inside].sum() / m.sum())


@torch.no_grad()
def neuron_by_class(
    model: nn.Module, normalizer: nn.Module, loader, num_classes: int, device: torch.device
) -> list[np.ndarray]:
    """Per timm ViT block, the (hidden neurons x classes) mean activation of its MLP."""
    from remem_ray.models import vit_block_modules
    from remem_ray.timm_adapter import mlp_output_layer

    blocks = [block for _, block in vit_block_modules(model)]
    if not blocks:
        raise TypeError("expertness needs a ViT built from timm's Block")
    sums: dict[int, torch.Tensor] = {}
    counts = torch.zeros(num_classes, dtype=torch.float64)
    current: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(_module, inputs):
            current[index] = inputs[0].detach().float().mean(dim=1)  # mean over tokens: (batch, hidden)

        return record

    handles = [mlp_output_layer(b).register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for images, labels in loader:
            model(normalizer(images.to(device)))
            onehot = torch.nn.functional.one_hot(labels, num_classes).double()
            counts += onehot.sum(0)
            if any(current[i].shape[0] != len(labels) for i in range(len(blocks))):
                # mobilevit's blocks see each image's patches folded into the batch: no image's tokens
                raise TypeError("expertness needs a ViT whose blocks see each image's tokens together")
            for i in range(len(blocks)):
                contrib = current[i].double().cpu().T @ onehot  # (hidden, classes)
                sums[i] = sums[i] + contrib if i in sums else contrib
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [(sums[i] / counts.clamp(min=1)).numpy() for i in range(len(blocks))]


def expertness_profile(matrices: list[np.ndarray], seed: int = 0) -> list[float]:
    return [expertness_score(m, seed) for m in matrices]
