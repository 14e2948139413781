"""FedSM SoftPull: mix each site's personalized model with the other sites' models.

For the N sites present (those that answered this round), site i's new personalized model is

    p_i = lam * w_i + (1 - lam) / (N - 1) * sum_{j != i} w_j

so lam = 1 keeps each site's own model, lam = 1/N gives every site the plain average and
lam = 0 gives the mean of the *other* sites. With N = 1 the site keeps its own model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import numpy as np

from .aggregation import weighted_average

__all__ = ["softpull", "softpull_weights"]


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, Real) or math.isnan(float(lam)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"SoftPull lambda must be a number in [0, 1], got {lam!r}")
    return float(lam)


def softpull_weights(sites: list[str], lam: float) -> dict[str, dict[str, float]]:
    """Mixing matrix ``M[i][j]``: ``lam`` on the diagonal, ``(1 - lam) / (N - 1)`` elsewhere.

    Every row sums to 1. ``N == 1`` gives ``{site: {site: 1.0}}`` whatever ``lam`` is (it is
    still validated). Raises ``ValueError`` for an empty or duplicated site list or lam
    outside [0, 1].
    """
    lam = _check_lam(lam)
    sites = list(sites)
    if not sites:
        raise ValueError("softpull_weights needs at least one site")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate site names: {sites}")
    n = len(sites)
    if n == 1:
        return {sites[0]: {sites[0]: 1.0}}
    other = (1.0 - lam) / (n - 1)
    return {i: {j: (lam if i == j else other) for j in sites} for i in sites}


def softpull(personalized: Mapping[str, Mapping[str, np.ndarray]], lam: float) -> dict[str, dict]:
    """Apply SoftPull to the personalized models of the sites present in ``personalized``.

    Returns ``{site: p_site}`` in the order of ``personalized``; each ``p_site`` is
    ``weighted_average`` with row ``site`` of :func:`softpull_weights`, so it keeps each key's
    dtype (integers get the rounded mix) and the key order of that site's own model. All sites
    must have the same key set and shapes (``ValueError`` otherwise).
    """
    if not personalized:
        raise ValueError("softpull needs at least one personalized model")
    matrix = softpull_weights(list(personalized), lam)
    out = {}
    for site, row in matrix.items():
        # Own model first so the result follows its key order and dtypes.
        ordered = {site: personalized[site], **{s: m for s, m in personalized.items() if s != site}}
        out[site] = weighted_average(ordered, row)
    return out
