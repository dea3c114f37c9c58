"""The slot logic: trials waiting for another trial's teacher hold no GPU slot."""

from __future__ import annotations

import pickle

import optuna

from remem_ray.config import SweepSpec
from remem_ray.contract import METRIC, stopped_early
from remem_ray.sweep.search import TIME_ATTR, DefineByRunSpace
from remem_ray.sweep.slots import SlotMeasure, SlotPolicy, slots_in_use
from remem_ray.sweep.tune_adapter import budget_aware_optuna_search


def test_slots_count_distilling_trials_and_one_per_teacher_in_training():
    stored = {"k1"}.__contains__
    assert slots_in_use([], stored) == 0
    assert slots_in_use(["k2", "k2", "k2"], stored) == 1  # one trains k2, two wait for it: one GPU slot
    assert slots_in_use(["k2", "k3"], stored) == 2  # two teachers in training
    assert slots_in_use(["k1", "k1", "k2", "k2"], stored) == 3  # two students distilling from k1, k2 training


class FakeSlots(SlotPolicy):
    """The policy with its registry look-up replaced: which teachers are stored is the test's."""

    def __init__(self, spec: SweepSpec, stored: set[str]) -> None:
        super().__init__(spec)
        self.RECHECK_S = 0.0
        self.stored_now = stored

    def _registry_has(self, key: str) -> bool:
        return key in self.stored_now


def _spec(max_concurrent: int, root: str = "/nonexistent-root") -> SweepSpec:
    # every trial has the same teacher (one rho, one alpha): the worst case for waiting trials
    search = {"rho": {"values": [0.05]}, "alpha": {"values": [0.9]}}
    sweep = {"max_concurrent_trials": max_concurrent, "search": search}
    return SweepSpec.model_validate({"sweep": sweep, "storage": {"root": root}})


def test_no_gpu_slot_idles_while_trials_wait_for_a_teacher():
    spec = _spec(max_concurrent=2)
    slots = FakeSlots(spec, stored=set())
    searcher = budget_aware_optuna_search(
        DefineByRunSpace(spec), METRIC, "max", optuna.samplers.TPESampler(seed=0), TIME_ATTR, stopped_early, slots=slots
    )
    # A ConcurrencyLimiter would stop at 2 live trials: one training the teacher, one waiting for it,
    # one GPU idle. Waiting trials hold no slot, so a third and fourth start (at most 2 x 2 live).
    started = [t for t in ("t1", "t2", "t3", "t4", "t5") if searcher.suggest(t) is not None]
    assert started == ["t1", "t2", "t3", "t4"]
    assert slots_in_use(searcher.live.values(), slots.is_stored) == 1  # one teacher in training

    key = next(iter(searcher.live.values()))
    slots.stored_now.add(key)  # the teacher is stored: all four distil now, every slot is taken
    assert searcher.suggest("t6") is None
    for trial in ("t1", "t2", "t3"):
        searcher.on_trial_complete(trial, {METRIC: 0.5, "epoch": 3, "epochs": 3})
    assert searcher.suggest("t6") is not None  # t4 and t6 distil: 2 slots
    assert searcher.suggest("t7") is None


def test_the_slot_policy_survives_the_searchers_save_and_restore(tmp_path):
    spec = _spec(max_concurrent=3, root=str(tmp_path))
    policy = pickle.loads(pickle.dumps(SlotPolicy(spec)))
    assert (policy.measure, policy.max_live) == (SlotMeasure(3), 6)
    assert policy.key({"rho": 0.05, "alpha": 0.9, "teacher_epoch": 20}) == spec.run_spec(
        {"rho": 0.05, "alpha": 0.9, "teacher_epoch": 20}
    ).teacher_key(1)
    assert not policy.is_stored(policy.key({"rho": 0.05, "alpha": 0.9, "teacher_epoch": 20}))  # an empty root


def test_with_a_gpu_budget_students_fill_the_gpus_their_teachers_held():
    """4-GPU teachers and 1-GPU students on 16 GPUs (search_spaces/cifar100_vit_b.yaml). Counted
    by trials, the sweep stopped at 4 live trials: once their teachers were stored, 4 students
    distilled on 16 GPUs. Weighed, trials start while a student run still fits."""
    gpu = {"num_workers": 1, "gpus_per_worker": 1}
    resources = {"teacher": {**gpu, "num_workers": 4}, "student": gpu, "gpu_budget": 16}
    spec = SweepSpec.model_validate({"sweep": {"resources": resources}})
    policy = FakeSlots(spec, stored=set())
    assert (policy.measure, policy.max_live) == (SlotMeasure(16, 4, 1, by_gpus=True), 20)
    training = ["k0", "k1", "k2", "k3"]
    assert not policy.may_start(training)  # 4 teachers: 16 GPUs
    assert policy.may_start(["k0", "k1", "k2"])  # 12 GPUs: the next may only distil, or wait for 4
    policy.stored_now.update(training)  # all four distil: 4 GPUs of 16
    assert policy.may_start(training)
    assert slots_in_use(training + ["k4"], policy.is_stored, policy.measure) == 8  # a fifth trains a teacher
    distilling = training * 4  # two checkpoints of each teacher, two students each
    assert slots_in_use(distilling[:15], policy.is_stored, policy.measure) == 15 and policy.may_start(distilling[:15])
    assert not policy.may_start(distilling)


def test_a_policy_built_while_the_driver_drives_keeps_the_drivers_measure():
    """Under Ray Client the searcher runs where no driver_limit is set: it keeps the measure it
    was built with, which must be the driver's (read off the cluster), not the spec's shares."""
    from remem_ray.sweep.slots import driver_limit

    spec = SweepSpec.model_validate(
        {
            "sweep": {
                "resources": {"gpu_budget": 8, "student": {"gpus_per_worker": 0.5}, "teacher": {"gpus_per_worker": 0.5}}
            }
        }
    )
    assert SlotPolicy(spec).measure == SlotMeasure(8, 0.5, 0.5, by_gpus=True)
    with driver_limit(spec, SlotMeasure(8, 1, 1, by_gpus=True)):
        policy = SlotPolicy(spec)
    assert pickle.loads(pickle.dumps(policy)).measure == SlotMeasure(8, 1, 1, by_gpus=True)
