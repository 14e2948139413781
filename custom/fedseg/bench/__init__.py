"""FedSeg benchmark: every method side by side on the same data, seeds and training budget.

    python -m fedseg.bench --preset quick --out bench_results [--datasets synth2d synth3d polyp]
                           [--data-dir DIR ...] [--seeds 0 1 2] [--methods ...] [--publish]

See fedseg.bench.budget (the budget), fedseg.bench.presets (smoke / quick / full), fedseg.bench.run (the
runner), fedseg.bench.cost (FL overhead and executor throughput) and fedseg.bench.benchmark_report (BENCHMARKS.md);
the local-only and centralized baselines run in fedseg.baselines (python -m fedseg.baselines benchmark ...).
"""
