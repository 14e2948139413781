"""The report's numbers over seeds, as data: runs grouped by dataset, every model of a run, validation curves and
whether they flattened, paired comparisons and the headline's yes/no answers, the local-optimizer pairs, the
FedCrossEns uncertainty points. Pure functions of the raw cells; the section modules render them."""

from __future__ import annotations

import numpy as np

from fedseg_tools.bench.budget import matched_key
from fedseg_tools.bench.gap_report import gap_rows
from fedseg_tools.bench.report_data import (
    _finite,
    _first_rec,
    _mean,
    aggregate,
    local_optimizer_of,
    method_order,
    method_summary,
    multiple_of,
    protocol_rows,
    run_info,
    run_keys,
    run_name,
)

BEAT_MARGIN = 0.02  # "beats FedAvg by at least 2 Dice points"
MATCH_MARGIN = 0.01  # "FedCross matches the stock cyclic workflow": at most 1 Dice point below it
FLAT_TAIL, FLAT_GAIN = 0.25, 0.01  # flattened: over the last 25% of a curve the validation Dice rises by < 0.01 (fitted line)


def by_dataset(cells: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in cells:
        out.setdefault(c["dataset"], []).append(c)
    return out


def all_models(cells: list[dict], key: str) -> dict[str, dict[str, list]]:
    """{model: {site: [dice per seed]}} for every model a run reports."""
    out: dict[str, dict[str, list]] = {}
    for c in cells:
        rec = c.get("methods", {}).get(key) or {}
        for model, per_site in ((rec.get("results") or {}).get("models") or {}).items():
            for site, v in per_site.items():
                out.setdefault(model, {}).setdefault(site, []).append(v.get("dice"))
    return out


def plotted_runs(cells: list[dict]) -> list[str]:
    """The runs drawn in the curves and bars: every method's equal-steps run, the paper-protocol runs, stock."""
    keys = [k for k, _ in protocol_rows(cells, "equal")]
    return keys + [k for k, shared in protocol_rows(cells, "paper") if not shared and k not in keys]


def without_hd95(cells: list[dict]) -> list[str]:
    """Runs whose headline results carry no HD95 (e.g. a method whose scoring does not report it)."""
    out = []
    for key in method_order(cells):
        recs = [c["methods"][key] for c in cells if c.get("methods", {}).get(key, {}).get("status") in ("ok", "partial")]
        if recs and not any(_finite(method_summary(r, 1)["hd95"]) for r in recs):
            out.append(run_name(key, recs[0]))
    return out


# ---- validation curves ------------------------------------------------------------------------------------
def _budget_multiple(rec: dict, cell: dict) -> float:
    plan = rec.get("plan") or {}
    if _finite(plan.get("budget_multiple")):
        return float(plan["budget_multiple"])
    b = (cell.get("budget") or {}).get("total_steps")
    return plan["seg_steps_total"] / b if b and _finite(plan.get("seg_steps_total")) else 1.0


def mean_curve(cells: list[dict], key: str, budget_axis: bool = False) -> list[tuple[float, float]]:
    """A run's validation curve, mean over seeds per point (x: share of its own plan, or with budget_axis the
    share of the budget B, so that a 2B run ends at 2)."""
    points: dict[float, list[float]] = {}
    for c in cells:
        rec = c.get("methods", {}).get(key) or {}
        scale = _budget_multiple(rec, c) if budget_axis else 1.0
        for x, y in rec.get("curve") or []:
            if _finite(y):
                points.setdefault(round(float(x) * scale, 4), []).append(float(y))
    return [(x, float(np.mean(points[x]))) for x in sorted(points)]


def flattened(curve: list[tuple[float, float]], tail: float = FLAT_TAIL, tol: float = FLAT_GAIN) -> tuple[bool | None, float]:
    """(flattened?, gain): gain = how much the validation Dice rises over the curve's last `tail` share, from a
    least-squares line through the points of that share (robust to the round-to-round wobble of federated
    curves); flattened when the gain is below tol. None when that share holds fewer than 3 points."""
    if len(curve) < 3:
        return None, float("nan")
    xs = np.array([x for x, _ in curve], dtype=float)
    ys = np.array([y for _, y in curve], dtype=float)
    cut = xs[-1] - tail * (xs[-1] - xs[0])
    sel = xs >= cut - 1e-9
    if sel.sum() < 3:
        return None, float("nan")
    slope = float(np.polyfit(xs[sel], ys[sel], 1)[0])
    gain = slope * float(xs[-1] - cut)
    return gain < tol, gain


# ---- comparisons and the headline's answers ----------------------------------------------------------------
def compare(cells: list[dict], a: str, b: str) -> tuple[float, float, float, list[float]]:
    """(mean Dice of run a, of run b, a - b, paired per-seed differences)."""
    aa, bb = aggregate(cells, a), aggregate(cells, b)
    da = dict(zip(aa["seeds"], aa["dice"]))
    db = dict(zip(bb["seeds"], bb["dice"]))
    paired = [da[s] - db[s] for s in da if s in db and _finite(da[s]) and _finite(db[s])]
    return _mean(aa["dice"]), _mean(bb["dice"]), _mean(aa["dice"]) - _mean(bb["dice"]), paired


def fedavg_reference(cells: list[dict], key: str, keys: set[str]) -> str:
    """The FedAvg run a run is held against: FedAvg trained for the same steps (the matched-step run at the run's
    multiple of B) when it ran, else FedAvg at B."""
    multiple = multiple_of(key, _first_rec(cells, key))
    matched = matched_key("fedavg", multiple)
    return matched if multiple > 1 and matched in keys else "fedavg"


def headline_facts(cells: list[dict]) -> dict:
    """The headline's yes/no answers for one dataset, from the numbers (None: not measured)."""
    keys = set(run_keys(cells))
    facts: dict = {}
    for m in ("fedsm", "fedcrossens"):
        per, reference = {}, {}
        for protocol, key in (("equal", m), ("paper", f"{m}-paper")):
            if key in keys and "fedavg" in keys:
                reference[protocol] = fedavg_reference(cells, key, keys)
                per[protocol] = compare(cells, key, reference[protocol])
        facts[m] = {
            "per_protocol": per,
            "reference": reference,
            "beats_fedavg": (any(d >= BEAT_MARGIN for _, _, d, _ in per.values()) if per else None),
        }
    if {"centralized", "local"} <= keys:
        c = compare(cells, "centralized", "local")
        facts["centralized_vs_local"] = {"diff": c[2], "values": c[:2], "beats": c[2] > 0, "paired": c[3]}
    if {"fedcross", "nvflare_cyclic"} <= keys and aggregate(cells, "nvflare_cyclic")["dice"]:
        c = compare(cells, "fedcross", "nvflare_cyclic")
        facts["fedcross_vs_stock"] = {"diff": c[2], "values": c[:2], "matches": c[2] >= -MATCH_MARGIN, "paired": c[3]}
    not_flat = []
    for k in plotted_runs(cells):
        flat, gain = flattened(mean_curve(cells, k))
        if flat is False:
            not_flat.append((k, gain))
    facts["not_flattened"] = not_flat
    facts["gap_closed"] = gap_rows(cells)  # share of the centralized - FedAvg gap, at matched steps
    return facts


# ---- local optimizer state; FedCrossEns uncertainty --------------------------------------------------------
def optimizer_rows(cells: list[dict]) -> list[tuple[str, dict[str, list], list]]:
    """(method, {setting: [mean test Dice per seed]}, [keep - fresh per seed]) for FedAvg/FedProx when both
    local-optimizer settings ran."""
    out = []
    for method in ("fedavg", "fedprox"):
        by: dict[str, dict[int, float]] = {}
        for c in cells:
            for k, rec in c.get("methods", {}).items():
                i = run_info(k, rec)
                if i["method"] != method or i["protocol"] != "equal" or i["group"] not in ("main", "optimizer"):
                    continue
                setting = local_optimizer_of(rec)
                if setting and rec.get("status") in ("ok", "partial"):
                    by.setdefault(setting, {})[c["seed"]] = method_summary(rec, 1)["dice"]
        if {"fresh", "keep"} <= set(by):
            diffs = [by["keep"][s] - by["fresh"][s] for s in by["keep"] if s in by["fresh"]]
            out.append((method, {k: list(v.values()) for k, v in by.items()}, diffs))
    return out


def uncertainty_points(cells: list[dict], key: str = "fedcrossens") -> tuple[list[float], list[float], list[str], dict]:
    """FedCrossEns per test case: (member disagreement, 1 - Dice, site) as three lists, and per seed the mean
    member std on wrong and on right voxels ({"wrong": [..], "right": [..]})."""
    xs, ys, sites, sums = [], [], [], {"wrong": [], "right": []}
    for c in cells:
        rec = c.get("methods", {}).get(key) or {}
        res = rec.get("results") or {}
        extra = res.get("extra") or {}
        ens = (res.get("models") or {}).get("ensemble") or {}
        for site, scores in ens.items():
            per_case = (scores or {}).get("dice_per_case") or []
            # per-case uncertainty next to the ensemble's per-case Dice (older records: in extra.uncertainty_per_site)
            stds = (
                scores.get("mean_std_per_case")
                or ((extra.get("uncertainty_per_site") or {}).get(site) or {}).get("mean_std_per_case")
                or []
            )
            for std, dice in zip(stds, per_case):
                xs.append(std)
                ys.append(1.0 - dice)
                sites.append(site)
        sums["wrong"].append(extra.get("uncertainty_mean_std_wrong"))
        sums["right"].append(extra.get("uncertainty_mean_std_right"))
    return xs, ys, sites, sums
