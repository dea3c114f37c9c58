"""No more Train runs of a sweep at once than its slot measure holds (sweep/slots.py: so many
runs, or so many GPUs with each run weighing its workers' GPUs): a trial takes a run slot before
each fit() and gives it back after, in the order trials asked, from one small actor the driver owns.

Why: the searcher (sweep/slots.py) admits trials that wait for another's teacher without
counting them, since they hold no GPU while they wait. Once that teacher is stored they all want
a Train run at the same moment, up to twice as many as the measure holds. Without this gate Ray would
queue their workers, the queued time would count against `worker_start_timeout_s`, and Train
would fail and retry runs that only waited their turn. Here they wait before fit(), holding
no Train run (only their leases), and each run's start timeout measures a start.

The book describes what runs rather than granting a right to write, so it needs no fencing:
a holder renews its slot from a heartbeat thread while its run goes; a slot not renewed for the
stale window is freed (its trial died without its `finally`); a renewal of a freed slot counts
the run again (the book then shows more runs than slots, which is the truth); a restarted trial
(the same trial id) finds its slot still its own. A trial that stopped asking (it died while
queued) leaves the queue after QUEUE_FORGET_S.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from remem_ray.config import SweepSpec
from remem_ray.console import say
from remem_ray.sweep.slots import SlotMeasure, sweep_id

POLL_S = 1.0  # a queued trial asks again this often
QUEUE_FORGET_S = 30.0  # a queued trial not heard from this long has gone
PASS_WINDOW_S = 60.0  # how long lighter runs may pass one that waits for more room than is free
CALL_TIMEOUT_S = 30.0  # one call to the book's actor
BOOK_START_TIMEOUT_S = 120.0  # the actor's process start, on a loaded head node


@dataclass(frozen=True)
class SlotState:
    in_use: float  # what the running runs weigh (runs, or GPUs)
    capacity: float
    ahead: int  # trials queued before the one asking
    by_gpus: bool = False

    def describe(self) -> str:
        held = "GPUs in use" if self.by_gpus else "running"
        return f"{self.in_use:g} of {self.capacity:g} {held}, {self.ahead} ahead"


class RunSlotBook:
    """Who runs a Train run now, and who waits for one, in arrival order (plain logic; the driver
    runs it as a Ray actor). A run weighs what its role takes of the measure (slots.SlotMeasure).
    Walking down the line, each run that fits takes its weight; one that does not fit keeps its
    place, and for its first PASS_WINDOW_S in line lighter runs behind it may use the room (a
    teacher run waiting for 4 GPUs leaves the 3 free to students). After that the room is held
    for it: students finishing one at a time would otherwise each hand their GPU to the next
    student in line, and the teacher (and every trial waiting for its key) would wait for the
    whole line behind it."""

    def __init__(self, measure: SlotMeasure, stale_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.measure, self.stale_after_s, self._clock = measure, stale_after_s, clock
        self._running: dict[str, _Entry] = {}  # holder -> its run, last renewed
        self._queue: dict[str, _Entry] = {}  # holder -> its place, last asked, in arrival order

    def take(self, holder: str, role: str = "teacher") -> bool:
        """Take a slot for `holder`'s run of `role` if it fits once those before it in line that
        fit have theirs; else queue it (or keep its place)."""
        now, weight = self._clock(), self.measure.weight(role)
        self._forget(now)
        held = self._running.get(holder)
        if held is not None:
            if held.weight >= weight:  # its own, from before a restart (or a lighter run after a failed release)
                self._running[holder] = _Entry(held.since, now, weight)
                return True
            del self._running[holder]  # a heavier run now: it asks as anyone would
        queued = self._queue.get(holder)
        since = queued.since if queued is not None and queued.weight == weight else now
        self._queue[holder] = _Entry(since, now, weight)  # a new holder goes to the end
        free = self.measure.capacity - self._in_use()
        for name, entry in self._queue.items():
            if entry.weight > free + 1e-9:
                if now - entry.since >= PASS_WINDOW_S:
                    return False  # waited long enough: the room that frees is held for it
                continue  # it waits for more room; those behind it may fit
            if name == holder:
                del self._queue[holder]
                self._running[holder] = _Entry(now, now, weight)
                return True
            free -= entry.weight  # room kept for one ahead in line, taken when it asks again
        return False

    def renew(self, holder: str, role: str = "teacher") -> None:
        held = self._running.get(holder)
        now = self._clock()
        self._running[holder] = _Entry(held.since if held else now, now, self.measure.weight(role))
        self._queue.pop(holder, None)

    def release(self, holder: str) -> None:
        self._running.pop(holder, None)
        self._queue.pop(holder, None)

    def state(self, holder: str) -> SlotState:
        queued = list(self._queue)
        ahead = queued.index(holder) if holder in queued else len(queued)
        return SlotState(self._in_use(), self.measure.capacity, ahead, self.measure.by_gpus)

    def _in_use(self) -> float:
        return sum(entry.weight for entry in self._running.values())

    def _forget(self, now: float) -> None:
        for holder, entry in list(self._running.items()):
            if now - entry.last > self.stale_after_s:
                del self._running[holder]
        for holder, entry in list(self._queue.items()):
            if now - entry.last > QUEUE_FORGET_S:
                del self._queue[holder]


@dataclass(frozen=True)
class _Entry:
    since: float  # when it joined the line (or started running)
    last: float  # its last ask, or renewal
    weight: float


def book_name(spec: SweepSpec) -> str:
    """The book's actor name: one per sweep (two sweeps may run from one process)."""
    digest = hashlib.sha1("\n".join(sweep_id(spec)).encode()).hexdigest()[:16]
    return f"remem-run-slots-{digest}"


@contextlib.contextmanager
def run_slot_book(spec: SweepSpec, measure: SlotMeasure) -> Iterator[None]:
    """The driver's side: the sweep's book, as a named actor, while the block runs. The actor
    takes no CPU and dies with the driver, as the trials do. A book that does not start leaves
    the sweep ungated (it says so), never failed."""
    import ray

    if not ray.is_initialized():  # never a Ray of its own (an actor's .remote() would start one)
        yield
        return
    actor_class: Any = ray.remote(num_cpus=0, max_restarts=0)(RunSlotBook)
    options: dict[str, Any] = {"name": book_name(spec)}
    with contextlib.suppress(Exception):  # on the driver's node where it has one (not under Ray Client)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    book = None
    try:
        book = actor_class.options(**options).remote(measure, spec.sweep.lease_stale_after_s)
        ray.get(book.state.remote(""), timeout=BOOK_START_TIMEOUT_S)  # up before the first trial asks
    except Exception as exc:  # a gate that cannot start must not stop the sweep
        say(f"sweep {spec.name}: its run-slot book did not start ({type(exc).__name__}); Train runs may start ungated")
    try:
        yield
    finally:
        if book is not None:
            with contextlib.suppress(Exception):
                ray.kill(book)


class _Slot:
    """One trial's hold on a run slot, renewed by a leases.Heartbeat (renew/release as a lease's:
    once released, from whichever thread, no renewal follows)."""

    def __init__(self, book, holder: str, role: str) -> None:
        self._book, self._holder, self._role = book, holder, role
        self._lock = threading.Lock()
        self._released = False

    def renew(self) -> bool:
        with self._lock:
            if self._released:
                return False
            with contextlib.suppress(Exception):  # a book gone (the driver ending) stops nothing
                _call(self._book.renew, self._holder, self._role)
            return True  # a run that is going goes on: the book counts it again if it had dropped it

    def release(self) -> None:
        with self._lock:
            if not self._released:
                self._released = True
                _leave(self._book, self._holder)


def _leave(book, holder: str) -> None:
    """Give a slot or a place in line back; a book gone has forgotten it anyway."""
    with contextlib.suppress(Exception):
        _call(book.release, holder)


def _call(method, *args):
    import ray

    return ray.get(method.remote(*args), timeout=CALL_TIMEOUT_S)


def _queued_note(book, trial_id: str) -> str:
    """The waiting line (asked of the book only when the Waiter prints it)."""
    state: SlotState = _call(book.state, trial_id)
    return f"trial {trial_id}: waiting for a Train run slot ({state.describe()})"


def _find_book(spec: SweepSpec, trial_id: str):
    import ray

    if not ray.is_initialized():  # the runs called outside Ray (tests of the trial's own logic)
        return None
    try:
        return ray.get_actor(book_name(spec))
    except ValueError:  # its driver's book died, or the trial runs under a Tuner built by hand
        say(f"trial {trial_id}: the sweep has no run-slot book; its Train run starts without waiting for a slot")
        return None


@contextlib.contextmanager
def run_slot(
    spec: SweepSpec, trial_id: str, role: str, timeout_s: float, stopping: threading.Event | None = None
) -> Iterator[None]:
    """A trial's side: hold a run slot for a run of `role` (teacher or student) while the block
    (one fit()) runs. Waits in line first,
    with a line now and then; leaves the line if Tune stops the trial meanwhile. A book that
    cannot be reached lets the run go (a lost gate costs at worst the queueing it exists to
    spare, never the trial)."""
    import ray

    from remem_ray.leases import HEARTBEAT_S, Heartbeat
    from remem_ray.sweep.ray_adapter import end_stopped_trial
    from remem_ray.sweep.registry import Waiter

    book = _find_book(spec, trial_id)
    if book is not None:
        waiter = Waiter("a Train run slot", timeout_s, POLL_S)
        try:
            while True:
                if stopping is not None and stopping.is_set():  # checked first: no run starts after it
                    end_stopped_trial()
                if _call(book.take, trial_id, role):
                    break
                waiter.wait(lambda: _queued_note(book, trial_id))
        except ray.exceptions.RayError as exc:  # the actor gone, or a call timed out
            _leave(book, trial_id)  # a take that timed out here may have landed there
            say(f"trial {trial_id}: the sweep's run-slot book is unreachable ({type(exc).__name__}); starting its run")
            book = None
        except BaseException:  # the wait timed out, the trial is being stopped: out of the line at once
            _leave(book, trial_id)
            raise
    if book is None:
        yield
        return
    slot = _Slot(book, trial_id, role)
    try:
        with Heartbeat(slot, HEARTBEAT_S, stopping):
            yield
    finally:
        slot.release()
