"""Checks of a valid spec against the outside world, before any work starts.

Kept out of the pydantic validators so that reading a spec has no side effects: these build
the models on the meta device (imports torch and timm) and look for the weights and data, local or
s3:// (only where the runs read them: a sweep on a cluster reads them on its nodes).
The entry points (CLI verbs, `run_teacher`, `run_student`, `run_sweep`) call `check_spec`
first; trials and `remem sweep status` only read specs and skip it.
"""

from __future__ import annotations

from pathlib import Path

from remem_ray.config import AUTO, RunSpec, SweepSpec, weights_kind
from remem_ray.errors import ResourceError, SpecError

ROLES = ("teacher", "student")


def check_spec(
    spec: RunSpec, sweep_settings: bool = True, inputs_here: bool = True, weights_of: tuple[str, ...] = ROLES
) -> None:
    """Raise SpecError/ResourceError naming the field: unknown dataset, unbuildable model, missing
    inputs (weights files, data folders, their s3:// objects); for a sweep, settings it cannot run
    (kept out of the validators: a stored sweep spec must still read, for status and reports).
    inputs_here: whether the runs read their inputs from this machine, with its credentials (a
    local Ray), not from a cluster's nodes (preflight_from_cluster looks there). weights_of: the
    roles whose weights the runs load (`remem distill` builds its teacher from a checkpoint)."""
    if isinstance(spec, SweepSpec) and sweep_settings:
        _check_sweep(spec)
    from remem_ray.data.datasets import classes_without_reading
    from remem_ray.models import check_model_spec

    check_data(spec, inputs_here)
    size, classes = spec.data.img_size, classes_without_reading(spec.data)
    for role, model, reweights in (("teacher", spec.teacher, _reweighting(spec)), ("student", spec.student, None)):
        check_model_spec(role, model.model, model.model_kwargs, classes, size, reweighted_by=reweights)
        if role in weights_of:
            _check_timm_weights(role, model.model, model.weights)
            if inputs_here:
                _check_local_weights(role, model.weights)
        _check_optimizer(role, model.optimizer.name)
    if inputs_here:
        check_s3_inputs(s3_inputs(spec, weights_of), spec.storage.endpoint, spec.storage.region)


def check_data(spec: RunSpec, inputs_here: bool = True) -> None:
    """The data section alone (`remem info --data` reads nothing else of its spec)."""
    from remem_ray.data import DATASETS  # an open registry (register_dataset): known only once imported
    from remem_ray.data.datasets import missing_local_root

    if spec.data.name not in DATASETS:
        raise SpecError(f"data.name: unknown dataset {spec.data.name!r}; known: {', '.join(sorted(DATASETS))}")
    missing = missing_local_root(spec.data) if inputs_here else None
    if missing is not None:
        hint = (
            ""
            if spec.data.name == "imagefolder"
            else f" (set data.root to the folder holding {spec.data.name}, or data.download: true)"
        )
        raise ResourceError(f"data.root: folder not found: {missing}{hint}")
    _check_split_sizes(spec)


def _check_split_sizes(spec: RunSpec) -> None:
    """What the data's size already says before any run builds it: synthetic images too few per
    class to put one of each class in every split (each run failed as it built its data, naming
    a fraction), a training cap below the class count."""
    import numpy as np

    from remem_ray.data.datasets import classes_without_reading, refuse_cap_below_classes, train_val_test

    data = spec.data
    if data.name == "synthetic":
        labels = np.repeat(np.arange(data.num_classes), data.samples_per_class)
        try:
            train_val_test(labels, data, spec.seed, has_test=False)
        except SpecError:
            raise SpecError(
                f"data.samples_per_class: {data.samples_per_class} images of each of {data.num_classes} classes "
                f"cannot put one of each class in train, val and test (val_fraction {data.val_fraction}, "
                f"test_fraction {data.test_fraction})"
            ) from None
    classes = classes_without_reading(data)
    if data.max_train_samples is not None and classes is not None:
        refuse_cap_below_classes(data.max_train_samples, classes)


def _reweighting(spec: RunSpec) -> str | None:
    """The field that asks for MLP reweighting (alpha < 1), if any: a sweep's search of alpha,
    which sets every trial's, else the teacher's own alpha."""
    if isinstance(spec, SweepSpec) and "alpha" in spec.sweep.search.ranges():
        return "sweep.search.alpha" if spec.searches_reweighting() else None
    return "teacher.alpha" if spec.teacher.alpha < 1.0 else None


def _check_optimizer(role: str, name: str) -> None:
    from timm.optim import get_optimizer_info, list_optimizers

    if name not in list_optimizers():
        raise SpecError(f"{role}.optimizer.name: unknown optimizer {name!r}; see timm.optim.list_optimizers()")
    if get_optimizer_info(name).second_order:
        raise SpecError(f"{role}.optimizer.name: {name} needs second-order gradients; pick a first-order optimizer")


def _check_timm_weights(role: str, name: str, weights: str | None) -> None:
    """`weights: timm` on a name timm has no weights for (an architecture without a pretrained tag,
    a mistyped tag) failed every run as it built its model; timm's registry says so offline."""
    if weights != "timm" or name.startswith("hf-hub:"):
        return
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as exc:  # no pretrained cfg for the architecture, or an unknown tag
        reason = str(exc).rstrip(".")
    else:
        if cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file):
            return
        reason = "its pretrained config names no weights"
    base = name.split(".", 1)[0]
    raise SpecError(
        f"{role}.weights: timm has no weights for {name} ({reason}); pick a tag of "
        f"timm.list_pretrained('{base}*'), or give hf-hub:ORG/REPO, a file, or none"
    )


def _check_local_weights(role: str, weights: str | None) -> None:
    """Local files (s3:// ones: check_s3_inputs; hub names are fetched, and checked, where used)."""
    if weights and weights_kind(weights) == "file" and not Path(weights).is_file():
        raise ResourceError(f"{role}.weights: weights file not found: {weights}")


def s3_inputs(spec: RunSpec, weights_of: tuple[str, ...] = ROLES) -> list[tuple[str, str]]:
    """The spec's s3:// inputs, as (field, URI): the roles' weights, an image folder."""
    inputs = [(f"{role}.weights", getattr(spec, role).weights) for role in weights_of]
    if spec.data.name == "imagefolder":
        inputs.append(("data.root", spec.data.root))
    return [(field, uri) for field, uri in inputs if uri and uri.startswith("s3://")]


def check_s3_inputs(inputs: list[tuple[str, str]], endpoint: str | None, region: str | None) -> None:
    """Each input is there, in seconds (storage.preflight_input)."""
    from remem_ray.storage.preflight import preflight_input

    for field, uri in inputs:
        preflight_input(uri, endpoint, region, field)


def _check_sweep(spec: SweepSpec) -> None:
    if spec.student.teacher_checkpoint is not None:
        # every trial distils its own fine-tuned teacher; a fixed one gave every trial the same
        # student key (the first one's student replayed by all) and left the search meaningless
        raise SpecError(
            "student.teacher_checkpoint: a sweep distils each trial's own teacher; "
            "remove it (it is for `remem distill`)"
        )
    if "kd_temperature" in spec.sweep.search.ranges() and spec.student.kd.weight == 0.0:
        # every temperature is one student key (canonical_student): the trials replayed one
        # student and the table, best-so-far curve and importances counted it per temperature
        raise SpecError(
            "sweep.search.kd_temperature: student.kd.weight is 0 (no distillation term), so every temperature "
            "distils the same student; give kd.weight above 0 or stop searching kd_temperature"
        )
    res = spec.sweep.resources
    fewest = _fewest_gpus_per_trial(res)
    if res.gpu_budget is not None and res.gpu_budget < fewest:
        raise SpecError(
            f"sweep.resources.gpu_budget: {res.gpu_budget} GPUs cannot hold one trial, which takes "
            f"{fewest:g} (workers x gpus_per_worker of its larger phase)"
        )


def _fewest_gpus_per_trial(res) -> float:
    """GPUs a trial holds at its peak, at least: an `auto` role takes a share of one GPU (single
    worker) or a whole GPU per worker (several), sweep/gpu_shares.py."""
    return max(
        (r.num_workers if r.num_workers > 1 else 0.0) if r.gpus_per_worker == AUTO else r.num_workers * r.gpus()
        for r in (res.teacher, res.student)
    )
