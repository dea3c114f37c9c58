"""The student registry (remem_ray.sweep.students): a finished student stored once by its run's last
epoch, replayed to whoever asks for the same key, distilled by one trial at a time. The stored
run here is a real in-process distillation; the Train runs of distil_once are fakes, as only our
own logic is under test there (the real thing: tests/test_sweep_integration.py)."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers.leases import leave_lease_held_by_an_ended_process
from helpers.sessions import TINY_TEACHER_SPEC, FileSession

from remem_ray.checkpoint_files import best_checkpoint, best_location, point_best
from remem_ray.checkpoints import write_checkpoint
from remem_ray.config import load_run_spec
from remem_ray.contract import STUDENT_KEY, STUDENT_REPLAYED, TEACHER_KEY, TEACHER_MI, TEACHER_TRAINED, LoopConfig
from remem_ray.errors import ResourceError
from remem_ray.leases import Heartbeat, Lease
from remem_ray.storage import Storage
from remem_ray.sweep import students as students_module
from remem_ray.sweep.registry import Waiter
from remem_ray.sweep.students import (
    ORIGINAL_RUN_ONLY,
    StudentFinished,
    StudentRecord,
    StudentRegistry,
    distil_once,
    replay,
    replay_extra,
)
from remem_ray.teacher_layout import version_file
from remem_ray.train.student import distill_student
from remem_ray.train.teacher import fine_tune_teacher

KEY = "5eed5eed5eed5eed"


class Recorder(FileSession):
    """A student run's session that notes, in order, its reports and the registry's publications."""

    def __init__(self, state_file: Path, events: list[str]) -> None:
        super().__init__(state_file)
        self.events = events

    def report(self, metrics, state=None, show=True) -> None:
        self.events.append(f"report {metrics['epoch']}")
        super().report(metrics, state)


class NotingFinished(StudentFinished):
    def __init__(self, events: list[str], *args) -> None:
        super().__init__(*args)
        self.events = events

    def __call__(self, output, history, log) -> bool:
        self.events.append("stored" if super().__call__(output, history, log) else "not stored")
        return True


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A real distillation (tiny teacher, 2 student epochs) whose last epoch stores it."""
    tmp = tmp_path_factory.mktemp("distilled")
    spec = load_run_spec(None, {**TINY_TEACHER_SPEC, "student.epochs": 2, "student.batch_size": 16})
    fine_tune_teacher(LoopConfig(spec, str(tmp / "teacher"), quiet=True))
    registry = StudentRegistry(Storage(str(tmp / "students")))
    events: list[str] = []
    session = Recorder(tmp / "student.pt", events)
    hook = NotingFinished(events, registry, KEY, 0, "sweep-a/t1")
    config = LoopConfig(
        spec,
        str(tmp / "run"),
        teacher_checkpoint=str(tmp / "teacher" / "epoch_3"),
        session=session,
        report_extra={TEACHER_KEY: "teacherkey", TEACHER_TRAINED: 1, "trial_started_at": 1.0},
        on_finished=hook,
    )
    result = distill_student(config)
    return tmp, registry, session, events, result


def test_the_last_epoch_stores_the_student_before_its_report(distilled):
    """Before: a scheduler stopping the run at its last report may end the run inside it."""
    tmp, registry, session, events, result = distilled
    assert events == ["report 1", "stored", "report 2"]
    record = registry.newest(KEY)
    assert record is not None and record.version == 1 and record.made_by == "sweep-a/t1"
    assert list(record.history) == session.reports  # the curve exactly as reported, every key
    assert record.best_epoch == result["best"]["epoch"] and record.problem() is None
    stored = Path(record.checkpoint_uri())
    own = Path(best_checkpoint(Storage(str(tmp / "run"))))
    assert stored.parent.parent == tmp / "students" / KEY and stored.name == own.name
    assert (stored / "model.pt").read_bytes() == (own / "model.pt").read_bytes()


def test_a_replay_reports_the_stored_curve_and_points_at_the_stored_checkpoint(distilled, tmp_path):
    _, registry, session, _, _ = distilled
    record = registry.newest(KEY)
    reports: list[dict] = []
    folder = Storage(str(tmp_path / "trial"))
    replay(record, folder, reports.append, replay_extra("teacherkey", KEY))
    assert len(reports) == len(session.reports)
    for original, replayed in zip(session.reports, reports):
        kept = {k: v for k, v in original.items() if k not in ORIGINAL_RUN_ONLY}
        assert {k: v for k, v in replayed.items() if k not in (STUDENT_KEY, STUDENT_REPLAYED, TEACHER_TRAINED)} == kept
        assert replayed[STUDENT_REPLAYED] == 1 and replayed[TEACHER_TRAINED] == 0 and replayed[STUDENT_KEY] == KEY
        assert "trial_started_at" not in replayed  # the original trial's process, not this one's
    assert best_checkpoint(folder) == record.checkpoint_uri()
    assert best_location(folder)[0].uri() == record.folder.uri()


def test_a_replay_of_a_student_stored_before_the_mi_headline_changed_reports_todays(distilled, tmp_path):
    """Records stored before 2026-12-07 hold the relative MI estimate as teacher_mi (about 5 nats
    on digits where the fixed-noise one reads about 2): their replays mixed the two headlines in
    one sweep's results. The student's checkpoint holds its teacher's information families."""
    import dataclasses

    _, registry, session, _, _ = distilled
    record = registry.newest(KEY)
    now = session.reports[-1][TEACHER_MI]
    assert 0.0 < now < 4.0
    before = tuple({**reported, TEACHER_MI: 4.9} for reported in record.history)
    reports: list[dict] = []
    replay(dataclasses.replace(record, history=before), Storage(str(tmp_path / "trial")), reports.append, {})
    assert [r[TEACHER_MI] for r in reports] == [now] * len(before)
    # where its checkpoint's meta does not read, the stored curve is reported as it is
    reports.clear()
    unread = dataclasses.replace(_record(tmp_path, best_epoch=1, epochs=1), history=before[:1])
    replay(unread, Storage(str(tmp_path / "other")), reports.append, {})
    assert reports[0][TEACHER_MI] == 4.9


class Stop(Exception):
    pass


def _record(tmp_path, best_epoch: int, epochs: int = 3) -> StudentRecord:
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    history = tuple({"epoch": e, "epochs": epochs, "best_val_acc": 0.5 + e / 10} for e in range(1, epochs + 1))
    return StudentRecord(KEY, 1, registry.folder(KEY).child("run-x"), best_epoch, history, "s/t0")


def test_a_replay_stopped_before_the_stored_best_epoch_points_at_nothing(tmp_path):
    """Its stored checkpoint is from a later epoch than the replay reached: not its student."""
    record = _record(tmp_path, best_epoch=3)
    folder = Storage(str(tmp_path / "trial"))

    def report(metrics):
        if metrics["epoch"] == 2:
            raise Stop  # ASHA stops the trial at its rung

    with pytest.raises(Stop):
        replay(record, folder, report, {})
    assert best_location(folder) is None


def _store(registry: StudentRegistry, after_version: int, weight: float, made_by: str = "s/t1") -> bool:
    run = registry.storage.child("..", "runs", made_by.replace("/", "-"))
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, weight)
    write_checkpoint(run, "best_epoch_2", model, {"epoch": 2})
    point_best(run, 2)
    history = [{"epoch": 1, "epochs": 2}, {"epoch": 2, "epochs": 2}]
    return registry.publish(KEY, after_version, run, history, made_by)


def test_one_version_is_published_once_and_a_broken_one_is_superseded(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    assert _store(registry, 0, 1.0, "s/t1")
    assert not _store(registry, 0, 2.0, "s/t2")  # a second holder (one that took over) finds it taken
    first = registry.newest(KEY)
    assert first.version == 1 and first.made_by == "s/t1" and first.problem() is None
    model_file = Path(first.checkpoint_uri()) / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:10])  # truncated after publication
    assert "sha256" in first.problem()
    record, seen = students_module.usable_record(registry, KEY, "t3")
    assert record is None and seen == 1
    assert _store(registry, seen, 3.0, "s/t3")  # the one who found it broken publishes the next version
    second = registry.newest(KEY)
    assert second.version == 2 and second.problem() is None and second.folder.uri() != first.folder.uri()
    assert model_file.stat().st_size == 10  # the broken version's files are never rewritten under readers


def test_a_waiter_reads_a_broken_stored_student_once_while_its_key_is_distilled_again(tmp_path, monkeypatch):
    """Another trial distils the key again (its stored version found truncated); this one waits.
    Before, each of its looks (every 2 s) read and hashed the whole broken checkpoint again, and
    said so on the console."""
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    assert _store(registry, 0, 1.0, "s/t1")
    model_file = Path(registry.newest(KEY).checkpoint_uri()) / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:10])
    holder = registry.lease(KEY, "s/t2", 60)
    assert holder.try_acquire()  # the trial distilling it again
    lines: list[str] = []
    monkeypatch.setattr(students_module, "say", lines.append)
    with pytest.raises(TimeoutError, match=KEY):
        distil_once(registry, KEY, "s/t3", FakeDistil(registry), print, 0.3)
    assert len([line for line in lines if "not usable" in line]) == 1, lines


def test_a_failed_publication_is_logged_and_costs_the_run_nothing(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    lines: list[str] = []
    finished = StudentFinished(registry, KEY, 0, "s/t1")
    assert finished(Storage(str(tmp_path / "no-run")), [], lines.append) is False  # no best checkpoint
    assert len(lines) == 1 and "not stored for reuse" in lines[0]


class FakeDistil:
    """Stands in for a trial's Train run: stores a student as the run's last epoch would."""

    def __init__(self, registry: StudentRegistry, before=None) -> None:
        self.registry, self.before, self.calls = registry, before, 0

    def __call__(self, finished: StudentFinished, lease=None) -> None:
        self.calls += 1
        if self.before is not None:
            self.before()
        run = self.registry.storage.child("..", "runs", f"run{self.calls}")
        write_checkpoint(run, "best_epoch_1", torch.nn.Linear(2, 2), {"epoch": 1})
        point_best(run, 1)
        finished(run, [{"epoch": 1, "epochs": 1, "best_val_acc": 0.9}], print)


def test_a_stored_key_is_replayed_and_a_new_one_distilled_once(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    fake, played = FakeDistil(registry), []
    assert distil_once(registry, KEY, "s/t1", fake, played.append, 60) == "distilled"
    assert distil_once(registry, KEY, "s/t2", fake, played.append, 60) == "replayed"
    assert fake.calls == 1 and [r.made_by for r in played] == ["s/t1"]
    assert registry.lease(KEY, "x", 60).holder_now() is None  # released when done


def test_a_trial_waits_for_the_holder_of_its_key_then_replays(tmp_path, monkeypatch):
    """Two sweeps on one root want one student: the second waits (no Train run) while the first
    distils, then replays the first's curve."""
    monkeypatch.setattr(students_module, "POLL_S", 0.05)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    holding, go_on = threading.Event(), threading.Event()

    def hold():
        holding.set()
        assert go_on.wait(30)

    first, second, played = FakeDistil(registry, before=hold), FakeDistil(registry), []
    thread = threading.Thread(target=lambda: distil_once(registry, KEY, "sweep-a/t1", first, print, 60))
    thread.start()
    assert holding.wait(30)
    waiter = threading.Thread(
        target=lambda: played.append(distil_once(registry, KEY, "sweep-b/t1", second, lambda r: None, 60))
    )
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and second.calls == 0  # waiting while the first holds the key
    go_on.set()
    thread.join(30)
    waiter.join(30)
    assert played == ["replayed"] and (first.calls, second.calls) == (1, 0)


def test_a_holder_gone_stale_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    dead = registry.lease(KEY, "sweep-a/t1", 60)
    assert dead.try_acquire()  # its trial was killed: no heartbeat, no release
    fake = FakeDistil(registry)
    assert distil_once(registry, KEY, "sweep-b/t1", fake, print, 60, stale_after_s=0.2) == "distilled"
    assert fake.calls == 1 and registry.newest(KEY).made_by == "sweep-b/t1"


def test_waiting_past_the_timeout_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    holder = Lease(registry.folder(KEY).child("lease"), "sweep-a/t1", 60)
    assert holder.try_acquire()
    with pytest.raises(TimeoutError, match=KEY):
        distil_once(registry, KEY, "sweep-b/t1", FakeDistil(registry), print, 0.1)


def test_the_record_is_one_file_written_once(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    assert _store(registry, 0, 1.0)
    records = tmp_path / "students" / KEY / "records"
    assert sorted(p.name for p in records.iterdir()) == [version_file(1)]
    data = json.loads((records / version_file(1)).read_text())
    assert data["student_key"] == KEY and data["best_epoch"] == 2 and len(data["history"]) == 2


def test_storage_errors_reach_the_caller_of_publish(tmp_path, monkeypatch):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))

    def broken(*args, **kwargs):
        raise ResourceError("storage: down")

    monkeypatch.setattr(Storage, "create_exclusive", broken)
    with pytest.raises(ResourceError):
        _store(registry, 0, 1.0)


def test_a_trial_being_stopped_releases_its_lease_at_once(tmp_path):
    """Tune stops a trial (ASHA) by setting its session's stop event, then ends its actor: no
    finally runs in the thread blocked on the Train run. The heartbeat's watcher releases the
    lease, so a waiter takes the key now, not after the stale window."""
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    lease, stopping = registry.lease(KEY, "s/t1", 60), threading.Event()
    assert lease.try_acquire()
    with Heartbeat(lease, 60, stopping):
        stopping.set()
        deadline = time.monotonic() + 10
        while lease.holder_now() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lease.holder_now() is None
        assert registry.lease(KEY, "s/t2", 60).try_acquire()


def test_a_heartbeat_ended_normally_releases_nothing_when_the_event_comes_later(tmp_path):
    """Tune sets the event at every trial's end, too: by then the holder may be someone else."""
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    lease, stopping = registry.lease(KEY, "s/t1", 60), threading.Event()
    assert lease.try_acquire()
    with Heartbeat(lease, 60, stopping):
        pass
    lease.release()
    other = registry.lease(KEY, "s/t2", 60)
    assert other.try_acquire()
    stopping.set()
    time.sleep(0.2)
    assert other.holder_now() == "s/t2"


# ------------------------------------------------------- a teacher checkpoint broken under a student


def test_a_student_given_a_broken_teacher_checkpoint_follows_the_teachers_set_in_use(distilled, tmp_path):
    """Its trial verified the checkpoint, then it was truncated, and a retraining published a whole
    set beside it: the run distils from that set instead of failing (and being retried, 21 times
    in the chaos run) on the broken one. With nowhere else to go, the error stands."""
    import shutil

    from remem_ray.checkpoint_files import CheckpointError

    tmp = distilled[0]
    broken, whole = tmp_path / "gen-1" / "epoch_3", tmp_path / "gen-2" / "epoch_3"
    shutil.copytree(tmp / "teacher" / "epoch_3", broken)
    shutil.copytree(tmp / "teacher" / "epoch_3", whole)
    model_file = broken / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    spec = load_run_spec(None, {**TINY_TEACHER_SPEC, "student.epochs": 1, "student.batch_size": 16})
    lines: list[str] = []
    session = FileSession(tmp_path / "s.pt")
    session.log = lines.append
    config = LoopConfig(spec, str(tmp_path / "run"), teacher_checkpoint=str(broken), session=session)
    with pytest.raises(CheckpointError, match="sha256"):
        distill_student(config)
    result = distill_student(config.but(output=str(tmp_path / "run2"), teacher_now=lambda: str(whole)))
    assert result["best"]["epoch"] == 1
    assert any(f"distilling from {whole}" in line for line in lines)
    meta = json.loads((Path(result["checkpoint"]) / "meta.json").read_text())
    assert meta["teacher"]["epoch"] == 3


def test_teacher_in_use_answers_the_published_set_only_if_whole(tmp_path):
    from helpers.teachers import registry_setup, write_teacher

    from remem_ray.sweep.registry import TeacherInUse

    _, _, _, registry, key = registry_setup(tmp_path)
    finder = TeacherInUse(registry, key, (), 4)
    assert finder() is None  # nothing stored
    for generation in (1, 2):
        write_teacher(registry.output(key, generation), float(generation))
    assert registry.claim(key, 1) and registry.publish(key, 1)
    assert finder() == registry.output(key, 1).uri("epoch_4")
    assert registry.claim(key, 2) and registry.publish(key, 2)  # a retraining, published beside it
    assert finder() == registry.output(key, 2).uri("epoch_4")
    model_file = Path(registry.output(key, 2).uri("epoch_4")) / "model.pt"
    model_file.write_bytes(b"x")
    assert finder() is None  # broken too: nowhere to go


def test_an_unreadable_record_is_superseded_not_fatal(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    records = tmp_path / "students" / KEY / "records"
    records.mkdir(parents=True)
    (records / version_file(1)).write_text('{"folder": "run-x", "best_ep')  # damaged after its create
    record, seen = students_module.usable_record(registry, KEY, "t1")
    assert record is None and seen == 1
    assert _store(registry, seen, 1.0)
    assert registry.newest(KEY).version == 2 and registry.newest(KEY).problem() is None


def test_a_history_json_cannot_hold_is_logged_and_the_run_goes_on(tmp_path):
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    run = Storage(str(tmp_path / "run"))
    write_checkpoint(run, "best_epoch_1", torch.nn.Linear(2, 2), {"epoch": 1})
    point_best(run, 1)
    lines: list[str] = []
    finished = StudentFinished(registry, KEY, 0, "s/t1")
    assert finished(run, [{"epoch": 1, "odd": object()}], lines.append) is False
    assert "not stored for reuse: TypeError" in lines[0] and registry.newest(KEY) is None


def _runs(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "students" / KEY).iterdir() if p.name.startswith("run-"))


def test_the_loser_of_a_publication_race_removes_its_folder_and_a_retried_create_is_still_ours(tmp_path, monkeypatch):
    """Two holders pass the "version free?" check together; one create wins. The loser's folder,
    named by no record, goes. A create whose first PUT landed but whose retry was answered
    "exists" (S3) finds the record naming its own folder: published."""
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    create = Storage.create_exclusive

    def another_wins_first(self, rel, data):
        record = json.loads(data)
        create(self, rel, json.dumps({**record, "folder": "run-winner", "made_by": "s/other"}).encode())
        return create(self, rel, data)

    monkeypatch.setattr(Storage, "create_exclusive", another_wins_first)
    assert not _store(registry, 0, 1.0)
    assert _runs(tmp_path) == [] and registry.newest(KEY).made_by == "s/other"

    def landed_then_answered_exists(self, rel, data):
        create(self, rel, data)
        return False

    monkeypatch.setattr(Storage, "create_exclusive", landed_then_answered_exists)
    assert _store(registry, 1, 1.0)
    newest = registry.newest(KEY)
    assert newest.version == 2 and _runs(tmp_path) == [Path(newest.folder.uri()).name]


def test_a_waiting_student_rides_out_a_storage_outage_as_its_holder_does(tmp_path, monkeypatch):
    """Before, the first look storage did not answer failed the trial."""
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    clock = [0.0]
    monkeypatch.setattr(students_module, "Waiter", functools.partial(Waiter, clock=lambda: clock[0]))
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    real, unanswered = students_module.usable_record, [3]

    def usable_record(*args):
        if unanswered[0] > 0:
            unanswered[0] -= 1
            clock[0] += 15.0
            raise ResourceError("storage: s3://bucket/students: connection refused")
        return real(*args)

    monkeypatch.setattr(students_module, "usable_record", usable_record)
    fake = FakeDistil(registry)
    assert distil_once(registry, KEY, "s/t1", fake, print, 600, stale_after_s=60) == "distilled" and fake.calls == 1
    unanswered[0] = 1000
    with pytest.raises(ResourceError, match="connection refused"):
        distil_once(registry, KEY, "s/t2", fake, print, 600, stale_after_s=60)
    assert fake.calls == 1


def test_a_holder_whose_process_ended_is_taken_over_at_once(tmp_path, monkeypatch):
    """Before, its waiters waited out the stale window (60 s): a second sweep's trial printed
    'waiting for student' (the smoke test's lease check failed so on a loaded machine)."""
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    leave_lease_held_by_an_ended_process(registry.folder(KEY).child("lease"), "sweep-a/t1")
    fake = FakeDistil(registry)
    assert distil_once(registry, KEY, "sweep-b/t1", fake, print, 2) == "distilled" and fake.calls == 1


def test_a_diverged_student_is_recorded_for_its_key_and_not_distilled_again(distilled, tmp_path, monkeypatch):
    """Only teachers' divergences were kept: a student diverging (seeded: every time alike) spent
    each of Train's retries, then each of Tune's, re-diverging, and so did a resume's rerun and a
    later sweep's trial of its key. Now the sweep's hook keeps it for the key: a retry stops before
    its teacher is even loaded, and distil_once never starts a run for it."""
    from remem_ray.errors import TrainingDivergedError
    from remem_ray.train import student as student_module

    teacher_dir, registry = distilled[0] / "teacher", StudentRegistry(Storage(str(tmp_path / "students")))
    # SGD at lr 10, weight decay 1, momentum 0.99, batches of 4: NaN in epoch 1, seeded (resnet10t
    # rides out lr 10 alone; in batches of 16 it lasted into epoch 2 once the teacher changed)
    sgd = {"name": "sgd", "lr": 10.0, "weight_decay": 1.0, "momentum": 0.99}
    diverging = {**TINY_TEACHER_SPEC, "student.epochs": 2, "student.batch_size": 4, "student.optimizer": sgd}
    spec = load_run_spec(None, diverging)
    hook = StudentFinished(registry, KEY, 0, "s/t1")
    events: list[str] = []

    def config() -> LoopConfig:
        teacher = str(teacher_dir / "epoch_3")
        session = Recorder(tmp_path / "student.pt", events)
        return LoopConfig(spec, str(tmp_path / "run"), teacher_checkpoint=teacher, session=session, on_finished=hook)

    recorded = f"recorded in {tmp_path}/students/{KEY}/diverged.json: remove it to distil this student again"
    with pytest.raises(TrainingDivergedError, match=f"student diverged in epoch 1 .*{recorded}"):
        distill_student(config())
    assert events == [] and registry.divergence(KEY).endswith(f"({recorded})")

    def never_built(*args, **kwargs):
        raise AssertionError("a student task built for a key that diverged")

    monkeypatch.setattr(student_module, "StudentTask", never_built)
    with pytest.raises(TrainingDivergedError, match=recorded):  # Train's retry: not one epoch
        distill_student(config())
    with pytest.raises(TrainingDivergedError, match=recorded):  # any trial of the key: no run
        distil_once(registry, KEY, "s/t2", never_built, print, 60)
    assert events == [] and registry.lease(KEY, "x", 60).holder_now() is None


def test_a_storage_blip_on_the_look_after_taking_the_lease_is_ridden_out(tmp_path, monkeypatch):
    """The holder looks again, once it holds the lease, whether the student was stored meanwhile;
    before, that look failing failed the trial, where every look before it rode out the outage."""
    monkeypatch.setattr(students_module, "POLL_S", 0.01)
    registry = StudentRegistry(Storage(str(tmp_path / "students")))
    real, looks = registry.newest, []

    def newest(key):
        looks.append(key)
        if len(looks) == 2:  # the look under the lease
            raise ResourceError("storage: s3://bucket/students: connection reset")
        return real(key)

    monkeypatch.setattr(registry, "newest", newest)
    distil = FakeDistil(registry)
    assert distil_once(registry, KEY, "s/t1", distil, print, 30.0, stale_after_s=60) == "distilled"
    assert distil.calls == 1 and registry.newest(KEY) is not None
    assert registry.lease(KEY, "other", 60).holder_now() is None
