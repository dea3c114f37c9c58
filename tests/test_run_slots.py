"""The run-slot book: no more Train runs at once than its measure holds (so many runs, or so many
GPUs with each run weighing its role's), taken in the order trials asked."""

from __future__ import annotations

import threading
import time

import pytest

from remem_ray.config import SweepSpec
from remem_ray.sweep import run_slots
from remem_ray.sweep.run_slots import QUEUE_FORGET_S, RunSlotBook, SlotState, book_name
from remem_ray.sweep.slots import SlotMeasure


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _book(slots: int = 2, stale_after_s: float = 60.0, measure: SlotMeasure | None = None) -> tuple[RunSlotBook, Clock]:
    clock = Clock()
    return RunSlotBook(measure or SlotMeasure(slots), stale_after_s, clock), clock


def test_a_crowd_released_at_once_runs_slots_at_a_time_in_the_order_it_asked():
    book, _ = _book(slots=2)
    assert book.take("a") and book.take("b")
    for waiter in ("c", "d", "e"):
        assert not book.take(waiter)
    assert book.state("d") == SlotState(in_use=2, capacity=2, ahead=1)
    book.release("a")
    assert not book.take("e")  # c asked first: the free slot is c's, even if e asks before c again
    assert not book.take("d")
    assert book.take("c")
    book.release("b")
    book.release("c")
    assert book.take("e") and book.take("d")  # two free slots: the first two in line take them
    assert book.state("x") == SlotState(in_use=2, capacity=2, ahead=0)


def test_runs_weigh_their_roles_gpus_and_a_light_run_fills_room_a_heavy_one_waits_for():
    """4-GPU teachers and 1-GPU students on 16 GPUs: one slot per run kept 4 runs at once, so 4
    students distilled on 16 GPUs. Weighed, a teacher run waiting for 4 GPUs leaves the 3 free to
    a student behind it, and takes 4 that free up at once before anyone behind it."""
    book, _ = _book(measure=SlotMeasure(16, teacher=4, student=1, by_gpus=True))
    assert all(book.take(f"t{i}", "teacher") for i in range(4))
    assert not book.take("s0", "student")  # 16 of 16 in use
    book.release("t0")
    assert book.take("s0", "student") and all(book.take(f"s{i}", "student") for i in (1, 2))
    assert not book.take("T", "teacher")  # 1 GPU free: waits, first in line
    assert book.state("x") == SlotState(in_use=15, capacity=16, ahead=1, by_gpus=True)
    assert book.take("s3", "student")  # fits beside the waiting teacher
    assert book.state("x").describe() == "16 of 16 GPUs in use, 1 ahead"
    book.release("t1")  # 4 free: the teacher's, though a student asks first
    assert not book.take("s4", "student")
    assert book.take("T", "teacher") and book.take("s4", "student") is False
    for student in ("s0", "s1", "s2", "s3"):
        book.release(student)
    assert all(book.take(f"s{i}", "student") for i in range(4, 8))


def test_a_waiting_teacher_run_is_passed_only_for_a_while_then_the_room_is_held_for_it():
    """Students finishing one at a time each handed their GPU to the next student behind the
    waiting teacher: with 20 students queued after it, it started after all 20 (a review's
    simulation). Past PASS_WINDOW_S the room that frees is the teacher's."""
    book, clock = _book(stale_after_s=3600, measure=SlotMeasure(16, teacher=4, student=1, by_gpus=True))
    assert all(book.take(f"s{i}", "student") for i in range(16))
    assert not book.take("T", "teacher")
    waiting = [f"w{i}" for i in range(20)]
    assert not any(book.take(w, "student") for w in waiting)
    book.release("s0")
    assert book.take("w0", "student")  # within the window a student may use the free GPU
    while clock.now <= run_slots.PASS_WINDOW_S:  # all of them asking again, as they do every second
        clock.now += 10
        assert not book.take("T", "teacher") and not any(book.take(w, "student") for w in waiting[1:])
    started = []
    for finished in range(1, 5):
        book.release(f"s{finished}")
        started += [w for w in waiting[1:] if book.take(w, "student")]
        if book.take("T", "teacher"):
            break
    assert started == [] and finished == 4  # the four GPUs the next four students freed
    assert book.state("x") == SlotState(in_use=16, capacity=16, ahead=19, by_gpus=True)


def test_a_trial_that_holds_a_slot_takes_the_weight_of_its_run_now():
    """A trial restarted within the stale window finds its slot its own: a lighter run keeps it at
    the lighter weight; a heavier one (its stored teacher found corrupt: it trains it again)
    asks as anyone would, rather than run 4 GPUs on the book's count of 1."""
    book, _ = _book(measure=SlotMeasure(4, teacher=4, student=1, by_gpus=True))
    assert book.take("a", "teacher")
    assert book.take("a", "student") and book.state("x").in_use == 1  # its release was lost
    assert book.take("b", "student") and book.take("c", "student")
    assert not book.take("a", "teacher")  # 3 in use without a: waits for 4
    book.release("b")
    book.release("c")
    assert book.take("a", "teacher") and book.state("x").in_use == 4


def test_a_run_heavier_than_the_measure_runs_alone():
    book, _ = _book(measure=SlotMeasure(2, teacher=4, student=1, by_gpus=True))
    assert book.take("s", "student") and not book.take("T", "teacher")
    book.release("s")
    assert book.take("T", "teacher") and not book.take("s", "student")


def test_a_restarted_trial_finds_its_slot_still_its_own():
    book, _ = _book(slots=1)
    assert book.take("a")
    assert not book.take("b")
    assert book.take("a")  # the same trial id, after Tune restarted it
    assert book.state("b").in_use == 1


def test_a_slot_whose_holder_stopped_renewing_is_freed_after_the_stale_window():
    book, clock = _book(slots=1, stale_after_s=60)
    assert book.take("a")
    clock.now = 50
    book.renew("a")
    assert not book.take("b")
    clock.now = 105  # 55 s since a's last renewal: still a's
    assert not book.take("b")
    clock.now = 111  # 61 s: a died without its finally
    assert book.take("b")
    book.renew("a")  # a was only slow: the book counts its run again (the truth) rather than lose it
    assert book.state("c") == SlotState(in_use=2, capacity=1, ahead=0)
    assert not book.take("c")


def test_a_trial_that_stopped_asking_leaves_the_line():
    book, clock = _book(slots=1)
    assert book.take("a")
    assert not book.take("gone")  # asks once, then dies while queued
    clock.now = 10
    assert not book.take("b")
    book.release("a")
    assert not book.take("b")  # "gone" is still first in line
    clock.now = QUEUE_FORGET_S + 1
    assert book.take("b")


def test_each_sweep_has_its_own_book():
    a = SweepSpec.model_validate({"name": "a", "storage": {"root": "/r1"}})
    assert book_name(a) == book_name(SweepSpec.model_validate({"name": "a", "storage": {"root": "/r1"}}))
    assert book_name(a) != book_name(SweepSpec.model_validate({"name": "a", "storage": {"root": "/r2"}}))
    assert book_name(a) != book_name(SweepSpec.model_validate({"name": "b", "storage": {"root": "/r1"}}))


class FakeMethod:
    def __init__(self, book: RunSlotBook, name: str, calls: list) -> None:
        self.book, self.name, self.calls = book, name, calls

    def remote(self, *args):
        self.calls.append((self.name, *args))
        return getattr(self.book, self.name)(*args)


class FakeActor:
    """The book's actor, in process: each method's .remote() answers at once."""

    def __init__(self, book: RunSlotBook) -> None:
        self.calls: list = []
        for name in ("take", "renew", "release", "state"):
            setattr(self, name, FakeMethod(book, name, self.calls))


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def in_process_book(monkeypatch):
    book, _ = _book(slots=1)
    actor = FakeActor(book)
    monkeypatch.setattr(run_slots, "_find_book", lambda spec, trial_id: actor)
    monkeypatch.setattr(run_slots, "_call", lambda method, *args: method.remote(*args))
    monkeypatch.setattr(run_slots, "POLL_S", 0.01)
    return book, actor


def test_a_trial_waits_in_line_then_holds_its_slot_for_its_run_and_gives_it_back(in_process_book, capsys):
    book, actor = in_process_book
    spec = SweepSpec.model_validate({"name": "s"})
    assert book.take("t0")  # another trial's run holds the only slot
    entered = threading.Event()
    running_inside: list[int] = []

    def trial() -> None:
        with run_slots.run_slot(spec, "t1", "teacher", timeout_s=30):
            running_inside.append(book.state("x").in_use)
            entered.set()

    thread = threading.Thread(target=trial)
    thread.start()
    _wait_for(lambda: ("state", "t1") in actor.calls)  # refused once: queued behind t0
    assert not entered.is_set()
    book.release("t0")
    thread.join(10)
    assert entered.is_set() and not thread.is_alive() and running_inside == [1]
    assert book.state("x").in_use == 0  # given back after the run
    assert ("take", "t1", "teacher") in actor.calls and ("release", "t1") in actor.calls
    out = capsys.readouterr().out
    assert "trial t1: waiting for a Train run slot (1 of 1 running, 0 ahead)" in out, (out, actor.calls)


def test_a_trial_gives_its_slot_back_when_its_run_fails(in_process_book):
    book, _ = in_process_book
    spec = SweepSpec.model_validate({"name": "s"})
    with pytest.raises(RuntimeError, match="run failed"):
        with run_slots.run_slot(spec, "t1", "teacher", timeout_s=30):
            raise RuntimeError("run failed")
    assert book.take("t2")


def test_a_trial_waiting_past_its_timeout_fails_with_a_line_naming_the_slot(in_process_book):
    book, _ = in_process_book
    spec = SweepSpec.model_validate({"name": "s"})
    assert book.take("t0")
    with pytest.raises(TimeoutError, match="a Train run slot: not ready after"):
        with run_slots.run_slot(spec, "t1", "teacher", timeout_s=0.05):
            pass


def test_outside_a_driver_run_the_run_goes_without_a_book():
    # no Ray here: the trial's logic tested on its own (tests/test_trial.py) runs ungated
    spec = SweepSpec.model_validate({"name": "s"})
    ran = []
    with run_slots.run_slot(spec, "t1", "teacher", timeout_s=1):
        ran.append(1)
    assert ran == [1]


def test_no_renewal_brings_a_released_slot_back(in_process_book):
    """Tune stopping a trial releases its slot from the heartbeat's watch thread while the renewal
    thread still runs: a renewal after the release must not count the ended run again (it did:
    the book held the slot of a gone trial for the stale window)."""
    book, actor = in_process_book
    slot = run_slots._Slot(actor, "t1", "teacher")
    assert book.take("t1")
    assert slot.renew()
    slot.release()
    assert not slot.renew()
    assert book.state("x").in_use == 0 and book.take("t2")
    slot.release()  # once only
    assert actor.calls.count(("release", "t1")) == 1


def test_a_queued_trial_that_tune_stops_leaves_the_line_at_once(in_process_book):
    book, _ = in_process_book
    spec = SweepSpec.model_validate({"name": "s"})
    assert book.take("t0")
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(SystemExit) as ended:  # as Train's own report ends a stopped trial's thread
        with run_slots.run_slot(spec, "t1", "teacher", timeout_s=30, stopping=stopping):
            pass
    assert ended.value.code == 0
    book.release("t0")
    assert book.state("t2").ahead == 0 and book.take("t2")  # t1 is out of the line


def test_a_trial_whose_wait_timed_out_leaves_the_line(in_process_book):
    book, _ = in_process_book
    spec = SweepSpec.model_validate({"name": "s"})
    assert book.take("t0")
    with pytest.raises(TimeoutError):
        with run_slots.run_slot(spec, "t1", "teacher", timeout_s=0.05):
            pass
    book.release("t0")
    assert book.take("t2")
