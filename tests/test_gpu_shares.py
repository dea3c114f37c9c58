"""`gpus_per_worker: auto`: the arithmetic on recorded step figures, the rules around it (DDP
roles, one run for both phases, a cluster without GPUs, a probe that fails), the concurrency it
allows, and the probe itself run as a Ray task on a node with a logical GPU (no CUDA here)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile

import pytest

from remem_ray.config import load_sweep_spec
from remem_ray.contract import StepMemory
from remem_ray.errors import ResourceError
from remem_ray.sweep.gpu_shares import (
    NodeResources,
    ProbeFailed,
    fit_concurrency,
    probe_on_cluster,
    refuse_what_this_machine_cannot_hold,
    resolve_gpu_shares,
    run_need_mb,
    runs_per_gpu,
    share_of,
    slot_measure,
)
from remem_ray.sweep.slots import SlotMeasure

H100_MB = 81559.0  # torch's total_memory of an H100 80GB HBM3, in MiB


def _nodes(gpus: float = 1, cpus: float = 16, count: int = 1, kind: str = "H100") -> list[NodeResources]:
    return [NodeResources(gpus, cpus, kind) for _ in range(count)]


def _spec(teacher: object = "auto", student: object = "auto", **overrides):
    values = {
        "sweep.resources.teacher.gpus_per_worker": teacher,
        "sweep.resources.student.gpus_per_worker": student,
        **overrides,
    }
    return load_sweep_spec(None, values)


class RecordedProbe:
    """Answers with recorded peaks (MiB per role; 8 GiB of data resident unless told) and
    remembers what it was asked."""

    def __init__(
        self, peaks: dict[str, float | None], total_mb: float | None = H100_MB, resident_mb: float = 8192
    ) -> None:
        self.peaks, self.total_mb, self.resident_mb, self.asked = peaks, total_mb, resident_mb, []

    def __call__(self, spec, roles):
        self.asked.append(list(roles))
        return [StepMemory(r, "NVIDIA H100 80GB HBM3", self.peaks[r], self.total_mb, self.resident_mb) for r in roles]


def test_the_share_leaves_room_for_headroom_the_store_and_each_process():
    # 18,000 MiB x 1.25 + an 8 GiB store + 1 GiB = 31,716 MiB; 0.95 x 81,559 / 31,716 = 2.44
    assert run_need_mb(18000, 8192) == pytest.approx(31716)
    assert runs_per_gpu(31716, H100_MB) == 2
    assert runs_per_gpu(4000, H100_MB) == 4  # at most four runs share a card
    assert runs_per_gpu(90000, H100_MB) == 1  # a step that does not fit keeps a whole GPU (and fails there)
    assert share_of(2) == 0.5 and share_of(4) == 0.25
    assert share_of(3) == 0.3333 and 3 * share_of(3) <= 1.0  # three such shares fit on one GPU in Ray's books


def test_both_roles_on_the_same_workers_take_the_larger_share_so_one_run_serves_both_phases():
    spec = _spec()
    probe = RecordedProbe({"teacher": 18000, "student": 3000})  # alone: teacher 0.5, student 0.25
    sized, lines = resolve_gpu_shares(spec, _nodes(1), probe)
    res = sized.sweep.resources
    assert probe.asked == [["teacher", "student"]]  # one probe measures both
    assert res.teacher.gpus_per_worker == res.student.gpus_per_worker == 0.5
    assert res.teacher == res.student  # so the trial's teacher run distils in place
    assert any("teacher 0.5 GPU per worker: a step at batch 32 peaks at 17.6 GiB" in line for line in lines), lines


def test_roles_on_different_workers_keep_their_own_shares():
    spec = _spec(**{"sweep.resources.student.cpus_per_worker": 0.5})
    sized, _ = resolve_gpu_shares(spec, _nodes(1), RecordedProbe({"teacher": 18000, "student": 3000}))
    assert sized.sweep.resources.teacher.gpus_per_worker == 0.5
    assert sized.sweep.resources.student.gpus_per_worker == 0.25


def test_data_kept_on_the_gpu_counts_against_the_share():
    peaks = {"teacher": 18000, "student": 18000}
    with_store, lines = resolve_gpu_shares(_spec(), _nodes(1), RecordedProbe(peaks))
    without, _ = resolve_gpu_shares(_spec(), _nodes(1), RecordedProbe(peaks, resident_mb=0))
    assert with_store.sweep.resources.teacher.gpus_per_worker == 0.5  # 31,716 MiB a run
    assert without.sweep.resources.teacher.gpus_per_worker == 0.3333  # 23,524 MiB a run: three fit
    assert "with 8.0 GiB of data kept on the GPU and 1.0 GiB per process, 2 run(s) fit on a 79.6 GiB" in lines[0]


def test_the_probe_counts_the_device_store_and_a_cached_target_table_as_resident():
    """What a run keeps on the GPU beside its steps, from the data as a run lists it: digits'
    1,797 images (1,221 of them training) stored at their native 8 px, and a student's cached
    targets."""
    import torch

    from remem_ray.data import build_datasets, num_items
    from remem_ray.train.memory_probe import resident_mb

    spec = _spec(**{"student.teacher_targets": "cached", "student.target_views": 4})
    splits = build_datasets(spec.data, spec.seed)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # nothing is allocated: sizes only
    store = 1797 * 3 * 8 * 8 / 2**20  # every split, uint8
    assert resident_mb(spec, "teacher", splits, cuda) == pytest.approx(store)
    assert num_items(splits.train) == 1221
    table = 1221 * 4 * 10 * 2 / 2**20  # views x classes, float16
    assert resident_mb(spec, "student", splits, cuda) == pytest.approx(store + table)
    assert resident_mb(spec, "student", splits, cpu) == 0.0  # no GPU, nothing to size
    loader = _spec(**{"data.pipeline": "loader"})
    assert resident_mb(loader, "teacher", splits, cuda) == 0.0
    tight = _spec(**{"data.store_budget_gb": 0.0001})  # the store stays on the host
    assert resident_mb(tight, "teacher", splits, cuda) == 0.0


def test_a_ddp_role_takes_a_gpu_per_worker_and_is_not_probed():
    spec = _spec(student=1, **{"sweep.resources.teacher.num_workers": 4})
    probe = RecordedProbe({})
    sized, lines = resolve_gpu_shares(spec, _nodes(8), probe)
    assert probe.asked == []
    assert sized.sweep.resources.teacher.gpus_per_worker == 1.0
    assert lines[0] == "GPU shares (auto): teacher 1 GPU per worker: 4 workers, a GPU each (DDP)"


def test_a_probe_that_cannot_measure_leaves_a_whole_gpu_and_says_why():
    def failing(spec, roles):
        raise ProbeFailed("no GPU took the probe within 600 s")

    sized, lines = resolve_gpu_shares(_spec(), _nodes(1), failing)
    assert sized.sweep.resources.teacher.gpus_per_worker == 1.0
    assert "not measured (no GPU took the probe within 600 s): a whole GPU" in lines[0]
    sized, lines = resolve_gpu_shares(_spec(), _nodes(1), RecordedProbe({"teacher": None, "student": None}, None))
    assert sized.sweep.resources.student.gpus_per_worker == 1.0
    assert "no CUDA device where the probe ran" in lines[1]


def test_auto_on_a_cluster_without_gpus_needs_device_cuda_which_waits_for_one():
    """device auto would train on CPUs for good: the runs would never ask an autoscaler for the
    GPU nodes the user meant. device cuda probes, and the probe's GPU request is what scales up."""
    probe = RecordedProbe({"teacher": 18000, "student": 3000})
    with pytest.raises(ResourceError, match=r"^sweep.resources.teacher.gpus_per_worker: auto, but the Ray cluster"):
        resolve_gpu_shares(_spec(), _nodes(0), probe)
    assert probe.asked == []
    sized, _ = resolve_gpu_shares(_spec(device="cuda"), _nodes(0), probe)
    assert probe.asked == [["teacher", "student"]] and sized.sweep.resources.teacher.gpus_per_worker == 0.5


def test_gpus_of_several_kinds_keep_a_whole_gpu_a_share_sized_on_one_would_overfill_another():
    probe = RecordedProbe({"teacher": 3000, "student": 3000})
    mixed = _nodes(1, kind="A10G") + _nodes(8, kind="A100")
    sized, lines = resolve_gpu_shares(_spec(), mixed, probe)
    assert probe.asked == [] and sized.sweep.resources.teacher.gpus_per_worker == 1.0
    assert "GPUs of several kinds: A100, A10G" in lines[0]


def _fit(spec, nodes, probe):
    sized, _ = resolve_gpu_shares(spec, nodes, probe)
    return fit_concurrency(spec, sized, nodes)


def test_auto_runs_as_many_trials_at_once_as_the_gpu_nodes_hold_unless_told_otherwise():
    probe = RecordedProbe({"teacher": 3000, "student": 3000})  # a quarter of a GPU each
    sized, line = _fit(_spec(), _nodes(2, cpus=16), probe)
    assert sized.max_concurrent_trials() == 8 and line is not None
    assert line.startswith("GPU shares (auto): 8 trial(s) at a time: what the cluster's GPU nodes hold at 0.25 GPU")
    budget, line = _fit(_spec(**{"sweep.resources.gpu_budget": 1}), _nodes(2), probe)
    assert budget.max_concurrent_trials() == 4 and line is None  # the budget's GPU at 0.25 per trial
    fixed, line = _fit(_spec(**{"sweep.max_concurrent_trials": 3}), _nodes(2), probe)
    assert fixed.max_concurrent_trials() == 3 and line is None
    # a whole GPU a run on one GPU: one trial at a time, not two (the second run's wait for the
    # GPU would count as its start and fail it after worker_start_timeout_s)
    whole, _ = _fit(_spec(), _nodes(1), RecordedProbe({"teacher": 50000, "student": 50000}))
    assert whole.max_concurrent_trials() == 1
    # each node holds what its own CPUs allow: 2 GPU nodes of 2 CPUs at 0.9 a run hold 2 runs
    # each; a CPU-only head's 64 CPUs run no Train worker of a GPU run
    nodes = _nodes(1, cpus=2, count=2) + [NodeResources(0, 64)]
    cpus, line = _fit(_spec(), nodes, probe)
    assert cpus.max_concurrent_trials() == 4
    # the trials' drivers need CPUs too: one node of 4 CPUs holds 4 runs of 0.9 CPUs, not 4
    # runs and 4 drivers of 0.1 each (the fourth run would wait out its start timeout)
    lone, _ = _fit(_spec(**{"sweep.resources.trial_cpus": 0.5}), _nodes(1, cpus=4), probe)
    assert lone.max_concurrent_trials() == 2  # 4 CPUs / (0.9 + 0.5)
    # drivers placed by a driver resource ask for no CPU (a head with none runs them): 4 runs fit
    placed = _spec(**{"sweep.resources.trial_cpus": 0.5, "sweep.resources.driver_resource": "remem_driver"})
    assert _fit(placed, _nodes(1, cpus=4), probe)[0].max_concurrent_trials() == 4
    # DDP: a 2-worker teacher on GPU nodes of 2 GPUs but 2 CPUs each holds one worker a node, so
    # one run over both; the CPU-only head's CPUs run no worker
    ddp = _spec(student=1, **{"sweep.resources.teacher.num_workers": 2, "sweep.resources.teacher.cpus_per_worker": 2})
    nodes = _nodes(2, cpus=2, count=2) + [NodeResources(0, 64)]
    assert _fit(ddp, nodes, probe)[0].max_concurrent_trials() == 1


def test_a_gpu_budget_counts_the_gpus_a_worker_keeps_from_others_where_cpus_run_out_first():
    """gpu_budget 8 at half a GPU and 7 CPUs a worker ran 16 trials at once on nodes of 1 GPU and
    7 CPUs, which hold one such worker each: 8 runs waited past worker_start_timeout_s, failed."""
    half = {
        "sweep.resources.gpu_budget": 8,
        "sweep.resources.teacher.cpus_per_worker": 7,
        "sweep.resources.student.cpus_per_worker": 7,
    }
    spec = _spec(0.5, 0.5, **half)
    assert spec.max_concurrent_trials() == 16  # the budget as the share counts it
    measure, line = slot_measure(spec, _nodes(1, cpus=7, count=8))
    assert measure == SlotMeasure(8, 1, 1, by_gpus=True) and measure.fewest_trials() == 8 and line is not None
    assert line.startswith("sweep.resources.gpu_budget: 8 at a time, not 16 at a time: ")
    # nodes whose CPUs hold two such workers a GPU keep the 16; so does a cluster with no GPU
    # node up yet (an autoscaler from zero: nothing to read), and a limit the user set
    assert slot_measure(spec, _nodes(1, cpus=16, count=8)) == (SlotMeasure(8, 0.5, 0.5, by_gpus=True), None)
    # nodes of two kinds: counted over all of them (15 workers on 8 GPUs), not by the smallest
    mixed, _ = slot_measure(spec, _nodes(1, cpus=16, count=7) + _nodes(1, cpus=7))
    assert mixed.fewest_trials() == 15
    assert slot_measure(spec, [NodeResources(0, 8)]) == (SlotMeasure(8, 0.5, 0.5, by_gpus=True), None)
    told = _spec(0.5, 0.5, **half, **{"sweep.max_concurrent_trials": 16})
    assert slot_measure(told, _nodes(1, cpus=7, count=8)) == (SlotMeasure(16), None)
    # a 4-worker teacher at 1 GPU each keeps its 4 GPUs whatever the CPUs: 2 trials in 8 train teachers
    ddp = _spec(1, 1, **{"sweep.resources.gpu_budget": 8, "sweep.resources.teacher.num_workers": 4})
    assert slot_measure(ddp, _nodes(1, cpus=8, count=8)) == (SlotMeasure(8, 4, 1, by_gpus=True), None)


def test_a_gpu_budget_weighs_each_run_by_the_gpus_of_its_role():
    """The paper's setting: 4-GPU teachers, 1-GPU students, 16 GPUs. Counted by trials (16 / 4),
    4 students distilled at once on 16 GPUs, 12 idle; weighed, 16 distil while no teacher trains."""
    ddp = {"sweep.resources.gpu_budget": 16, "sweep.resources.teacher.num_workers": 4}
    measure, line = slot_measure(_spec(1, 1, **ddp), _nodes(8, cpus=64, count=2))
    assert line is None and (measure.fewest_trials(), measure.most_trials()) == (4, 16)
    assert measure.describe() == "4 to 16 at a time: 16 GPUs, a teacher run takes 4 and a student run 1"
    # a student on CPUs takes nothing of the budget: runs counted, as many as the teachers fit
    on_cpus, _ = slot_measure(_spec(1, 0, **ddp), _nodes(8, cpus=64, count=2))
    assert on_cpus == SlotMeasure(4) and on_cpus.describe() == "4 at a time"
    # equal roles: as many as before, said as before
    same, _ = slot_measure(_spec(0.5, 0.5, **{"sweep.resources.gpu_budget": 4}), _nodes(4))
    assert same.describe() == "8 at a time"
    # a run heavier than the whole budget still runs, alone
    assert SlotMeasure(2, 4, 1, by_gpus=True).weight("teacher") == 2


def test_a_resumed_sweep_runs_at_the_concurrency_this_driver_sized():
    """Tune restores the searcher, and its slot policy, as pickled when the sweep first ran: on
    a cluster that shrank since, the old limit would start runs that wait for GPUs past their
    start timeout. The driver's limit holds while it drives, whatever the pickle says."""
    import pickle

    from remem_ray.sweep.slots import SlotPolicy, driver_limit

    spec = _spec(**{"sweep.max_concurrent_trials": 8})
    restored = pickle.loads(pickle.dumps(SlotPolicy(spec)))
    live = [f"key{i}" for i in range(2)]  # two teachers in training
    restored.is_stored = lambda key: False
    assert restored.may_start(live)
    with driver_limit(spec, SlotMeasure(2)):
        assert (restored.measure.capacity, restored.max_live) == (2, 4) and not restored.may_start(live)
        other_root = _spec(**{"sweep.max_concurrent_trials": 8, "storage.root": "/elsewhere"})
        with driver_limit(other_root, SlotMeasure(5)):  # the same name on another root is another sweep
            assert restored.measure.capacity == 2
        assert restored.measure.capacity == 2
    assert restored.measure.capacity == 8 and restored.may_start(live)
    for older_state in ({"max_concurrent": 8, "max_live": 16}, {"_max_concurrent": 8}):
        # as pickled before the limit became a property, and before runs were weighed
        state = {key: value for key, value in restored.__getstate__().items() if key != "_measure"}
        older = SlotPolicy.__new__(SlotPolicy)
        older.__setstate__({**state, **older_state})
        assert (older.measure, older.max_live) == (SlotMeasure(8), 16)


def test_a_spec_without_auto_comes_back_as_it_is():
    spec = _spec(teacher=1, student=0.5)
    probe = RecordedProbe({})
    assert resolve_gpu_shares(spec, _nodes(4), probe) == (spec, []) and probe.asked == []
    with pytest.raises(ValueError, match="resolved by the sweep driver"):
        _spec().sweep.resources.gpus_per_trial()


@pytest.mark.integration
def test_the_probe_runs_as_a_ray_task_holding_a_gpu(monkeypatch):
    """A real Ray on loopback with one logical GPU: the task takes it, runs both roles' steps (on
    the CPU here) and answers without a peak, so the sizing keeps a whole GPU."""
    import ray

    spec = _spec()
    temp_dir = tempfile.mkdtemp(prefix="remem-ray-", dir="/tmp")  # Ray's socket paths must stay short
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, num_gpus=1, _node_ip_address="127.0.0.1", include_dashboard=False, _temp_dir=temp_dir)
    try:
        measured = probe_on_cluster(spec, ["teacher", "student"])
        sized, lines = resolve_gpu_shares(spec, _nodes(1), probe_on_cluster)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert [(m.role, m.device, m.peak_mb) for m in measured] == [("teacher", "cpu", None), ("student", "cpu", None)]
    assert sized.sweep.resources.teacher.gpus_per_worker == 1.0
    assert "no CUDA device where the probe ran" in lines[0]


def _driver_without_ray(monkeypatch, nodes: list[NodeResources]) -> list[str]:
    """The driver's run with no Ray started (a cluster of `nodes`) and its console's lines kept:
    what _driving shows, in order."""
    import contextlib

    from remem_ray.sweep import driver, progress

    shown: list[str] = []

    @contextlib.contextmanager
    def console(*args, **kwargs):
        yield type("Console", (), {"show": staticmethod(shown.append)})()

    @contextlib.contextmanager
    def no_ray(address, verbose):
        yield None

    monkeypatch.setattr(driver, "ray_session", no_ray)
    monkeypatch.setattr(driver, "cluster_nodes", lambda: nodes)
    monkeypatch.setattr(progress, "sweep_console", console)
    return shown


def test_the_driver_sizes_the_shares_before_the_trials_and_shows_how(tmp_path, monkeypatch):
    """What the trials get is the sized spec; the console says what was measured, then the
    concurrency the shares allow, in the sweep's first line."""
    from remem_ray.storage import Storage
    from remem_ray.sweep import driver, gpu_shares
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.slots import _DRIVER_LIMITS

    def driver_limits():
        return dict(_DRIVER_LIMITS)

    shown = _driver_without_ray(monkeypatch, _nodes(1, cpus=16))
    probe = RecordedProbe({"teacher": 3000, "student": 3000})
    monkeypatch.setattr(gpu_shares, "probe_on_cluster", probe)
    spec = _spec(name="sized")
    layout = SweepLayout(Storage(str(tmp_path)), spec.name)
    with driver._driving(spec, layout, None, False, "4 trials", export=None) as (_, sized, _driving):
        assert sized.sweep.resources.teacher.gpus_per_worker == 0.25
        assert list(driver_limits().values()) == [SlotMeasure(4)]  # what the searcher obeys while the driver runs
    assert driver_limits() == {}
    assert not sys.modules["ray"].is_initialized()  # nothing in the driver's run starts a Ray of its own
    assert probe.asked == [["teacher", "student"]]
    assert shown[0].startswith("sweep sized: measuring a training step of the teacher and student on one GPU")
    assert shown[1].startswith("GPU shares (auto): teacher 0.25 GPU per worker: a step at batch 32 peaks at 2.9 GiB")
    assert shown[3].startswith("GPU shares (auto): 4 trial(s) at a time")
    assert shown[4].startswith("sweep sized: 4 trials, 4 at a time; log ")
    assert spec.sweep.resources.teacher.gpus_per_worker == "auto"  # what is stored stays as written
    record = json.loads((tmp_path / "sweeps" / "sized" / "gpu_shares.json").read_text())
    assert record["max_concurrent_trials"] == 4 and record["slots"]["capacity"] == 4
    teacher = record["roles"]["teacher"]
    assert (teacher["gpus_per_worker"], teacher["peak_mb"], teacher["resident_mb"]) == (0.25, 3000, 8192)
    assert teacher["need_mb"] == pytest.approx(3000 * 1.25 + 8192 + 1024)


def test_the_driver_weighs_runs_by_their_gpus_and_says_so(tmp_path, monkeypatch):
    """A budget over 4-GPU teachers and 1-GPU students: the searcher and the run-slot book get the
    weighed measure, and the sweep's first line says what it allows."""
    from remem_ray.storage import Storage
    from remem_ray.sweep import driver
    from remem_ray.sweep.layout import SweepLayout
    from remem_ray.sweep.slots import _DRIVER_LIMITS

    shown = _driver_without_ray(monkeypatch, _nodes(8, cpus=64, count=2))
    ddp = {"sweep.resources.gpu_budget": 16, "sweep.resources.teacher.num_workers": 4, "name": "weighed"}
    spec = _spec(1, 1, **ddp)
    layout = SweepLayout(Storage(str(tmp_path)), spec.name)
    with driver._driving(spec, layout, None, False, "64 trials", export=None):
        assert list(_DRIVER_LIMITS.values()) == [SlotMeasure(16, 4, 1, by_gpus=True)]
    assert shown[0].startswith(
        "sweep weighed: 64 trials, 4 to 16 at a time: 16 GPUs, a teacher run takes 4 and a student run 1; log "
    )


def test_the_driver_refuses_auto_without_gpus_before_its_first_write(tmp_path, monkeypatch):
    import contextlib

    from remem_ray.storage import Storage
    from remem_ray.sweep import driver, progress
    from remem_ray.sweep.layout import SweepLayout

    opened = []

    @contextlib.contextmanager
    def console(*args, **kwargs):
        opened.append(True)
        yield None

    @contextlib.contextmanager
    def no_ray(address, verbose):
        yield None

    monkeypatch.setattr(driver, "ray_session", no_ray)
    monkeypatch.setattr(driver, "cluster_nodes", lambda: [NodeResources(0, 8)])
    monkeypatch.setattr(progress, "sweep_console", console)
    spec = _spec(name="nogpu")
    with pytest.raises(ResourceError, match="no GPUs now"):
        with driver._driving(spec, SweepLayout(Storage(str(tmp_path)), spec.name), None, False, "4 trials", None):
            pass
    assert opened == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "teacher, nodes, refused",
    [
        ({"gpus_per_worker": 1}, [NodeResources(0, 2)], "teacher.gpus_per_worker: 1 worker(s) of 0.9 CPU(s) and 1 GPU"),
        ({"cpus_per_worker": 4}, [NodeResources(0, 2)], "teacher.cpus_per_worker: 1 worker(s) of 4 CPU(s)"),
        ({"num_workers": 2, "cpus_per_worker": 1}, [NodeResources(0, 2)], "teacher.cpus_per_worker: 2 worker(s)"),
        ({"cpus_per_worker": 1.5}, [NodeResources(0, 1.55)], "trial_cpus: 0.1 CPU(s) for each trial"),
        ({"num_workers": 2, "gpus_per_worker": 1}, [NodeResources(1, 16)], "teacher.gpus_per_worker"),
        ({"gpus_per_worker": 1}, [NodeResources(1, 16)], None),
        ({"num_workers": 2, "gpus_per_worker": 0.5}, [NodeResources(1, 16)], None),
        ({"gpus_per_worker": "auto"}, [NodeResources(1, 16)], None),  # sized to the card later
        ({}, [NodeResources(0, 2)], None),  # the embedded default on 2 cores
    ],
)
def test_a_private_ray_refuses_a_run_it_can_never_place(teacher, nodes, refused, tmp_path, monkeypatch):
    """gpus_per_worker: 1 on a machine without GPUs, or more CPUs than it has: each Train run
    waited worker_start_timeout_s (600 s) for workers that never came, on every retry of every
    trial, then the sweep exited 1. A private local Ray has no autoscaler: refused at once,
    before the sweep's first write."""
    import contextlib

    from remem_ray.storage import Storage
    from remem_ray.sweep import driver, driver_lease
    from remem_ray.sweep.layout import SweepLayout

    spec = load_sweep_spec(
        None, {"sweep.resources.teacher": teacher, "sweep.resources.student": {"gpus_per_worker": 0}}
    )
    if refused is None:
        refuse_what_this_machine_cannot_hold(spec, nodes)
        return

    @contextlib.contextmanager
    def no_ray(address, verbose):
        yield None

    class LeaseTaken(Exception):
        pass

    def lease(*args, **kwargs):
        raise LeaseTaken

    monkeypatch.setattr(driver, "ray_session", no_ray)
    monkeypatch.setattr(driver, "cluster_nodes", lambda: nodes)
    monkeypatch.setattr(driver, "preflight_from_cluster", lambda spec, address: None)
    monkeypatch.setattr(driver_lease, "driving_lease", lease)  # the sweep's first write
    layout = SweepLayout(Storage(str(tmp_path)), spec.name)
    with pytest.raises(ResourceError, match=rf"^sweep\.resources\.{re.escape(refused)}.*this machine's Ray \("):
        with driver._driving(spec, layout, None, False, "4 trials", None):
            pass
    # on a cluster (--address) an autoscaler may add what it lacks: not refused there
    with pytest.raises(LeaseTaken), driver._driving(spec, layout, "10.0.0.0:6379", False, "4 trials", None):
        pass


def test_a_private_ray_refuses_a_driver_resource_no_node_of_it_has():
    spec = load_sweep_spec(None, {"sweep.resources.driver_resource": "driver"})
    with pytest.raises(ResourceError, match=r"^sweep\.resources\.driver_resource: 'driver' is a resource of a"):
        refuse_what_this_machine_cannot_hold(spec, [NodeResources(0, 2)])


def test_a_run_bigger_than_the_card_gets_a_whole_gpu_and_a_warning():
    sized, lines = resolve_gpu_shares(_spec(), _nodes(1), RecordedProbe({"teacher": 70000, "student": 3000}))
    assert sized.sweep.resources.teacher.gpus_per_worker == 1.0
    assert (
        "more than a 79.6 GiB NVIDIA H100 80GB HBM3 holds with the margins: the runs may run out of memory"
        in (lines[0])
    )
    assert "4 run(s) fit" in lines[1]  # the student alone would fit four (it shares the teacher's run)
