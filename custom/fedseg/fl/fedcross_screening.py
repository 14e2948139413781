"""FedCross's screening of what the sites return (no FLARE): the model a visit brings back, and the scores of a
cross_validate task. A rejection goes through the workflow's Screener (fedseg.fl.screener), named by site and
field; the model keeps its last weights, the scores are left out.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

from fedseg.algorithms import UpdateRejected, check_update
from fedseg.algorithms.packing import unpack
from fedseg.algorithms.screening import (
    check_optimizer_state,
    clip_scales,
    read_int,
    read_score,
    read_step_count,
    read_summary,
    screen_relative,
    update_norm,
)
from fedseg.fl.screener import Screener


def screen_visits(
    screener: Screener,
    pending: dict[str, int],
    results: dict,
    members: list[dict],
    recent: Collection[float],
    max_lone_update_ratio: float,
) -> tuple[set[str], dict[str, float]]:
    """(sites whose returned model moved far more than the other visits of this communication and the recent
    accepted visits (Screener.magnitudes), {site: factor} bounding the others above clip_ratio x that median
    (fedseg.algorithms.clip_scales)). ``pending``: {site: the model it visited}; ``results``: {site: FLModel};
    malformed results are left to check_visit."""
    norms = {}
    for site, m in pending.items():
        try:
            weights = unpack(results[site].params)["model"]
            check_update(site, weights, members[m])
            norms[site] = update_norm(weights, members[m])
        except Exception:  # noqa: BLE001 (any malformed result: rejected with its reason by check_visit)
            continue
    too_large = screener.magnitudes("model update", norms, recent)
    if len(norms) == 1 and not recent:  # no peer at all: against the model that was sent
        (site, norm), m = next(iter(norms.items())), pending[next(iter(norms))]
        sent = members[m]
        reason = screen_relative(norm, update_norm(sent, {k: np.zeros_like(v) for k, v in sent.items()}), max_lone_update_ratio)
        if reason:
            screener.reject(site, f"model {m} update (no other visit to compare with)", reason)
            too_large.add(site)
    # a visit replaces its model whole (no average dilutes it): one above clip_ratio x the median of this
    # communication's and the recent visits moves the model no further than that
    scales = clip_scales({s: n for s, n in norms.items() if s not in too_large}, screener.clip_ratio, recent)
    return too_large, scales


def check_visit(site: str, m: int, result, model: dict, optimizer: dict, planned: int | None) -> tuple[dict, dict, int]:
    """(weights, optimizer state, steps) of a visit of model m, the result a site returned: for model m, the
    weights fit ``model``, the optimizer state is a sane Adam state (what was sent, ``optimizer``, plus at most
    ``planned`` steps), the step count is valid. Raises UpdateRejected (or KeyError, AttributeError, TypeError
    when the result cannot be unpacked)."""
    meta = result.meta or {}
    index = read_int(site, meta, "model_index")
    if index != m:
        raise UpdateRejected(site, f"result is for model {index}, expected {m}")
    groups = unpack(result.params)
    weights, optim = groups.get("model", {}), groups.get("optim", {})
    check_update(site, weights, model)
    check_optimizer_state(site, optim, weights, optimizer, max_new_steps=planned)
    steps, _ = read_step_count(site, meta, planned)
    return weights, optim, steps


def read_uncertainty(site: str, u, n_cases: int) -> dict:
    """The ensemble's uncertainty a site reports (sums and counts over its wrong and right voxels, their means,
    the AUROC of the std for finding the wrong ones, per-case means), validated."""
    if not isinstance(u, dict):
        raise UpdateRejected(site, "metrics.uncertainty: missing or not a dict")
    unc = {key: read_score(site, u, key, 0.0, math.inf) for key in ("std_sum_wrong", "std_sum_right")}
    unc.update({key: read_int(site, u, key, 0) for key in ("n_wrong", "n_right")})
    # NaN where no voxel of that kind; auroc: of the std for finding the ensemble's wrong voxels
    for key, high in (("mean_std_wrong", math.inf), ("mean_std_right", math.inf), ("auroc", 1.0)):
        value = u.get(key)
        unc[key] = float("nan") if isinstance(value, float) and math.isnan(value) else read_score(site, u, key, 0.0, high)
    for key in ("mean_std_per_case", "mean_entropy_per_case"):
        values = u.get(key, [])
        if not isinstance(values, list) or len(values) > n_cases:
            raise UpdateRejected(site, f"metrics.uncertainty.{key}: not a list of at most {n_cases} values")
        unc[key] = [read_score(site, {key: v}, key, 0.0, math.inf) for v in values]
    return unc


def read_cross_scores(screener: Screener, site: str, metrics, k: int) -> dict | None:
    """A site's cross_validate metrics of an ensemble of k models reduced to validated fields (None, rejected,
    when malformed)."""
    try:
        n_cases = read_int(site, metrics, "n_cases", 0, 100000)
        out = {"n_cases": n_cases, "section": str(metrics.get("section", ""))[:20]}
        if n_cases == 0:
            return out
        members = metrics.get("members")
        if not isinstance(members, list) or len(members) != k:
            raise UpdateRejected(site, f"metrics.members: not a list of {k} summaries")
        out["ensemble"] = read_summary(site, metrics, "ensemble")
        out["members"] = [read_summary(site, {"m": x}, "m") for x in members]
        out["uncertainty"] = read_uncertainty(site, metrics.get("uncertainty"), n_cases)
        return out
    except UpdateRejected as e:
        screener.reject(site, "scores", e.reason)
        return None
