"""The raw result files the report is generated from (raw/): written by write_raw, read by load_raw.

results.json: the run record and every cell (every run, every model, every site), without the parts the report
does not use; results.csv: one row per dataset/seed/run/model/site; methods.csv: one row per dataset/seed/run
(time, steps, traffic, memory); run.json: the run record alone. Beside them, when their phases ran: cost.json
(fedseg_tools.bench.cost), gpu.json (fedseg_tools.bench.gpu) and robust.json (fedseg_tools.bench.robust).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fedseg_tools.bench.report_data import _fmt, method_summary, run_info

RESULTS_COLUMNS = [
    "dataset",
    "seed",
    "run",
    "method",
    "protocol",
    "model",
    "headline",
    "site",
    "dice",
    "dice_std_over_cases",
    "n_cases",
    "hd95",
]
METHODS_COLUMNS = [
    "dataset",
    "seed",
    "run",
    "method",
    "protocol",
    "group",
    "status",
    "mean_dice",
    "mean_hd95",
    "wall_seconds",
    "cpu_seconds",
    "seg_steps",
    "planned_seg_steps",
    "budget_steps",
    "selector_steps",
    "mb_in_per_site_round",
    "mb_out_per_site_round",
    "peak_rss_mb_max_site",
    "server_peak_rss_mb",
]


def _slim(cell: dict) -> dict:
    """A cell without the bulky parts the report does not use (FedCross history is kept as the curve)."""
    cell = json.loads(json.dumps(cell, default=str))
    for rec in cell.get("methods", {}).values():
        extra = (rec.get("results") or {}).get("extra") or {}
        extra.pop("history", None)
        extra.pop("model_set", None)
        rec.pop("log_tail", None)
    for job in cell.get("jobs", []):
        job.pop("log_tail", None)
    return cell


def results_rows(cells: list[dict]) -> list[list]:
    """results.csv: one row per dataset/seed/run/model/site."""
    rows = []
    for cell in cells:
        for k, rec in cell.get("methods", {}).items():
            i = run_info(k, rec)
            for model, per_site in ((rec.get("results") or {}).get("models") or {}).items():
                for site, v in sorted(per_site.items()):
                    rows.append(
                        [
                            *(cell["dataset"], cell["seed"], k, i["method"], i["protocol"], model),
                            model == rec.get("headline_model"),
                            site,
                            _fmt(v.get("dice"), 4),
                            _fmt(v.get("dice_std"), 4),
                            v.get("n_cases"),
                            _fmt(v.get("hd95"), 3),
                        ]
                    )
    return rows


def methods_rows(cells: list[dict]) -> list[list]:
    """methods.csv: one row per dataset/seed/run."""
    rows = []
    for cell in cells:
        budget = cell.get("budget") or {}
        for k, rec in cell.get("methods", {}).items():
            i = run_info(k, rec)
            row = method_summary(rec, budget.get("rounds") or 1)
            rows.append(
                [
                    *(cell["dataset"], cell["seed"], k, i["method"], i["protocol"], i["group"], rec.get("status")),
                    _fmt(row["dice"], 4),
                    _fmt(row["hd95"], 3),
                    _fmt(rec.get("wall_seconds"), 2),
                    _fmt(rec.get("cpu_seconds"), 2),
                    rec.get("seg_steps"),
                    (rec.get("plan") or {}).get("seg_steps_total"),
                    budget.get("total_steps"),
                    rec.get("selector_steps", ""),
                    _fmt(row["mb_in"], 4),
                    _fmt(row["mb_out"], 4),
                    _fmt(row["peak_rss_mb"], 1),
                    _fmt(row["server_rss_mb"], 1),
                ]
            )
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_raw(raw: Path, cells: list[dict], run_info_: dict) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    cells = [_slim(c) for c in cells]
    (raw / "results.json").write_text(json.dumps({"run": run_info_, "cells": cells}, indent=1, default=str))
    _write_csv(raw / "results.csv", RESULTS_COLUMNS, results_rows(cells))
    _write_csv(raw / "methods.csv", METHODS_COLUMNS, methods_rows(cells))
    (raw / "run.json").write_text(json.dumps(run_info_, indent=1, default=str))


def load_raw(raw: Path) -> tuple[dict, list[dict], dict | None]:
    """(run record, cells, cost record or None); the GPU and robustness records, when present, join the run record
    as run["gpu"] and run["robust"]."""
    data = json.loads((raw / "results.json").read_text())
    cost_file = raw / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else None
    gpu_file = raw / "gpu.json"  # the GPU variant's measurements (fedseg_tools.bench.gpu), when it ran
    if gpu_file.exists():
        data["run"]["gpu"] = json.loads(gpu_file.read_text())
    robust_file = raw / "robust.json"  # one malicious site and DP-SGD (fedseg_tools.bench.robust), when it ran
    if robust_file.exists():
        data["run"]["robust"] = json.loads(robust_file.read_text())
    return data["run"], data["cells"], cost
