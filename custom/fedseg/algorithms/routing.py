"""FedSM super-model routing: pick the global model or one site's personalized model.

Given the model selector's probabilities ``q`` over the S training sites (softmax output,
shape ``(S,)``) and a threshold ``gamma`` in [0, 1]:

    k = argmax_s q[s]          (first index on ties)
    model = site_names[k]  if q[k] > gamma  else  "global"

The comparison is strict and q is clipped to [0, 1], so gamma = 1 always routes to the global
model and gamma = 0 always routes to a personalized model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

__all__ = ["GAMMA_POLICIES", "GLOBAL", "Route", "choose_gamma", "route", "route_batch", "selector_health", "softmax"]

GLOBAL = "global"
PROB_ATOL = 1e-3  # tolerance on sum(q) == 1 and 0 <= q <= 1 (covers float16 softmax output)


@dataclass(frozen=True)
class Route:
    """Routing decision for one input.

    ``model`` is ``"global"`` or a site name; ``site_index`` and ``confidence`` are the argmax
    site index and its probability (also filled in when the global model is chosen);
    ``probs`` is the validated, clipped probability vector.
    """

    model: str
    site_index: int
    confidence: float
    probs: list[float]

    @property
    def is_global(self) -> bool:
        return self.model == GLOBAL


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax ``exp(x - max) / sum(exp(x - max))`` along ``axis``.

    Float inputs keep their dtype, others become float64. Entries of -inf get probability 0.
    """
    x = np.asarray(logits)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    return e / np.sum(e, axis=axis, keepdims=True)


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or math.isnan(float(gamma)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    return float(gamma)


def _check_sites(site_names: list[str]) -> list[str]:
    names = list(site_names)
    if not names:
        raise ValueError("site_names must not be empty")
    if GLOBAL in names:
        raise ValueError(f"{GLOBAL!r} is reserved and cannot be a site name")
    return names


def _check_probs(q: np.ndarray, n_sites: int) -> np.ndarray:
    """Validate probability rows (last axis = sites) and clip them to [0, 1]."""
    if q.shape[-1] != n_sites:
        raise ValueError(f"probs has {q.shape[-1]} entries per row, expected {n_sites} (one per site)")
    if not np.all(np.isfinite(q)):
        raise ValueError("probs contains NaN/Inf")
    if np.any(q < -PROB_ATOL) or np.any(q > 1 + PROB_ATOL):
        raise ValueError("probs must lie in [0, 1]")
    if not np.allclose(q.sum(axis=-1), 1.0, rtol=0.0, atol=PROB_ATOL):
        raise ValueError("probs must sum to 1 over sites (apply softmax first)")
    return np.clip(q, 0.0, 1.0)


def _decide(q: np.ndarray, names: list[str], gamma: float) -> Route:
    k = int(np.argmax(q))
    conf = float(q[k])
    return Route(model=names[k] if conf > gamma else GLOBAL, site_index=k, confidence=conf, probs=q.tolist())


def route(probs, site_names: list[str], gamma: float) -> Route:
    """Route one input from selector probabilities ``probs`` (shape ``(S,)``); see module doc."""
    names = _check_sites(site_names)
    gamma = _check_gamma(gamma)
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 1:
        raise ValueError(f"probs must have shape ({len(names)},), got {q.shape}")
    return _decide(_check_probs(q, len(names)), names, gamma)


def route_batch(probs, site_names: list[str], gamma: float) -> list[Route]:
    """Route a batch: ``probs`` has shape ``(B, S)``; returns B :class:`Route` objects."""
    names = _check_sites(site_names)
    gamma = _check_gamma(gamma)
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"probs must have shape (B, {len(names)}), got {q.shape}")
    q = _check_probs(q, len(names))
    return [_decide(row, names, gamma) for row in q]


# ---- choosing gamma and judging the selector: pure functions of what the sites measured ---------------------
GAMMA_POLICIES = ("validation", "fixed")
UNUSED_GLOBAL_SHARE = 0.9  # a super model that sends this share of cases to the global model is the global model


def choose_gamma(gammas, site_dice: dict[str, list[float]]) -> tuple[float, list[float]]:
    """The confidence threshold with the best mean super-model Dice over sites, from the sites' sweeps on their
    VALIDATION cases ({site: [Dice per gamma]}, one value per entry of ``gammas``). Ties go to the larger gamma
    (fewer cases leave the global model). Returns (gamma, mean Dice per gamma)."""
    gammas = [_check_gamma(g) for g in gammas]
    rows = [list(map(float, v)) for v in site_dice.values()]
    if not gammas or not rows or any(len(r) != len(gammas) for r in rows):
        raise ValueError(f"need one Dice per gamma ({len(gammas)}) from at least one site, got {site_dice}")
    means = [float(np.nanmean([r[i] for r in rows])) for i in range(len(gammas))]
    finite = [i for i, m in enumerate(means) if math.isfinite(m)]
    if not finite:
        raise ValueError("no site reported a finite Dice for any gamma")
    best = max(finite, key=lambda i: (means[i], gammas[i]))
    return gammas[best], means


def selector_health(
    accuracy: dict[str, float], routing: dict[str, dict[str, int]], site_names: list[str], gamma: float | None = None
) -> dict:
    """Whether the selector learned and whether the super model uses it, from per-site argmax accuracy (share of
    a site's cases whose top class is the site itself) and routing counts ({site: {model or "global": count}}).

    "collapsed": some class site's accuracy is at or below chance (1 / S): the selector attributes most of its
      images to other sites (a selector stuck on one class, or one that cannot tell the sites apart).
    "unused": at least UNUSED_GLOBAL_SHARE of all cases go to the global model: the super model is (almost)
      the global model, whatever the selector learned (e.g. its confidence stays under gamma).
    "learned": neither. Returns {"status", "reasons", "chance", "below_chance", "global_share"}.
    With the gamma the super model used: gamma >= 1 routes every case to the global model by choice (e.g. chosen on
    validation, where the personalized models scored no better than the global one), which the reasons say."""
    names = _check_sites(site_names)
    chance = 1.0 / len(names)
    below = sorted(s for s in names if s in accuracy and float(accuracy[s]) <= chance + 1e-12)
    total = sum(int(v) for row in routing.values() for v in (row or {}).values())
    to_global = sum(int((row or {}).get(GLOBAL, 0)) for row in routing.values())
    share = to_global / total if total else float("nan")
    reasons = []
    if below:
        reasons.append(
            f"argmax accuracy at or below chance ({chance:.2f}) at {', '.join(below)}: the selector sends their "
            "images to other sites' models"
        )
    if total and share >= UNUSED_GLOBAL_SHARE:
        reasons.append(f"{share:.0%} of the cases are routed to the global model: the super model is the global model")
        if gamma is not None and float(gamma) >= 1.0:
            reasons.append(
                f"gamma = {float(gamma):g} sends every case to the global model whatever the selector says: where gamma "
                "is chosen on the sites' validation cases, the personalized models scored no better than the global "
                "model there"
            )
    status = "collapsed" if below else ("unused" if reasons else "learned")
    return {"status": status, "reasons": reasons, "chance": chance, "below_chance": below, "global_share": share}
