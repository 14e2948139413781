"""What FedCross records (no FLARE): a validated communication's scores of the ensemble and of each model, and the
results record fedseg_results.json of the best set's final scores (fedseg.report reads it). The sites' scores come
in validated (fedseg.fl.fedcross_screening.read_cross_scores).
"""

from __future__ import annotations

import math

import numpy as np

from fedseg.algorithms.screening import case_dice

KEEP = ("dice", "dice_std", "n_cases", "dice_per_case", "hd95")  # of a model's summary (hd95 when the sites compute it)
# per-case and voxel-level uncertainty sit next to the per-case Dice of the ensemble
ENSEMBLE_UNCERTAINTY = ("mean_std_per_case", "mean_entropy_per_case", "mean_std_wrong", "mean_std_right", "n_wrong", "n_right")


def finite_mean(values) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validation_scores(scores: dict[str, dict], k: int) -> dict:
    """A validated communication's record from the sites' scores of its k models ({site: read_cross_scores}):
    the ensemble's Dice over every validation case, each model's, the number of cases, and per site."""
    ens_cases, member_cases = [], [[] for _ in range(k)]
    per_site = {}
    for site, metrics in sorted(scores.items()):
        if not metrics.get("n_cases"):
            continue
        ens_cases += case_dice(metrics["ensemble"])
        for m, summary in enumerate(metrics["members"]):
            member_cases[m] += case_dice(summary)
        per_site[site] = {
            "ensemble": metrics["ensemble"]["dice"],
            "members": [s["dice"] for s in metrics["members"]],
            "n_cases": metrics["n_cases"],
        }
    return {
        "val_dice": float(np.mean(ens_cases)) if ens_cases else float("nan"),
        "val_member_dice": [float(np.mean(x)) if x else float("nan") for x in member_cases],
        "val_n_cases": len(ens_cases),
        "val_per_site": per_site,
    }


def final_models(scores: dict[str, dict], k: int) -> tuple[dict[str, dict], dict]:
    """({"ensemble": {site: scores}, "member m": {site: scores}}, the ensemble's uncertainty over the sites) from
    the sites' final scores of the k models of the best set ({site: read_cross_scores})."""
    models: dict[str, dict] = {"ensemble": {}}
    models.update({f"member {m}": {} for m in range(k)})
    sums = {"std_sum_wrong": 0.0, "n_wrong": 0, "std_sum_right": 0.0, "n_right": 0}
    per_site_uncertainty, per_site_auroc = {}, {}
    for site, metrics in sorted(scores.items()):
        if not metrics.get("n_cases"):
            continue
        u = metrics["uncertainty"]
        models["ensemble"][site] = (
            {key: metrics["ensemble"][key] for key in KEEP if key in metrics["ensemble"]}
            | {key: u[key] for key in ENSEMBLE_UNCERTAINTY}
            | {"uncertainty_auroc": u["auroc"], "section": metrics["section"]}
        )
        for m, summary in enumerate(metrics["members"]):
            models[f"member {m}"][site] = {key: summary[key] for key in KEEP if key in summary}
        for key in sums:
            sums[key] += u[key]
        per_site_uncertainty[site] = {"wrong": u["mean_std_wrong"], "right": u["mean_std_right"]}
        per_site_auroc[site] = u["auroc"]
    uncertainty = {
        "uncertainty_mean_std_wrong": sums["std_sum_wrong"] / sums["n_wrong"] if sums["n_wrong"] else float("nan"),
        "uncertainty_mean_std_right": sums["std_sum_right"] / sums["n_right"] if sums["n_right"] else float("nan"),
        "uncertainty_per_site": per_site_uncertainty,  # mean std over wrong / right voxels
        # voxel-level AUROC of the ensemble's std for finding its wrong voxels (0.5: no better than chance;
        # a single model has no spread: 0.5); the mean is over the sites where both kinds of voxel exist
        "uncertainty_auroc_per_site": per_site_auroc,
        "uncertainty_auroc_mean": finite_mean(per_site_auroc.values()),
    }
    return models, uncertainty


def fedcross_results(scores: dict[str, dict], k: int, section: str, run: dict, files: dict) -> dict:
    """The results record of the best set's final scores on ``section``: a row for the ensemble and one per
    model; "extra" holds ``run`` (the job's settings and what the run did), the ensemble's uncertainty, then
    ``files`` (the model set, checkpoint write time, history)."""
    models, uncertainty = final_models(scores, k)
    return {
        "method": "fedcross" if k == 1 else "fedcrossens",
        "section": section,
        "models": models,
        "extra": {**run, **uncertainty, **files},
    }
