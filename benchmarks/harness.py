"""Side-by-side timing: variants run interleaved, round after round, so drift and noisy
neighbours hit all of them alike; we compare medians as ratios, never absolute times."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.node()} | {platform.processor() or platform.machine()} | {cpus} CPUs | {gpu} | "
        f"torch {torch.__version__} | {time.strftime('%Y-%m-%d')}"
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_samples(
    variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, per_round: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per interleaved round.

    Each variant's block in a round starts with one untimed call: switching models evicts
    caches and the allocator's free lists, and we compare steady states.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            fn()
            samples[name].append(seconds_per_call(fn, per_round))
    return samples


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    """Mean seconds of `calls` back-to-back calls, the device's queued work included."""
    sync()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - began) / calls


def median_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the per-round ratio: a slow spell on a shared machine (we see
    10x bursts lasting seconds) hits both sides of a round alike and cancels."""
    return statistics.median(n / d for n, d in zip(samples[numerator], samples[denominator]))


def ratio_quartiles(samples: dict[str, list[float]], numerator: str, denominator: str) -> tuple[float, float]:
    """(25th, 75th) percentile of the per-round ratios: how far the median can be trusted."""
    ratios = sorted(n / d for n, d in zip(samples[numerator], samples[denominator]))
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    return "meets" if ok else "MISSES"
