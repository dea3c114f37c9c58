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
worker and says why. With no sweep.max_concurrent_trials nor gpu_budget, as many trials run at
once as the cluster's GPUs hold at these shares (at least 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from remem_ray.config import SweepSpec
from remem_ray.contract import StepMemory

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


def resolve_gpu_shares(
    spec: SweepSpec, cluster_gpus: float, probe: Probe, cluster_cpus: float = math.inf
) -> tuple[SweepSpec, list[str]]:
    """The spec with every `auto` replaced by a share (and the concurrency it allows), and the
    console lines that say how each was found. A spec without `auto` comes back as it is."""
    res = spec.sweep.resources
    roles = res.auto_roles()
    if not roles:
        return spec, []
    if cluster_gpus <= 0 and spec.device == "auto":
        names = " and ".join(roles)
        shares = {role: 0.0 for role in roles}
        lines = [f"GPU shares (auto): the cluster has no GPUs: the {names} train on CPUs (device: cuda waits for GPUs)"]
        return _with_shares(spec, shares, cluster_gpus, cluster_cpus), lines
    shares, why = {}, {}
    single = []
    for role in roles:
        workers = getattr(res, role).num_workers
        if workers > 1:
            shares[role], why[role] = 1.0, f"{workers} workers, a GPU each (DDP)"
        else:
            single.append(role)
    if single:
        _measured(spec, single, probe, shares, why)
    if len(roles) == 2 and res.teacher.num_workers == res.student.num_workers:
        if res.teacher.cpus_per_worker == res.student.cpus_per_worker:  # one run for both phases
            larger = max(shares.values())
            shares = {role: larger for role in roles}
    lines = [f"GPU shares (auto): {role} {shares[role]:g} GPU per worker: {why[role]}" for role in roles]
    sized = _with_shares(spec, shares, cluster_gpus, cluster_cpus)
    if sized.sweep.max_concurrent_trials != spec.sweep.max_concurrent_trials:
        cpus = "" if math.isinf(cluster_cpus) else f" and {cluster_cpus:g} CPUs at {_cpus_per_trial(sized):g}"
        lines.append(
            f"GPU shares (auto): {sized.max_concurrent_trials()} trials at a time: the cluster's "
            f"{cluster_gpus:g} GPU(s) at {sized.sweep.resources.gpus_per_trial():g}{cpus} per trial "
            f"(sweep.max_concurrent_trials or gpu_budget set it otherwise)"
        )
    return sized, lines


def _cpus_per_trial(spec: SweepSpec) -> float:
    """CPUs a trial holds at its peak: its driver's and its larger Train run's."""
    res = spec.sweep.resources
    return res.trial_cpus + max(r.num_workers * r.cpus_per_worker for r in (res.teacher, res.student))


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
        runs = runs_per_gpu(run_need_mb(m.peak_mb, m.resident_mb), m.total_mb)
        shares[role] = share_of(runs)
        batch = getattr(spec, role).batch_size
        why[role] = (
            f"a step at batch {batch} peaks at {_gib(m.peak_mb)}; with {_gib(m.resident_mb)} of data kept "
            f"on the GPU and {_gib(PROCESS_MB)} per process, {runs} run(s) fit on a {_gib(m.total_mb)} {m.device}"
        )


def _with_shares(spec: SweepSpec, shares: dict[str, float], cluster_gpus: float, cluster_cpus: float) -> SweepSpec:
    """The spec with these shares and, unless the user chose the concurrency, as many trials at
    once as the cluster's GPUs and CPUs hold: a Train run left waiting for resources longer than
    worker_start_timeout_s fails (Ray Train counts the wait as its start)."""
    raw: dict[str, Any] = spec.model_dump(mode="json")
    for role, share in shares.items():
        raw["sweep"]["resources"][role]["gpus_per_worker"] = share
    sized = SweepSpec.model_validate(raw)
    sweep = sized.sweep
    per_trial = sweep.resources.gpus_per_trial()
    if sweep.max_concurrent_trials is None and sweep.resources.gpu_budget is None and per_trial > 0 < cluster_gpus:
        fits = math.floor(cluster_gpus / per_trial + 1e-9)
        if not math.isinf(cluster_cpus):
            fits = min(fits, math.floor(cluster_cpus / _cpus_per_trial(sized) + 1e-9))
        raw["sweep"]["max_concurrent_trials"] = max(2, fits)
        sized = SweepSpec.model_validate(raw)
    return sized


PROBE_CPUS = 1.0


def _probe_here(spec: dict, roles: list[str]) -> list[StepMemory]:
    """Runs as a Ray task on a GPU node: the training code is imported there, not in the driver."""
    from remem_ray.train.memory_probe import measure_step_memory

    sweep_spec = SweepSpec.model_validate(spec)
    return measure_step_memory(sweep_spec, roles, reweight=sweep_spec.searches_reweighting())


def probe_on_cluster(spec: SweepSpec, roles: list[str]) -> list[StepMemory]:
    """The roles' step memory, measured by a task holding one GPU of the connected cluster."""
    import ray

    task = ray.remote(num_gpus=1, num_cpus=PROBE_CPUS, max_retries=0)(_probe_here)
    pending = task.remote(spec.model_dump(mode="json"), roles)
    timeout = spec.sweep.worker_start_timeout_s
    try:
        return ray.get(pending, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(pending, force=True)
        raise ProbeFailed(f"no GPU took the probe within {timeout:.0f} s") from None
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
        raise ProbeFailed(f"{type(cause).__name__}: {first}") from None
