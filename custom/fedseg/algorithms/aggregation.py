"""Validation and weighted averaging of model updates (pure numpy, no FLARE/torch).

A model ("params") is a ``dict[str, numpy.ndarray]``, e.g. a converted PyTorch state dict.
Floating arrays are averaged in (at least) float64 and cast back to their own dtype; integer
and bool arrays (e.g. BatchNorm ``num_batches_tracked``) are averaged the same way and then
rounded to the nearest integer (``numpy.rint``, ties to even) before the cast back, i.e. they
get the rounded weighted mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import numpy as np

__all__ = [
    "AGGREGATIONS",
    "UpdateRejected",
    "aggregate",
    "aggregate_shared",
    "check_update",
    "robust_average",
    "TRIMMED_MEAN_MIN_SITES",
    "trim_count",
    "weighted_average",
]

AGGREGATIONS = ("mean", "median", "trimmed_mean")

_MAX_NAMED_KEYS = 5


class UpdateRejected(ValueError):
    """A site's update failed validation; ``site`` and ``reason`` are kept as attributes."""

    def __init__(self, site: str, reason: str):
        self.site = site
        self.reason = reason
        super().__init__(f"update from {site} rejected: {reason}")

    def __reduce__(self):  # keep the two-argument constructor picklable
        return (type(self), (self.site, self.reason))


def _name_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_NAMED_KEYS])
    more = len(keys) - _MAX_NAMED_KEYS
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _is_allowed_dtype(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)


def check_update(site: str, params: dict, reference: Mapping[str, np.ndarray], allow_missing: bool = False) -> None:
    """Raise :class:`UpdateRejected` unless ``params`` is a sane update shaped like ``reference``.

    Rejected, in this order: ``params`` not a dict or empty; keys of ``reference`` missing from
    ``params`` (unless ``allow_missing``; up to 5 are named); keys not in ``reference``; per key
    (in ``params`` order): a value that is not a numpy array/scalar, a non-numeric dtype (numeric
    and bool are accepted), a shape different from the reference's, any NaN/Inf in a floating
    (or complex) array (the count is named). Every array's dtype must be EXACTLY the reference's
    (what the server sent): an integer, complex or other-width tensor is never cast, it rejects the update.
    """
    if not isinstance(reference, Mapping):
        raise TypeError(f"reference must be a dict of arrays, got {type(reference).__name__}")
    if not isinstance(params, dict):
        raise UpdateRejected(site, f"params is not a dict (got {type(params).__name__})")
    if not params:
        raise UpdateRejected(site, "empty update (no parameters)")

    missing = [k for k in reference if k not in params]
    if missing and not allow_missing:
        raise UpdateRejected(site, f"missing {len(missing)} key(s): {_name_keys(missing)}")
    extra = [k for k in params if k not in reference]
    if extra:
        raise UpdateRejected(site, f"unexpected {len(extra)} key(s): {_name_keys(extra)}")

    for key, value in params.items():
        if not isinstance(value, (np.ndarray, np.generic)):
            raise UpdateRejected(site, f"key {key!r}: value is not a numpy array (got {type(value).__name__})")
        if not _is_allowed_dtype(value.dtype):
            raise UpdateRejected(site, f"key {key!r}: non-numeric dtype {value.dtype}")
        expected_dtype = np.asarray(reference[key]).dtype
        if value.dtype != expected_dtype:
            raise UpdateRejected(
                site, f"key {key!r}: dtype {value.dtype}, expected {expected_dtype} (the dtype the server sent)"
            )
        expected = np.shape(reference[key])
        if value.shape != expected:
            raise UpdateRejected(site, f"key {key!r}: shape {value.shape} does not match expected {expected}")
        if np.issubdtype(value.dtype, np.inexact):
            finite = np.isfinite(value)
            bad = int(value.size - np.count_nonzero(finite))
            if bad:
                n_nan = int(np.count_nonzero(np.isnan(value)))
                raise UpdateRejected(site, f"key {key!r}: {bad} non-finite value(s) ({n_nan} NaN, {bad - n_nan} Inf)")


def _cast_back(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64/complex accumulator back to ``dtype``; non-float dtypes are rounded first."""
    if np.issubdtype(dtype, np.inexact):
        return acc.astype(dtype)
    return np.rint(acc).astype(dtype)


def _acc_dtype(dtype: np.dtype, key: str) -> np.dtype:
    if not _is_allowed_dtype(dtype):
        raise ValueError(f"key {key!r}: cannot average non-numeric dtype {dtype}")
    return np.promote_types(dtype, np.float64)


def weighted_average(updates: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, float]) -> dict:
    """Key-wise weighted mean ``out[k] = sum_i (w_i / sum_j w_j) * updates[i][k]``.

    * ``weights`` needs an entry for every site in ``updates``; entries for other sites are
      ignored, so the weights are normalised over the sites present. Each weight must be finite
      and >= 0 and the total > 0, else ``ValueError``. Zero-weight updates are skipped (shape
      still checked).
    * Computed in float64 (complex128 for complex); each key is cast back to the dtype of the
      first update's array; integer/bool arrays get the rounded weighted mean (``np.rint``).
    * The result has the key order of the first update; all updates must have the same key set
      and shapes, else ``ValueError``. Returned arrays are new (never views of the inputs).
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    norm: dict[str, float] = {}
    for site in updates:
        if site not in weights:
            raise ValueError(f"no weight given for site {site!r}")
        w = weights[site]
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(float(w)) or w < 0:
            raise ValueError(f"weight for site {site!r} must be a finite number >= 0, got {w!r}")
        norm[site] = float(w)
    total = math.fsum(norm.values())
    if not total > 0:
        raise ValueError(f"total weight must be > 0, got {total}")
    norm = {site: w / total for site, w in norm.items()}

    first_site, first = next(iter(updates.items()))
    keys = list(first)
    key_set = set(keys)
    for site, upd in updates.items():
        if set(upd) != key_set:
            missing = [k for k in keys if k not in upd]
            extra = [k for k in upd if k not in key_set]
            raise ValueError(
                f"key set of {site!r} differs from {first_site!r}: missing [{_name_keys(missing)}], extra [{_name_keys(extra)}]"
            )

    out = {}
    for key in keys:
        ref = np.asarray(first[key])
        acc = np.zeros(ref.shape, dtype=_acc_dtype(ref.dtype, key))
        for site, upd in updates.items():
            arr = np.asarray(upd[key])
            if arr.shape != ref.shape:
                raise ValueError(f"key {key!r}: shape {arr.shape} from {site!r} != {ref.shape} from {first_site!r}")
            if norm[site] != 0.0:
                acc += norm[site] * arr.astype(acc.dtype, copy=False)
        out[key] = _cast_back(acc, ref.dtype)
    return out


TRIMMED_MEAN_MIN_SITES = 3  # one trimmed at each side and at least one left


def trim_count(n: int, trim_fraction: float) -> int:
    """How many values "trimmed_mean" drops at EACH side of a coordinate among ``n`` sites:
    ``max(1, floor(trim_fraction * n))`` (always at least one, so a single extreme site is always cut).
    Raises ValueError when fewer than one value would remain (fewer than 3 sites)."""
    cut = max(1, int(np.floor(trim_fraction * n)))
    if n - 2 * cut < 1:
        raise ValueError(
            f"trimmed_mean needs at least {2 * cut + 1} updates to trim {cut} per side (trim_fraction {trim_fraction:g}), "
            f"got {n}"
        )
    return cut


def robust_average(updates: Mapping[str, Mapping[str, np.ndarray]], method: str = "median", trim_fraction: float = 0.2) -> dict:
    """Unweighted coordinate-wise robust mean of the updates: "median", or "trimmed_mean" (drop the
    ``max(1, floor(trim_fraction * n))`` largest and smallest values of each coordinate, average the rest;
    :func:`trim_count`: fewer than 3 updates are refused).

    Robust to a minority of arbitrary updates; unweighted, because a step count is itself a site's claim.
    Same key set and shapes required as in :func:`weighted_average`; dtypes cast back the same way.
    """
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"robust method must be 'median' or 'trimmed_mean', got {method!r}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if not updates:
        raise ValueError("robust_average needs at least one update")
    sites = sorted(updates)
    keys = list(updates[sites[0]])
    out = {}
    for key in keys:
        try:
            stack = np.stack([np.asarray(updates[s][key], dtype=np.float64) for s in sites])
        except (KeyError, ValueError) as e:
            raise ValueError(f"key {key!r}: updates differ in keys or shapes ({e})") from e
        if method == "median":
            acc = np.median(stack, axis=0)
        else:
            cut = trim_count(len(sites), trim_fraction)
            ordered = np.sort(stack, axis=0)
            acc = ordered[cut : len(sites) - cut].mean(axis=0)
        out[key] = _cast_back(acc, np.asarray(updates[sites[0]][key]).dtype)
    return out


def aggregate(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float],
    method: str = "mean",
    trim_fraction: float = 0.2,
) -> dict:
    """The global model from the accepted updates: "mean" (weighted by ``weights``, i.e. FedAvg), or the
    unweighted robust "median" / "trimmed_mean" (:func:`robust_average`). Sites are taken in sorted order, so
    the result does not depend on the order in which results arrived."""
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")
    ordered = {s: updates[s] for s in sorted(updates)}
    if method == "mean":
        return weighted_average(ordered, weights)
    return robust_average(ordered, method, trim_fraction)


def aggregate_shared(
    updates: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float],
    local_keys,
    method: str = "mean",
    trim_fraction: float = 0.2,
) -> dict:
    """FedBN's server step: the keys NOT in ``local_keys`` are aggregated as :func:`aggregate` does; the sites
    keep their own ``local_keys`` (normalization), so those never enter a model a site trains with. The global
    model still needs values for them (a site that has none of its own, e.g. an unseen one): the step-weighted
    mean of the sites' values, whatever ``method`` is. Keys in the first update's order."""
    local = set(local_keys)
    ordered = {s: updates[s] for s in sorted(updates)}
    split = {
        s: ({k: v for k, v in u.items() if k not in local}, {k: v for k, v in u.items() if k in local})
        for s, u in ordered.items()
    }
    shared = aggregate({s: parts[0] for s, parts in split.items()}, weights, method, trim_fraction)
    own = weighted_average({s: parts[1] for s, parts in split.items()}, weights) if local else {}
    first = next(iter(ordered.values()))
    return {k: shared[k] if k in shared else own[k] for k in first}
