"""Hyper-parameters a method may choose, chosen on the sites' validation cases by one rule for every method.

The benchmark runs FedProx and FedSM once more per candidate value next to their main run (which uses the
shipped default), under the equal-steps plan, with the same data, seed and budget. Per seed, the value whose
run reached the best validation Dice (the highest point of its validation curve: the score its best checkpoint
was kept by) is chosen; a tie keeps the default. Test Dice plays no part in the choice; the report then shows
the chosen run's test Dice next to the default's. FedSM's gamma is chosen inside every FedSM run on the same
validation cases (gamma_policy "validation"); FedAvg, FedBN, FedCross and FedCrossEns have nothing to choose.

Pure functions over benchmark cells (results.json "cells"): no FLARE, no torch.
"""

from __future__ import annotations

import math

# method -> (its workflow argument, the candidates tried besides the shipped default)
TUNING: dict[str, tuple[str, tuple[float, ...]]] = {
    "fedprox": ("fedprox_mu", (0.001, 0.1)),  # default 0.01
    "fedsm": ("lam", (0.5, 0.9)),  # SoftPull lambda, default 0.7
}


def tuning_key(method: str, param: str, value: float) -> str:
    """The run key of one candidate: "fedprox-fedprox_mu0.001", "fedsm-lam0.5"."""
    return f"{method}-{param}{float(value):g}"


def tuning_runs(methods) -> list[tuple[str, str, dict]]:
    """(run key, method, workflow options) of every candidate run of the methods that have something to choose."""
    return [
        (tuning_key(m, param, v), m, {param: float(v)}) for m, (param, values) in TUNING.items() if m in methods for v in values
    ]


def best_validation(rec: dict) -> float | None:
    """The best validation Dice of a run: the top of its validation curve (None without one)."""
    values = [float(y) for _, y in (rec.get("curve") or []) if y is not None and math.isfinite(float(y))]
    return max(values) if values and rec.get("status", "ok") == "ok" else None


def candidates(cell: dict, method: str) -> list[tuple[str, float]]:
    """(run key, value) of the method's main run and its candidate runs present in one cell, default first."""
    param = TUNING[method][0]
    runs = cell.get("methods") or {}
    out = []
    if method in runs:
        value = (runs[method].get("workflow_args") or {}).get(param)
        if value is not None:
            out.append((method, float(value)))
    for v in TUNING[method][1]:
        key = tuning_key(method, param, v)
        if key in runs:
            out.append((key, float(v)))
    return out


def choose(cell: dict, method: str) -> dict | None:
    """The choice in one cell: {"param", "values": {value: best validation Dice}, "keys": {value: its run key},
    "chosen": value, "key": run key of the chosen value, "default": the main run's value}; None when the cell has no candidate run of the method or a
    candidate has no validation curve (nothing is chosen from an incomplete set)."""
    found = candidates(cell, method)
    if len(found) < 2 or found[0][0] != method:
        return None
    runs = cell["methods"]
    scores = {key: best_validation(runs[key]) for key, _ in found}
    if any(s is None for s in scores.values()):
        return None
    best_key, best_value = found[0]
    for key, value in found[1:]:  # strictly better than every earlier one: a tie keeps the default (listed first)
        if scores[key] > scores[best_key]:
            best_key, best_value = key, value
    return {
        "param": TUNING[method][0],
        "values": {value: scores[key] for key, value in found},
        "keys": {value: key for key, value in found},
        "chosen": best_value,
        "key": best_key,
        "default": found[0][1],
    }
