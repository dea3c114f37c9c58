"""Ratio benchmarks: each script prints a table; RESULTS.md records them with machine and date."""
