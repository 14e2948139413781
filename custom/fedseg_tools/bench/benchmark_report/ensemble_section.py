"""A dataset's FedCrossEns paragraphs: how well the ensemble's disagreement finds its errors (voxel AUROC per
site) and the per-case uncertainty against the error."""

from __future__ import annotations

import numpy as np

from fedseg_tools.bench.benchmark_report.facts import uncertainty_points
from fedseg_tools.bench.report_data import _finite, _first_rec, _fmt, _mean, _pm, _table, run_info, run_keys, run_name


def auroc_section(ds: str, cells: list[dict], sites: list[str]) -> list[str]:
    keys = [k for k in run_keys(cells) if run_info(k, _first_rec(cells, k))["method"] == "fedcrossens"]
    rows = []
    for k in keys:
        vals = [
            ((((c["methods"].get(k) or {}).get("results") or {}).get("extra") or {}).get("uncertainty_auroc_per_site") or {})
            for c in cells
            if k in c.get("methods", {})
        ]
        if not any(vals):
            continue
        rows.append(
            [run_name(k, _first_rec(cells, k))]
            + [_pm([v.get(s) for v in vals]) for s in sites]
            + [_pm([_mean(list(v.values())) for v in vals if v])]
        )
    if not rows:
        return []
    return [
        f"**FedCrossEns uncertainty quality on {ds}**: voxel-level AUROC of the ensemble's per-voxel std (members' "
        "foreground probability) for finding the wrongly segmented voxels of each site's test cases (0.5 = no better "
        "than chance; mean ± std over seeds):",
        "",
        _table(["run"] + sites + ["mean over sites"], rows),
        "",
    ]


def uncertainty_summary(cells: list[dict]) -> list[str]:
    """Mean member std on wrong vs right voxels, and the per-case correlation of uncertainty with the error."""
    xs, ys, _, sums = uncertainty_points(cells)
    if not (sums["wrong"] and any(_finite(x) for x in sums["wrong"])):
        return []
    r = float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 and np.std(xs) > 0 and np.std(ys) > 0 else float("nan")
    return [
        f"FedCrossEns (equal steps) uncertainty: mean member std {_pm(sums['wrong'], 4)} on wrongly segmented voxels "
        f"vs {_pm(sums['right'], 4)} on correct ones; per-case correlation of mean uncertainty with 1 − Dice: "
        f"r = {_fmt(r, 2)} ({len(xs)} test cases over seeds).",
        "",
    ]
