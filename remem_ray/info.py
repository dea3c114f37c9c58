"""`remem info`: the MI family and per-block expertness of one saved checkpoint.

The caller picks the device: this command joins the insight maths to checkpoints and data,
and choosing hardware is the command line's business, not the diagnostics'.
"""

from __future__ import annotations

from typing import Any

import torch

from remem_ray.checkpoints import load_model, split_location
from remem_ray.config import RunSpec
from remem_ray.data import EvalResize, build_datasets, num_items
from remem_ray.errors import UserInputError
from remem_ray.insight.expertness import expertness_profile, neuron_by_class
from remem_ray.insight.information import collect_logits, teacher_information
from remem_ray.models import data_config_of, normalizer_for


def checkpoint_info(
    location: str, spec: RunSpec, device: torch.device | str, samples: int = 1000, endpoint: str | None = None
) -> dict[str, Any]:
    """MI family and per-block expertness of the checkpoint at `location` on the spec's val data."""
    device = torch.device(device)
    storage, name = split_location(location, endpoint or spec.storage.endpoint, spec.storage.region)
    model, meta = load_model(storage, name)
    # a ViT would fail at its first forward; a CNN would be measured at a size it never trained at
    if meta["img_size"] != spec.data.img_size:
        trained, given = meta["img_size"], spec.data.img_size
        raise UserInputError(f"data.img_size: the checkpoint was trained at {trained} px, the data spec says {given}")
    model = model.to(device)
    normalizer = normalizer_for(model).to(device)
    splits = build_datasets(
        spec.data,
        spec.seed,
        EvalResize.from_timm(spec.data.img_size, data_config_of(model)),
        endpoint=endpoint or spec.storage.endpoint,
        region=spec.storage.region,
    )
    if meta["num_classes"] != splits.num_classes:
        raise UserInputError(
            f"data: the checkpoint has {meta['num_classes']} classes, {spec.data.name} has {splits.num_classes}"
        )
    logits, labels = collect_logits(model, normalizer, splits.val, device, samples, spec.seed)
    out = {
        "checkpoint": storage.uri(name),
        "model": meta["model"],
        "epoch": meta.get("epoch"),
        "reweighting": meta.get("reweighting"),
        "samples": int(labels.numel()),
        "val_acc_on_subset": float((logits.argmax(-1) == labels).double().mean()),
        "kd_temperature": spec.student.kd.temperature,
        "mutual_information": teacher_information(logits, labels, spec.student.kd.temperature),
    }
    try:
        g = torch.Generator().manual_seed(spec.seed)
        subset = torch.randperm(num_items(splits.val), generator=g)[:samples].tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(splits.val, subset), batch_size=256)
        matrices = neuron_by_class(model, normalizer, loader, splits.num_classes, device)
        out["expertness_by_block"] = expertness_profile(matrices, spec.seed)
    except TypeError:
        out["expertness_by_block"] = None  # not a ViT: no MLP blocks to score
    return out
