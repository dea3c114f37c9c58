"""Training loops. Each is a plain function of one config dict: it runs in-process and also
serves as a Ray Train `train_loop_per_worker`. Nothing here knows about Tune."""

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
