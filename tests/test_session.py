"""Where a loop's lines go (remem_ray.train.session): which epochs reach a sweep's console."""

from __future__ import annotations

from remem_ray.train.session import EpochLines, StoredStateSession
from remem_ray.train.student import StudentTask
from remem_ray.train.teacher import TeacherTask


def test_a_run_shows_its_first_last_and_named_epochs_and_one_a_minute_between():
    now = [0.0]
    lines = EpochLines(first=1, last=20, named=[10, 15, 20], every_s=60.0, clock=lambda: now[0])
    shown = []
    for epoch in range(1, 21):
        now[0] += 2.0  # fast epochs: only the ones that matter
        if lines.show(epoch):
            shown.append(epoch)
    assert shown == [1, 10, 15, 20]

    now[0] = 0.0
    lines = EpochLines(first=1, last=20, named=[20], every_s=60.0, clock=lambda: now[0])
    shown = []
    for epoch in range(1, 21):
        now[0] += 25.0  # slow ones: a line at least every minute, counted from the last shown
        if lines.show(epoch):
            shown.append(epoch)
    assert shown == [1, 4, 7, 10, 13, 16, 19, 20]


def test_a_resumed_run_shows_the_epoch_it_resumes_at():
    lines = EpochLines(first=7, last=20, named=[10], every_s=60.0, clock=lambda: 0.0)
    assert [e for e in range(7, 21) if lines.show(e)] == [7, 10, 20]


def test_a_teacher_names_its_saved_epochs_and_a_student_every_epoch():
    teacher = TeacherTask.__new__(TeacherTask)
    teacher.cfg = type("Cfg", (), {"saved_epochs": [10, 15, 20]})()
    assert list(teacher.console_epochs()) == [10, 15, 20]
    student = StudentTask.__new__(StudentTask)
    student.epochs = 8  # ASHA judges every student epoch: all of them show
    assert list(student.console_epochs()) == list(range(1, 9))


def test_an_epoch_not_shown_goes_to_the_log(tmp_path):
    from remem_ray.storage import Storage

    class Base:
        world_rank, local_rank, world_size = 0, 0, 1

        def __init__(self):
            self.console, self.log_only = [], []

        def log(self, message):
            self.console.append(message)

        def detail(self, message):
            self.log_only.append(message)

    base = Base()
    session = StoredStateSession(base, Storage(str(tmp_path)))
    session.report({"epoch": 1, "epochs": 3, "val_acc": 0.5})
    session.report({"epoch": 2, "epochs": 3, "val_acc": 0.6}, show=False)
    assert [m.split()[1] for m in base.console] == ["1/3"] and [m.split()[1] for m in base.log_only] == ["2/3"]
    assert len(session.history) == 2  # reported all the same


def test_a_holder_that_ends_before_its_own_first_state_leaves_the_next_one_resuming_from_the_earlier(tmp_path):
    """Holder 5 trains to epoch 6 (checkpoints in gen-5); holder 6 adopts its state and ends
    before copying the checkpoints or writing a state of its own (preempted at start). Before,
    the adopted copy was gen-6's state.pt: holder 7 resumed from gen-6, found no checkpoints
    there and trained the teacher again from epoch 1, gen-5's six epochs ignored."""
    from remem_ray.storage import Storage
    from remem_ray.sweep.registry import TeacherRegistry
    from remem_ray.teacher_layout import RESUME_DIR

    class Base:
        world_rank, local_rank, world_size = 0, 0, 1

        def log(self, message):
            pass

        detail = log

    registry = TeacherRegistry(Storage(str(tmp_path)))
    key = "k" * 16

    def holder(generation: int) -> StoredStateSession:
        session = StoredStateSession(Base(), registry.output(key, generation).child(RESUME_DIR))
        earlier = registry.resume_source(key, generation)
        if earlier is not None:
            session.adopt(earlier.child(RESUME_DIR))
        return session

    first = holder(5)
    assert first.restore_state() is None
    first.report({"epoch": 6, "epochs": 10}, state={"epoch": 6})

    second = holder(6)
    assert second.restore_state() == {"epoch": 6}  # it continues from holder 5's state ...
    assert registry.resume_source(key, 7).uri() == registry.output(key, 5).uri()  # ... and ends here

    third = holder(7)
    assert third.restore_state() == {"epoch": 6}
    adopted = tmp_path / key / "gen-00000007" / RESUME_DIR / "adopted.pt"
    assert adopted.is_file()
    third.report({"epoch": 7, "epochs": 10}, state={"epoch": 7})  # its own state, beside its checkpoints
    assert third.restore_state() == {"epoch": 7}  # a Train retry of its run reads its own
    assert not adopted.exists()  # the copy goes once its own state is written (a ViT-B's: 0.7 GB)
    assert registry.resume_source(key, 8).uri() == registry.output(key, 7).uri()
