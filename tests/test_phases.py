"""A teacher and its student in one run (remem_ray.train.phases), in-process: the teacher's resume
state lives in its own folder (another holder resumes it), a run restarted past its teacher phase
goes straight to the student."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers.sessions import TINY_TEACHER_SPEC, FileSession, Interrupted, TakeoverSession, assert_bitwise_equal

from remem_ray.checkpoints import load_model
from remem_ray.config import load_run_spec
from remem_ray.contract import LoopConfig, PhasesConfig
from remem_ray.leases import Lease
from remem_ray.storage import Storage
from remem_ray.train.phases import teach_then_distil
from remem_ray.train.session import STATE_FILE
from remem_ray.train.student import StudentTask, distill_student

SPEC = {
    **TINY_TEACHER_SPEC,
    "teacher.checkpoint_epochs": [1, 3],
    "student.epochs": 2,
    "student.batch_size": 16,
    "student.teacher_epoch": 3,
}


@pytest.fixture(autouse=True)
def no_timed_epoch_lines(monkeypatch):
    """Which epoch lines show then depends on the epochs alone (see EpochLines), never on speed."""
    monkeypatch.setattr("remem_ray.train.session.EPOCH_LINE_EVERY_S", math.inf)


class Events:
    """What happened, in order: teacher epochs (through the base session's log), the phase switch, student epochs."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def teacher_done(self) -> None:
        self.seen.append("teacher done")


class TeacherLog(FileSession):
    """The teacher phase's base session: its epoch lines land in `events` (state goes elsewhere)."""

    def __init__(self, events: Events) -> None:
        super().__init__(Path("/nonexistent"))
        self.events = events

    def log(self, message: str) -> None:
        if message.startswith("epoch "):
            self.events.seen.append("teacher " + message.split()[1])

    def detail(self, message: str) -> None:  # a sweep's log only, not its console
        if message.startswith("epoch "):
            self.events.seen.append(f"teacher {message.split()[1]} (log only)")


class TakenOverLog(TeacherLog):
    """A teacher whose lease passes to another holder (a TakeoverSession's) once epoch `after` is logged."""

    def __init__(self, events: Events, takeover: TakeoverSession) -> None:
        super().__init__(events)
        self.takeover = takeover

    def log(self, message: str) -> None:
        super().log(message)
        if message.startswith("epoch "):
            self.takeover.report({"epoch": int(message.split()[1].split("/")[0])})


class StudentLog(FileSession):
    def __init__(self, state_file: Path, events: Events) -> None:
        super().__init__(state_file)
        self.events = events

    def report(self, metrics, state=None, show=True) -> None:
        super().report(metrics, state)
        self.events.seen.append(f"student {metrics['epoch']}/{metrics['epochs']}")


def _config(
    spec, tmp_path: Path, teacher_session, student_session, events: Events, lease=None, teacher="teacher", earlier=None
) -> PhasesConfig:
    teacher_config = LoopConfig(
        spec,
        str(tmp_path / teacher),
        state=str(tmp_path / teacher / "resume"),
        resume_from=str(tmp_path / earlier) if earlier else None,
        session=teacher_session,
        lease=lease.handle() if lease is not None else None,
    )
    student = None
    if student_session is not None:
        student = LoopConfig(
            spec,
            str(tmp_path / "student"),
            teacher_checkpoint=str(tmp_path / teacher / "epoch_3"),
            session=student_session,
            report_extra={"trial_started_at": 1.0},
        )
    return PhasesConfig(teacher_config, student, on_teacher_done=events.teacher_done)


def test_the_student_starts_once_its_teacher_is_finished_and_reports_only_its_own_epochs(tmp_path):
    spec = load_run_spec(None, SPEC)
    events = Events()
    student = StudentLog(tmp_path / "student.pt", events)
    result = teach_then_distil(_config(spec, tmp_path, TeacherLog(events), student, events))
    teacher = ["teacher 1/3", "teacher 2/3 (log only)", "teacher 3/3"]  # saved: 1 and 3
    assert events.seen == [*teacher, "teacher done", "student 1/2", "student 2/2"]
    assert [r["epoch"] for r in student.reports] == [1, 2]  # the run's results: student epochs only
    assert all(r["student_in_teacher_run"] == 1 and r["trial_started_at"] == 1.0 for r in student.reports)
    assert all(r["fit_called_at"] <= r["epoch_started_at"] for r in student.reports)
    teacher_state = torch.load(tmp_path / "teacher" / "resume" / STATE_FILE, weights_only=False)
    assert teacher_state["epoch"] == 3  # the teacher's resume state, in the teacher's folder
    assert (tmp_path / "teacher" / "epoch_1").is_dir() and (tmp_path / "student" / "best.json").is_file()
    assert result["student"]["best"]["epoch"] in (1, 2)
    assert result["student"]["best"]["val_acc"] > 0.25  # 4 classes: it learnt from its teacher


def test_a_teacher_stopped_by_a_lost_lease_is_resumed_by_the_next_holder_exactly(tmp_path):
    """The next holder writes into a folder of its own and continues from the first one's state,
    read only; the first holder's folder is never written again."""
    spec = load_run_spec(None, SPEC)
    whole_events = Events()
    teach_then_distil(_config(spec, tmp_path / "whole", TeacherLog(whole_events), None, whole_events))

    lease_folder = Storage(str(tmp_path / "lease"))
    first = Lease(lease_folder, "sweep-1/trial_a", 60.0)
    assert first.try_acquire()
    events = Events()
    takeover = TakeoverSession(tmp_path / "unused.pt", lease_folder, after=1)
    taken = TakenOverLog(events, takeover)
    student = StudentLog(tmp_path / "student.pt", events)
    result = teach_then_distil(_config(spec, tmp_path, taken, student, events, lease=first, teacher="gen-1"))
    assert "passed to sweep-2/trial_b" in result["teacher"]["stopped"] and result["student"] is None
    assert "teacher done" not in events.seen and not student.reports  # no student on an unfinished teacher
    first_files = {p: p.read_bytes() for p in (tmp_path / "gen-1").rglob("*") if p.is_file()}
    assert (tmp_path / "gen-1" / "epoch_1").is_dir() and not (tmp_path / "gen-1" / "epoch_3").exists()

    # the new holder (another trial) resumes from the state in the first one's folder, then distils
    events = Events()
    student = StudentLog(tmp_path / "student.pt", events)
    lease = takeover.new_holder
    config = _config(spec, tmp_path, TeacherLog(events), student, events, lease=lease, teacher="gen-2", earlier="gen-1")
    teach_then_distil(config)
    assert events.seen[:3] == ["teacher 2/3", "teacher 3/3", "teacher done"]
    assert {p: p.read_bytes() for p in (tmp_path / "gen-1").rglob("*") if p.is_file()} == first_files
    whole, _ = load_model(Storage(str(tmp_path / "whole" / "teacher")), "epoch_3")
    resumed, _ = load_model(Storage(str(tmp_path / "gen-2")), "epoch_3")
    assert_bitwise_equal(whole.state_dict(), resumed.state_dict())
    copied, _ = load_model(Storage(str(tmp_path / "gen-2")), "epoch_1")  # checked and copied over
    original, _ = load_model(Storage(str(tmp_path / "gen-1")), "epoch_1")
    assert_bitwise_equal(copied.state_dict(), original.state_dict())


def test_a_state_whose_checkpoints_are_gone_trains_from_the_first_epoch(tmp_path):
    """Resuming needs every checkpoint saved before the state's epoch: without one, the teacher
    trains again from epoch 1 (and ends whole) rather than resuming into a set that stays broken."""
    spec = load_run_spec(None, SPEC)
    events = Events()
    teach_then_distil(_config(spec, tmp_path, TeacherLog(events), None, events, teacher="gen-1"))
    shutil.rmtree(tmp_path / "gen-1" / "epoch_1")  # lost after the run ended
    events = Events()
    teach_then_distil(_config(spec, tmp_path, TeacherLog(events), None, events, teacher="gen-2", earlier="gen-1"))
    assert events.seen == ["teacher 1/3", "teacher 2/3 (log only)", "teacher 3/3", "teacher done"]
    assert (tmp_path / "gen-2" / "epoch_1" / "manifest.json").is_file()


class AllLines(TeacherLog):
    def __init__(self, events: Events) -> None:
        super().__init__(events)
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        super().log(message)
        self.lines.append(message)


def test_a_teacher_restarted_after_its_last_epoch_says_its_epochs_were_done(tmp_path):
    """A run Train restarted after its teacher's last epoch (its student diverged, say) said
    "resuming at epoch 4 of 3" on the sweep's console."""
    spec = load_run_spec(None, SPEC)
    teach_then_distil(_config(spec, tmp_path, TeacherLog(Events()), None, Events()))
    events = Events()
    again = AllLines(events)
    teach_then_distil(_config(spec, tmp_path, again, None, events))
    assert "all 3 epochs were done already (its resume state says so)" in again.lines
    assert not any(line.startswith("resuming at epoch") for line in again.lines), again.lines
    assert events.seen == ["teacher 3/3", "teacher done"]  # its last result handed over again, no epoch run


def test_a_run_restarted_in_its_student_phase_does_not_train_its_teacher_again(tmp_path):
    spec = load_run_spec(None, SPEC)
    events = Events()
    teach_then_distil(_config(spec, tmp_path, TeacherLog(events), StudentLog(tmp_path / "s.pt", events), events))
    teacher_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "teacher").rglob("*") if p.is_file()}

    events = Events()  # the same run again (Train restarted it): its student has a checkpoint
    student = StudentLog(tmp_path / "s.pt", events)
    result = teach_then_distil(_config(spec, tmp_path, TeacherLog(events), student, events))
    assert result["teacher"] is None and events.seen == ["student 2/2"]
    assert student.reports[0]["replayed"] == 1  # its final result, handed over again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "teacher").rglob("*") if p.is_file()} == teacher_files


def _two_ranks(rank: int, world: int, tmp: str, targets: str) -> None:
    import os
    import time

    import torch.distributed as dist

    import remem_ray.train.teacher as teacher_module

    tmp_path = Path(tmp)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=world)
    try:
        if rank == 0:  # rank 0 takes its time over each checkpoint it writes; the others must wait for it
            measure = teacher_module.checkpoint_information

            def slowly(*args, **kwargs):
                time.sleep(3)
                return measure(*args, **kwargs)

            teacher_module.checkpoint_information = slowly
        spec = load_run_spec(None, {**SPEC, "student.teacher_targets": targets, "student.target_views": 2})
        events = Events()
        teacher = TeacherLog(events)
        teacher.world_rank, teacher.local_rank, teacher.world_size = rank, rank, world
        student = StudentLog(tmp_path / "student.pt", events)
        student.world_rank, student.local_rank, student.world_size = rank, rank, world
        teach_then_distil(_config(spec, tmp_path, teacher, student, events))
        assert [e for e in events.seen if e.startswith("student")] == ["student 1/2", "student 2/2"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("targets", ["online", "cached"])
def test_two_gloo_ranks_start_their_student_only_once_rank_0_has_written_the_teacher(tmp_path, targets):
    """Rank 0 writes the teacher's checkpoints; every rank loads the chosen one for its student
    (cached: the ranks compute its targets together, each its share, through the whole loop)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(2, str(tmp_path), targets), nprocs=2, join=True)
    assert (tmp_path / "student" / "best.json").is_file()
    kept = sorted(p.name.rsplit(".", 1)[1] for p in (tmp_path / "teacher" / "targets").glob("*"))
    assert kept == ([] if targets == "online" else ["lease", "pt"])  # the table, no part left


def test_readers_of_a_students_best_follow_a_pointer_to_a_finished_folder(tmp_path, monkeypatch):
    """Each best is a folder of its own and best.json points at it; a resumed run points readers
    back at its state's best before it writes anything again (an interrupted attempt may have
    written a later one), and a run starting afresh points them at none until its first best."""
    spec = load_run_spec(None, {**SPEC, "student.epochs": 3})
    events = Events()
    teach_then_distil(_config(spec, tmp_path, TeacherLog(events), None, events))
    student = LoopConfig(spec, str(tmp_path / "student"), teacher_checkpoint=str(tmp_path / "teacher" / "epoch_3"))
    output = Storage(str(tmp_path / "student"))

    with pytest.raises(Interrupted):
        distill_student(student.but(session=FileSession(tmp_path / "s.pt", stop_after=1)))
    assert json.loads(output.read_text("best.json")) == {"epoch": 1, "checkpoint": "best_epoch_1"}
    # an attempt that got further before dying wrote a later best its state never saw
    shutil.copytree(tmp_path / "student" / "best_epoch_1", tmp_path / "student" / "best_epoch_2")
    output.write_text("best.json", json.dumps({"epoch": 2, "checkpoint": "best_epoch_2"}))
    pointed_at_start = []
    begin = StudentTask.begin

    def watched_begin(self, ctx, state):
        state = begin(self, ctx, state)
        pointed_at_start.append(
            json.loads(output.read_text("best.json"))["epoch"] if output.is_file("best.json") else None
        )
        return state

    monkeypatch.setattr(StudentTask, "begin", watched_begin)
    result = distill_student(student.but(session=FileSession(tmp_path / "s.pt")))
    best = result["best"]["epoch"]
    assert pointed_at_start == [1]  # re-pointed to the state's best before anything was written
    assert result["checkpoint"] == output.uri(f"best_epoch_{best}")
    kept = sorted(p.name for p in (tmp_path / "student").iterdir() if p.name.startswith("best_epoch_"))
    assert f"best_epoch_{best}" in kept and len(kept) <= 2  # the best and the one before it

    (tmp_path / "s.pt").unlink()  # a fresh run into the same folder: no best until its first
    distill_student(student.but(session=FileSession(tmp_path / "s.pt")))
    assert pointed_at_start == [1, None]


def test_a_holder_paused_between_its_lease_check_and_its_writes_changes_nothing_anyone_reads(tmp_path, monkeypatch):
    """The fencing case: the first holder is held right after epoch 3's lease check; another takes
    the lease over, resumes from the first one's state and publishes; then the first one wakes,
    writes its epoch 3 and finishes its loop. The set in use, and every file in it, stay the
    second holder's; the first one's writes land in its own folder only."""
    import threading

    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.registry import TeacherRegistry
    from remem_ray.sweep.trial import TeacherFinished

    spec = load_run_spec(None, SPEC)
    layout = SweepLayout(Storage(str(tmp_path / "root")), "s")
    registry = TeacherRegistry(layout.teachers)
    key = spec.teacher_key(1)
    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv("REMEM_TEST_HOLD_AT", "teacher-checked:3")
    monkeypatch.setenv("REMEM_TEST_HOLD_DIR", str(holds))

    def holder_config(lease, trial_id: str, earlier=None) -> PhasesConfig:
        handle = lease.handle()
        output = registry.output(key, handle.generation)
        teacher = LoopConfig(
            spec,
            output.uri(),
            state=output.uri("resume"),
            resume_from=earlier.uri() if earlier is not None else None,
            lease=handle,
            quiet=True,
        )
        return PhasesConfig(teacher, None, on_teacher_done=TeacherFinished(registry, layout, key, trial_id, handle))

    first = registry.lease(key, "sweep-a/t1", 60.0)
    assert first.try_acquire() and registry.claim(key, 1)
    results: dict = {}
    paused = threading.Thread(target=lambda: results.update(teach_then_distil(holder_config(first, "t1"))))
    paused.start()
    claimed = holds / "teacher-checked-3.claimed"
    for _ in range(600):
        if claimed.exists() or not paused.is_alive():
            break
        paused.join(0.5)
    assert claimed.exists(), "the first holder never reached its pause"

    clock = [0.0]  # the second holder's clock: the first one's record has not changed for the window
    second = Lease(registry.folder(key).lease, "sweep-b/t9", 1.0, clock=lambda: clock[0])
    assert not second.try_acquire()
    clock[0] = 5.0
    assert second.try_acquire() and registry.claim(key, 2)
    earlier = registry.resume_source(key, 2)
    assert earlier is not None and earlier.uri() == registry.output(key, 1).uri()
    teach_then_distil(holder_config(second, "t9", earlier))
    in_use = registry.set_in_use(key)
    assert in_use is not None and in_use.uri() == registry.output(key, 2).uri() and layout.trained_by(key) == "t9"
    published = {p: p.read_bytes() for p in Path(in_use.uri()).rglob("*") if p.is_file()}

    (holds / "teacher-checked-3.release").touch()
    paused.join(120)
    assert not paused.is_alive()
    assert (Path(registry.output(key, 1).uri()) / "epoch_3" / "manifest.json").is_file()  # it did write, at home
    assert registry.set_in_use(key).uri() == in_use.uri() and layout.trained_by(key) == "t9"
    assert {p: p.read_bytes() for p in Path(in_use.uri()).rglob("*") if p.is_file()} == published


def test_an_earlier_state_that_does_not_load_is_not_resumed_from(tmp_path):
    spec = load_run_spec(None, SPEC)
    (tmp_path / "gen-1" / "resume").mkdir(parents=True)
    (tmp_path / "gen-1" / "resume" / STATE_FILE).write_bytes(b"truncated")
    events = Events()
    teach_then_distil(_config(spec, tmp_path, TeacherLog(events), None, events, teacher="gen-2", earlier="gen-1"))
    assert events.seen == ["teacher 1/3", "teacher 2/3 (log only)", "teacher 3/3", "teacher done"]


def test_a_diverged_teacher_is_recorded_for_its_key_and_not_trained_again(tmp_path):
    """A divergence is deterministic (seeded): before, each of Train's retries trained it again to
    the same NaN, then each of Tune's, then every other trial of the key. Now its sweep hook keeps
    it for the key: the retry stops before its first epoch, and trials never start a run for it."""
    from helpers.teachers import registry_setup

    from remem_ray.errors import TrainingDivergedError
    from remem_ray.sweep.trial import TeacherFinished, ensure_teacher

    diverging = {**SPEC, "teacher.rho": 10.0, "teacher.optimizer": {"name": "sgd", "lr": 10.0}}
    spec = load_run_spec(None, diverging)
    sweep, run_spec, layout, registry, key = registry_setup(tmp_path / "root")
    hook = TeacherFinished(registry, layout, key, "t1", lease=None)  # its divergence record needs no lease
    for attempt in ("first", "retry"):
        events = Events()
        config = _config(spec, tmp_path, TeacherLog(events), None, events)
        with pytest.raises(TrainingDivergedError, match="teacher diverged in epoch 1"):
            teach_then_distil(PhasesConfig(config.teacher, None, on_teacher_done=hook))
        if attempt == "retry":
            assert events.seen == []  # not one epoch
    assert "remove it to train this teacher again" in registry.divergence(key)

    class NeverFit:
        def __call__(self, *args):
            raise AssertionError("a Train run for a teacher that diverged")

    with pytest.raises(TrainingDivergedError, match=f"recorded in .*{key}/diverged.json"):
        ensure_teacher(sweep, run_spec, "s/t2", registry, layout, fit=NeverFit())


class _SlowRecord:
    """Rank 0's divergence hook: takes its time over the record, or cannot write it at all."""

    def __init__(self, record: Path, fails: bool = False, before: str | None = None) -> None:
        self.record, self.fails, self.before = record, fails, before

    def divergence(self) -> str | None:
        return self.before

    def diverged(self, message: str) -> str:
        import time

        from remem_ray.errors import ResourceError

        time.sleep(1)
        if self.fails:
            raise ResourceError("storage: cannot write diverged.json: Access Denied")
        self.record.write_text(message)
        return f"{message} (recorded in diverged.json)"


DIVERGENCE_CASES = ("diverges", "write-fails", "recorded-before")


def _diverging_ranks(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    from remem_ray.errors import TrainingDivergedError
    from remem_ray.train.loop import divergence_kept

    tmp_path = Path(tmp)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=rank, world_size=world)
    try:
        for case in DIVERGENCE_CASES:  # one after the other, on one process group
            record = tmp_path / f"{case}-diverged.json"
            before = "student diverged in epoch 1 (recorded in diverged.json)" if case == "recorded-before" else None
            hook = _SlowRecord(record, fails=case == "write-fails", before=before) if rank == 0 else None
            ran = False
            try:
                with divergence_kept(hook, torch.device("cpu")):
                    ran = True
                    raise TrainingDivergedError("student diverged in epoch 3 (val_loss nan)")  # every rank, as the loop
            except TrainingDivergedError as exc:
                outcome = {"error": str(exc), "type": type(exc).__name__, "ran": ran, "written": record.exists()}
                (tmp_path / f"{case}-rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_every_rank_raises_rank_0s_record_of_a_divergence_once_it_is_written(tmp_path):
    """With several workers every rank raises in the same epoch, but only rank 0 records: the
    others raised at once, so Train could end the group before the record was written (the retry
    diverged again), and a trial's failure line (rank 1's error, the last of Train's snippets) did
    not name the record; a record that could not be written replaced the divergence with a storage
    error. Now each rank waits for rank 0's record and raises its text."""
    import torch.multiprocessing as mp

    mp.spawn(_diverging_ranks, args=(2, str(tmp_path)), nprocs=2, join=True)
    expected = {
        "diverges": "student diverged in epoch 3 (val_loss nan) (recorded in diverged.json)",
        "write-fails": "student diverged in epoch 3 (val_loss nan) (not recorded: storage: cannot write "
        "diverged.json: Access Denied)",
        "recorded-before": "student diverged in epoch 1 (recorded in diverged.json)",
    }
    for case in DIVERGENCE_CASES:
        outcomes = [json.loads((tmp_path / f"{case}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [o["error"] for o in outcomes] == [expected[case]] * 2, case
        # kept for the key: a sweep's Train run ends without an error (no retry to meet the record)
        kept = "TrainingDivergedError" if case == "write-fails" else "RecordedDivergence"
        assert [o["type"] for o in outcomes] == [kept] * 2, case
        assert [o["ran"] for o in outcomes] == [case != "recorded-before"] * 2, case  # refused before training
        assert [o["written"] for o in outcomes] == [case == "diverges"] * 2, case  # rank 1 left after the write
        # ("written": whether the record was there as this rank's error left)
