"""remem-ray: the ReMem method (SAM + MLP-reweighted ViT teachers, distilled into small students)
as a sweep service on Ray.

What scripts use, imported lazily so that `import remem_ray` (and the CLI) stays light:

    from remem_ray import SAM, reweight_mlp, create_model, RunSpec, SweepSpec
    from remem_ray import load_run_spec, load_sweep_spec, check_spec
    from remem_ray import run_teacher, run_student, run_sweep
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("remem-ray")
except PackageNotFoundError:  # a source checkout on PYTHONPATH (e.g. the GPU machine), not installed
    __version__ = "0+unknown"

_PUBLIC = {
    "SAM": "remem_ray.sam",
    "reweight_mlp": "remem_ray.models",
    "create_model": "remem_ray.models",
    "RunSpec": "remem_ray.config",
    "SweepSpec": "remem_ray.config",
    "load_run_spec": "remem_ray.config",
    "load_sweep_spec": "remem_ray.config",
    "check_spec": "remem_ray.spec_checks",
    "run_teacher": "remem_ray.runs",
    "run_student": "remem_ray.runs",
    "run_sweep": "remem_ray.sweep.driver",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'remem_ray' has no attribute {name!r}")
