"""remem_ray is a real package: a file to ship, a version, a public API that imports lazily."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import remem_ray


def test_package_has_a_file_and_a_version():
    """`remem sweep submit --ship-package` ships Path(remem_ray.__file__).parent."""
    assert remem_ray.__file__ is not None
    assert (Path(remem_ray.__file__).parent / "cli.py").is_file()
    assert remem_ray.__version__ == version("remem-ray")


def test_public_api_resolves_and_importing_the_package_stays_light():
    from remem_ray.sam import SAM

    assert remem_ray.SAM is SAM
    for name in remem_ray.__all__:
        assert getattr(remem_ray, name) is not None
    code = "import sys, remem_ray; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]


TRIAL_DRIVER = """
import sys
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from remem_ray.config import SweepSpec
from remem_ray.sweep.trial import TeacherFinished, TrialRuns

import ray.train
import ray.tune.integration.ray_train as tune_train

# neither the Train run nor Tune is under test here: what the driver imports on the way is
DataParallelTrainer.fit = lambda self: None
tune_train.TuneReportCallback = ray.train.UserCallback
teacher = {"epochs": 2, "checkpoint_epochs": [2]}
workers = {"num_workers": int(sys.argv[2])}
sweep = {"resources": {"teacher": workers, "student": workers}}
spec = SweepSpec.model_validate({"name": "s", "storage": {"root": sys.argv[1]}, "teacher": teacher, "sweep": sweep})
run_spec = spec.run_spec({"rho": 0.1, "alpha": 0.9, "teacher_epoch": 2})
runs = TrialRuns(spec, run_spec, "t1", 0.0)
lease = runs.registry.lease(runs.key, "s/t1", 60)
assert lease.try_acquire()
handle = lease.handle()
assert runs.registry.claim(runs.key, handle.generation)
finished = TeacherFinished(runs.registry, runs.layout, runs.key, "t1", handle)
runs.fit_teacher(spec, run_spec, runs.registry, runs.key, handle, finished)
finished()  # what the (stubbed) teacher run's rank 0 does when its teacher phase ends
runs.fit_student(trained=True)
print(*(m in sys.modules for m in ("torch", "timm", "torchvision")))
"""


# What a trial's driver imports, by workers per Train run: one worker (the default) needs no
# process group, so no torch; several import torch through ray.train.torch (its TorchConfig
# module imports torch at the top), never timm or torchvision. The README says so.
EXPECTED_IMPORTS = {1: ["False", "False", "False"], 2: ["True", "False", "False"]}


@pytest.mark.parametrize("num_workers", sorted(EXPECTED_IMPORTS))
def test_a_trial_driver_imports_no_training_code_and_no_torch_for_one_worker(tmp_path, num_workers):
    """A trial's process only leases, waits and starts Train runs: torch, timm and torchvision
    would add seconds to every trial's start and hundreds of MB to each trial's driver."""
    out = subprocess.run(
        [sys.executable, "-c", TRIAL_DRIVER, str(tmp_path / "root"), str(num_workers)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]  # the driver ran through: a crash is no pass
    assert out.stdout.split() == EXPECTED_IMPORTS[num_workers], out.stderr[-3000:]


OURS = ("remem_ray", "__future__", "")  # "": relative imports
ADAPTERS = {"remem_ray/sweep/tune_adapter.py", "remem_ray/sweep/ray_adapter.py", "remem_ray/timm_adapter.py"}


def _library_internals_used(path: Path) -> list[str]:
    """Imports of `_`-prefixed names from other packages, attribute access on them
    (`ray._private...`), and assignments to `__class__`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] not in OURS:
            for alias in node.names:
                if any(part.startswith("_") for part in [*str(node.module).split("."), alias.name]):
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += ["__class__ assignment" for t in targets if isinstance(t, ast.Attribute) and t.attr == "__class__"]
    return found


def test_library_internals_are_touched_only_in_the_adapter_modules(tmp_path):
    root = Path(remem_ray.__file__).parent.parent
    offenders = {
        str(path.relative_to(root)): used
        for path in sorted((root / "remem_ray").rglob("*.py"))
        if str(path.relative_to(root)) not in ADAPTERS and (used := _library_internals_used(path))
    }
    assert offenders == {}
    assert _library_internals_used(root / "remem_ray" / "sweep" / "tune_adapter.py") == []  # `_ot_trials`: an attribute
    sample = tmp_path / "sample.py"  # the scan itself finds what it looks for
    sample.write_text("from timm.models._builder import x\nimport ray._private\nm.__class__ = K\n")
    assert len(_library_internals_used(sample)) == 3
