"""The teacher registry and who trains a key (remem_ray.sweep.registry, ensure_teacher), with a
fake training in place of Ray Train: only our own logic is under test here; the real thing
runs in tests/test_sweep_integration.py."""

from __future__ import annotations

import threading

import pytest
from helpers.teachers import EPOCHS, registry_setup, write_teacher

from remem_ray.leases import Lease
from remem_ray.sweep.registry import TRAIN_RUN
from remem_ray.sweep.results import summarize
from remem_ray.sweep.trial import ensure_teacher


class FakeFit:
    """Stands in for the Ray Train run: writes the checkpoints where the registry says, then marks
    the teacher finished as the run's rank 0 does; counts calls."""

    def __init__(self, weight: float = 1.0, before=None) -> None:
        self.calls, self.weight, self.before = 0, weight, before

    def __call__(self, spec, run_spec, registry, key, lease, finished) -> None:
        self.calls += 1
        assert lease.handle().lost() is None  # trains only under its lease
        if self.before is not None and self.before(registry, key, lease) is False:
            return  # the loop found its lease lost and stopped
        write_teacher(registry.training_output(key), self.weight)
        finished()


def test_the_holder_trains_and_records_it(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    fit = FakeFit()
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit)
    assert fit.calls == 1 and layout.trained_by(key) == "t1"
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


def test_a_holder_that_loses_its_lease_mid_run_waits_for_the_new_one(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)

    def taken_over(registry, key, lease):
        clock = [0.0]
        other = Lease(registry.folder(key).child("lease"), "sweep-b/t9", 1.0, clock=lambda: clock[0])
        assert not other.try_acquire()
        clock[0] = 5.0
        assert other.try_acquire()  # our holder looked stale to it
        write_teacher(registry.training_output(key), 2.0)  # ...and it finished the teacher
        return False  # our run stops at its next epoch check, writing nothing

    fit = FakeFit(before=taken_over)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit) is False
    assert fit.calls == 1 and layout.trained_by(key) is None  # not counted as ours
    assert registry.lease(key, "x", 60).holder_now() == "sweep-b/t9"  # its lease left alone


def test_a_corrupt_checkpoint_is_retrained_beside_the_one_in_use_and_switched_at_the_end(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    write_teacher(registry.folder(key), 1.0)
    assert registry.has_all(key, EPOCHS) and registry.verify(key, 4) is None
    assert registry.train_run_name(key) == TRAIN_RUN
    model_file = tmp_path / "teachers" / key / "epoch_4" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10])  # truncated after its manifest was written
    epoch_2 = (tmp_path / "teachers" / key / "epoch_2" / "model.pt").read_bytes()
    in_use = registry.checkpoint_uri(key, 2)

    def during(registry, key, lease):
        # trials reading the checkpoints in use still find them, unchanged, while the retraining runs
        assert registry.checkpoint_uri(key, 2) == in_use and registry.verify(key, 2) is None
        assert registry.train_run_name(key) == f"{TRAIN_RUN}-retrain-1"
        assert registry.training_output(key).uri() == registry.folder(key).uri("retrain-1")

    fit = FakeFit(weight=3.0, before=during)
    assert ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=fit)
    assert fit.calls == 1
    assert registry.checkpoint_uri(key, 4) == registry.folder(key).uri("retrain-1", "epoch_4")  # switched
    assert registry.verify(key, 4) is None and registry.pending_retrain(key) is None
    assert (tmp_path / "teachers" / key / "epoch_2" / "model.pt").read_bytes() == epoch_2  # old set untouched

    summary = summarize(spec, layout)
    assert summary.corrupt_checkpoints_retrained == 1
    assert "epoch_4/model.pt does not match its sha256" in summary.integrity_events[0]["problem"]


def test_an_interrupted_retraining_is_resumed_not_scheduled_again(tmp_path):
    spec, run_spec, layout, registry, key = registry_setup(tmp_path)
    write_teacher(registry.folder(key), 1.0)
    model_file = tmp_path / "teachers" / key / "epoch_4" / "model.pt"
    model_file.write_bytes(b"garbage")

    def crash(registry, key, lease):
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        ensure_teacher(spec, run_spec, "s/t1", registry, layout, fit=FakeFit(before=crash))
    runs = []
    fit = FakeFit(before=lambda registry, key, lease: runs.append(registry.train_run_name(key)))
    assert ensure_teacher(spec, run_spec, "s/t2", registry, layout, fit=fit)  # the lease was released
    assert runs == [f"{TRAIN_RUN}-retrain-1"]
    assert len(layout.integrity_events()) == 1
