"""Screening of what a site sends back, before any of it touches a model or a decision (pure; numpy only).

Everything a site returns is untrusted: a broken or malicious site can send any type in any field. The
server workflows read every field through these functions; each raises :class:`UpdateRejected` naming the
site and the field, so the workflow can log one line and go on without that site.

* fields:     :func:`read_step_count` (capped by what the server planned), :func:`read_int`, :func:`read_score`
* optimizer:  :func:`check_optimizer_state` (keys, shapes, finite, Adam's second moments >= 0, step counts)
* magnitude:  :func:`update_norm` and :func:`screen_magnitudes` (norm above ``max_ratio`` x the median of the
              other updates of the round, and of recent accepted ones, is rejected); :func:`clip_scales` and
              :func:`clip_update` (each accepted update is bounded to ``clip_ratio`` x the round's median norm);
              :func:`screen_relative` (against the model that was sent: a reference no site chooses);
* direction:  :func:`update_directions` and :func:`screen_directions` (cosine with the mean of the other
              sites' updates below ``min_cosine`` is rejected: an update that undoes the others')
              :func:`state_norm` (size of optimizer moments, screened like an update)
* metadata:   :func:`check_metadata` (depth, key-count, string-length and size limits on whatever a site sends
              in meta/metrics, checked without recursion before anything formats or stores it)
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
    "ADAM_BETAS",
    "METADATA_LIMITS",
    "OPTIM_SEP",
    "STEP_KEY",
    "adam_moment_bound",
    "cap_step_weights",
    "case_dice",
    "check_metadata",
    "check_optimizer_state",
    "clip_scales",
    "clip_update",
    "fingerprint",
    "numeric_metrics",
    "read_int",
    "read_score",
    "read_step_count",
    "read_summary",
    "robust_score",
    "screen_directions",
    "screen_magnitudes",
    "screen_relative",
    "state_norm",
    "update_directions",
    "update_norm",
]

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, what every FedSeg optimizer uses


def adam_moment_bound(betas: tuple[float, float] = ADAM_BETAS) -> float:
    """K such that Adam's moments always satisfy ``exp_avg**2 <= K * exp_avg_sq`` (element-wise), whatever the
    gradients: both are exponential averages of the same gradients from zero, so by Cauchy-Schwarz
    ``(sum a_i g_i)**2 <= (sum a_i**2 / c_i) * (sum c_i g_i**2)`` with a_i = (1 - b1) b1**i and c_i = (1 - b2) b2**i,
    i.e. K = (1 - b1)**2 / ((1 - b2) * (1 - b1**2 / b2)) (52.9 for the defaults). It holds for averages of
    valid states too (Jensen), so it is a check no site can choose the reference of: a poisoned ``exp_avg`` that
    would make the next site's Adam steps explode breaks it."""
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 < b2 < 1 and b1 * b1 < b2):
        raise ValueError(f"Adam betas {betas} outside the range this bound covers (b1**2 < b2)")
    return (1 - b1) ** 2 / ((1 - b2) * (1 - b1 * b1 / b2))


# what any field a site sends (meta, metrics) may hold at most: nesting depth, entries of one dict or list,
# characters of one string, and containers + scalars in all
METADATA_LIMITS = {"max_depth": 12, "max_entries": 20000, "max_string": 4096, "max_items": 500000}


def check_metadata(site: str, value, field: str, limits: Mapping | None = None) -> None:
    """Raise UpdateRejected when ``value`` (a field a site sent: its meta or metrics) is nested deeper, has a
    dict/list with more entries, a longer string (or key), or more items in all than ``limits`` (default
    :data:`METADATA_LIMITS`) allow. Iterative (no recursion) and it never formats the value, so a structure
    nested thousands of levels deep, or a huge one, is refused at its first excess and cannot crash the server."""
    lim = {**METADATA_LIMITS, **(limits or {})}
    stack = [(value, 0)]
    items = 0
    while stack:
        item, depth = stack.pop()
        items += 1
        if items > lim["max_items"]:
            raise UpdateRejected(site, f"{field}: more than {lim['max_items']} entries in all")
        if isinstance(item, (str, bytes)):
            if len(item) > lim["max_string"]:
                raise UpdateRejected(site, f"{field}: a string of {len(item)} characters (limit {lim['max_string']})")
            continue
        if isinstance(item, Mapping):
            children = list(item.keys()) + list(item.values())
            size = len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = list(item)
            size = len(item)
        elif isinstance(item, np.ndarray) and item.dtype == object:
            children, size = list(item.ravel()), item.size
        else:
            continue
        if depth + 1 > lim["max_depth"]:
            raise UpdateRejected(site, f"{field}: nested deeper than {lim['max_depth']} levels")
        if size > lim["max_entries"]:
            raise UpdateRejected(site, f"{field}: a dict or list of {size} entries (limit {lim['max_entries']})")
        stack.extend((child, depth + 1) for child in children)


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
    site: str,
    optim: dict,
    weights: Mapping,
    sent: Mapping | None = None,
    max_new_steps: int | None = None,
    betas: tuple[float, float] = ADAM_BETAS,
) -> None:
    """Raise UpdateRejected unless ``optim`` is a sane optimizer state for a model with these ``weights``.

    Every key is "<parameter>::<state>" for a parameter of the model; every value a finite numeric numpy
    array that is a scalar (e.g. Adam's step) or has its parameter's shape. Adam's second moments
    ("::exp_avg_sq") must be >= 0: a negative one turns the next site's step into NaN (sqrt of a negative).
    Step counts ("::step") must be >= 0, never go back below what was sent, and (with ``max_new_steps``)
    not advance by more than the server planned. When a non-empty state was sent, the returned one must
    have the same keys; an empty returned state is allowed (a site's privacy scope may withhold it).
    Every dtype must be exactly what was sent (else: the parameter's dtype; a floating step count), and every
    first moment must satisfy Adam's invariant ``exp_avg**2 <= K exp_avg_sq`` (:func:`adam_moment_bound`).
    """
    if not isinstance(optim, dict):
        raise UpdateRejected(site, f"optimizer state: not a dict (got {type(optim).__name__})")
    for key, value in optim.items():
        name, sep, state_key = str(key).partition(OPTIM_SEP)
        if not sep or name not in weights:
            raise UpdateRejected(site, f"optimizer state key {key!r} names no parameter of the model")
        if not isinstance(value, (np.ndarray, np.generic)) or not np.issubdtype(value.dtype, np.number):
            raise UpdateRejected(site, f"optimizer state {key!r} is not a numeric array")
        before = sent.get(key) if sent else None
        if before is not None:
            expected = np.asarray(before).dtype
        elif state_key == "step":
            expected = value.dtype if np.issubdtype(value.dtype, np.floating) else np.dtype(np.float32)
        else:
            expected = np.asarray(weights[name]).dtype
        if value.dtype != expected:
            raise UpdateRejected(
                site, f"optimizer state {key!r}: dtype {value.dtype}, expected {expected} (the dtype the server sent)"
            )
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
    bound = adam_moment_bound(betas)
    for key, value in optim.items():
        name, _, state_key = str(key).partition(OPTIM_SEP)
        if state_key != "exp_avg":
            continue
        second = optim.get(f"{name}{OPTIM_SEP}exp_avg_sq")
        if second is None:
            raise UpdateRejected(site, f"optimizer state {key!r}: first moment without its second moment")
        first = np.abs(np.asarray(value, np.float64))
        limit = np.sqrt(bound * np.asarray(second, np.float64)) * (1 + 1e-3) + 1e-12
        over = int(np.count_nonzero(first > limit))
        if over:
            raise UpdateRejected(
                site,
                f"optimizer state {key!r}: {over} first moment(s) larger than any gradients allow "
                f"(|exp_avg| <= {math.sqrt(bound):.3g} sqrt(exp_avg_sq) for Adam {betas})",
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


def state_norm(optim: Mapping, sent: Mapping | None, state_key: str) -> float:
    """L2 norm of the change of one kind of optimizer state (e.g. "exp_avg") from what was sent (zeros when
    nothing was sent): the size of a site's moments, screened against the other sites' like an update."""
    total = 0.0
    for key, value in optim.items():
        if str(key).partition(OPTIM_SEP)[2] != state_key:
            continue
        diff = np.asarray(value, np.float64)
        if sent and key in sent:
            diff = diff - np.asarray(sent[key], np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def _flat_update(params: Mapping, reference: Mapping) -> np.ndarray:
    """``params - reference`` over the floating-point weights (optimizer state excluded), in float64, key order."""
    parts = []
    for key in sorted(params):
        if OPTIM_SEP in key or key not in reference:
            continue
        array = np.asarray(params[key])
        if np.issubdtype(array.dtype, np.floating):
            parts.append((array.astype(np.float64) - np.asarray(reference[key], np.float64)).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def update_directions(updates: Mapping[str, Mapping], references: Mapping[str, Mapping]) -> dict[str, float]:
    """Cosine between each site's update (its params minus ``references[site]``, what it was sent) and the mean
    DIRECTION of the OTHER sites' updates (leave-one-out, each other update scaled to unit length first, so that one
    large update cannot turn the reference of everyone else around). Needs at least 3 updates (with 2, neither can
    be told from the other); NaN for a zero update."""
    if len(updates) < 3:
        return {}
    flat = {s: _flat_update(u, references[s]) for s, u in updates.items()}
    lengths = {s: float(np.linalg.norm(v)) for s, v in flat.items()}
    flat = {s: v / lengths[s] if lengths[s] > 0 else v for s, v in flat.items()}
    total = sum(flat.values())
    out = {}
    for site, vector in flat.items():
        others = total - vector
        denominator = float(np.linalg.norm(vector) * np.linalg.norm(others))
        out[site] = float(np.dot(vector, others) / denominator) if denominator > 0 else float("nan")
    return out


def screen_directions(cosines: Mapping[str, float], min_cosine: float) -> dict[str, str]:
    """Which updates point against the others: {site: reason} for a cosine with the leave-one-out mean below
    ``min_cosine`` (update_directions). ``min_cosine`` <= -1 switches the check off. A sign-flipped update that is
    not opposed strongly enough to be refused is still bounded in size (clip_scales)."""
    if min_cosine <= -1:
        return {}
    return {
        site: f"update points against the other sites' (cosine {c:.3f} with their mean, limit {min_cosine:g})"
        for site, c in sorted(cosines.items())
        if math.isfinite(c) and c < min_cosine
    }


def clip_scales(norms: Mapping[str, float], clip_ratio: float, recent: Iterable[float] = ()) -> dict[str, float]:
    """Norm bounding: {site: factor < 1} for the updates whose norm is above ``clip_ratio`` x the median norm of
    the round's accepted updates (``norms``) and the ``recent`` accepted norms (FedCross: its earlier visits);
    multiplying such an update by its factor brings it to the bound. A sign-flipped or scaled update then moves
    the model no more than an honest one may. ``clip_ratio`` <= 0, fewer than 2 norms in all or a median of 0:
    nothing is clipped."""
    values = [float(n) for n in norms.values()] + [float(x) for x in recent if math.isfinite(float(x))]
    if clip_ratio <= 0 or len(values) < 2:
        return {}
    median = float(np.median(values))
    if not median > 0:
        return {}
    bound = clip_ratio * median
    return {s: bound / float(n) for s, n in sorted(norms.items()) if float(n) > bound}


def clip_update(params: Mapping, reference: Mapping, scale: float) -> dict:
    """``reference + scale * (params - reference)`` for every floating array (computed in float64, returned in
    the reference's dtype); other arrays and optimizer state are returned as they are."""
    out = dict(params)
    for key, value in params.items():
        if OPTIM_SEP in key or key not in reference:
            continue
        ref = np.asarray(reference[key])
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        base = ref.astype(np.float64)
        out[key] = (base + float(scale) * (np.asarray(value, np.float64) - base)).astype(ref.dtype)
    return out


def screen_relative(norm: float, reference_norm: float, max_ratio: float) -> str | None:
    """Why an update is too large against the model that was sent (None when it is not): its norm above
    ``max_ratio`` x the norm of the sent model. No site chooses this reference, so it holds where there is no
    peer to compare with (FedCross's first visit of a model). ``max_ratio`` <= 0 switches it off."""
    if max_ratio <= 0 or not reference_norm > 0:
        return None
    if not norm <= max_ratio * reference_norm:
        return (
            f"update norm {norm:.4g} is {norm / reference_norm:.3g}x the norm {reference_norm:.4g} of the model that "
            f"was sent (limit {max_ratio:g}x)"
        )
    return None


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


def numeric_metrics(metrics, allowed=None) -> dict[str, float]:
    """The finite numbers among a site's flat metrics (what a history may record of them); the rest is dropped.
    ``allowed`` (a predicate on the key): only the keys the method defines are kept."""
    if not isinstance(metrics, Mapping):
        return {}
    out = {}
    for key, value in metrics.items():
        if allowed is not None and not (isinstance(key, str) and allowed(key)):
            continue
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
