"""fusionkit's accuracy, robustness and ablation studies; each writes a page of ``docs/results/``.

Run one from the repository root as a module, e.g. ``python -m experiments.accuracy_presets``.
Speed and memory live in ``benchmarks/`` (pytest-benchmark).
"""
