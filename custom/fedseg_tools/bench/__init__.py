"""FedSeg benchmark: every method side by side on the same data, seeds and training budget.

    python -m fedseg_tools.bench --preset quick --out bench_results [--datasets synth2d synth3d polyp]
                           [--data-dir DIR ...] [--seeds 0 1 2] [--methods ...] [--publish]

See fedseg_tools.bench.budget (the budget), fedseg_tools.bench.presets (smoke / quick / full), fedseg_tools.bench.run (the
runner), fedseg_tools.bench.cost (FL overhead and executor throughput) and fedseg_tools.bench.benchmark_report (BENCHMARKS.md);
the local-only and centralized baselines run in fedseg_tools.baselines (python -m fedseg_tools.baselines benchmark ...).
"""
