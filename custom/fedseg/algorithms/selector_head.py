"""FedSM's model selector head in closed form: linear discriminant analysis from the sites' feature statistics
(pure; numpy only).

Every site sees only its own class, so a selector trained by local optimizer steps learns "everything is me"
at each site and the server averages those biased steps (client drift at its most extreme). The "lda" selector
protocol avoids local optimisation altogether: the selector's convolutional features are fixed (seeded by the
server, the same at every site), each site sends the sufficient statistics of its training images' features
(count, mean, scatter about its mean), and the server fits the linear head that Gaussian linear discriminant
analysis with a shared covariance gives:

    S      = sum_k scatter_k / (n - K)                              pooled within-site covariance
    S_a    = (1 - a) S + a * mean(diag(S)) * I                      shrinkage a (a well-conditioned inverse)
    w_k    = S_a^-1 mu_k,   b_k = -1/2 mu_k^T S_a^-1 mu_k            equal priors: no site is favoured by its size

softmax(w_k . f + b_k) is then the posterior of site k. The sums are exact, so the federated head IS the head
fitted centrally on the pooled features (tests/test_algorithms.py), whatever the number of rounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .aggregation import UpdateRejected

__all__ = ["STAT_KEYS", "check_feature_statistics", "feature_statistics", "fit_lda_head", "spread"]

STAT_KEYS = ("count", "mean", "scatter")
SYMMETRY_RTOL = 1e-3  # scatter matrices are sums of outer products: symmetric up to float32 rounding
EIGEN_RTOL = 1e-4  # ... and positive semi-definite: eigenvalues >= -EIGEN_RTOL * largest
MISSING_CLASS_MARGIN = 1e6  # logit gap that keeps a class without statistics from ever being the argmax


def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """(n, d) features -> {"count": (1,), "mean": (d,), "scatter": (d, d)}: what a site sends (float64 sums,
    sent as float32)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {f.shape}")
    mean = f.mean(axis=0) if len(f) else np.zeros(f.shape[1])
    centred = f - mean
    return {
        "count": np.array([len(f)], dtype=np.float32),
        "mean": mean.astype(np.float32),
        "scatter": (centred.T @ centred).astype(np.float32),
    }


def check_feature_statistics(site: str, stats, dim: int, max_count: int | None = None) -> dict[str, np.ndarray]:
    """A site's feature statistics as float64 arrays, or UpdateRejected naming the site and the problem: exactly
    the keys count/mean/scatter, float arrays of shapes (1,), (dim,), (dim, dim), finite, a whole count in
    [0, max_count], a symmetric positive semi-definite scatter."""
    if not isinstance(stats, Mapping) or set(stats) != set(STAT_KEYS):
        keys = sorted(stats) if isinstance(stats, Mapping) else type(stats).__name__
        raise UpdateRejected(site, f"selector statistics must have exactly the keys {list(STAT_KEYS)}, got {keys}")
    shapes = {"count": (1,), "mean": (dim,), "scatter": (dim, dim)}
    out = {}
    for key, shape in shapes.items():
        value = stats[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.shape != shape:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise UpdateRejected(site, f"selector statistics '{key}' must be a float array of shape {shape}, got {got}")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(site, f"selector statistics '{key}' has non-finite values")
        out[key] = value
    count = out["count"][0]
    if count != round(count) or count < 0 or (max_count is not None and count > max_count):
        raise UpdateRejected(site, f"selector statistics count {count} is not a whole number in [0, {max_count}]")
    scatter = out["scatter"]
    scale = float(np.abs(scatter).max()) if scatter.size else 0.0
    if np.abs(scatter - scatter.T).max(initial=0.0) > SYMMETRY_RTOL * max(scale, 1e-12):
        raise UpdateRejected(site, "selector statistics scatter is not symmetric")
    if scale > 0 and np.linalg.eigvalsh((scatter + scatter.T) / 2).min() < -EIGEN_RTOL * scale * dim:
        raise UpdateRejected(site, "selector statistics scatter is not positive semi-definite")
    return out


def spread(stats: Mapping[str, np.ndarray]) -> float:
    """Root mean squared distance of a site's features from their mean: the size screened against other sites'
    (a scatter inflated by a malicious site would swamp the pooled covariance)."""
    count = float(stats["count"][0])
    return float(np.sqrt(np.trace(stats["scatter"]) / count)) if count > 0 else 0.0


def fit_lda_head(stats: Sequence[Mapping[str, np.ndarray] | None], shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """Head weights (K, d) and biases (K,) from checked statistics per class (None or a count < 2: no statistics
    for that class yet; its bias is set below every other class's, so it is never the argmax)."""
    if not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    usable = [i for i, s in enumerate(stats) if s is not None and float(s["count"][0]) >= 2]
    if not usable:
        raise ValueError("no class has feature statistics of at least 2 images")
    dim = np.asarray(stats[usable[0]]["mean"]).shape[0]
    n = sum(float(stats[i]["count"][0]) for i in usable)
    pooled = sum(np.asarray(stats[i]["scatter"], dtype=np.float64) for i in usable) / max(n - len(usable), 1.0)
    level = float(np.mean(np.diag(pooled)))
    level = level if level > 0 else 1.0
    covariance = (1.0 - shrinkage) * pooled + (shrinkage * level + 1e-9 * level) * np.eye(dim)
    precision = np.linalg.inv(covariance)
    weights = np.zeros((len(stats), dim))
    biases = np.zeros(len(stats))
    for i in usable:
        mu = np.asarray(stats[i]["mean"], dtype=np.float64)
        weights[i] = precision @ mu
        biases[i] = -0.5 * mu @ precision @ mu
    # a class without statistics: zero weights and a bias far below any other class's logit, finite (a saved
    # selector stays a plain float32 state)
    for i in sorted(set(range(len(stats))) - set(usable)):
        biases[i] = biases[usable].min() - MISSING_CLASS_MARGIN
    return weights, biases
