"""A trial's two trainings in one run: the teacher phase, then the student phase.

Each Ray Train run pays for fresh processes before its first epoch (benchmarks/RESULTS.md has
the figures), so a trial that trains its teacher distils from it in the same worker group and
pays once.

- The teacher phase keeps its resume state beside the checkpoints it writes
  (`StoredStateSession`), not in the run: whoever trains that teacher next (another trial, after
  this one died) resumes it. It reports nothing to Train, so the run's results, and the
  scheduler reading them, are student epochs only.
- The config's `on_teacher_done` runs on rank 0 between the phases (a sweep marks the teacher
  finished there); every rank waits until rank 0 has written the teacher's last checkpoint and
  run it. A hook with `divergence()` and `diverged(message)` (a sweep's) is asked first whether
  the teacher diverged before, and told when it diverges.
- The student phase is the plain distillation with the run's own checkpoints: a restarted run
  that has a checkpoint is past its teacher phase and resumes the student (so a sweep gives a
  student run that exists already a run of its own). One restarted before its first student
  checkpoint goes through the teacher phase again, which resumes at its end: the finished
  teacher's result is reported to the console again and the hook runs again.

Like the loops it calls, this runs in-process as well as under Ray Train.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from remem_ray.contract import LoopConfig, PhasesConfig
from remem_ray.train.common import pick_device, rank0_decides
from remem_ray.train.loop import base_session, divergence_kept
from remem_ray.train.student import distill_student
from remem_ray.train.teacher import fine_tune_teacher


def teach_then_distil(config: PhasesConfig) -> dict[str, Any]:
    """Run the teacher phase, then the student phase, in-process or on each Ray Train worker.

    Returns {"teacher": its result (None for a run restarted past it), "student": the student's
    result (None if the teacher phase stopped, its lease lost, or no student was asked for)}.
    """
    student_cfg = config.student
    student_session = base_session(student_cfg, "student") if student_cfg is not None else None
    if student_session is not None and student_session.restore_state() is not None:
        teacher, switched_at = None, time.time()  # a restarted run, past its teacher phase
    else:
        teacher = _teacher_phase(config.teacher, config.teacher_done_hook)
        if "stopped" in teacher or student_cfg is None:
            return {"teacher": teacher, "student": None}
        _release_memory()
        switched_at = time.time()
    assert student_cfg is not None and student_session is not None
    # the student's start counts from the phase switch: this run's processes were already up
    extra = {**student_cfg.report_extra, "fit_called_at": switched_at, "student_in_teacher_run": 1}
    student = distill_student(student_cfg.but(session=student_session, report_extra=extra))
    return {"teacher": teacher, "student": student}


def _teacher_phase(cfg: LoopConfig, teacher_done_hook: Callable[[], Callable[[], object] | None]) -> dict[str, Any]:
    base = base_session(cfg, "teacher")
    device = pick_device(cfg.spec.device, base.local_rank)
    hook = teacher_done_hook() if base.world_rank == 0 else None  # unpickled where it runs
    with divergence_kept(hook, device):
        result = fine_tune_teacher(cfg.but(session=base))  # its `state` folder keeps the resume state
    if "stopped" in result:  # every rank stops at the same epoch (rank 0 decides)
        return result
    published = hook() is not False if hook is not None else True
    # rank 0 wrote the last checkpoint and ran the hook; the others load that checkpoint next
    if not rank0_decides(published, device):
        # refused: another holder took the lease over; no student on a set nobody will use
        return {**result, "stopped": "its set was not published: the lease passed to another holder"}
    return result


def _release_memory() -> None:
    """The teacher's model and optimizer state go before the student's arrive (GPU memory)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
