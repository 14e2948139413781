"""A dataset's paragraph on NVFlare's stock workflows (CyclicRecipe, FedAvgRecipe) next to FedCross and FedAvg."""

from __future__ import annotations

from fedseg_tools.bench.benchmark_report.dataset_section import steps_text
from fedseg_tools.bench.report_data import NAMES, _first_rec, _fmt, _mean, _pm, _table, aggregate

PAIRS = (("fedcross", "nvflare_cyclic"), ("fedavg", "nvflare_fedavg"))  # FedSeg's run, the stock peer of the same plan


def _run_rows(cells: list[dict], key: str, sites: list[str]) -> list[list[str]]:
    """Every model of one run (members left out); a failed run is one row with its error."""
    rows = []
    rec = _first_rec(cells, key)
    for model in (rec.get("results") or {}).get("models") or {}:
        if model.startswith("member"):
            continue
        a = aggregate(cells, key, model)
        if not a["dice"] and (rec.get("status") not in ("ok", "partial")):
            error = f"{rec.get('status')}: {(rec.get('error') or '')[:80]}"
            rows.append([NAMES.get(key, key), model, *["-"] * len(sites), error, "-", "-"])
            break
        if a["dice"]:
            rows.append(
                [
                    NAMES.get(key, key),
                    model + (" (headline)" if model == rec.get("headline_model") else ""),
                    *[_fmt(_mean(a["per_site"].get(s, []))) for s in sites],
                    _pm(a["dice"]),
                    _pm(a["worst"]),
                    steps_text(a),
                ]
            )
    if not rec:
        rows.append([NAMES.get(key, key), "-", *["-"] * len(sites), "not run", "-", "-"])
    return rows


def stock_section(ds: str, cells: list[dict], sites: list[str]) -> list[str]:
    rows = []
    for ours, stock in PAIRS:
        if any(stock in c.get("methods", {}) for c in cells):
            rows += _run_rows(cells, ours, sites) + _run_rows(cells, stock, sites)
    if not rows:
        return []
    return [
        f"**NVFlare's stock workflows on {ds}** (CyclicRecipe / FedAvgRecipe through a Client API script on FedSeg's "
        "engine, same data, initial checkpoint, seeds and budget; fedseg_tools.bench.stock). The stock Cyclic keeps no "
        "best model: its last model is its headline.",
        "",
        _table(["workflow", "model"] + sites + ["mean over sites", "worst site", "steps used / B"], rows),
        "",
    ]
