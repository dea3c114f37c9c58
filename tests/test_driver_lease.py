"""One driver per sweep (remem_ray/sweep/driver_lease.py), on local storage with a fake clock."""

from __future__ import annotations

import subprocess
import sys
import threading
import time as pytime

import psutil
import pytest

from remem_ray.errors import ResourceError
from remem_ray.leases import Lease, current_record
from remem_ray.storage import Storage
from remem_ray.sweep.driver_lease import DRIVER_LEASE, POLL_S, SweepDriven, _take, driving_lease
from remem_ray.sweep.layout import SweepLayout

STALE_S = 60.0


class FakeTime:
    def __init__(self, on_sleep=None) -> None:
        self.now, self.on_sleep = 0.0, on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep:
            self.on_sleep()


def _folder(tmp_path) -> Storage:
    return SweepLayout(Storage(str(tmp_path)), "s").experiment.child(DRIVER_LEASE)


def test_a_second_driver_of_a_sweep_whose_driver_still_renews_is_refused_with_one_line(tmp_path):
    """A `resume` while the first driver runs (or two `run`s of one name) restarted the same trials
    twice: two copies of a trial then took each other's teacher lease in turn, forever."""
    first = Lease(_folder(tmp_path), "driver a", STALE_S)
    assert first.try_acquire()
    time = FakeTime(on_sleep=first.renew)  # alive: it renews while the second one waits
    second = Lease(_folder(tmp_path), "driver b", STALE_S, clock=time.clock)
    lines: list[str] = []
    with pytest.raises(SweepDriven, match=r"^sweep: 's' is being run by driver a \(its lease at .* is held\)"):
        _take(second, STALE_S, lines.append, "s", clock=time.clock, sleep=time.sleep)
    assert len(lines) == 1 and "waiting up to 60 s" in lines[0]
    assert time.now == POLL_S  # refused at its first sign of life, not after the whole window
    assert current_record(_folder(tmp_path)).holder == "driver a"


def test_a_driver_silent_past_the_stale_window_is_taken_over(tmp_path):
    first = Lease(_folder(tmp_path), "driver a", STALE_S)
    assert first.try_acquire()  # this process: alive, so only its silence frees the lease
    time = FakeTime()
    second = Lease(_folder(tmp_path), "driver b", STALE_S, clock=time.clock)
    _take(second, STALE_S, lambda line: None, "s", clock=time.clock, sleep=time.sleep)
    assert STALE_S <= time.now < STALE_S + 10
    assert current_record(_folder(tmp_path)).holder == "driver b" and not first.renew()


@pytest.mark.parametrize("how", ["released", "its process ended", "its process ended, not reaped yet"])
def test_a_resume_after_a_driver_ended_takes_the_lease_at_once(tmp_path, how):
    if how == "released":
        first = Lease(_folder(tmp_path), "driver a", STALE_S)
        assert first.try_acquire()
        first.release()
    else:  # a driver on this host killed (SIGKILL, a crash): its pid is gone
        code = (
            "import sys; from remem_ray.leases import Lease; from remem_ray.storage import Storage; "
            "sys.exit(0 if Lease(Storage(sys.argv[1]), 'driver a', 60).try_acquire() else 1)"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, _folder(tmp_path).path()])
        if how == "its process ended":
            assert proc.wait() == 0
        else:  # a zombie still answers kill(pid, 0): found so in the SIGKILL fault tests (60 s waits)
            while current_record(_folder(tmp_path)) is None or psutil.Process(proc.pid).status() != "zombie":
                pytime.sleep(0.05)
    time = FakeTime()
    _take(Lease(_folder(tmp_path), "driver b", STALE_S, clock=time.clock), STALE_S, print, "s", time.clock, time.sleep)
    assert time.now == 0 and current_record(_folder(tmp_path)).holder == "driver b"


def test_a_driver_whose_lease_was_taken_over_stops_its_sweep_and_the_lease_is_released_at_the_end(tmp_path):
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    lost, lines = threading.Event(), []
    with driving_lease(layout, STALE_S, lines.append, renew_every_s=0.05, on_lost=lost.set) as driving:
        record = current_record(_folder(tmp_path))
        assert record.holder == driving.lease.holder and not record.released
        driving.raise_if_lost()  # still ours
        # another driver took it over (this one was paused past the window, as far as it could tell)
        assert Lease(_folder(tmp_path), "driver b", STALE_S).try_acquire(gone=lambda r: True)
        assert lost.wait(30)
        with pytest.raises(SweepDriven, match="^sweep: this driver's lease passed to driver b, which runs the sweep"):
            driving.raise_if_lost()  # after Tune stops: no summary written into the other driver's sweep
    assert lines[-1] == "this driver's lease passed to driver b, which runs the sweep now: stopping"
    assert current_record(_folder(tmp_path)).holder == "driver b"  # the loser's release changed nothing

    with driving_lease(SweepLayout(Storage(str(tmp_path)), "t"), STALE_S, lines.append):
        pass
    assert current_record(SweepLayout(Storage(str(tmp_path)), "t").experiment.child(DRIVER_LEASE)).released


def test_an_s3_server_that_ignores_conditional_writes_stops_the_sweep_at_its_first_lease(s3, monkeypatch):
    """Preflight only lists; a server ignoring If-None-Match made every exclusive create succeed:
    two contenders both took a lease and wrote into one generation's folder."""
    layout = SweepLayout(Storage(f"s3://{s3['bucket']}/p", s3["endpoint"]), "s")
    with driving_lease(layout, STALE_S, print) as driving:  # moto honours it
        assert driving.lease.exclusive_create_refused()

    def put_ignoring_the_condition(self, target: str, data: bytes) -> bool:
        bucket, _, key = target.partition("/")
        self._boto3().put_object(Bucket=bucket, Key=key, Body=data)
        return True

    monkeypatch.setattr(Storage, "_put_if_absent", put_ignoring_the_condition)
    with pytest.raises(ResourceError, match=r"^storage.root: the S3 server at .* ignores conditional writes"):
        with driving_lease(layout, STALE_S, print):
            raise AssertionError("the sweep went on")


def test_the_driver_lease_is_released_however_the_driving_ends(tmp_path):
    """An error in the driving (a probe, the Tuner, a second Ctrl-C) left the lease held: a resume
    elsewhere then waited the stale window, a retry in the same process always did."""
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    with pytest.raises(RuntimeError, match="the probe failed"):
        with driving_lease(layout, STALE_S, print):
            raise RuntimeError("the probe failed")
    assert current_record(_folder(tmp_path)).released

    def found_a_sweep():
        raise ValueError("name: sweep 's' already exists")  # a run's look again once it holds the lease

    with pytest.raises(ValueError, match="already exists"):
        with driving_lease(layout, STALE_S, print, after_taking=found_a_sweep):
            raise AssertionError("not reached")
    assert current_record(_folder(tmp_path)).released


def test_a_driver_cut_off_from_storage_for_the_stale_window_stops_and_says_why(tmp_path, monkeypatch):
    """Others may reach storage when this driver cannot (its laptop's network, a broken NAT), and
    take over after the window: it must stop then too, saying it was cut off, not taken over."""
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    lost, lines = threading.Event(), []
    with driving_lease(layout, 10.0, lines.append, renew_every_s=0.05, on_lost=lost.set, resume="again") as driving:
        clock = [0.0]
        driving.lease._clock = lambda: clock[0]
        driving.lease._last_ok = 0.0

        def down(*args, **kwargs):
            raise ResourceError("storage: cannot reach it")

        for name in ("read_text", "write_text", "list_dir"):
            monkeypatch.setattr(driving.lease.folder, name, down)
        clock[0] = 10.0  # the stale window since the last beat storage took
        assert lost.wait(30)
        with pytest.raises(SweepDriven, match=r"could not reach storage for 10 s, .* `again` continues it"):
            driving.raise_if_lost()
    assert "could not reach storage" in lines[-1] and "passed to" not in lines[-1]


def test_the_interrupt_a_lost_lease_sends_outside_tunes_run_ends_as_the_loss(tmp_path):
    """The loss stops the sweep with SIGINT; outside Tune's run (the GPU probe, the summary) it
    arrived as a plain KeyboardInterrupt: "interrupted", exit 130, the resume advice."""
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    lost = threading.Event()
    with pytest.raises(SweepDriven, match="passed to driver b"):
        with driving_lease(layout, STALE_S, print, renew_every_s=0.05, on_lost=lost.set):
            assert Lease(_folder(tmp_path), "driver b", STALE_S).try_acquire(gone=lambda r: True)
            assert lost.wait(30)
            raise KeyboardInterrupt  # what the loss's SIGINT raises here


def test_a_loss_once_tune_has_ended_sends_no_interrupt_and_stops_the_next_write(tmp_path):
    """Once Tune's run is over, the loss's interrupt landed anywhere in the summary's writing: a
    summary.json without its report, the study's copy half made. Settled, the loss is only noted
    and each of the last writes checks it first."""
    layout = SweepLayout(Storage(str(tmp_path)), "s")
    interrupted, lines = threading.Event(), []
    with driving_lease(layout, STALE_S, lines.append, renew_every_s=0.05, on_lost=interrupted.set) as driving:
        driving.settle()  # what the driver does as Tune returns
        assert Lease(_folder(tmp_path), "driver b", STALE_S).try_acquire(gone=lambda r: True)
        deadline = pytime.monotonic() + 30
        while not lines and pytime.monotonic() < deadline:
            pytime.sleep(0.05)
        assert lines == ["this driver's lease passed to driver b, which runs the sweep now: stopping"]
        assert not interrupted.wait(1.0)  # the heartbeat thread, past its line, sends nothing
        with pytest.raises(SweepDriven, match="passed to driver b"):
            driving.raise_if_lost()


def test_the_sweeps_last_writes_stop_at_a_loss_between_them(tmp_path, monkeypatch):
    """The driver's last writes (summary.json, the report, the study's copy), each after a check of
    its lease: a loss between two of them leaves the rest unwritten, and the driver ends with it."""
    from types import SimpleNamespace

    from remem_ray.sweep import driver

    written: list[str] = []

    class Driving:
        lost = False

        def settle(self):
            written.append("settled")

        def raise_if_lost(self):
            if self.lost:
                raise SweepDriven("sweep: lost")

    driving = Driving()

    def write_summary(layout, summary):
        written.append("summary")
        driving.lost = True  # the loss lands while the summary is written

    spec = SimpleNamespace(sweep=SimpleNamespace(num_samples=2), name="s")
    monkeypatch.setattr(driver, "load_trials", lambda layout: [])
    monkeypatch.setattr(driver, "expected_trials", lambda spec: 2)
    monkeypatch.setattr(driver, "summarize", lambda spec, layout, trials: SimpleNamespace(space_exhausted=False))
    monkeypatch.setattr(driver, "write_summary", write_summary)
    monkeypatch.setattr(driver, "write_report", lambda summary, layout: written.append("report"))
    with pytest.raises(SweepDriven, match="lost"):
        driver._finish(spec, None, None, lambda: written.append("study copy"), driving)
    assert written == ["settled", "summary"]
