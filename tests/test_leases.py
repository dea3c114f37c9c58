"""Leases in storage, one suite for both backends (local folder, S3)."""

from __future__ import annotations

import threading

import pytest
from helpers.leases import lease_held_by_a_live_process, leave_lease_held_by_an_ended_process

from remem_ray.errors import ResourceError
from remem_ray.leases import Lease, LeaseHandle, LeaseWatch, current_record, process_gone
from remem_ray.storage import Storage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lease(store, holder, clock=None, stale_after_s=60.0):
    return Lease(store.child("lease"), holder, stale_after_s, clock or FakeClock())


def _race(contenders: list[Lease]) -> list[str]:
    """All take the lease at the same moment, forced: each contender's exclusive create waits at a barrier
    until every contender has got there, so all of them pass the "is it free" check first and then race in
    `create_exclusive` itself (without it, a late contender sees the winner's record and gives up before
    reaching the create, and the race tests nothing). The holders that got the lease."""
    n = len(contenders)
    start, at_create = threading.Barrier(n), threading.Barrier(n, timeout=30)
    winners: list[str] = []
    creates: list[tuple[str, str, bool]] = []  # (holder, record name, created) for each exclusive create
    errors: list[BaseException] = []

    def gate(contender: Lease) -> None:
        real = contender.folder.create_exclusive  # each contender has its own Storage of the folder

        def create_exclusive(rel: str, data: bytes) -> bool:
            at_create.wait()  # broken (the test fails) if some contender never reaches its create
            created = real(rel, data)
            creates.append((contender.holder, rel, created))
            return created

        contender.folder.create_exclusive = create_exclusive  # type: ignore[method-assign]

    def race(contender: Lease) -> None:
        try:
            start.wait()
            if contender.try_acquire():
                winners.append(contender.holder)
        except BaseException as exc:  # reported below, from the test thread
            errors.append(exc)
            at_create.abort()

    for c in contenders:
        gate(c)
    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(holder for holder, _, _ in creates) == sorted(c.holder for c in contenders)  # all got there
    assert len({rel for _, rel, _ in creates}) == 1  # all for the same generation's record
    # the lease went to whoever's exclusive create won, and to nobody else (a lost create is no win)
    assert sorted(holder for holder, _, created in creates if created) == sorted(winners), (creates, winners)
    return winners


def test_one_holder_at_a_time_until_release(store):
    a, b = lease(store, "sweep-1/a"), lease(store, "sweep-2/b")
    assert a.try_acquire()
    assert not b.try_acquire() and b.holder_now() == "sweep-1/a"
    assert a.renew() and not b.try_acquire()
    a.release()
    assert b.holder_now() is None
    assert b.try_acquire() and b.holder_now() == "sweep-2/b"
    with pytest.raises(RuntimeError, match="not held"):
        a.handle()  # released: a holds nothing


def test_a_stale_holder_is_taken_over_and_finds_out(store):
    clock = FakeClock()
    a, b = lease(store, "a", clock), lease(store, "b", clock)
    assert a.try_acquire()
    handle = a.handle()
    assert not b.try_acquire()  # first sight of a's record
    clock.now = 50
    assert a.renew()  # a beat: the record changed
    clock.now = 100
    assert not b.try_acquire()  # changed 50 s ago... as b saw it now: the wait starts again
    clock.now = 159
    assert not b.try_acquire()
    clock.now = 161  # unchanged for 61 s of b's clock
    assert b.try_acquire()
    assert "passed to b" in handle.lost()
    assert not a.renew()  # a learns it at its next beat and holds nothing more
    a.release()  # a no-op for a lost lease: b's record stays in force
    assert current_record(store.child("lease")).holder == "b" and not current_record(store.child("lease")).released
    assert b.handle().lost() is None


def test_a_restarted_holder_takes_its_lease_back_at_once(store):
    """The same trial after a crash, in a new process of this host: the record's process has ended."""
    folder = store.child("lease")
    leave_lease_held_by_an_ended_process(folder, "sweep/trial_1")
    ended = current_record(folder)
    stale_handle = LeaseHandle(folder.uri(), folder.endpoint, folder.region, ended.generation, ended.token)
    again = lease(store, "sweep/trial_1")
    assert again.try_acquire(gone=process_gone)
    assert stale_handle.lost() is not None and again.handle().lost() is None


def test_a_live_copy_of_the_same_holder_waits_for_it_to_end_or_go_stale(store):
    """Two copies of one trial at once (a driver frozen while its trials train on, and the new
    driver's rerun of them): one holder name, two live processes. The second waits as anyone does;
    taking the lease at once, the two copies took it from each other in turn, forever."""
    clock = FakeClock()
    copy = lease(store, "sweep/trial_1", clock)
    with lease_held_by_a_live_process(store.child("lease"), "sweep/trial_1"):
        assert not copy.try_acquire(gone=process_gone)
        clock.now = 59.0
        assert not copy.try_acquire(gone=process_gone)
        assert current_record(store.child("lease")).generation == 1
    assert copy.try_acquire(gone=process_gone)  # ended: at once, long before the stale window
    assert current_record(store.child("lease")).generation == 2

    with lease_held_by_a_live_process(store.child("lease2"), "sweep/trial_2"):
        stale = Lease(store.child("lease2"), "sweep/trial_2", 60.0, clock)
        assert not stale.try_acquire(gone=process_gone)
        clock.now += 60.0  # no beat for the stale window: taken over, alive or not
        assert stale.try_acquire(gone=process_gone)


def test_handle_travels_as_plain_data(store):
    a = lease(store, "a")
    assert a.try_acquire()
    handle = LeaseHandle.from_dict(a.handle().to_dict())
    assert handle == a.handle() and handle.lost() is None


def test_only_the_newest_generations_are_kept(store):
    for i in range(5):
        holder = lease(store, f"h{i}")
        assert holder.try_acquire()
        holder.release()
    assert store.child("lease").list_dir() == ["00000004.json", "00000005.json"]


def test_racing_contenders_on_a_free_lease_get_one_winner(store):
    contenders = [lease(store, f"sweep-{i}/trial") for i in range(6)]
    winners = _race(contenders)
    assert len(winners) == 1
    assert current_record(store.child("lease")).holder == winners[0]


def test_racing_takeovers_of_a_stale_lease_get_one_winner(store):
    dead = lease(store, "dead")
    assert dead.try_acquire()
    clock = FakeClock()
    contenders = [lease(store, f"c{i}", clock, stale_after_s=0.5) for i in range(6)]
    for c in contenders:
        assert not c.try_acquire()  # each sees the record once
    clock.now = 1.0
    winners = _race(contenders)
    assert len(winners) == 1
    record = current_record(store.child("lease"))
    assert record.holder == winners[0] and record.generation == 2


def _unreachable(storage: Storage, monkeypatch) -> None:
    """Every read and write of `storage` fails as an outage does (pyarrow's retries spent)."""

    def fail(*args, **kwargs):
        raise ResourceError(f"storage: cannot reach {storage.uri()}")

    for name in ("read_text", "read_bytes", "write_text", "write_bytes", "list_dir", "exists", "is_file"):
        monkeypatch.setattr(storage, name, fail)


def test_a_holder_cut_off_from_storage_longer_than_the_stale_window_stops(tmp_path, monkeypatch):
    """Shorter than the window an outage is not a loss; one that lasts the window is (others may
    have taken over; the holder cannot know): for the heartbeat's renew counted from the last beat
    storage took, for a worker's checks from the check's first error. Neither raises."""
    clock = [0.0]
    lease = Lease(Storage(str(tmp_path / "lease")), "a", 60.0, clock=lambda: clock[0])
    assert lease.try_acquire()
    handle = lease.handle()
    clock[0] = 5.0
    assert lease.renew()  # the last beat storage takes
    _unreachable(lease.folder, monkeypatch)
    clock[0] = 30.0
    assert lease.renew()
    clock[0] = 64.9
    assert lease.renew()
    clock[0] = 65.0
    assert not lease.renew()

    answers = iter([ResourceError("down"), ResourceError("down"), None])

    def flaky(self):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(LeaseHandle, "lost", flaky)
    watch = LeaseWatch(handle, clock=lambda: clock[0], sleep=sleep)
    assert watch.lost() is None and clock[0] == 75.0  # asked again until storage answered

    def down(self):
        raise ResourceError("down")

    monkeypatch.setattr(LeaseHandle, "lost", down)
    assert "storage unreachable for 60 s" in watch.lost()


def test_a_renewal_that_fails_after_a_minute_of_retries_counts_the_outage_from_the_last_beat(tmp_path, monkeypatch):
    """One renewal can spend about a minute in S3 retries before it fails. The outage was counted
    from that first failure, so the holder went on for another window while waiters, who saw no
    beat since the last one, had taken over. Failed before: this renew returned True."""
    clock = [0.0]
    lease = Lease(Storage(str(tmp_path / "lease")), "a", 60.0, clock=lambda: clock[0])
    assert lease.try_acquire()
    clock[0] = 5.0
    assert lease.renew()
    _unreachable(lease.folder, monkeypatch)
    clock[0] = 70.0  # the next renewal's retries ran out 65 s after the last beat
    assert not lease.renew()


def test_a_release_is_never_undone_by_a_renewal_still_in_flight(tmp_path):
    lease = Lease(Storage(str(tmp_path / "lease")), "a", 60.0)
    assert lease.try_acquire()
    in_flight, go_on = threading.Event(), threading.Event()
    rewrite = lease._rewrite

    def slow_rewrite(record, **changes):
        if "beat" in changes:  # the renewal's write, held up (a slow S3 PUT)
            in_flight.set()
            go_on.wait(30)
        return rewrite(record, **changes)

    lease._rewrite = slow_rewrite
    renewer = threading.Thread(target=lease.renew)
    renewer.start()
    assert in_flight.wait(30)
    releaser = threading.Thread(target=lease.release)
    releaser.start()
    releaser.join(2)  # a release that does not wait for the renewal would be done by now
    go_on.set()
    renewer.join(30)
    releaser.join(30)
    assert current_record(lease.folder).released
    assert not lease.renew()  # none follows a release


def test_a_failing_prune_never_fails_the_new_holder(tmp_path, monkeypatch):
    folder = Storage(str(tmp_path / "lease"))
    for holder in ("a", "b"):  # generations worth pruning
        old = Lease(folder, holder, 60.0)
        assert old.try_acquire()
        old.release()
    lease = Lease(folder, "c", 60.0)
    real_prune = lease._prune

    def break_then_prune(generation):
        _unreachable(folder, monkeypatch)  # storage goes away once the lease is ours
        real_prune(generation)

    monkeypatch.setattr(lease, "_prune", break_then_prune)
    assert lease.try_acquire() and lease.record is not None


def test_a_contender_that_stalled_while_others_came_and_went_does_not_take_the_lease(store, monkeypatch):
    """It saw generation 1 released and stalled while three holders took the lease in turn (the
    last one pruning generations up to 2); its exclusive create of generation 2 then succeeds in an
    empty slot, but the lease is the fourth generation's. Before, it believed it held it."""
    import remem_ray.leases as leases_module

    first = lease(store, "h1")
    assert first.try_acquire()
    first.release()
    seen_before_the_stall = current_record(first.folder)
    for name in ("h2", "h3"):
        taker = lease(store, name)
        assert taker.try_acquire()
        taker.release()
    holder = lease(store, "h4")
    assert holder.try_acquire() and current_record(holder.folder).generation == 4
    assert not store.child("lease").is_file("00000002.json")  # pruned

    real, looks = leases_module.current_record, []

    def stale_first_look(folder):
        looks.append(folder)
        return seen_before_the_stall if len(looks) == 1 else real(folder)

    monkeypatch.setattr(leases_module, "current_record", stale_first_look)
    stalled = lease(store, "stalled")
    assert not stalled.try_acquire() and stalled.record is None
    monkeypatch.setattr(leases_module, "current_record", real)
    assert holder.renew() and current_record(holder.folder).holder == "h4"


def test_a_beat_that_took_retries_to_return_counts_from_when_it_was_sent(tmp_path, monkeypatch):
    """A renewal whose PUT landed at once but returned after 50 s of retries (a lost answer):
    waiters saw the beat at once and count their window from then. The holder counted from the
    return and went on 50 s past the window in the outage that followed."""
    clock = [0.0]
    lease = Lease(Storage(str(tmp_path / "lease")), "a", 60.0, clock=lambda: clock[0])
    assert lease.try_acquire()
    real_write = lease.folder.write_text

    def write_then_slow_answer(rel, text):
        real_write(rel, text)
        clock[0] += 50.0

    monkeypatch.setattr(lease.folder, "write_text", write_then_slow_answer)
    clock[0] = 5.0
    assert lease.renew() and clock[0] == 55.0
    _unreachable(lease.folder, monkeypatch)
    clock[0] = 66.0  # 61 s after the beat was sent (and landed)
    assert not lease.renew()


def test_an_outage_right_after_the_create_raises_and_the_same_holder_takes_its_record_back(tmp_path, monkeypatch):
    """The check that the new record is the newest reads storage once more: an outage there is an
    error of the take (the caller rides it out or fails in one line), never a lease believed held;
    the record it left is this holder's to take back at once, and another's only once stale."""
    folder = Storage(str(tmp_path / "lease"))
    lease = Lease(folder, "s/t1", 60.0)
    created = folder.create_exclusive

    def create_then_break(rel, data):
        won = created(rel, data)
        _unreachable(folder, monkeypatch)
        return won

    monkeypatch.setattr(folder, "create_exclusive", create_then_break)
    with pytest.raises(ResourceError):
        lease.try_acquire()
    assert lease.record is None
    monkeypatch.undo()  # storage is back
    other = Lease(Storage(str(tmp_path / "lease")), "s/t2", 60.0)
    assert not other.try_acquire()
    assert lease.try_acquire() and current_record(folder).generation == 2 and current_record(folder).holder == "s/t1"
