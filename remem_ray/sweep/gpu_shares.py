"""`gpus_per_worker: auto`: the share of one GPU a role's Train runs ask for, sized as the sweep
starts from what a training step of the role takes on one of the cluster's GPUs.

Ray's GPU shares are bookkeeping: two runs of half a GPU each land on one card, and nothing
stops either from filling its memory. So a share is only as safe as the memory figure behind it:

    need         = measured peak x 1.25 + the data the run keeps on the GPU (the device pipeline's
                   store, a cached-target table) + 1 GiB (the CUDA context and cuDNN/cuBLAS
                   workspaces lie outside the allocator's figure)
    runs per GPU = floor(0.95 x the card's memory / need), from 1 to 4
    share        = 1 / runs per GPU

A role with several workers takes a GPU per worker (DDP's ranks need devices of their own). When
both roles are auto on the same workers they take the larger of their two shares, so a trial
that trains its teacher still distils in the same run. A probe that cannot measure (no CUDA
where it ran, an error, no GPU free within worker_start_timeout_s) leaves a whole GPU per
worker and says why, as do GPUs of several kinds (a share sized on one card overfills a smaller
one). On a cluster without GPUs, `auto` needs `device: cuda` (the probe then waits for a GPU node,
which an autoscaler adds). With neither sweep.max_concurrent_trials nor gpu_budget, as many trials
run at once as the cluster's GPU nodes hold at these shares (fit_concurrency).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remem_ray.config import SweepSpec, WorkerResources
from remem_ray.contract import StepMemory
from remem_ray.errors import ResourceError, UserInputError
from remem_ray.sweep.slots import ROLES, SlotMeasure, measure_of, whole

HEADROOM = 1.25
PROCESS_MB = 1024.0
USABLE = 0.95
MAX_RUNS_PER_GPU = 4
GIB = 1024.0


class ProbeFailed(Exception):
    """The step could not be measured; the message says why, in a few words."""


Probe = Callable[[SweepSpec, list[str]], list[StepMemory]]


def run_need_mb(peak_mb: float, resident_mb: float) -> float:
    return peak_mb * HEADROOM + resident_mb + PROCESS_MB


def runs_per_gpu(need_mb: float, total_mb: float) -> int:
    return max(1, min(MAX_RUNS_PER_GPU, math.floor(USABLE * total_mb / need_mb)))


def share_of(runs: int) -> float:
    """1 / runs, rounded down to Ray's resource precision (1e-4): `runs` shares fit in one GPU."""
    return math.floor(10000 / runs) / 10000


def _gib(mb: float) -> str:
    return f"{mb / GIB:.1f} GiB"


@dataclass(frozen=True)
class NodeResources:
    """An alive node's GPUs, CPUs and GPU model (Ray's accelerator_type resource; None if unknown)."""

    gpus: float
    cpus: float
    accelerator: str | None = None


def refuse_auto_without_gpus(spec: SweepSpec, nodes: list[NodeResources]) -> None:
    """ResourceError where `auto` cannot mean a GPU: device auto on a cluster without GPUs now
    (CPU-only runs would never ask an autoscaler for the GPU nodes the user meant)."""
    roles = spec.sweep.resources.auto_roles()
    if roles and spec.device == "auto" and sum(n.gpus for n in nodes) <= 0:
        raise ResourceError(
            f"sweep.resources.{roles[0]}.gpus_per_worker: auto, but the Ray cluster has no GPUs now: set "
            f"device: cuda to wait for a GPU node (an autoscaler adds one), or a number (0: CPUs only)"
        )


def refuse_what_this_machine_cannot_hold(spec: SweepSpec, nodes: list[NodeResources]) -> None:
    """ResourceError where a private local Ray (no autoscaler: its nodes are all it will ever have)
    cannot place one trial's Train run beside the trial's own driver: the run waited
    worker_start_timeout_s for workers that never came, on each of its retries, then failed.
    `auto` shares are sized to the cards later (refuse_auto_without_gpus)."""
    res = spec.sweep.resources
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    here = f"this machine's Ray ({cpus:g} CPUs, {gpus:g} GPUs)"
    if res.driver_resource:
        raise ResourceError(
            f"sweep.resources.driver_resource: {res.driver_resource!r} is a resource of a cluster's nodes; "
            f"{here} has none: remove it, or run on the cluster (--address)"
        )
    trial_cpus = res.trial_resources()["cpu"]
    for role in ("teacher", "student"):
        if role in res.auto_roles():
            continue
        r: WorkerResources = getattr(res, role)
        per_gpu = r.gpus()
        by_gpus = sum(whole(n.gpus / per_gpu) for n in nodes) if per_gpu > 0 else r.num_workers
        by_cpus = sum(whole(n.cpus / r.cpus_per_worker) for n in nodes)
        workers = f"{r.num_workers} worker(s) of {r.cpus_per_worker:g} CPU(s) and {per_gpu:g} GPU(s)"
        if min(by_gpus, by_cpus) < r.num_workers:
            field = "gpus_per_worker" if by_gpus < r.num_workers else "cpus_per_worker"
            raise ResourceError(
                f"sweep.resources.{role}.{field}: {workers} do not fit {here}: lower them, or run on a cluster "
                f"(--address)"
            )
        run_cpus = r.num_workers * r.cpus_per_worker
        if run_cpus + trial_cpus > cpus + 1e-9:
            if run_cpus >= cpus - 1e-9:  # the trial's driver needs some CPU (trial_cpus > 0): the run must leave it
                raise ResourceError(
                    f"sweep.resources.{role}.cpus_per_worker: {workers} take all {here}'s CPUs, and each "
                    f"trial's driver needs some too (trial_cpus {trial_cpus:g}): lower cpus_per_worker"
                )
            raise ResourceError(
                f"sweep.resources.trial_cpus: {trial_cpus:g} CPU(s) for each trial's driver beside its {role}'s "
                f"{workers} do not fit {here}: at most {cpus - run_cpus:g} fits"
            )


def resolve_gpu_shares(spec: SweepSpec, nodes: list[NodeResources], probe: Probe) -> tuple[SweepSpec, list[str]]:
    """The spec with every `auto` replaced by a share, and the console lines that say how each
    was found. A spec without `auto` comes back as it is. Raises ResourceError where `auto`
    cannot mean a GPU: device auto on a cluster without GPUs (an autoscaling one would never be
    asked for them)."""
    res = spec.sweep.resources
    roles = res.auto_roles()
    if not roles:
        return spec, []
    refuse_auto_without_gpus(spec, nodes)
    shares, why = {}, {}
    single = []
    for role in roles:
        workers = getattr(res, role).num_workers
        if workers > 1:
            shares[role], why[role] = 1.0, f"{workers} workers, a GPU each (DDP)"
        else:
            single.append(role)
    kinds = sorted({n.accelerator or "unknown" for n in nodes if n.gpus > 0})
    if single and len(kinds) > 1:  # a share sized on one card would overfill a smaller one
        for role in single:
            shares[role], why[role] = 1.0, f"not measured (GPUs of several kinds: {', '.join(kinds)}): a whole GPU"
    elif single:
        _measured(spec, single, probe, shares, why)
    if res.one_run_for_both_phases():  # both auto on the same workers: keep them so once sized
        larger = max(shares.values())
        for role in roles:
            if shares[role] != larger:
                why[role] += "; it shares a run with the other role, so it takes that role's larger share"
        shares = {role: larger for role in roles}
    raw: dict[str, Any] = spec.model_dump(mode="json")
    for role, share in shares.items():
        raw["sweep"]["resources"][role]["gpus_per_worker"] = share
    lines = [f"GPU shares (auto): {role} {shares[role]:g} GPU per worker: {why[role]}" for role in roles]
    return SweepSpec.model_validate(raw), lines


def _measured(spec: SweepSpec, roles: list[str], probe: Probe, shares: dict, why: dict) -> None:
    try:
        measured = {m.role: m for m in probe(spec, roles)}
    except ProbeFailed as exc:
        for role in roles:
            shares[role], why[role] = 1.0, f"not measured ({exc}): a whole GPU"
        return
    for role in roles:
        m = measured.get(role)
        if m is None or m.peak_mb is None or m.total_mb is None:
            shares[role], why[role] = 1.0, "not measured (no CUDA device where the probe ran): a whole GPU"
            continue
        need = run_need_mb(m.peak_mb, m.resident_mb)
        runs = runs_per_gpu(need, m.total_mb)
        shares[role] = share_of(runs)
        batch = getattr(spec, role).batch_size
        fit = (
            f"{runs} run(s) fit on a {_gib(m.total_mb)} {m.device}"
            if need <= USABLE * m.total_mb
            else f"that is more than a {_gib(m.total_mb)} {m.device} holds with the margins: the runs may "
            f"run out of memory (a smaller batch_size, or data.pipeline: loader)"
        )
        why[role] = (
            f"a step at batch {batch} peaks at {_gib(m.peak_mb)}; with {_gib(m.resident_mb)} of data kept "
            f"on the GPU and {_gib(PROCESS_MB)} per process, {fit}"
        )


def fit_concurrency(spec: SweepSpec, sized: SweepSpec, nodes: list[NodeResources]) -> tuple[SweepSpec, str | None]:
    """`sized` with as many trials at once as the cluster's GPU nodes hold at its shares, where
    the user (`spec`, as written) chose `auto` and neither max_concurrent_trials nor gpu_budget: a
    Train run left waiting for resources past worker_start_timeout_s fails (Ray Train counts the
    wait as its start). Each GPU node holds workers by its own GPUs and CPUs, and the cluster's
    CPUs hold the runs' and the trial drivers' together. The sweep sizes as if it had the
    cluster to itself (set gpu_budget where it shares one)."""
    sweep, res = spec.sweep, sized.sweep.resources
    if not spec.sweep.resources.auto_roles() or sweep.max_concurrent_trials is not None or res.gpu_budget is not None:
        return sized, None
    on_gpus = [r for r in (res.teacher, res.student) if r.gpus() > 0]
    if not on_gpus:
        return sized, None
    by_nodes = min(_runs_fit(r, nodes) for r in on_gpus)
    # the trials' drivers sit on any node: the cluster's CPUs hold them beside the widest runs
    run_cpus = max(r.num_workers * r.cpus_per_worker for r in on_gpus) + res.trial_resources()["cpu"]
    concurrency = max(1, min(by_nodes, whole(sum(n.cpus for n in nodes) / run_cpus)))
    raw: dict[str, Any] = sized.model_dump(mode="json")
    raw["sweep"]["max_concurrent_trials"] = concurrency
    widest = max(on_gpus, key=lambda r: r.num_workers * r.gpus())
    line = (
        f"GPU shares (auto): {concurrency} trial(s) at a time: what the cluster's GPU nodes hold at "
        f"{widest.gpus():g} GPU and {widest.cpus_per_worker:g} CPUs a worker (sweep.max_concurrent_trials or "
        f"gpu_budget set it otherwise; set gpu_budget where an autoscaler adds GPU nodes)"
    )
    return SweepSpec.model_validate(raw), line


def slot_measure(sized: SweepSpec, nodes: list[NodeResources]) -> tuple[SlotMeasure, str | None]:
    """What the sweep's concurrency counts (sweep/slots.py), with a line where gpu_budget counts
    a worker by its share but the cluster's GPU nodes hold fewer of its workers a GPU (their CPUs
    run out first: 7 CPUs a worker at half a GPU need 14 CPUs a GPU). A budget of 8 at 0.5 a
    worker ran 16 trials on 8 nodes of 1 GPU and 7 CPUs: 8 runs placed, 8 waiting past
    worker_start_timeout_s, failed and retried. Such a worker weighs the GPUs it keeps, read off
    the GPU nodes up now (an autoscaler adds more of their kind); none up, its share."""
    res = sized.sweep.resources
    if sized.sweep.max_concurrent_trials is not None or res.gpu_budget is None:
        return measure_of(sized), None
    held = {role: _gpus_held(getattr(res, role), nodes) for role in ROLES}
    measure, by_shares = measure_of(sized, held), measure_of(sized)
    if measure == by_shares:
        return measure, None
    role = max(held, key=lambda r: held[r] - getattr(res, r).gpus())
    worker = getattr(res, role)
    line = (
        f"sweep.resources.gpu_budget: {measure.describe()}, not {by_shares.describe()}: this cluster's GPU "
        f"nodes hold a {role} worker of {worker.gpus():g} GPU and {worker.cpus_per_worker:g} CPUs per "
        f"{held[role]:g} GPU (their CPUs run out first); lower cpus_per_worker, or set max_concurrent_trials"
    )
    return measure, line


def _gpus_held(role: WorkerResources, nodes: list[NodeResources]) -> float:
    """The GPUs one worker of `role` keeps from others on the cluster's GPU nodes: its share, or
    more where the nodes' CPUs hold fewer workers than their GPUs would (over the GPU nodes that
    hold one: their GPUs over the workers they hold, so one small node does not size them all)."""
    if role.gpus() <= 0:
        return 0.0
    fits = [(node.gpus, _workers_on(role, node)) for node in nodes if node.gpus]
    gpus, workers = sum(g for g, fit in fits if fit), sum(fit for _, fit in fits)
    return max(role.gpus(), gpus / workers) if workers else role.gpus()


def _runs_fit(role: WorkerResources, nodes: list[NodeResources]) -> int:
    """Runs of `role` that the GPU nodes hold at once, each node by its own GPUs and CPUs."""
    return sum(_workers_on(role, n) for n in nodes if n.gpus > 0) // role.num_workers


def _workers_on(role: WorkerResources, node: NodeResources) -> int:
    """Workers of `role` one GPU node holds at once, by its own GPUs and CPUs."""
    return min(whole(node.gpus / role.gpus()), whole(node.cpus / role.cpus_per_worker))


def sizing_record(sized: SweepSpec, measured: list[StepMemory], measure: SlotMeasure) -> dict[str, Any]:
    """What `auto` measured and chose, as stored beside the sweep (benchmarks.gpu_sweep checks
    the runs' own peaks against each role's need)."""
    res = sized.sweep.resources
    roles: dict[str, Any] = {}
    for m in measured:
        need = run_need_mb(m.peak_mb, m.resident_mb) if m.peak_mb is not None else None
        roles[m.role] = {
            "gpus_per_worker": getattr(res, m.role).gpus(),
            "device": m.device,
            "peak_mb": m.peak_mb,
            "resident_mb": m.resident_mb,
            "total_mb": m.total_mb,
            "need_mb": need,
        }
    for role in ("teacher", "student"):
        roles.setdefault(role, {"gpus_per_worker": getattr(res, role).gpus()})
    return {
        "roles": roles,
        "teacher_run_distils": res.one_run_for_both_phases(),
        "max_concurrent_trials": measure.fewest_trials(),  # trials at once while each trains its teacher
        "slots": dataclasses.asdict(measure),
        "process_mb": PROCESS_MB,
    }


PROBE_CPUS = 1.0


def _probe_here(spec: dict, roles: list[str]) -> list[StepMemory]:
    """Runs as a Ray task on a GPU node: the training code is imported there, not in the driver."""
    from remem_ray.train.memory_probe import measure_step_memory

    sweep_spec = SweepSpec.model_validate(spec)
    return measure_step_memory(sweep_spec, roles, reweight=sweep_spec.searches_reweighting())


def probe_on_cluster(spec: SweepSpec, roles: list[str]) -> list[StepMemory]:
    """The roles' step memory, measured by a task holding one GPU of the connected cluster."""
    import ray

    # max_calls=1: the worker process exits with the task, and its CUDA context with it
    task = ray.remote(num_gpus=1, num_cpus=PROBE_CPUS, max_retries=0, max_calls=1)(_probe_here)
    pending = task.remote(spec.model_dump(mode="json"), roles)
    timeout = spec.sweep.worker_start_timeout_s
    try:
        return ray.get(pending, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(pending, force=True)
        raise ProbeFailed(
            f"the probe did not finish within {timeout:.0f} s: waiting for a GPU, or listing the data"
        ) from None
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, UserInputError):  # the data or a model the runs would fail on too
            raise type(cause)(str(cause)) from None
        first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
        raise ProbeFailed(f"{type(cause).__name__}: {first}") from None
