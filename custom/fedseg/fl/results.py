"""What a workflow records of its run: the parts of the history every round shares, and the common results record
fedseg_results.json (read by fedseg.report) written at the end into the server's app dir. No FLARE here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from fedseg.algorithms.screening import numeric_metrics
from fedseg.engine.dp import DP_METRICS
from fedseg.fl.checkpoints import write_json
from fedseg.report import RESULTS_FILE, format_table

SITE_SECONDS = ("validate_seconds", "train_seconds", "selector_seconds")  # what sites report of a round's task


def round_seconds(results: dict, began: float, tasks_done: float, aggregated_at: float, saved_at: float) -> dict:
    """Where a round's time went (perf_counter stamps): the tasks (sent to last result in), of which each site's own
    work as it reports it (SITE_SECONDS found in its metrics: a measurement, never used to decide), what FLARE added
    beyond the slowest site, the server's screening and aggregation, and saving the global model."""
    sites = {}
    for site, result in sorted(results.items()):
        metrics = result.metrics if isinstance(result.metrics, dict) else {}
        sites[site] = {
            key: round(value, 3)
            for key in SITE_SECONDS
            if isinstance(value := metrics.get(key), float) and math.isfinite(value) and value >= 0
        }
    slowest = max((sum(v.values()) for v in sites.values()), default=0.0)
    return {
        "tasks": round(tasks_done - began, 3),
        "sites": sites,
        # what FLARE adds to the slowest site's own work: transfers, (de)serialisation, polling, building the network
        "tasks_beyond_slowest_site": round(max(tasks_done - began - slowest, 0.0), 3),
        "screen_and_aggregate": round(aggregated_at - tasks_done, 3),
        "save": round(saved_at - aggregated_at, 3),
    }


def dp_spent(metrics: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """DP-SGD sites: {site: the privacy loss it reports having spent so far (dp_epsilon at dp_delta)} of the sites'
    metrics ({site: metrics}); sites that report none are absent. It is the site's own certificate."""
    return {s: m for s in sorted(metrics) if (m := numeric_metrics(metrics[s], DP_METRICS.__contains__))}


def write_results(app_dir: str | Path, record: dict) -> str:
    """Write the results record (fedseg_results.json) into the server's app dir; returns its table for the log."""
    write_json(Path(app_dir) / RESULTS_FILE, record)
    return format_table(record)
