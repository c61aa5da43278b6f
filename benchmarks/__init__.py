"""fusionkit's benchmark suite: speed, throughput, FLOP rate and peak memory, side by side.

Run ``make bench`` (CPU) or ``make bench-gpu`` (CUDA); ``python -m benchmarks.report`` turns
the pytest-benchmark JSON into ``docs/benchmarks/``. Cases are defined in
:mod:`benchmarks.cases`; the timing and memory harness is :mod:`benchmarks.harness`.
"""
