"""A sweep's teacher registry on a local root, and stored teachers written without training."""

from __future__ import annotations

import torch

from remem_ray.checkpoints import write_checkpoint
from remem_ray.config import SweepSpec
from remem_ray.storage import Storage
from remem_ray.sweep.layout import SweepLayout
from remem_ray.sweep.registry import TeacherRegistry

EPOCHS = [2, 4]


def registry_setup(tmp_path, name="s"):
    spec = SweepSpec.model_validate(
        {"name": name, "storage": {"root": str(tmp_path)}, "teacher": {"epochs": 4, "checkpoint_epochs": EPOCHS}}
    )
    run_spec = spec.run_spec({"rho": 0.1, "alpha": 0.9, "teacher_epoch": 4})
    layout = SweepLayout(Storage(str(tmp_path)), name)
    registry = TeacherRegistry(layout.teachers)
    return spec, run_spec, layout, registry, run_spec.teacher_key(spec.sweep.resources.teacher.num_workers)


def write_teacher(folder: Storage, weight: float) -> None:
    model = torch.nn.Linear(4, 2)
    torch.nn.init.constant_(model.weight, weight)
    for epoch in EPOCHS:
        write_checkpoint(folder, f"epoch_{epoch}", model, {"epoch": epoch})
