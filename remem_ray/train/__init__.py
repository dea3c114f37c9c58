"""Training loops. Each is a function of one frozen config (contract.LoopConfig, PhasesConfig): it
runs in-process, and on each Ray Train worker through the shims in sweep/trial.py, which hand it
the config Train passed as plain data. Nothing here knows about Tune."""

from remem_ray.train.phases import teach_then_distil
from remem_ray.train.session import ConsoleSession, RayTrainSession, StoredStateSession, current_session
from remem_ray.train.student import distill_student
from remem_ray.train.teacher import fine_tune_teacher

__all__ = [
    "ConsoleSession",
    "RayTrainSession",
    "StoredStateSession",
    "current_session",
    "distill_student",
    "fine_tune_teacher",
    "teach_then_distil",
]
