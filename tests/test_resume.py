"""A run interrupted after epoch k and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.sessions import TINY_TEACHER_SPEC as SPEC
from helpers.sessions import FileSession, Interrupted, TakeoverSession, assert_bitwise_equal

from remem_ray.checkpoints import load_model
from remem_ray.config import load_run_spec
from remem_ray.contract import LoopConfig
from remem_ray.leases import Lease
from remem_ray.storage import Storage
from remem_ray.train.teacher import fine_tune_teacher


def _train(spec, output: Path, session) -> None:
    fine_tune_teacher(LoopConfig(spec, str(output), session=session))


def _weights(output: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(Storage(str(output)), "epoch_3")
    return model.state_dict()


@pytest.mark.parametrize("pipeline", ["loader", "device"])
def test_one_worker_resumed_after_epoch_1_ends_bitwise_equal(tmp_path, pipeline):
    spec = load_run_spec(None, {**SPEC, "data.pipeline": pipeline})
    _train(spec, tmp_path / "whole", FileSession(tmp_path / "whole.pt"))
    with pytest.raises(Interrupted):
        _train(spec, tmp_path / "resumed", FileSession(tmp_path / "resumed.pt", stop_after=1))
    torch.rand(7)  # a process that did other things before resuming
    session = FileSession(tmp_path / "resumed.pt")
    _train(spec, tmp_path / "resumed", session)
    assert [r["epoch"] for r in session.reports] == [2, 3]
    assert_bitwise_equal(_weights(tmp_path / "whole"), _weights(tmp_path / "resumed"))


def _ddp_teacher(rank: int, world: int, tmp: str, phase: str) -> None:
    tmp_path = Path(tmp)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'init-{phase}'}", rank=rank, world_size=world)
    try:
        spec = load_run_spec(None, SPEC)
        output = tmp_path / phase
        if phase == "whole":
            _train(spec, output, FileSession(tmp_path / "whole.pt", rank, world))
        else:
            try:
                _train(spec, output, FileSession(tmp_path / "resumed.pt", rank, world, stop_after=1))
            except Interrupted:
                pass
            _train(spec, output, FileSession(tmp_path / "resumed.pt", rank, world))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_resumed_after_epoch_1_end_bitwise_equal(tmp_path):
    """Each rank goes on with its own RNG stream (not rank 0's) and its own shard of the order."""
    for phase in ("whole", "resumed"):
        mp.spawn(_ddp_teacher, args=(2, str(tmp_path), phase), nprocs=2, join=True)
    assert_bitwise_equal(_weights(tmp_path / "whole"), _weights(tmp_path / "resumed"))


def test_a_run_resumed_after_its_last_epoch_reports_its_final_result_again(tmp_path):
    """Tune may not have saved a finished trial's completion: the re-run must hand it its result."""
    spec = load_run_spec(
        None,
        {
            **SPEC,
            "teacher.epochs": 1,
            "teacher.checkpoint_epochs": [1],
            "teacher.model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
        },
    )
    first = FileSession(tmp_path / "s.pt")
    _train(spec, tmp_path / "out", first)
    again = FileSession(tmp_path / "s.pt")
    _train(spec, tmp_path / "out", again)
    assert len(again.reports) == 1 and again.reports[0]["replayed"] == 1
    assert again.reports[0]["val_acc"] == first.reports[-1]["val_acc"] and again.reports[0]["epoch"] == 1


def test_a_holder_that_loses_its_lease_stops_unsaved_and_the_new_holder_ends_it_exactly(tmp_path):
    spec = load_run_spec(None, {**SPEC, "teacher.checkpoint_epochs": [1, 2, 3]})
    _train(spec, tmp_path / "whole", FileSession(tmp_path / "whole.pt"))

    output = tmp_path / "shared"
    lease_folder = Storage(str(tmp_path / "lease"))
    first = Lease(lease_folder, "sweep-1/trial_a", 60.0)
    assert first.try_acquire()
    session = TakeoverSession(tmp_path / "shared.pt", lease_folder, after=1)
    result = fine_tune_teacher(LoopConfig(spec, str(output), session=session, lease=first.handle()))
    assert "passed to sweep-2/trial_b" in result["stopped"]
    assert [r["epoch"] for r in session.reports] == [1]  # epoch 2 trained, then dropped: nothing reported
    assert (output / "epoch_1").is_dir() and not (output / "epoch_2").exists()
    assert not (output / "history.json").exists()
    assert any("lease" in line and "lost" in line for line in session.logs)

    successor = FileSession(tmp_path / "shared.pt")  # the new holder resumes the same run
    fine_tune_teacher(LoopConfig(spec, str(output), session=successor, lease=session.new_holder.handle()))
    assert [r["epoch"] for r in successor.reports] == [2, 3]
    assert_bitwise_equal(_weights(tmp_path / "whole"), _weights(output))


def test_a_holder_that_lost_its_lease_and_then_diverged_stops_as_a_lost_lease(tmp_path):
    """The run raised its divergence before its lease check: Train retried it from its last
    checkpoint (each retry diverging again, or stopping there), then the trial failed, where it
    should have waited for the new holder, whose run may well train on (bf16 is not bit-exact)."""
    diverging = {**SPEC, "teacher.rho": 10.0, "teacher.optimizer": {"name": "sgd", "lr": 10.0}}
    spec = load_run_spec(None, diverging)
    lease_folder = Storage(str(tmp_path / "lease"))
    clock = [0.0]
    first = Lease(lease_folder, "sweep-1/trial_a", 1.0, clock=lambda: clock[0])
    assert first.try_acquire()
    handle = first.handle()
    second = Lease(lease_folder, "sweep-2/trial_b", 1.0, clock=lambda: clock[0])
    assert not second.try_acquire()
    clock[0] = 2.0
    assert second.try_acquire()  # the first holder was paused past the stale window before its run
    session = FileSession(tmp_path / "run.pt")
    result = fine_tune_teacher(LoopConfig(spec, str(tmp_path / "out"), session=session, lease=handle))
    assert "passed to sweep-2/trial_b" in result["stopped"] and session.reports == []
