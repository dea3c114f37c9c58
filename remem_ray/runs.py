"""One run in-process: where its teacher and student live under the storage root."""

from __future__ import annotations

from typing import Any

from remem_ray.checkpoint_files import checkpoint_name, is_complete
from remem_ray.config import RunSpec
from remem_ray.console import say
from remem_ray.contract import LoopConfig
from remem_ray.errors import ResourceError
from remem_ray.inputs import with_input_identities
from remem_ray.spec_checks import check_spec
from remem_ray.storage import Storage


def run_folder(spec: RunSpec) -> Storage:
    return Storage.from_config(spec.storage).child("runs", spec.name)


def teacher_location(spec: RunSpec) -> str:
    """The teacher checkpoint a student distils from: explicit, or this run's chosen epoch."""
    if spec.student.teacher_checkpoint:  # whole before the run writes anything (its scalars)
        from remem_ray.checkpoint_files import split_location

        parent, name = split_location(spec.student.teacher_checkpoint, spec.storage.endpoint, spec.storage.region)
        if not is_complete(parent, name):
            raise ResourceError(f"student.teacher_checkpoint (--teacher): no complete checkpoint at {parent.uri(name)}")
        return spec.student.teacher_checkpoint
    epoch = spec.student.teacher_epoch or spec.teacher.saved_epochs[-1]
    folder = run_folder(spec).child("teacher")
    if not is_complete(folder, checkpoint_name(epoch)):
        raise ResourceError(
            f"student.teacher_epoch: no teacher checkpoint at {folder.uri(checkpoint_name(epoch))}; "
            f"run `remem teacher` first or set student.teacher_checkpoint"
        )
    return folder.uri(checkpoint_name(epoch))


def _identified(spec: RunSpec, role: str) -> RunSpec:
    """With what its inputs hold now: a node's s3:// copy is fetched again once they change."""
    identified, unread = with_input_identities(spec, roles=(role,))
    for line in unread:
        say(line)
    return identified


def run_teacher(spec: RunSpec, quiet: bool = False, checked: bool = False) -> dict[str, Any]:
    """checked: the caller ran check_spec on it already (the CLI, before its storage preflight)."""
    from remem_ray.train.teacher import fine_tune_teacher

    if not checked:
        check_spec(spec, weights_of=("teacher",))
    spec = _identified(spec, "teacher")
    folder = run_folder(spec)
    return fine_tune_teacher(
        LoopConfig(spec, folder.uri("teacher"), quiet=quiet, tensorboard=folder.uri("tensorboard", "teacher"))
    )


def run_student(spec: RunSpec, quiet: bool = False, checked: bool = False) -> dict[str, Any]:
    """checked: as run_teacher's."""
    from remem_ray.train.student import distill_student

    if not checked:
        check_spec(spec, weights_of=("student",))
    spec = _identified(spec, "student")
    folder = run_folder(spec)
    config = LoopConfig(
        spec,
        folder.uri("student"),
        teacher_checkpoint=teacher_location(spec),
        quiet=quiet,
        tensorboard=folder.uri("tensorboard", "student"),
    )
    return distill_student(config)
