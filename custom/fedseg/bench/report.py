"""BENCHMARKS.md and its plots, generated from the raw results only (raw/results.json, raw/cost.json).

    python -m fedseg.bench --report-only --out bench_results [--publish]

Raw files (written by write_raw): results.json (run record + every cell, every method, every model, every
site), results.csv (one row per dataset/seed/method/model/site), methods.csv (one row per dataset/seed/method:
time, steps, traffic, memory), cost.json (FL overhead and throughput). Plots (matplotlib, Agg): Dice per
round per method, per-site bars per dataset, FedCrossEns uncertainty against error.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np

from fedseg.bench.budget import METHODS

NAMES = {"local": "Local only", "centralized": "Centralized", "fedavg": "FedAvg", "fedprox": "FedProx", "fedsm": "FedSM",
         "softpull": "SoftPull", "fedcross": "FedCross", "fedcrossens": "FedCrossEns"}
HEADLINE = {"local": "local (own site)", "centralized": "centralized", "fedavg": "global (last)", "fedprox": "global (last)",
            "fedsm": "FedSM super model", "softpull": "SoftPull personalized (own site)", "fedcross": "ensemble",
            "fedcrossens": "ensemble"}
COLORS = {"local": "#8c8c8c", "centralized": "#000000", "fedavg": "#1f77b4", "fedprox": "#17becf", "fedsm": "#d62728",
          "softpull": "#ff9896", "fedcross": "#9467bd", "fedcrossens": "#2ca02c"}
PUBLISH_DIR = Path("docs") / "benchmarks"
MB = 1e6


# ---- small helpers -----------------------------------------------------------------------------------------
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(values) -> float:
    v = [float(x) for x in values if _finite(x)]
    return float(np.mean(v)) if v else float("nan")


def _std(values) -> float:
    """Sample standard deviation (ddof=1); 0 for one value."""
    v = [float(x) for x in values if _finite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else float("nan"))


def _fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def _pm(values, digits: int = 3) -> str:
    m, s = _mean(values), _std(values)
    if not _finite(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len([v for v in values if _finite(v)]) > 1 else f"{m:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def site_mean(per_site: dict, key: str = "dice") -> float:
    return _mean([v.get(key) for v in per_site.values() if isinstance(v, dict)])


# ---- raw files ---------------------------------------------------------------------------------------------
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


def write_raw(raw: Path, cells: list[dict], run_info: dict) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    cells = [_slim(c) for c in cells]
    (raw / "results.json").write_text(json.dumps({"run": run_info, "cells": cells}, indent=1, default=str))
    with open(raw / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "seed", "method", "model", "headline", "site", "dice", "dice_std_over_cases", "n_cases", "hd95"])
        for cell in cells:
            for m, rec in cell.get("methods", {}).items():
                for model, per_site in ((rec.get("results") or {}).get("models") or {}).items():
                    for site, v in sorted(per_site.items()):
                        w.writerow([cell["dataset"], cell["seed"], m, model, model == rec.get("headline_model"), site,
                                    _fmt(v.get("dice"), 4), _fmt(v.get("dice_std"), 4), v.get("n_cases"), _fmt(v.get("hd95"), 3)])
    with open(raw / "methods.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "seed", "method", "status", "mean_dice", "mean_hd95", "wall_seconds", "seg_steps",
                    "planned_seg_steps", "selector_steps", "mb_in_per_site_round", "mb_out_per_site_round",
                    "peak_rss_mb_max_site", "server_peak_rss_mb"])
        for cell in cells:
            rounds = (cell.get("budget") or {}).get("rounds") or 1
            for m, rec in cell.get("methods", {}).items():
                row = method_summary(rec, rounds)
                w.writerow([cell["dataset"], cell["seed"], m, rec.get("status"), _fmt(row["dice"], 4), _fmt(row["hd95"], 3),
                            _fmt(rec.get("wall_seconds"), 2), rec.get("seg_steps"), (rec.get("plan") or {}).get("seg_steps_total"),
                            rec.get("selector_steps", ""), _fmt(row["mb_in"], 4), _fmt(row["mb_out"], 4),
                            _fmt(row["peak_rss_mb"], 1), _fmt(row["server_rss_mb"], 1)])
    (raw / "run.json").write_text(json.dumps(run_info, indent=1, default=str))


def method_summary(rec: dict, rounds: int) -> dict:
    """Headline numbers of one method in one cell."""
    models = (rec.get("results") or {}).get("models") or {}
    per_site = models.get(rec.get("headline_model") or HEADLINE.get(rec.get("method"), ""), {})
    traffic = rec.get("traffic") or {}
    memory = [v for v in (rec.get("memory") or {}).values() if _finite(v)]
    return {
        "dice": site_mean(per_site) if per_site else float("nan"),
        "hd95": site_mean(per_site, "hd95") if per_site else float("nan"),
        "per_site": {s: v.get("dice") for s, v in per_site.items()},
        "per_site_hd95": {s: v.get("hd95") for s, v in per_site.items()},
        "per_site_case_std": {s: v.get("dice_std") for s, v in per_site.items()},
        "mb_in": _mean([t["bytes_in"] / rounds / MB for t in traffic.values()]) if traffic else float("nan"),
        "mb_out": _mean([t["bytes_out"] / rounds / MB for t in traffic.values()]) if traffic else float("nan"),
        "peak_rss_mb": max(memory) / 2**20 if memory else float("nan"),
        "server_rss_mb": rec["server_peak_rss_bytes"] / 2**20 if _finite(rec.get("server_peak_rss_bytes")) else float("nan"),
    }


def load_raw(raw: Path) -> tuple[dict, list[dict], dict | None]:
    data = json.loads((raw / "results.json").read_text())
    cost_file = raw / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else None
    return data["run"], data["cells"], cost


# ---- aggregation over seeds ------------------------------------------------------------------------------
def by_dataset(cells: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in cells:
        out.setdefault(c["dataset"], []).append(c)
    return out


def method_order(cells: list[dict]) -> list[str]:
    present = {m for c in cells for m in c.get("methods", {})}
    return [m for m in METHODS if m in present]


def aggregate(cells: list[dict], method: str) -> dict:
    """Over the seeds of one dataset: lists of per-seed values of one method."""
    agg: dict = {"dice": [], "hd95": [], "wall": [], "cpu": [], "steps": [], "planned": [], "selector_steps": [], "mb_in": [],
                 "mb_out": [], "rss": [], "server_rss": [], "per_site": {}, "per_site_hd95": {}, "per_site_case_std": {},
                 "status": [], "seeds": [], "errors": []}
    for c in cells:
        rec = c.get("methods", {}).get(method)
        if rec is None:
            continue
        agg["status"].append(rec.get("status"))
        if rec.get("status") not in ("ok", "partial"):
            agg["errors"].append(rec.get("error", ""))
            continue
        s = method_summary(rec, (c.get("budget") or {}).get("rounds") or 1)
        agg["seeds"].append(c["seed"])
        for key, src in (("dice", "dice"), ("hd95", "hd95"), ("mb_in", "mb_in"), ("mb_out", "mb_out"),
                         ("rss", "peak_rss_mb"), ("server_rss", "server_rss_mb")):
            agg[key].append(s[src])
        agg["wall"].append(rec.get("wall_seconds"))
        agg["cpu"].append(rec.get("cpu_seconds"))
        agg["steps"].append(rec.get("seg_steps"))
        agg["planned"].append((rec.get("plan") or {}).get("seg_steps_total"))
        agg["selector_steps"].append(rec.get("selector_steps"))
        for key in ("per_site", "per_site_hd95", "per_site_case_std"):
            for site, v in s[key].items():
                agg[key].setdefault(site, []).append(v)
    return agg


def all_models(cells: list[dict], method: str) -> dict[str, dict[str, list]]:
    """{model: {site: [dice per seed]}} for every model a method reports."""
    out: dict[str, dict[str, list]] = {}
    for c in cells:
        rec = c.get("methods", {}).get(method) or {}
        for model, per_site in ((rec.get("results") or {}).get("models") or {}).items():
            for site, v in per_site.items():
                out.setdefault(model, {}).setdefault(site, []).append(v.get("dice"))
    return out


# ---- plots -------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(cells_by_ds: dict[str, list[dict]], path: Path) -> Path | None:
    plt = _plt()
    names = list(cells_by_ds)
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.0), squeeze=False)
    for ax, ds in zip(axes[0], names):
        cells = cells_by_ds[ds]
        for m in method_order(cells):
            points: dict[float, list[float]] = {}
            for c in cells:
                for x, y in (c.get("methods", {}).get(m) or {}).get("curve") or []:
                    if _finite(y):
                        points.setdefault(round(float(x), 4), []).append(float(y))
            if not points:
                continue
            xs = sorted(points)
            ys = [np.mean(points[x]) for x in xs]
            ax.plot(xs, ys, marker="o", ms=3, label=NAMES[m], color=COLORS[m], lw=1.6)
        ax.set_title(f"{ds}: validation Dice during training")
        ax.set_xlabel("fraction of the training budget used")
        ax.set_ylabel("mean Dice over sites (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_site_bars(ds: str, cells: list[dict], path: Path) -> Path | None:
    plt = _plt()
    methods = method_order(cells)
    aggs = {m: aggregate(cells, m) for m in methods}
    sites = sorted({s for a in aggs.values() for s in a["per_site"]})
    if not sites:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * (len(sites) + 1) + 2), 4.0))
    width = 0.8 / max(len(methods), 1)
    groups = sites + ["mean"]
    for i, m in enumerate(methods):
        a = aggs[m]
        means = [_mean(a["per_site"].get(s, [])) for s in sites] + [_mean(a["dice"])]
        stds = [_std(a["per_site"].get(s, [])) for s in sites] + [_std(a["dice"])]
        xs = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(xs, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), label=NAMES[m], color=COLORS[m], capsize=2)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{ds}: per-site test Dice of each method's headline model")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def uncertainty_points(cells: list[dict]) -> tuple[list[float], list[float], list[str], dict]:
    xs, ys, sites, sums = [], [], [], {"wrong": [], "right": []}
    for c in cells:
        rec = c.get("methods", {}).get("fedcrossens") or {}
        res = rec.get("results") or {}
        extra = res.get("extra") or {}
        ens = (res.get("models") or {}).get("ensemble") or {}
        for site, scores in ens.items():
            per_case = (scores or {}).get("dice_per_case") or []
            # per-case uncertainty next to the ensemble's per-case Dice (older records: in extra.uncertainty_per_site)
            stds = scores.get("mean_std_per_case") or ((extra.get("uncertainty_per_site") or {}).get(site) or {}).get("mean_std_per_case") or []
            for std, dice in zip(stds, per_case):
                xs.append(std)
                ys.append(1.0 - dice)
                sites.append(site)
        sums["wrong"].append(extra.get("uncertainty_mean_std_wrong"))
        sums["right"].append(extra.get("uncertainty_mean_std_right"))
    return xs, ys, sites, sums


def plot_uncertainty(cells_by_ds: dict[str, list[dict]], path: Path) -> Path | None:
    plt = _plt()
    data = {ds: uncertainty_points(cells) for ds, cells in cells_by_ds.items()}
    data = {ds: d for ds, d in data.items() if d[0]}
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(4.6 * len(data), 4.0), squeeze=False)
    for ax, (ds, (xs, ys, sites, _)) in zip(axes[0], data.items()):
        for j, site in enumerate(sorted(set(sites))):
            idx = [i for i, s in enumerate(sites) if s == site]
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=12, alpha=0.7, label=site, color=f"C{j}")
        if len(xs) > 2 and np.std(xs) > 0:
            r = float(np.corrcoef(xs, ys)[0, 1])
            ax.set_title(f"{ds}: FedCrossEns (Pearson r = {r:.2f})")
        else:
            ax.set_title(f"{ds}: FedCrossEns")
        ax.set_xlabel("mean member disagreement per case (std of p)")
        ax.set_ylabel("error per case (1 - Dice)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the markdown ------------------------------------------------------------------------------------------
def _headline_sentences(ds: str, cells: list[dict]) -> list[str]:
    aggs = {m: aggregate(cells, m) for m in method_order(cells)}
    mean = {m: _mean(a["dice"]) for m, a in aggs.items() if a["dice"]}
    out = []
    if not mean:
        return out
    ranked = sorted(mean, key=lambda m: -mean[m])
    spread = mean[ranked[0]] - mean[ranked[-1]]
    seed_std = _mean([_std(a["dice"]) for a in aggs.values() if len(a["dice"]) > 1])
    if mean[ranked[0]] < 0.35 or (_finite(seed_std) and spread < 2 * seed_std):
        out.append(f"**{ds}: no conclusion at this budget** — every method is at {mean[ranked[-1]]:.2f}–{mean[ranked[0]]:.2f} "
                   f"mean Dice (seed std ≈ {seed_std:.2f}): the networks have barely started to learn; this dataset needs the "
                   "full preset's budget. Its time, traffic and memory numbers are still measured.")
        return out
    out.append(f"**{ds}**: best {NAMES[ranked[0]]} {mean[ranked[0]]:.3f}; worst {NAMES[ranked[-1]]} {mean[ranked[-1]]:.3f} "
               f"(order: " + " > ".join(f"{NAMES[m]} {mean[m]:.3f}" for m in ranked) + ").")
    if "centralized" in mean and "fedavg" in mean:
        gap = mean["centralized"] - mean["fedavg"]
        if gap > 0.005:
            closed = [f"{NAMES[m]} {100 * (mean[m] - mean['fedavg']) / gap:+.0f}%" for m in ("fedsm", "softpull", "fedcrossens", "fedcross", "fedprox")
                      if m in mean]
            out.append(f"Centralized − FedAvg gap {gap:+.3f}; share of that gap closed: " + ", ".join(closed) +
                       " (100% = as good as centralized; negative = worse than FedAvg).")
        else:
            out.append(f"FedAvg is within {abs(gap):.3f} of (or above) centralized here: there is no gap for FedSM/FedCrossEns to close.")
    for m in ("fedsm", "fedcrossens"):
        if m in mean and "fedavg" in mean and mean[m] < mean["fedavg"]:
            out.append(f"{NAMES[m]} loses to FedAvg on {ds} ({mean[m]:.3f} vs {mean['fedavg']:.3f}).")
    if "local" in mean and "fedavg" in mean and mean["local"] > mean["fedavg"]:
        out.append(f"Local-only beats FedAvg on {ds} ({mean['local']:.3f} vs {mean['fedavg']:.3f}): the sites differ more than averaging can bridge at this budget.")
    return out


def _cost_section(cost: dict | None, run: dict) -> list[str]:
    lines = ["## Cost of federation (measured in the same run)", ""]
    if not cost:
        lines += ["Not measured in this run (preset without a cost phase, or --no-cost).", ""]
        return lines
    if "error" in cost:
        lines += [f"The cost phase failed: `{cost['error']}`", ""]
        return lines
    r = cost.get("ratios") or {}
    if cost.get("plain") and cost.get("jobs"):
        from fedseg.bench.cost import ratios

        r = ratios(cost)  # recomputed from the raw measurements, so the report can add ratios to older records
    fo = r.get("fl_overhead") or {}
    lines += [
        f"Same command and machine as above; cost phase started {cost.get('started', '?')} (load average "
        f"{[round(x, 1) for x in cost.get('load_average_at_start', [])]} at start, {[round(x, 1) for x in cost.get('load_average_at_end', [])]} "
        f"at end), {_fmt(cost.get('seconds'), 0)} s. Dataset `{cost['dataset']}` ({len(cost['sites'])} sites), FedAvg for "
        f"{cost['rounds']} rounds from the same initial weights on the same engine; small work = {cost['small_epochs']} epoch "
        f"per round, realistic = {cost['realistic_epochs']} epochs per round. FL: the NVFlare simulator job (sites = parallel "
        "processes sharing the cores); plain: the same training steps and step-weighted averaging in a plain Python loop, "
        "one process, sites one after the other (1 thread, as every site). Ratio > 1: the FL run is slower. Other jobs "
        "shared this machine, so wall times move by 2x between runs; CPU seconds and the per-round overhead (training wall "
        "time minus the slowest site's task, round by round) are the robust numbers.",
        "",
    ]
    rows = []
    for key, v in fo.items():
        work, setting = key.split("/")
        label = {"shipped": "FLARE defaults, as jobs/ ship (task_request_interval 2 s, task_check_period 0.5 s)",
                 "tuned": "bench settings (task_request_interval 0.1 s, task_check_period 0.1 s)"}[setting]
        rows.append([work, label, _fmt(v.get("fl_training_seconds"), 1), _fmt(v.get("plain_training_seconds"), 1),
                     f"**{_fmt(v.get('training_wall_ratio'), 2)}**", _fmt(v.get("overhead_per_round_seconds"), 2),
                     _fmt(v.get("training_cpu_ratio"), 2), _fmt(v.get("fl_job_seconds"), 1), _fmt(v.get("plain_process_seconds"), 1),
                     _fmt(v.get("job_wall_ratio"), 2), _fmt(v.get("cpu_ratio"), 2)])
    lines += ["### FL overhead ratio", "",
              _table(["work/round", "settings", "FL training s", "plain loop s", "training wall ratio", "FL overhead s/round",
                      "training CPU ratio", "FL job s (all)", "plain process s (all)", "job wall ratio", "job CPU ratio"], rows), "",
              "FL training: the FedAvg workflow from its first task to its last aggregation; FL job: the whole simulator run "
              "(start-up of a server and one process per site, warm-up, shut-down); plain process: the plain loop's whole "
              "process (imports, data). Training CPU: the sites' CPU during their training tasks plus the server's during the "
              "workflow, against the plain loop's CPU.", ""]
    rows = []
    for setting, v in (r.get("throughput") or {}).items():
        label = {"shipped": "as shipped (validate_before_train, TensorBoard scalar every step)",
                 "lean": "validate_before_train=false, no per-step TensorBoard"}[setting]
        task, loop = v.get("train_task_seconds"), v.get("engine_train_seconds_estimate")
        rest = task - loop if _finite(task) and _finite(loop) else None
        rows.append([label, _fmt(v.get("executor_images_per_second"), 1), _fmt(v.get("engine_images_per_second_logged"), 1),
                     _fmt(v.get("plain_engine_images_per_second"), 1), _fmt(v.get("plain_monai_images_per_second"), 1),
                     _fmt(v.get("executor_vs_monai"), 2), _fmt(v.get("executor_images_per_cpu_second"), 1),
                     _fmt(v.get("plain_monai_images_per_cpu_second"), 1), f"**{_fmt(v.get('executor_vs_monai_cpu'), 2)}**",
                     _fmt(v.get("engine_vs_monai_cpu"), 2), f"{_fmt(task, 1)} = {_fmt(loop, 1)} + {_fmt(rest, 1)}"])
    lines += ["### Site executor throughput", "",
              f"Site `{cost['throughput_site']}` alone, FedAvg, {cost['realistic_epochs']} epochs per round. Executor img/s = images "
              "trained / wall time of the site's whole `train` tasks (TaskMeter); img/CPU-s = the same per CPU second of the site "
              "process (robust to other load). Engine img/s (in task) = what the engine logs for its own training loop inside that "
              "task, per-step callback included; plain engine = SegEngine.train in a plain process; plain MONAI = a hand-written "
              "MONAI loop (CacheDataset, DataLoader, the same network, DiceCELoss, Adam, same transforms and batch size). "
              "Ratio < 1: the executor is slower.", "",
              _table(["executor settings", "executor img/s", "engine img/s (in task)", "plain engine img/s", "plain MONAI img/s",
                      "executor / MONAI (wall)", "executor img/CPU-s", "plain MONAI img/CPU-s", "executor / MONAI (CPU)",
                      "plain engine / MONAI (CPU)", "train-task s = engine loop + rest"], rows), "",
              "Between the two rows the engine's own loop differs only by the per-step TensorBoard event (its wall img/s also by "
              "the machine's other load); \"rest\" is the task time outside the training loop (validating the received model, "
              "building the network, converting weights, the meter).", ""]
    ship, tuned = fo.get("small/shipped") or {}, fo.get("small/tuned") or {}
    tp = r.get("throughput") or {}
    lines += ["### What was changed to improve the ratios", "",
              f"- **Server polling (changed, in the bench's jobs):** FLARE tells a site to come back for its next task after "
              f"`task_request_interval` = 2 s, and workflows check task status every 0.5 s. With small work per round that is most of "
              f"the round: FL overhead {_fmt(ship.get('overhead_per_round_seconds'), 2)} s per round and a training wall ratio of "
              f"{_fmt(ship.get('training_wall_ratio'), 2)} with FLARE's defaults, {_fmt(tuned.get('overhead_per_round_seconds'), 2)} s "
              f"and {_fmt(tuned.get('training_wall_ratio'), 2)} with 0.1 s / 0.1 s. Every bench job uses the tuned values (a FedCross "
              "relay, with N×R communications, pays the polling most). The shipped jobs/ still use FLARE's defaults: the setting is "
              "one line in config_fed_server.json (`\"server\": {\"task_request_interval\": 0.1}`) and the workflows' "
              "`task_check_period`.",
              f"- **Executor (measured, not changed here — fedseg/fl/executor.py is not part of the benchmark):** scoring the "
              f"received model on the validation cases before every round (`validate_before_train`, it feeds FLARE's best-model "
              f"selection) and a TensorBoard event to the server at every optimizer step cost the executor "
              f"{_fmt((tp.get('shipped') or {}).get('executor_vs_monai_cpu'), 2)} → "
              f"{_fmt((tp.get('lean') or {}).get('executor_vs_monai_cpu'), 2)} of the plain MONAI loop's images per CPU second "
              "when both are off.",
              "- **Fixed costs the ratio does not hide:** a simulator job starts a server and one process per site, each importing "
              "torch, MONAI and NVFlare (the job ratio); the bench's warm-up builds each site's training cache and takes the first "
              "optimizer step before any method is timed.", ""]
    return lines


def write_report(raw: Path, out: Path, asset_prefix: str = "") -> Path:
    """BENCHMARKS.md + PNGs in `out` from the raw results in `raw`. asset_prefix: how the markdown refers to
    the PNG and raw files (relative to where the markdown is read from)."""
    run, cells, cost = load_raw(raw)
    out.mkdir(parents=True, exist_ok=True)
    cells_by_ds = by_dataset([c for c in cells if c.get("methods")])
    plots = {"curves": plot_curves(cells_by_ds, out / "dice_per_round.png")}
    for ds, ds_cells in cells_by_ds.items():
        plots[f"bars_{ds}"] = plot_site_bars(ds, ds_cells, out / f"site_dice_{ds}.png")
    plots["uncertainty"] = plot_uncertainty(cells_by_ds, out / "fedcrossens_uncertainty.png")
    md = _markdown(run, cells, cost, cells_by_ds, plots, asset_prefix)
    path = out / "BENCHMARKS.md"
    path.write_text(md)
    return path


def _without_hd95(cells: list[dict]) -> list[str]:
    """Methods whose headline results carry no HD95 (e.g. a method whose scoring does not report it)."""
    out = []
    for m in METHODS:
        recs = [c["methods"][m] for c in cells if c.get("methods", {}).get(m, {}).get("status") in ("ok", "partial")]
        if recs and not any(_finite(method_summary(r, 1)["hd95"]) for r in recs):
            out.append(m)
    return out


def _markdown(run: dict, cells: list[dict], cost: dict | None, cells_by_ds: dict, plots: dict, prefix: str) -> str:
    m = run.get("machine", {})
    L: list[str] = ["# FedSeg benchmarks", "",
                    "Generated by `fedseg.bench.report` from the raw results in "
                    f"[`{prefix}raw/`]({prefix}raw/) — do not edit by hand; regenerate with "
                    "`python -m fedseg.bench --report-only --out bench_results --publish`.", ""]
    L += ["## How these numbers were made", "",
          f"- Command: `{run.get('command')}` (preset `{run.get('preset')}`: {run.get('preset_description', '')})",
          f"- Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} CPU cores, {m.get('memory_gib', '?')} GiB; "
          f"{m.get('platform', '')}; Python {m.get('python')}, torch {m.get('torch')}, MONAI {m.get('monai')}, NVFlare {m.get('nvflare')}. "
          f"Load average at start {m.get('load_average_at_start')} (the machine was shared with other jobs: times are noisy, "
          "compare them only within this run).",
          f"- Started {run.get('started')}, finished {run.get('finished')}; wall time {_fmt(run.get('seconds'), 0)} s "
          f"(cells {_fmt(run.get('cells_seconds'), 0)} s, {run.get('parallel')} at a time); CPU time of all its processes "
          f"{_fmt(run.get('cpu_seconds'), 0)} s.",
          f"- Seeds: {run.get('seeds')} (each seed: its own initial network shared by all methods, FedCross schedule and extra members, "
          "FedSM selector initialisation, and with --isolate the sites' engine seed; the datasets are fixed, generated/split "
          "with seed 0). Mean ± std are over seeds (sample std).",
          f"- Budget: R = {run.get('rounds')} FedAvg rounds × E = {run.get('epochs')} local epochs; every method trains the same total "
          "number of segmentation-network optimizer steps summed over sites, B = R·E·Σᵢ⌈nᵢ/batch⌉ "
          f"(FedSM/SoftPull policy `{run.get('fedsm_policy')}`; see below).",
          f"- Methods ran {'each (method, seed) in its own NVFlare simulator job' if run.get('isolate') else 'one after another in ONE NVFlare simulator job per dataset (every method and seed; the sites’ data-order/augmentation random stream is seeded once and continues from run to run) and one baseline process per dataset'}; "
          f"the jobs' server `task_request_interval` = {run.get('task_request_interval')} s. Test Dice on each site's held-out test cases; "
          f"HD95 {'in voxels' if run.get('hd95') else 'not computed'}"
          + (f" (no HD95 in the results of: {', '.join(NAMES[x] for x in _without_hd95(cells))})" if run.get("hd95") and _without_hd95(cells) else "")
          + ".",
          "- GPU: **no GPU was lent to this task**; everything here ran on CPU. The GPU table below is left empty on purpose.", ""]
    L += ["## Datasets", ""]
    rows = []
    for ds, info in (run.get("datasets") or {}).items():
        sites = info.get("sites") or {}
        rows.append([ds, info.get("note", ""), ", ".join(f"{s}: {n}" for s, n in sites.items()) or "-"])
    L += [_table(["dataset", "source", "training cases per site"], rows), ""]

    # headline
    L += ["## Headline", ""]
    for ds, ds_cells in cells_by_ds.items():
        L += [f"- {s}" for s in _headline_sentences(ds, ds_cells)]
    L += ["", "Mean test Dice over sites (each method's headline model), mean ± std over seeds:", ""]
    methods_all = [x for x in METHODS if any(x in c.get("methods", {}) for c in cells)]
    rows = []
    for meth in methods_all:
        row = [f"{NAMES[meth]} ({HEADLINE[meth]})"]
        for ds, ds_cells in cells_by_ds.items():
            a = aggregate(ds_cells, meth)
            row.append(_pm(a["dice"]) if a["dice"] else f"missing ({', '.join(sorted(set(a['status']))) or 'not run'})")
        rows.append(row)
    L += [_table(["method (model)"] + list(cells_by_ds), rows), ""]
    if plots.get("curves"):
        L += [f"![Dice per round]({prefix}{plots['curves'].name})", "",
              "Learning curves on the validation cases (mean over sites and seeds) against the share of the budget B used. "
              "FedAvg/FedProx/FedSM/SoftPull: each site scores the model it receives at the start of a round (the last FedSM/"
              "SoftPull point is after R−1 rounds; FedAvg/FedProx end with the final model); FedCross/FedCrossEns: the "
              "ensemble after each communication; local-only/centralized: after each R-th of their steps.", ""]

    # per dataset
    for ds, ds_cells in cells_by_ds.items():
        methods = method_order(ds_cells)
        sites = sorted({s for c in ds_cells for s in c.get("sites", [])})
        L += [f"## {ds}", ""]
        b = ds_cells[0].get("budget", {})
        L += [f"Budget B = {b.get('total_steps')} segmentation steps per seed (R={b.get('rounds')}, E={b.get('epochs')}, batch "
              f"{b.get('batch_size')}, steps per epoch {b.get('site_steps_per_epoch')}). Seeds: {sorted(c['seed'] for c in ds_cells)}.", ""]
        L += ["Test Dice per site: mean over seeds ± std over test cases (averaged over seeds); last column: mean over sites ± std over seeds.", ""]
        rows = []
        for meth in methods:
            a = aggregate(ds_cells, meth)
            if not a["dice"]:
                rows.append([NAMES[meth]] + ["-"] * len(sites) + [f"missing: {(a['errors'] or ['not run'])[0][:80]}"])
                continue
            rows.append([NAMES[meth]] + [f"{_fmt(_mean(a['per_site'].get(s, [])))} ±{_fmt(_mean(a['per_site_case_std'].get(s, [])), 2)}"
                                         for s in sites] + [f"**{_pm(a['dice'])}**"])
        L += [_table(["method"] + sites + ["mean over sites"], rows), ""]
        rows = []
        for meth in methods:
            a = aggregate(ds_cells, meth)
            if a["dice"] and any(_finite(x) for x in a["hd95"]):
                rows.append([NAMES[meth]] + [_fmt(_mean(a["per_site_hd95"].get(s, [])), 2) for s in sites] + [_pm(a["hd95"], 2)])
        if rows:
            L += ["HD95 (voxels; mean over seeds; cases with an empty prediction are left out by MONAI's metric):", "",
                  _table(["method"] + sites + ["mean over sites"], rows), ""]
        rows = []
        for meth in methods:
            for model, per_site in all_models(ds_cells, meth).items():
                if model.startswith("local:"):
                    continue
                rows.append([NAMES[meth], model] + [_fmt(_mean(per_site.get(s, []))) for s in sites] +
                            [_pm([_mean([per_site[s][i] for s in per_site if i < len(per_site[s])])
                                  for i in range(max(len(v) for v in per_site.values()))])])
        L += ["<details><summary>Every model of every method (FedSM global / personalized / super, FedCrossEns members ...)</summary>", "",
              _table(["method", "model"] + sites + ["mean over sites"], rows), "", "</details>", ""]
        if plots.get(f"bars_{ds}"):
            L += [f"![{ds} per-site Dice]({prefix}{plots[f'bars_{ds}'].name})", ""]
        # FedSM selector
        sel_rows = []
        for c in ds_cells:
            rec = c.get("methods", {}).get("fedsm") or {}
            extra = (rec.get("results") or {}).get("extra") or {}
            if extra.get("selector_accuracy"):
                sel_rows.append([c["seed"]] + [_fmt(extra["selector_accuracy"].get(s)) for s in sites] +
                                ["; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in sorted((extra.get('routing') or {}).get(s, {}).items()))
                                           for s in sites)])
        if sel_rows:
            L += ["FedSM selector accuracy on each site's test cases (fraction routed to the site's own index) and where its test "
                  "cases were routed (`global` = confidence below gamma):", "",
                  _table(["seed"] + sites + ["routing (site: model count)"], sel_rows), ""]
        # FedCrossEns uncertainty
        xs, ys, _, sums = uncertainty_points(ds_cells)
        if sums["wrong"]:
            r = float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 and np.std(xs) > 0 and np.std(ys) > 0 else float("nan")
            L += [f"FedCrossEns uncertainty (std of the members' foreground probability): mean {_pm(sums['wrong'], 4)} on wrongly "
                  f"segmented voxels vs {_pm(sums['right'], 4)} on correct ones; per-case correlation of mean uncertainty with "
                  f"1 − Dice: r = {_fmt(r, 2)} ({len(xs)} test cases over seeds).", ""]
        # cost per method
        rows = []
        fedavg_wall = _mean(aggregate(ds_cells, "fedavg")["wall"]) if "fedavg" in methods else float("nan")
        fedavg_cpu = _mean(aggregate(ds_cells, "fedavg")["cpu"]) if "fedavg" in methods else float("nan")
        for meth in methods:
            a = aggregate(ds_cells, meth)
            if not a["dice"]:
                continue
            planned = _mean(a["planned"])
            rows.append([NAMES[meth], _pm(a["wall"], 1), _fmt(_mean(a["wall"]) / fedavg_wall, 2) if _finite(fedavg_wall) else "-",
                         _pm(a["cpu"], 1), _fmt(_mean(a["cpu"]) / fedavg_cpu, 2) if _finite(fedavg_cpu) else "-",
                         f"{_fmt(_mean(a['steps']), 0)} / {_fmt(planned, 0)}",
                         _fmt(_mean(a["selector_steps"]), 0) if meth == "fedsm" else "",
                         _fmt(_mean(a["mb_in"]), 2), _fmt(_mean(a["mb_out"]), 2), _fmt(_mean(a["rss"]), 0),
                         _fmt(_mean(a["server_rss"]), 0)])
        L += ["Cost per method (mean over seeds). Wall: the method's own time, from its first task to its final scores "
              "(training, its per-round validation, final scoring; the shared simulator start-up, warm-up and shut-down are not "
              "included; local-only: summed over its sites, which ran one after the other). CPU: CPU seconds of all site "
              "processes during the method's tasks plus the server process during the method (baselines: their process), "
              "which other load on the machine hardly changes, unlike wall time. Steps: segmentation-network optimizer steps measured at the sites / budget. "
              "Traffic: bytes of every task the site received / sent during the method (TaskMeter, FOBS-serialised size), per "
              "site per budget round R (all tasks: training, validation, final scoring). Memory: peak RSS of a site process "
              "during the method (max over sites) and of the server process.", "",
              _table(["method", "wall s", "× FedAvg", "CPU s", "× FedAvg", "seg steps (measured / budget)", "selector steps (extra)",
                      "MB received / site / round", "MB sent / site / round", "peak RSS / site MB", "server peak RSS MB"], rows), ""]
        jobs = list({j.get("name"): j for c in ds_cells for j in c.get("jobs", [])}.values())  # a shared job serves every seed
        if jobs:
            L += [f"Simulator jobs: {len(jobs)}; time outside the methods (start-up, warm-up, shut-down) "
                  f"{_pm([j.get('outside_methods_seconds') for j in jobs], 1)} s per job.", ""]

    # budget and extra cost
    L += ["## Budget and extra cost, per method", "",
          "The budget B is the total number of segmentation-network training steps summed over sites (and over a method's "
          "networks), set by FedAvg with R rounds × E local epochs: B = R·E·Σᵢ sᵢ with sᵢ = ⌈nᵢ/batch⌉. Extra work a method does "
          "is not hidden in B: it is listed here and measured in the tables above.", ""]
    plans = {}
    for c in cells:
        for meth, rec in c.get("methods", {}).items():
            plans.setdefault(meth, rec.get("plan") or {})
    rows = []
    for meth in METHODS:
        p = plans.get(meth)
        if not p:
            continue
        how = {"local": "each site alone, R·E·sᵢ steps", "centralized": "pooled cases, B steps",
               "fedavg": f"{p.get('rounds')} rounds × {p.get('local_epochs')} epochs", "fedprox": f"{p.get('rounds')} rounds × {p.get('local_epochs')} epochs, mu 0.01",
               "fedsm": f"{p.get('rounds')} rounds × {p.get('local_epochs')} epochs for each of 2 networks",
               "softpull": f"{p.get('rounds')} rounds × {p.get('local_epochs')} epochs for each of 2 networks",
               "fedcross": f"{p.get('communications')} communications × {p.get('visit_epochs')}-epoch visits, 1 model (cyclic)",
               "fedcrossens": f"{p.get('communications')} communications × {p.get('visit_epochs')}-epoch visits, K = N models (Latin)"}[meth]
        rows.append([NAMES[meth], how, "yes" if p.get("within_budget", True) else "**no (2B)**",
                     "; ".join(f"{k}: {v}" for k, v in (p.get("extra_cost") or {}).items())])
    L += [_table(["method", "configuration under B", "= B", "extra cost (reported, not counted in B)"], rows), ""]
    L += _cost_section(cost, run)
    if plots.get("uncertainty"):
        L += ["## FedCrossEns: uncertainty against error", "", f"![FedCrossEns uncertainty vs error]({prefix}{plots['uncertainty'].name})", ""]
    L += ["## GPU", "", "No GPU was lent to this task, so the full preset's speed part was not run on a GPU. Nothing below is "
          "estimated.", "", _table(["method", "dataset", "wall s (GPU)", "× FedAvg", "peak GPU memory / site"], []), ""]
    L += ["## Raw data", "", f"- [`{prefix}raw/results.json`]({prefix}raw/results.json): run record and every cell (all methods, models, sites, seeds)",
          f"- [`{prefix}raw/results.csv`]({prefix}raw/results.csv): one row per dataset/seed/method/model/site",
          f"- [`{prefix}raw/methods.csv`]({prefix}raw/methods.csv): one row per dataset/seed/method (time, steps, traffic, memory)",
          f"- [`{prefix}raw/cost.json`]({prefix}raw/cost.json): FL overhead and throughput measurements", ""]
    return "\n".join(L) + "\n"


# ---- publishing ------------------------------------------------------------------------------------------
def publish(out: Path, repo: Path) -> list[Path]:
    """Copy raw files + plots to <repo>/docs/benchmarks/ and write <repo>/BENCHMARKS.md pointing at them."""
    target = repo / PUBLISH_DIR
    if target.exists():
        shutil.rmtree(target)
    (target / "raw").mkdir(parents=True)
    written = []
    for f in sorted((out / "raw").iterdir()):
        if f.suffix in (".json", ".csv"):
            shutil.copy2(f, target / "raw" / f.name)
            written.append(target / "raw" / f.name)
    md = write_report(target / "raw", target, asset_prefix=f"{PUBLISH_DIR.as_posix()}/")
    (repo / "BENCHMARKS.md").write_text(md.read_text())
    md.unlink()
    written += sorted(target.glob("*.png")) + [repo / "BENCHMARKS.md"]
    return written
