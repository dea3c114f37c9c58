"""`remem info`: the MI family and per-block expertness of one saved checkpoint."""

from __future__ import annotations

import torch

from remem_ray.insight.expertness import expertness_profile, neuron_by_class
from remem_ray.insight.information import collect_logits, teacher_information


def checkpoint_report(location: str, spec, samples: int = 1000, endpoint: str | None = None) -> dict:
    """`remem info`: MI family and per-layer expertness of a saved checkpoint on the spec's val data."""
    from remem_ray.checkpoints import load_model, split_location
    from remem_ray.data import EvalTransformConfig, build_datasets, num_items
    from remem_ray.models import data_config_of, normalizer_for
    from remem_ray.train.common import pick_device

    storage, name = split_location(location, endpoint or spec.storage.endpoint)
    model, meta = load_model(storage, name)
    device = pick_device(spec.device)
    model = model.to(device)
    normalizer = normalizer_for(model).to(device)
    splits = build_datasets(
        spec.data,
        spec.seed,
        EvalTransformConfig.from_timm(data_config_of(model)),
        endpoint=endpoint or spec.storage.endpoint,
    )
    if meta["num_classes"] != splits.num_classes:
        from remem_ray.errors import UserInputError

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
