"""Screening of what a site sends back, before any of it touches a model or a decision (pure; numpy only).

Everything a site returns is untrusted: a broken or malicious site can send any type in any field. The
server workflows read every field through these functions; each raises :class:`UpdateRejected` naming the
site and the field, so the workflow can log one line and go on without that site.

* fields:     :func:`read_step_count` (capped by what the server planned), :func:`read_int`, :func:`read_score`
* optimizer:  :func:`check_optimizer_state` (keys, shapes, finite, Adam's second moments >= 0, step counts)
* magnitude:  :func:`update_norm` and :func:`screen_magnitudes` (norm above ``max_ratio`` x the median of the
              other updates of the round, and of recent accepted ones, is rejected)
* scores:     :func:`read_summary` (a per-site score summary), :func:`case_dice`, :func:`robust_score`
              (median over sites: one lying site cannot pick the best model alone)
* identity:   :func:`fingerprint` (a short content hash of a weight dict, for the history)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from numbers import Real

import numpy as np

from .aggregation import UpdateRejected

OPTIM_SEP = "::"  # optimizer state keys are "<parameter name>::<state key>" (engine.optimizer_state_to_numpy)
STEP_KEY = "NUM_STEPS_CURRENT_ROUND"  # FLMetaKey.NUM_STEPS_CURRENT_ROUND (this module imports no FLARE)

__all__ = [
    "OPTIM_SEP",
    "STEP_KEY",
    "cap_step_weights",
    "case_dice",
    "check_optimizer_state",
    "fingerprint",
    "numeric_metrics",
    "read_int",
    "read_score",
    "read_step_count",
    "read_summary",
    "robust_score",
    "screen_magnitudes",
    "update_norm",
]


def _number(site: str, field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, np.integer, np.floating)):
        raise UpdateRejected(site, f"field {field!r}: not a number (got {type(value).__name__} {str(value)[:40]!r})")
    number = float(value)
    if not math.isfinite(number):
        raise UpdateRejected(site, f"field {field!r}: not finite ({number})")
    return number


def read_int(site: str, mapping, field: str, low: int | None = None, high: int | None = None) -> int:
    """An integer field of a site's meta/metrics: an int, or a float with an integral value, in [low, high]."""
    if not isinstance(mapping, Mapping) or field not in mapping:
        raise UpdateRejected(site, f"field {field!r}: missing")
    number = _number(site, field, mapping[field])
    if not number.is_integer():
        raise UpdateRejected(site, f"field {field!r}: not an integer ({number})")
    value = int(number)
    if (low is not None and value < low) or (high is not None and value > high):
        raise UpdateRejected(site, f"field {field!r}: {value} outside [{low}, {high}]")
    return value


def read_step_count(site: str, meta, planned: int | None) -> tuple[int, bool]:
    """The number of local steps a site reports (its aggregation weight) as (steps, capped).

    Must be an integer >= 1. A count above what the server planned for the round (``planned``; None or 0:
    no plan) is capped at the plan, so no site can weigh more than the server allowed it to train.
    """
    steps = read_int(site, meta, STEP_KEY, low=1)
    if planned and steps > planned:
        return int(planned), True
    return steps, False


def cap_step_weights(steps: Mapping[str, int], max_ratio: float) -> tuple[dict[str, float], dict[str, float]]:
    """Without a server plan, a site's step count (its weight) is capped at ``max_ratio`` x the median of the
    OTHER sites' counts (a leave-one-out median, so a single site's claim cannot raise its own cap).
    Returns (weights, {site: cap} for the capped ones). ``max_ratio`` <= 0 or a single site: no cap."""
    weights = {s: float(v) for s, v in steps.items()}
    capped = {}
    if max_ratio > 0 and len(steps) > 1:
        for site, value in steps.items():
            cap = max_ratio * float(np.median([v for s, v in steps.items() if s != site]))
            if value > cap:
                weights[site], capped[site] = cap, cap
    return weights, capped


def read_score(site: str, metrics, key: str, low: float = 0.0, high: float = 1.0) -> float:
    """A score (e.g. a Dice) a site reports: a finite number in [low, high]."""
    if not isinstance(metrics, Mapping):
        raise UpdateRejected(site, f"metrics: not a dict (got {type(metrics).__name__})")
    if key not in metrics:
        raise UpdateRejected(site, f"metrics: missing {key!r}")
    value = _number(site, f"metrics.{key}", metrics[key])
    if not low <= value <= high:
        raise UpdateRejected(site, f"field 'metrics.{key}': {value} outside [{low}, {high}]")
    return value


def check_optimizer_state(
    site: str, optim: dict, weights: Mapping, sent: Mapping | None = None, max_new_steps: int | None = None
) -> None:
    """Raise UpdateRejected unless ``optim`` is a sane optimizer state for a model with these ``weights``.

    Every key is "<parameter>::<state>" for a parameter of the model; every value a finite numeric numpy
    array that is a scalar (e.g. Adam's step) or has its parameter's shape. Adam's second moments
    ("::exp_avg_sq") must be >= 0: a negative one turns the next site's step into NaN (sqrt of a negative).
    Step counts ("::step") must be >= 0, never go back below what was sent, and (with ``max_new_steps``)
    not advance by more than the server planned. When a non-empty state was sent, the returned one must
    have the same keys; an empty returned state is allowed (a site's privacy scope may withhold it).
    """
    if not isinstance(optim, dict):
        raise UpdateRejected(site, f"optimizer state: not a dict (got {type(optim).__name__})")
    for key, value in optim.items():
        name, sep, state_key = str(key).partition(OPTIM_SEP)
        if not sep or name not in weights:
            raise UpdateRejected(site, f"optimizer state key {key!r} names no parameter of the model")
        if not isinstance(value, (np.ndarray, np.generic)) or not np.issubdtype(value.dtype, np.number):
            raise UpdateRejected(site, f"optimizer state {key!r} is not a numeric array")
        if value.ndim and value.shape != np.shape(weights[name]):
            raise UpdateRejected(
                site, f"optimizer state {key!r}: shape {value.shape} does not match parameter {np.shape(weights[name])}"
            )
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            raise UpdateRejected(site, f"optimizer state {key!r}: non-finite value(s)")
        if state_key == "exp_avg_sq" and np.any(value < 0):
            raise UpdateRejected(site, f"optimizer state {key!r}: {int(np.count_nonzero(value < 0))} negative second moment(s)")
        if state_key == "step":
            if value.size != 1 or float(value) < 0:
                raise UpdateRejected(site, f"optimizer state {key!r}: step count {value.ravel()[:3]} is not one number >= 0")
            before = sent.get(key) if sent else None
            if before is not None and float(value) < float(np.asarray(before).ravel()[0]):
                raise UpdateRejected(
                    site, f"optimizer state {key!r}: step count went back from {float(before):g} to {float(value):g}"
                )
            if before is not None and max_new_steps and float(value) > float(np.asarray(before).ravel()[0]) + max_new_steps:
                raise UpdateRejected(
                    site,
                    f"optimizer state {key!r}: {float(value) - float(before):g} new steps, "
                    f"more than the {max_new_steps} planned",
                )
    if sent and optim:
        missing = sorted(set(sent) - set(optim))
        extra = sorted(set(optim) - set(sent))
        if missing or extra:
            raise UpdateRejected(site, f"optimizer state keys changed: missing {missing[:5]}, unexpected {extra[:5]}")


def update_norm(params: Mapping, reference: Mapping) -> float:
    """L2 norm of ``params - reference`` over the floating-point weights (optimizer state keys excluded)."""
    total = 0.0
    for key, value in params.items():
        if OPTIM_SEP in key or key not in reference:
            continue
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            continue
        diff = array.astype(np.float64) - np.asarray(reference[key], dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_magnitudes(norms: Mapping[str, float], recent: Iterable[float] = (), max_ratio: float = 10.0) -> dict[str, str]:
    """Which updates are too large: {site: reason}.

    A site's update norm is compared with the median of its peers: the OTHER updates of the same round plus
    ``recent`` norms of accepted updates (FedCross with one model has no peer in its round). With no peer at
    all, or a peer median of 0, nothing is rejected. ``max_ratio`` <= 0 switches the check off.
    """
    if max_ratio <= 0:
        return {}
    recent = [float(x) for x in recent if math.isfinite(float(x))]
    rejected = {}
    for site, norm in norms.items():
        peers = [float(n) for s, n in norms.items() if s != site] + recent
        if not peers:
            continue
        median = float(np.median(peers))
        if median > 0 and norm > max_ratio * median:
            rejected[site] = (
                f"update norm {norm:.4g} is {norm / median:.1f}x the median {median:.4g} of the "
                f"other updates (limit {max_ratio:g}x)"
            )
    return rejected


def robust_score(values: Iterable[float]) -> float | None:
    """Median of the sites' scores (None when there is none): a single site cannot choose the best model."""
    values = [float(v) for v in values]
    return float(np.median(values)) if values else None


def read_summary(site: str, metrics, key: str | None = None, max_cases: int = 100000) -> dict:
    """A site's score summary of one model (``metrics[key]``, or ``metrics`` itself), validated and reduced to
    the known fields: n_cases >= 0 and, with cases, dice in [0, 1] (required); dice_std in [0, 1], hd95 >= 0 and
    dice_per_case (a list of n_cases values in [0, 1]; a site's privacy scope may withhold it) when present."""
    where = f"metrics.{key}" if key else "metrics"
    summary = metrics.get(key) if key and isinstance(metrics, Mapping) else metrics
    if not isinstance(summary, Mapping):
        raise UpdateRejected(site, f"{where}: missing or not a dict (got {type(summary).__name__})")
    n_cases = read_int(site, summary, "n_cases", 0, max_cases)
    if n_cases == 0:
        return {"n_cases": 0}  # nothing scored there (its Dice is NaN)
    out = {"dice": read_score(site, summary, "dice"), "n_cases": n_cases}
    if "dice_std" in summary:
        out["dice_std"] = read_score(site, summary, "dice_std")
    hd95 = summary.get("hd95")
    if isinstance(hd95, float) and math.isnan(hd95):
        pass  # no finite distance at that site (e.g. every prediction empty): left out, not an error
    elif hd95 is not None:
        out["hd95"] = read_score(site, summary, "hd95", 0.0, math.inf)
    if "dice_per_case" in summary:
        cases = summary["dice_per_case"]
        if not isinstance(cases, (list, tuple)) or len(cases) != out["n_cases"]:
            raise UpdateRejected(site, f"{where}.dice_per_case: not a list of n_cases={out['n_cases']} values")
        out["dice_per_case"] = [read_score(site, {"dice_per_case": c}, "dice_per_case") for c in cases]
    return out


def case_dice(summary: Mapping) -> list[float]:
    """Per-case Dice of a validated summary; without per-case values, the site's mean once per case (so a mean
    over sites is still weighted by their case counts)."""
    if "dice_per_case" in summary:
        return list(summary["dice_per_case"])
    return [summary["dice"]] * int(summary["n_cases"])


def numeric_metrics(metrics) -> dict[str, float]:
    """The finite numbers among a site's flat metrics (what a history may record of them); the rest is dropped."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for key, value in metrics.items():
        numeric = isinstance(key, str) and not isinstance(value, bool) and isinstance(value, (Real, np.integer, np.floating))
        if numeric and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def fingerprint(weights: dict) -> str:
    """Short content hash of a weight dict: the history shows which communications changed which model."""
    digest = hashlib.sha1()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(weights[key]).tobytes())
    return digest.hexdigest()[:12]
