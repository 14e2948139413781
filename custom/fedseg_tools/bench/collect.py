"""Turn a finished bench simulator workspace into one record per method (results, time, traffic, memory, curve).

Sources, all written during the run:
  <ws>/server/simulate_job/app_server/bench/timeline.json      BenchMark time stamps, server peak RSS per method
  <ws>/server/simulate_job/app_server/bench/<method>/...       the method's fedseg_results.json and outputs
  <ws>/<site>/simulate_job/fedseg_meter.jsonl                  TaskMeter: one record per task at the site
A task belongs to the method whose [start, end] time window contains it (one machine, one clock).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fedseg.fl.meter import METER_FILE, read_meter

# tasks that train segmentation networks, and how many networks each result's NUM_STEPS stands for
TRAIN_TASKS = {"train": 1, "cross_train": 1, "fedsm_train": 2}
# the validation score a site reports on the model it RECEIVED in a training task (the learning curve)
CURVE_METRIC = {
    "fedavg": "val_dice",
    "fedprox": "val_dice",
    "fedbn": "val_dice",  # FedBN: the received model with the site's own normalization
    "fedsm": "val_super_dice",
    "softpull": "val_personalized_dice",
}
HEADLINE_MODEL = {
    "local": "local (own site)",
    "centralized": "centralized",
    "fedavg": "global (best)",
    "fedprox": "global (best)",
    "fedbn": "personalized (best)",
    "fedsm": "FedSM super model",
    "softpull": "SoftPull personalized (own site)",
    "fedcross": "ensemble",
    "fedcrossens": "ensemble",
}
# extra models reported next to the headline (same rule for every method: the headline is best-validated)
LAST_MODEL = {"fedavg": "global (last)", "fedprox": "global (last)", "fedbn": "personalized (last)"}


def server_app_dir(workspace: Path) -> Path:
    return Path(workspace) / "server" / "simulate_job" / "app_server"


def timeline(workspace: Path) -> list[dict]:
    path = server_app_dir(workspace) / "bench" / "timeline.json"
    return json.loads(path.read_text()) if path.exists() else []


def windows(entries: list[dict]) -> dict[str, dict]:
    """{method: {"start", "end", "server_peak_rss_bytes"}} for methods that reached their end marker."""
    out: dict[str, dict] = {}
    for e in entries:
        if e["phase"] == "start":
            out[e["method"]] = {"start": e["time"], "cpu_start": e.get("cpu")}
        elif e["method"] in out:
            w = out[e["method"]]
            w.update(end=e["time"], server_peak_rss_bytes=e.get("peak_rss_bytes"))
            if w.get("cpu_start") is not None and e.get("cpu") is not None:
                w["server_cpu_seconds"] = e["cpu"] - w["cpu_start"]
    return {m: w for m, w in out.items() if "end" in w}


def meter_records(workspace: Path, sites: list[str]) -> dict[str, list[dict]]:
    return {s: read_meter(Path(workspace) / s / "simulate_job" / METER_FILE) for s in sites}


def _in_window(record: dict, window: dict) -> bool:
    """A task belongs to the method during whose window the site received it (the next method's first task
    can only be sent after this method's end marker)."""
    t_in = record.get("t_in")
    return t_in is not None and window["start"] <= t_in <= window["end"]


def _curve_from_meter(method: str, records: dict[str, list[dict]], rounds: int) -> list[tuple[float, float]]:
    key = CURVE_METRIC.get(method)
    if not key:
        return []
    by_round: dict[int, list[float]] = {}
    for site_records in records.values():
        for r in site_records:
            value = (r.get("metrics") or {}).get(key)
            if r.get("task_name") in TRAIN_TASKS and r.get("round") is not None and value is not None and math.isfinite(value):
                by_round.setdefault(int(r["round"]), []).append(float(value))
    return [(rnd / max(rounds, 1), float(np.mean(v))) for rnd, v in sorted(by_round.items())]


def _curve_from_history(results: dict, communications: int) -> list[tuple[float, float]]:
    history = (results.get("extra") or {}).get("history") or []
    out = []
    for h in history:
        v = h.get("val_dice")
        if v is not None and math.isfinite(v):
            out.append(((int(h["communication"]) + 1) / max(communications, 1), float(v)))
    return out


def method_record(
    method: str,
    workspace: Path,
    sites: list[str],
    plan: dict,
    window: dict | None,
    all_records: dict[str, list[dict]],
    name: str | None = None,
) -> dict:
    """Everything measured about one FL method run (BenchMark label `name`, default the method) in a bench workspace."""
    record: dict = {"method": method, "status": "missing", "plan": plan}
    results_file = server_app_dir(workspace) / "bench" / (name or method) / "fedseg_results.json"
    if window is None or not results_file.exists():
        record["error"] = "no end marker in the timeline" if window is None else f"no {results_file.name} written"
        return record
    results = json.loads(results_file.read_text())
    records = {s: [r for r in recs if _in_window(r, window)] for s, recs in all_records.items()}
    traffic, memory, steps, selector_steps, tasks = {}, {}, 0, 0.0, 0
    gpu_memory, site_steps, site_train_seconds = {}, {}, {}
    for site, recs in records.items():
        traffic[site] = {
            "bytes_in": int(sum(r.get("bytes_in") or 0 for r in recs)),
            "bytes_out": int(sum(r.get("bytes_out") or 0 for r in recs)),
            "tasks": len(recs),
            "bytes_method": sorted({r.get("bytes_method") for r in recs if r.get("bytes_method")}),
        }
        memory[site] = max((r.get("peak_rss_bytes") or 0 for r in recs), default=None)
        gpu_peaks = [r["peak_gpu_bytes"] for r in recs if isinstance(r.get("peak_gpu_bytes"), int)]
        if gpu_peaks:
            gpu_memory[site] = max(gpu_peaks)
        train = [r for r in recs if r.get("task_name") in TRAIN_TASKS and r.get("steps") is not None]
        site_steps[site] = int(sum(TRAIN_TASKS[r["task_name"]] * int(r["steps"]) for r in train))
        site_train_seconds[site] = float(sum(r.get("seconds") or 0 for r in train))
        for r in recs:
            tasks += 1
            if r.get("task_name") in TRAIN_TASKS and r.get("steps") is not None:
                steps += TRAIN_TASKS[r["task_name"]] * int(r["steps"])
            selector_steps += (
                (r.get("metrics") or {}).get("selector_steps", 0.0) if r.get("task_name") == "fedsm_train" else 0.0
            )
    task_seconds = {s: float(sum(r.get("seconds") or 0 for r in recs)) for s, recs in records.items()}
    site_cpu = {s: float(sum(r.get("cpu_seconds") or 0 for r in recs)) for s, recs in records.items()}
    if method in ("fedcross", "fedcrossens"):
        curve = _curve_from_history(results, plan.get("communications") or 1)
    else:
        curve = _curve_from_meter(method, records, plan.get("rounds") or 1)
        final = [
            v
            for v in ((results.get("extra") or {}).get("final_validation_dice") or {}).values()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        if final:
            curve.append((1.0, float(np.mean(final))))
    missing_sites = sorted(set(sites) - {s for m in results.get("models", {}).values() for s in m})
    record.update(
        status="ok" if not missing_sites else "partial",
        results=results,
        headline_model=HEADLINE_MODEL.get(method),
        wall_seconds=float(window["end"] - window["start"]),
        server_peak_rss_bytes=window.get("server_peak_rss_bytes"),
        traffic=traffic,
        memory=memory,
        gpu_memory=gpu_memory,
        site_seg_steps=site_steps,
        site_train_task_seconds=site_train_seconds,
        site_task_seconds=task_seconds,
        site_cpu_seconds=site_cpu,
        server_cpu_seconds=window.get("server_cpu_seconds"),
        cpu_seconds=float(sum(site_cpu.values()) + (window.get("server_cpu_seconds") or 0.0)),
        seg_steps=int(steps),
        selector_steps=int(selector_steps),
        tasks=tasks,
        curve=curve,
        missing_sites=missing_sites,
    )
    return record
