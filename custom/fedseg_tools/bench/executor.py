"""The benchmark's site executor: every FedSeg site task in one executor, for its multi-method simulator jobs."""

from __future__ import annotations

from fedseg.fl.executor import FedCrossExecutor, FedSMExecutor


class MultiMethodExecutor(FedSMExecutor, FedCrossExecutor):
    """Every FedSeg site task, for a job that runs several methods one after another (the benchmark's shared
    jobs, fedseg_tools.bench.jobs). Allowed only in the benchmark's own simulator runs
    (fedseg_tools.bench.jobs.BENCH_CLASSES), never at a site: a shipped job uses its method's executor, and site
    kits carry no tooling."""
