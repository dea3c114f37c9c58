"""This process's start and peak memory (Linux), for progress lines and benchmarks/sweep_overhead.py."""

from __future__ import annotations


def process_started_at() -> float:
    """This process's start, as the kernel recorded it."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except ImportError:
        return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
