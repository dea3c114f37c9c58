"""Leases in storage, one suite for both backends (local folder, S3)."""

from __future__ import annotations

import threading

import pytest

from remem_ray.leases import Lease, LeaseHandle, current_record


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lease(store, holder, clock=None, stale_after_s=60.0):
    return Lease(store.child("lease"), holder, stale_after_s, clock or FakeClock())


def _race(contenders: list[Lease]) -> list[str]:
    """All try to take the lease at the same moment; the holders that got it."""
    start, winners = threading.Barrier(len(contenders)), []

    def race(contender):
        start.wait()
        if contender.try_acquire():
            winners.append(contender.holder)

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
    first = lease(store, "sweep/trial_1")
    assert first.try_acquire()
    stale_handle = first.handle()
    again = lease(store, "sweep/trial_1")  # the same trial after a crash, a new process
    assert again.try_acquire()
    assert stale_handle.lost() is not None and again.handle().lost() is None
    assert not first.renew()


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
