"""The teacher registry and who trains a key (remem_ray.sweep.registry, ensure_teacher), with a
fake training in place of Ray Train: only our own logic is under test here; the real thing
runs in tests/test_sweep_integration.py."""

from __future__ import annotations

import functools
import shutil
import threading

import pytest
from helpers.leases import leave_lease_held_by_an_ended_process
from helpers.teachers import EPOCHS, registry_setup, write_teacher

from remem_ray.errors import ResourceError
from remem_ray.leases import Lease
from remem_ray.sweep import trial as trial_module
from remem_ray.sweep.registry import Waiter
from remem_ray.sweep.results import summarize
from remem_ray.sweep.trial import TeacherFinished, ensure_teacher
from remem_ray.teacher_layout import RESUME_STATE, generation_dir


class FakeFit:
    """Stands in for the Ray Train run: writes the checkpoints where the registry says (its lease
    generation's folder), then marks the teacher finished as the run's rank 0 does; counts calls."""

    def __init__(self, weight: float = 1.0, before=None) -> None:
        self.calls, self.weight, self.before = 0, weight, before
        self.resumed_from: list = []

    def __call__(self, spec, run_spec, registry, key, handle, finished, resume_from) -> None:
        self.calls += 1
        self.resumed_from.append(resume_from)
        assert handle.lost() is None  # trains only under its lease
        if self.before is not None and self.before(registry, key, handle) is False:
            return  # the loop found its lease lost and stopped
        write_teacher(registry.output(key, handle.generation), self.weight)
        finished()


def _take_over(registry, key, holder: str) -> Lease:
    """Another holder finds the lease stale (its clock moves past the window) and takes it."""
    clock = [0.0]
    other = Lease(registry.folder(key).lease, holder, 1.0, clock=lambda: clock[0])
    assert not other.try_acquire()
    clock[0] = 5.0
    assert other.try_acquire()
    return other


def test_the_holder_trains_and_records_it(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit)
    assert fit.calls == 1 and layout.trained_by(key) == "t1"
    assert registry.set_in_use(key).uri() == registry.output(key, 1).uri()  # its generation's folder
    assert registry.lease(key, "other", 60).holder_now() is None  # released when done
    assert not ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit)  # stored: reused
    assert fit.calls == 1


def test_contenders_from_two_sweeps_train_a_key_once(tmp_path):
    """Two sweeps on one root (different sweep names, same teacher key): one training in all."""
    fit, results, start = FakeFit(), {}, threading.Barrier(4)

    def trial(sweep, trial_id):
        spec, run_spec, layout, registry, _ = registry_setup(tmp_path, sweep)
        start.wait()
        results[(sweep, trial_id)] = ensure_teacher(spec, run_spec, f"{sweep}/{trial_id}", registry, layout, fit=fit)

    threads = [threading.Thread(target=trial, args=(s, t)) for s in ("sweep-a", "sweep-b") for t in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fit.calls == 1 and sum(results.values()) == 1 and len(results) == 4


def test_a_holder_that_loses_its_lease_mid_run_waits_for_the_new_one(tmp_path, monkeypatch):
    """The stale holder's run stops; it goes back to waiting (the real wait loop) until the new
    holder, which started after it, publishes; it is not counted as the trainer. Its own training
    took longer than the sweep's teacher wait: the wait for the new holder starts afresh (before,
    the trial timed out at its first look)."""
    monkeypatch.setattr(trial_module, "POLL_S", 0.05)
    clock = [0.0]
    monkeypatch.setattr(trial_module, "Waiter", functools.partial(Waiter, clock=lambda: clock[0]))
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    _, run_spec_b, layout_b, registry_b, _ = registry_setup(tmp_path, "sweep-b")
    waiting = threading.Event()
    new_holder: list[Lease] = []

    def taken_over(registry, key, handle):
        clock[0] += spec.sweep.teacher_wait_timeout_s + 1  # a long teacher, trained until its lease was lost
        new_holder.append(_take_over(registry, key, "sweep-b/t9"))
        return False  # our run finds its lease lost at its next epoch check and stops

    def finish_later() -> None:
        waiting.wait(30)
        lease = new_holder[0]
        assert registry_b.claim(key, lease.handle().generation)
        write_teacher(registry_b.output(key, lease.handle().generation), 2.0)
        TeacherFinished(registry_b, layout_b, key, "t9", lease.handle())()
        lease.release()

    real_usable = trial_module._usable

    def usable(*args):
        found = real_usable(*args)
        if new_holder and not found:
            waiting.set()  # our holder is back in the wait loop: now the new one finishes
        return found

    monkeypatch.setattr(trial_module, "_usable", usable)
    other = threading.Thread(target=finish_later)
    other.start()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit(before=taken_over)) is False
    other.join()
    assert waiting.is_set() and layout.trained_by(key) is None and layout_b.trained_by(key) == "t9"
    assert registry.set_in_use(key).uri() == registry.output(key, 2).uri()


def test_a_stale_holder_changes_nothing_a_reader_or_the_new_holder_sees(tmp_path):
    """Fencing: a holder paused right after its lease check (GC, swap, a preempted VM) wakes after
    another has taken the lease over; whatever it writes then is never what anyone reads."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    first = registry.lease(key, "s/t1", 60.0)
    assert first.try_acquire() and registry.claim(key, 1)
    stale = TeacherFinished(registry, layout, key, "t1", first.handle())
    # the pause: another holder takes over and claims the pointer before the first one publishes
    second = _take_over(registry, key, "s/t2")
    assert registry.claim(key, 2)
    write_teacher(registry.output(key, 2), 2.0)
    files = {p: p.read_bytes() for p in (tmp_path / "teachers" / key / generation_dir(2)).rglob("*") if p.is_file()}
    # the first holder wakes: it finishes its writes (into its own folder) and tries to publish
    write_teacher(registry.output(key, 1), 1.0)
    assert not registry.publish(key, 1)
    stale()
    assert registry.set_in_use(key) is None and layout.trained_by(key) is None  # nothing published
    TeacherFinished(registry, layout, key, "t2", second.handle())()
    assert registry.set_in_use(key).uri() == registry.output(key, 2).uri() and layout.trained_by(key) == "t2"
    stale()  # woken again, later: still nothing
    assert registry.set_in_use(key).uri() == registry.output(key, 2).uri() and layout.trained_by(key) == "t2"
    after = {p: p.read_bytes() for p in (tmp_path / "teachers" / key / generation_dir(2)).rglob("*") if p.is_file()}
    assert after == files


def test_a_holder_whose_lease_passed_before_it_claimed_trains_nothing(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    first = registry.lease(key, "s/t1", 60.0)
    assert first.try_acquire()
    _take_over(registry, key, "s/t2")
    assert registry.claim(key, 2)
    assert not registry.claim(key, 1)  # generation 1 may no longer add a version


def test_a_corrupt_checkpoint_is_retrained_beside_the_one_in_use_and_switched_at_the_end(tmp_path):
    """A key trained by an older version (one set at the key's root) whose checkpoint got truncated."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    write_teacher(registry.folder(key).storage, 1.0)
    in_use = registry.set_in_use(key)
    assert in_use.uri() == registry.folder(key).uri() and in_use.problem(EPOCHS, 4) is None
    model_file = tmp_path / "teachers" / key / "epoch_4" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10])  # truncated after its manifest was written
    epoch_2 = (tmp_path / "teachers" / key / "epoch_2" / "model.pt").read_bytes()

    def during(registry, key, handle):
        # trials reading the checkpoints in use still find them, unchanged, while the retraining runs
        assert registry.set_in_use(key).uri() == in_use.uri() and registry.set_in_use(key).verify(2) is None

    fit = FakeFit(weight=3.0, before=during)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit)
    assert fit.calls == 1 and fit.resumed_from == [None]
    assert registry.set_in_use(key).uri() == registry.output(key, 1).uri()  # switched
    assert registry.set_in_use(key).problem(EPOCHS, 4) is None
    assert (tmp_path / "teachers" / key / "epoch_2" / "model.pt").read_bytes() == epoch_2  # old set untouched

    summary = summarize(spec, layout)
    assert summary.corrupt_checkpoints_retrained == 1
    assert "epoch_4/model.pt does not match its sha256" in summary.integrity_events[0]["problem"]


def test_a_set_with_a_checkpoint_gone_is_repaired_not_resumed_forever(tmp_path):
    """A published set loses an epoch folder after its run ended: the next trial trains the key
    again (resuming, if at all, only where the checkpoints are whole) and counts the repair once."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit())
    registry.output(key, 1).write_text(RESUME_STATE, "its state")  # the run left its state
    shutil.rmtree(tmp_path / "teachers" / key / generation_dir(1) / "epoch_2")
    fit = FakeFit(weight=2.0)
    assert ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit)
    assert fit.calls == 1 and fit.resumed_from[0].uri() == registry.output(key, 1).uri()  # its checks decide
    assert registry.set_in_use(key).uri() == registry.output(key, 2).uri()
    assert registry.set_in_use(key).problem(EPOCHS, 4) is None
    assert not ensure_teacher(spec, run_spec, "s/t3", registry, layout, fit=fit) and fit.calls == 1  # repaired
    assert summarize(spec, layout).corrupt_checkpoints_retrained == 1


def test_an_interrupted_retraining_is_resumed_and_counted_once(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    write_teacher(registry.folder(key).storage, 1.0)
    model_file = tmp_path / "teachers" / key / "epoch_4" / "model.pt"
    model_file.write_bytes(b"garbage")

    def crash(registry, key, handle):
        registry.output(key, handle.generation).write_text(RESUME_STATE, "its state")
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit(before=crash))
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit)  # the lease was released
    assert fit.resumed_from[0].uri() == registry.output(key, 1).uri()  # the first retraining goes on
    assert len(layout.integrity_events()) == 1


def test_a_teacher_stored_under_the_key_an_older_version_gave_it_is_reused(tmp_path):
    """`checkpoint_epochs: null` hashed as written once; that folder still serves the training."""
    spec, _, layout, registry, _ = registry_setup(tmp_path)
    spec = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"checkpoint_epochs": None})})
    run_spec = spec.run_spec({"rho": 0.1, "alpha": 0.9, "teacher_epoch": 4})
    key = run_spec.teacher_key(1)
    (older, *_) = run_spec.legacy_teacher_keys(1)
    write_teacher(registry.folder(older).storage, 1.0)
    fit = FakeFit()
    assert not ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit) and fit.calls == 0
    assert registry.set_in_use(key) is None
    assert registry.set_in_use(key, [older]).uri() == registry.folder(older).uri()


def test_a_claim_racing_an_older_holders_publication_keeps_it(tmp_path, monkeypatch):
    """The older holder's publication lands between the new holder's read of the pointer and its
    create: the claim, built again on the newest version, keeps that set in use (it was finished
    before the claim), rather than naming what it had read before."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    assert registry.claim(key, 1)
    write_teacher(registry.output(key, 1), 1.0)
    sets = registry.folder(key).sets
    create = type(sets).create_exclusive
    raced = []

    def create_after_the_publication(self, rel, data):
        if not raced:
            raced.append(True)
            assert registry.publish(key, 1)  # the older holder, at just this moment
        return create(self, rel, data)

    monkeypatch.setattr(type(sets), "create_exclusive", create_after_the_publication)
    assert registry.claim(key, 2)
    assert registry.set_in_use(key).uri() == registry.output(key, 1).uri()
    assert not registry.publish(key, 1)  # and from now on the older one adds nothing


def test_the_next_holder_resumes_from_the_newest_generation_that_left_a_state(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    registry.output(key, 1).write_text(RESUME_STATE, "epoch 30")
    registry.output(key, 2).write_text("resume/state.pt.tmp-1234", "killed while writing its first")
    assert registry.resume_source(key, 3).uri() == registry.output(key, 1).uri()
    assert registry.resume_source(key, 1) is None


def test_a_waiter_reads_a_corrupt_set_in_use_once_not_at_every_poll(tmp_path, monkeypatch):
    """While another trial retrains a key whose set in use is corrupt, each waiting trial checked
    that set's sha256 at every poll (2 s): the whole checkpoint read again and again, a ViT-L's
    gigabyte a time, in a driver process with a tenth of a CPU (a read per poll before)."""
    from remem_ray.sweep import registry as registry_module

    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    write_teacher(registry.folder(key).storage, 1.0)
    model_file = tmp_path / "teachers" / key / "epoch_4" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    reads = []
    real_verify = registry_module.verify_checkpoint

    def counting_verify(storage, rel):
        reads.append(rel)
        return real_verify(storage, rel)

    monkeypatch.setattr(registry_module, "verify_checkpoint", counting_verify)
    corrupt: set[str] = set()
    for _ in range(3):
        assert not trial_module._usable(registry, key, [], EPOCHS, 4, corrupt)
    assert reads == ["epoch_4"] and corrupt == {registry.folder(key).uri()}
    # the retrained set, published, is read (once) and used
    write_teacher(registry.output(key, 1), 3.0)
    assert registry.claim(key, 1) and registry.publish(key, 1)
    assert trial_module._usable(registry, key, [], EPOCHS, 4, corrupt) and reads == ["epoch_4", "epoch_4"]


def test_waiters_ride_out_a_storage_outage_as_holders_do_and_fail_on_a_longer_one(tmp_path, monkeypatch):
    """A holder's renewals survive an outage shorter than the stale window; a waiter's looks did
    not (the trial failed at its first unanswered look, burning a retry per look)."""
    monkeypatch.setattr(trial_module, "POLL_S", 0.01)
    clock = [0.0]
    monkeypatch.setattr(trial_module, "Waiter", functools.partial(Waiter, clock=lambda: clock[0]))
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    real_usable, unanswered = trial_module._usable, [5]

    def usable(*args):
        if unanswered[0] > 0:
            unanswered[0] -= 1
            clock[0] += 10.0  # 5 looks: 40 s between the first failure and the last, inside the 60 s window
            raise ResourceError("storage: s3://bucket/teachers: connection refused")
        return real_usable(*args)

    monkeypatch.setattr(trial_module, "_usable", usable)
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit, stale_after_s=60) and fit.calls == 1
    unanswered[0] = 1000  # an outage that outlasts the window: the trial fails, naming storage
    with pytest.raises(ResourceError, match="connection refused"):
        ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit, stale_after_s=60)
    assert 1000 - unanswered[0] == 8  # looks 10 s apart until 70 s > 60 s had failed


def test_a_teacher_holder_whose_process_ended_is_taken_over_at_once(tmp_path, monkeypatch):
    """A trial process that ended holding a teacher's lease (killed, or ended by Tune before its
    release landed): before, its waiters waited out the stale window."""
    monkeypatch.setattr(trial_module, "POLL_S", 0.01)
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    leave_lease_held_by_an_ended_process(registry.folder(key).lease, "s/t0")
    spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"teacher_wait_timeout_s": 2.0})})
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit) and fit.calls == 1


def test_a_pointer_version_damaged_from_outside_is_one_line_naming_it(tmp_path):
    """Versions are exclusive creates, so only something outside can damage one; before, every
    trial of the key failed on it with a JSONDecodeError traceback, for good."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit())
    sets = registry.folder(key).sets
    newest = sorted(sets.list_dir())[-1]
    sets.write_text(newest, '{"generation": ')
    with pytest.raises(ResourceError, match=rf"pointer version {sets.uri(newest)} is unreadable .*: remove it"):
        registry.set_in_use(key)
    sets.delete_file(newest)
    assert registry.set_in_use(key) is None  # the version before it in force: the claim, made before any set


def test_a_trial_whose_run_ended_between_publishing_its_teacher_and_its_record_still_trained_it(tmp_path, monkeypatch):
    """A run publishes its teacher, then writes the sweep's record of who trained it: a run ended
    between the two (its node lost) left a teacher nobody trained. Tune's restart of the trial found
    it stored and called it reused, and the sweep counted one training fewer. The pointer names its
    publisher now, and the restarted trial writes the record. Failed before: the restart said reused."""
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    record = layout.record_teacher_training

    def node_lost(*args, **kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(layout, "record_teacher_training", node_lost)
    with pytest.raises(RuntimeError, match="node lost"):
        ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit())
    assert registry.published_by(key) == "s/t1" and layout.trained_by(key) is None
    monkeypatch.setattr(layout, "record_teacher_training", record)
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit)  # the restarted trial: its own
    assert fit.calls == 0 and layout.trained_by(key) == "t1" and layout.teacher_trainings() == [key]
    assert not ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit)  # another trial: reused
    other = registry_setup(tmp_path, name="other")  # another sweep on the root, a trial of the same id
    assert not ensure_teacher(other[0], other[1], "other/t1", other[3], other[2], fit=fit)
    assert fit.calls == 0 and other[2].teacher_trainings() == []


def test_a_set_whose_check_failed_once_is_used_once_the_holder_finds_it_whole(tmp_path, monkeypatch):
    """A stored set's sha256 check fails once (a bad read), so the trial takes the lease to train
    again, and, holding it, finds the set whole. Before, that read as "lost the lease": the trial
    skipped the set it had marked corrupt and took its own released lease again, forever, with
    no wait and no timeout, a new lease record and pointer version each turn."""
    from remem_ray.sweep.registry import TeacherSet

    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit())
    verify, failures = TeacherSet.verify, ["checkpoint: epoch_4/model.pt does not match its sha256"]
    monkeypatch.setattr(TeacherSet, "verify", lambda self, epoch: failures.pop() if failures else verify(self, epoch))
    takes = []
    try_acquire = Lease.try_acquire

    def counted(self, *args, **kwargs):
        takes.append(self.holder)
        assert len(takes) < 5, "the trial keeps taking the lease"
        return try_acquire(self, *args, **kwargs)

    monkeypatch.setattr(Lease, "try_acquire", counted)
    fit = FakeFit(weight=2.0)
    assert ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit) is False  # stored: reused
    assert fit.calls == 0 and takes == ["s/t2"] and layout.trained_by(key) == "t1"
    assert registry.set_in_use(key).uri() == registry.output(key, 1).uri()


@pytest.mark.parametrize("where", ["claim", "finished record"])
def test_a_storage_blip_right_after_the_lease_is_taken_or_the_run_ends_is_ridden_out(where, tmp_path, monkeypatch):
    """The looks around the teacher's Train run ride out an outage as the looks before the lease
    do. Before, a failed claim failed the trial; a failed read of the finished record, after
    the run had published the teacher, failed a trial whose teacher was stored (one of Tune's
    retries spent, or with none left the finished work marked ERROR)."""
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.registry import TeacherRegistry

    monkeypatch.setattr(trial_module, "POLL_S", 0.01)
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    method = (TeacherRegistry, "claim") if where == "claim" else (SweepLayout, "teacher_training")
    real, blips = getattr(*method), [ResourceError("storage: s3://bucket/teachers: connection reset")]

    def once_unanswered(self, *args, **kwargs):
        if blips:
            raise blips.pop()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(*method, once_unanswered)
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit, stale_after_s=60) is True
    assert not blips and fit.calls == 1 and layout.trained_by(key) == "t1"  # trained once, counted as its own


def test_a_storage_error_from_the_teacher_run_itself_is_not_retried_by_the_trial(tmp_path, monkeypatch):
    """Only the looks around the run are ridden out: a run that raised is Tune's to retry (looping
    here could train again and again while storage answers every look)."""
    monkeypatch.setattr(trial_module, "POLL_S", 0.01)
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    fit = FakeFit(before=lambda registry, key, handle: (_ for _ in ()).throw(ResourceError("storage: run's write")))
    with pytest.raises(ResourceError, match="run's write"):
        ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit, stale_after_s=60)
    assert fit.calls == 1 and registry.lease(key, "other", 60).holder_now() is None  # released


def test_the_looks_under_the_lease_ride_out_on_their_own_clock(tmp_path, monkeypatch):
    """A blip on the finished record after a run longer than teacher_wait_timeout_s is ridden out
    (it raised the waiter's TimeoutError: the run counted as a wait), and a look that fails every
    time under the lease fails the trial after the stale window (the looks before the lease
    answered, resetting the outage: it was retried until the wait's deadline, hours on)."""
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.registry import TeacherRegistry

    monkeypatch.setattr(trial_module, "POLL_S", 0.001)
    clock = [0.0]
    monkeypatch.setattr(trial_module, "Waiter", functools.partial(Waiter, clock=lambda: clock[0]))
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    spec = spec.model_copy(update={"sweep": spec.sweep.model_copy(update={"teacher_wait_timeout_s": 600.0})})
    real_record, blips = SweepLayout.teacher_training, [ResourceError("storage: connection reset")]

    def record_after_a_blip(self, *args, **kwargs):
        if blips:
            raise blips.pop()
        return real_record(self, *args, **kwargs)

    def a_long_run(registry, key, handle):
        clock[0] += 3600.0  # an hour of training, past the 10-minute wait for a teacher

    monkeypatch.setattr(SweepLayout, "teacher_training", record_after_a_blip)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit(before=a_long_run), stale_after_s=60)
    assert not blips

    claims = []

    def claim_never_answered(self, *args, **kwargs):
        claims.append(clock[0])
        clock[0] += 10.0
        raise ResourceError("storage: s3://bucket/teachers/sets: access denied")

    other = run_spec.model_copy(update={"teacher": run_spec.teacher.model_copy(update={"rho": 0.2})})
    monkeypatch.setattr(TeacherRegistry, "claim", claim_never_answered)
    with pytest.raises(ResourceError, match="access denied"):
        ensure_teacher(spec, other, "s/t2", registry, layout, fit=FakeFit(), stale_after_s=60)
    assert len(claims) == 8  # 10 s apart until 70 s > 60 s had failed
