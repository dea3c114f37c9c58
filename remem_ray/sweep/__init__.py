"""The sweep service: Tune + Optuna over rho, alpha and the teacher checkpoint; Ray Train trials."""

from remem_ray.sweep.driver import locate_sweep, resume_sweep, run_sweep, sweep_summary
from remem_ray.sweep.results import SweepSummary, format_table

__all__ = ["SweepSummary", "format_table", "locate_sweep", "resume_sweep", "run_sweep", "sweep_summary"]
