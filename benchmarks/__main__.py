"""The CPU benchmark set (under 3 minutes on 2 cores): step ratios, then the smoke sweep's overhead.

python -m benchmarks
"""

from benchmarks import steps, sweep_overhead

if __name__ == "__main__":
    steps.main([])
    print()
    sweep_overhead.main([])
