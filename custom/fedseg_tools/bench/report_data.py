"""The facts layer of the benchmark report: runs, their names and order, and per-seed values, from the raw cells.

The report (fedseg_tools.bench.benchmark_report and the section modules gap_report, leakage_report, tuning_report ...)
imports them from here, so that no report module imports another in a circle.
"""

from __future__ import annotations

import math

import numpy as np

from fedseg.report import worst_site
from fedseg_tools.bench.budget import MATCHED_BASELINES, METHODS, PAPER_DIFFERS, STOCK
from fedseg_tools.bench.collect import HEADLINE_MODEL

NAMES = {
    "local": "Local only",
    "centralized": "Centralized",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedbn": "FedBN",
    "fedsm": "FedSM",
    "softpull": "SoftPull",
    "fedcross": "FedCross",
    "fedcrossens": "FedCrossEns",
    "nvflare_cyclic": "NVFlare CyclicRecipe (stock)",
    "nvflare_fedavg": "NVFlare FedAvgRecipe (stock)",
}


# each run's headline model: FedSeg's methods as the collector records them, plus NVFlare's stock peers
HEADLINE = {**HEADLINE_MODEL, "nvflare_cyclic": "global (last)", "nvflare_fedavg": "global (best)"}


GROUPS = ("main", "stock", "matched", "tuning", "ablation", "optimizer")  # matched: baselines at the paper runs' steps


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


def _pts(x) -> str:
    """A Dice difference in Dice points (x 100), signed."""
    return f"{100 * x:+.1f}" if _finite(x) else "-"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def site_mean(per_site: dict, key: str = "dice") -> float:
    return _mean([v.get(key) for v in per_site.values() if isinstance(v, dict)])


# ---- runs: key, method, protocol, group ------------------------------------------------------------------
def run_info(key: str, rec: dict) -> dict:
    """method / protocol / group / options of a run record (records older than the two protocols: the key is
    the method, equal steps, main group)."""
    method = rec.get("method") if rec.get("method") in NAMES else key
    return {
        "key": key,
        "method": method,
        "protocol": rec.get("protocol", "equal"),
        "group": rec.get("group", "main"),
        "options": rec.get("options") or {},
    }


def local_optimizer_of(rec: dict) -> str | None:
    return (rec.get("options") or {}).get("local_optimizer") or (rec.get("workflow_args") or {}).get("local_optimizer")


def run_name(key: str, rec: dict) -> str:
    i = run_info(key, rec)
    base = NAMES.get(i["method"], i["method"])
    if i["group"] == "ablation":
        lam = i["options"].get("lam")
        return f"{base} λ={lam} ({'full' if i['protocol'] == 'paper' else 'half'} budget per network)"
    if i["group"] == "optimizer":
        return f"{base} (local optimizer {i['options'].get('local_optimizer')})"
    if i["group"] == "tuning":
        return f"{base} ({', '.join(f'{k}={v:g}' for k, v in sorted(i['options'].items()))})"
    if i["group"] == "matched":
        return matched_name(key, rec)
    return base + (" (paper protocol)" if i["protocol"] == "paper" else "")


def _first_rec(cells: list[dict], key: str) -> dict:
    return next((c["methods"][key] for c in cells if key in c.get("methods", {})), {})


def run_keys(cells: list[dict], groups=GROUPS) -> list[str]:
    """Every run key present, ordered: group, method (METHODS order, stock last), protocol."""
    found = {}
    for c in cells:
        for k, rec in c.get("methods", {}).items():
            found.setdefault(k, run_info(k, rec))
    order = list(METHODS) + list(STOCK)

    def sort_key(k):
        i = found[k]
        return (
            GROUPS.index(i["group"]) if i["group"] in GROUPS else 9,
            order.index(i["method"]) if i["method"] in order else 99,
            i["protocol"] != "equal",
            k,
        )

    return sorted((k for k in found if found[k]["group"] in groups), key=sort_key)


def method_order(cells: list[dict]) -> list[str]:
    """The main runs under equal steps (one per method) and the stock peers, in METHODS order."""
    return [k for k in run_keys(cells, ("main", "stock")) if _first_rec(cells, k).get("protocol", "equal") == "equal"]


def protocol_rows(cells: list[dict], protocol: str) -> list[tuple[str, bool]]:
    """(run key, shared) of one protocol's table: equal steps = every method's equal-steps run; paper = the
    "<method>-paper" run where the method has one, else its equal-steps run (shared=True: its own protocol is
    the equal-steps plan, the same run serves both tables). NVFlare's stock peers in both. The paper table ends
    with the matched-step baselines (FedAvg, local-only, centralized at the paper runs' 2B / N·B steps) when run."""
    main = method_order(cells)
    if protocol == "equal":
        return [(k, False) for k in main]
    keys = set(run_keys(cells))
    out = []
    for k in main:
        method = run_info(k, _first_rec(cells, k))["method"]
        paper = f"{k}-paper"
        if method in PAPER_DIFFERS and paper in keys:
            out.append((paper, False))
        elif method not in PAPER_DIFFERS:
            out.append((k, True))
    return out + [(k, False) for k in matched_keys(cells)]


def method_summary(rec: dict, rounds: int, model: str | None = None) -> dict:
    """Headline numbers of one run in one cell (`model`: another of its models instead of the headline)."""
    models = (rec.get("results") or {}).get("models") or {}
    name = model or rec.get("headline_model") or HEADLINE.get(rec.get("method"), "")
    per_site = models.get(name, {})
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


def aggregate(cells: list[dict], key: str, model: str | None = None) -> dict:
    """Over the seeds of one dataset: lists of per-seed values of one run (its headline model, or `model`)."""
    agg: dict = {
        "dice": [],
        "worst": [],  # per seed: the worst site's Dice (minimum over sites)
        "hd95": [],
        "wall": [],
        "cpu": [],
        "steps": [],
        "planned": [],
        "budget": [],
        "ratio": [],
        "selector_steps": [],
        "mb_in": [],
        "mb_out": [],
        "rss": [],
        "server_rss": [],
        "per_site": {},
        "per_site_hd95": {},
        "per_site_case_std": {},
        "status": [],
        "seeds": [],
        "errors": [],
    }
    for c in cells:
        rec = c.get("methods", {}).get(key)
        if rec is None:
            continue
        agg["status"].append(rec.get("status"))
        if rec.get("status") not in ("ok", "partial"):
            agg["errors"].append(rec.get("error", ""))
            continue
        s = method_summary(rec, (c.get("budget") or {}).get("rounds") or 1, model)
        if model and not s["per_site"]:
            continue
        agg["seeds"].append(c["seed"])
        for k, src in (
            ("dice", "dice"),
            ("hd95", "hd95"),
            ("mb_in", "mb_in"),
            ("mb_out", "mb_out"),
            ("rss", "peak_rss_mb"),
            ("server_rss", "server_rss_mb"),
        ):
            agg[k].append(s[src])
        agg["worst"].append(worst_site(s["per_site"]))
        b = (c.get("budget") or {}).get("total_steps")
        agg["wall"].append(rec.get("wall_seconds"))
        agg["cpu"].append(rec.get("cpu_seconds"))
        agg["steps"].append(rec.get("seg_steps"))
        agg["planned"].append((rec.get("plan") or {}).get("seg_steps_total"))
        agg["budget"].append(b)
        agg["ratio"].append(rec["seg_steps"] / b if _finite(rec.get("seg_steps")) and b else float("nan"))
        agg["selector_steps"].append(rec.get("selector_steps"))
        for k in ("per_site", "per_site_hd95", "per_site_case_std"):
            for site, v in s[k].items():
                agg[k].setdefault(site, []).append(v)
    return agg


def multiple_of(key: str, rec: dict) -> int:
    """A run's steps as a whole multiple of B (from its plan; "fedavg-2B" style keys when the plan has none)."""
    m = (rec.get("plan") or {}).get("budget_multiple")
    if isinstance(m, (int, float)) and math.isfinite(m) and m > 0:
        return max(1, round(m))
    tail = key.rsplit("-", 1)[-1]
    return int(tail[:-1]) if tail.endswith("B") and tail[:-1].isdigit() else 1


def matched_keys(cells: list[dict]) -> list[str]:
    """The matched-step baseline runs present, ordered by multiple, then FedAvg, local-only, centralized."""
    keys = run_keys(cells, ("matched",))

    def order(k):
        rec = _first_rec(cells, k)
        method = run_info(k, rec)["method"]
        return multiple_of(k, rec), MATCHED_BASELINES.index(method) if method in MATCHED_BASELINES else 9, k

    return sorted(keys, key=order)


def matched_name(key: str, rec: dict) -> str:
    """A matched-step baseline's row name: "FedAvg, 2B steps (matched)"."""
    method = run_info(key, rec)["method"]
    return f"{NAMES.get(method, method)}, {multiple_of(key, rec)}B steps (matched)"
