"""How much of the gap between FedAvg and centralized training a method closes: pure functions, no I/O.

For one dataset and one number of training steps, per seed s:

    gap_s    = centralized_s - fedavg_s                      (Dice; paired: the same seed's initial network)
    closed_s = (method_s - fedavg_s) / gap_s                 (0 = FedAvg, 1 = centralized, < 0 below FedAvg)

reported as mean ± standard error over seeds (SE = sample std / sqrt(n)). The share is only meaningful when the
gap itself stands out of the seed noise: when |mean gap| < 2 standard errors, when it is exactly zero, or with
fewer than 2 seeds, the answer is "gap within noise" instead of a percentage. The three runs must be trained for
the same number of steps (the report pairs a 2B run with FedAvg and centralized at 2B, fedseg_tools.bench.budget).

Inputs are {seed: mean test Dice over sites}; seeds missing in any of the three (or non-finite) are left out.
"""

from __future__ import annotations

import math

NOISE_SE = 2.0  # a gap smaller than this many standard errors is noise


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the finite values; SE is NaN for fewer than 2 values."""
    v = [float(x) for x in values if _finite(x)]
    n = len(v)
    if not n:
        return float("nan"), float("nan"), 0
    m = sum(v) / n
    if n < 2:
        return m, float("nan"), n
    var = sum((x - m) ** 2 for x in v) / (n - 1)
    return m, math.sqrt(var / n), n


def paired_gap(fedavg: dict, centralized: dict) -> dict:
    """{seed: centralized - fedavg} over the seeds both have."""
    return {
        s: centralized[s] - fedavg[s] for s in fedavg if s in centralized and _finite(fedavg[s]) and _finite(centralized[s])
    }


def gap_within_noise(gaps) -> bool:
    """True when the centralized - FedAvg gap cannot be told from seed noise: fewer than 2 seeds, a zero mean,
    or |mean| < NOISE_SE standard errors."""
    m, se, n = mean_se(gaps)
    if n < 2 or m == 0:
        return True
    return abs(m) < NOISE_SE * se


def closed_per_seed(method: dict, fedavg: dict, centralized: dict) -> dict:
    """{seed: (method - fedavg) / (centralized - fedavg)} over the seeds all three have (a seed with a zero gap is
    left out: its share is undefined)."""
    gap = paired_gap(fedavg, centralized)
    return {s: (method[s] - fedavg[s]) / g for s, g in gap.items() if s in method and _finite(method[s]) and g != 0}


def gap_closed(method: dict, fedavg: dict, centralized: dict) -> dict:
    """The share of the gap `method` closes, with the gap it is a share of.

    Returns {"gap", "gap_se", "gap_seeds", "within_noise", "closed", "closed_se", "seeds", "per_seed"}: the gap in
    Dice (mean and SE over the paired seeds), whether it is within noise, and the share (mean and SE over the seeds
    of all three runs; NaN when the gap is within noise: no share is claimed then)."""
    gaps = paired_gap(fedavg, centralized)
    g, g_se, g_n = mean_se(gaps.values())
    noise = gap_within_noise(gaps.values())
    per_seed = {} if noise else closed_per_seed(method, fedavg, centralized)
    c, c_se, c_n = mean_se(per_seed.values())
    return {
        "gap": g,
        "gap_se": g_se,
        "gap_seeds": g_n,
        "within_noise": noise,
        "closed": c,
        "closed_se": c_se,
        "seeds": c_n,
        "per_seed": per_seed,
    }


def format_gap(summary: dict) -> str:
    """The gap in Dice points: "+16.4 ± 1.0 points (3 seeds)"."""
    g, se, n = summary["gap"], summary["gap_se"], summary["gap_seeds"]
    if not _finite(g):
        return "-"
    err = f" ± {100 * se:.1f}" if _finite(se) else ""
    return f"{100 * g:+.1f}{err} points ({n} seed{'s' if n != 1 else ''})"


def format_closed(summary: dict) -> str:
    """The share as "42% ± 7%" (mean ± SE over seeds), or "gap within noise"."""
    if summary["within_noise"]:
        return "gap within noise"
    c, se = summary["closed"], summary["closed_se"]
    if not _finite(c):
        return "-"
    return f"{100 * c:.0f}% ± {100 * se:.0f}%" if _finite(se) else f"{100 * c:.0f}%"
