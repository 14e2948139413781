"""What FedSM records (no FLARE): the training metrics a round's history keeps, the gamma chosen on the sites'
validation cases, and the results record fedseg_results.json of the final set (fedseg.report reads it).
"""

from __future__ import annotations

import numpy as np

from fedseg.algorithms.routing import GLOBAL, choose_gamma, selector_health
from fedseg.methods.fedsm import GAMMA_SWEEP

ORACLE_LABEL = (
    "oracle routing (uses each case's site identity): every case to its own site's personalized model, "
    "= FedSM personalized (own site)"
)
TRAIN_METRICS = frozenset(
    (
        "val_super_dice",
        "val_global_dice",
        "val_personalized_dice",
        "val_selector_acc",
        "val_routed_own",
        "train_global_loss",
        "train_personal_loss",
        "selector_steps",
        "validate_seconds",
        "train_seconds",
        "selector_seconds",
        "dp_epsilon",
        "dp_delta",
    )
)
MODEL_LABELS = {
    True: {"super": "FedSM super model", "global": "FedSM global", "personalized": "FedSM personalized (own site)"},
    False: {"global": "SoftPull global", "personalized": "SoftPull personalized (own site)"},
}


def train_metric_key(key: str, classes: list[str]) -> bool:
    """The metrics a FedSM site's training task defines (fedseg.methods.fedsm), with the routing counts to the
    selector's classes and the global model: only these reach the history."""
    return key in TRAIN_METRICS or key in {f"val_route/{m}" for m in (*classes, GLOBAL)}


def _mean(values: dict):
    return float(np.mean(list(values.values()))) if values else None


def gamma_on_validation(per_site: dict[str, dict], classes: list[str]) -> tuple[float, list[float], dict] | None:
    """(gamma, mean super-model Dice per gamma of GAMMA_SWEEP, its record) chosen from the class sites' validation
    sweeps (fedseg.algorithms.routing.choose_gamma); None when no site has one."""
    sweeps = {s: m["gamma_sweep"] for s, m in per_site.items() if s in classes and "gamma_sweep" in m}
    if not sweeps:
        return None
    gamma, means = choose_gamma(GAMMA_SWEEP, sweeps)
    health = selector_health(
        {s: m["selector_accuracy"] for s, m in per_site.items() if "selector_accuracy" in m},
        {s: m.get("routing") or {} for s, m in per_site.items()},
        classes,
    )
    return gamma, means, {"gammas": list(GAMMA_SWEEP), "mean_dice": means, "dice": sweeps, "selector_status": health}


def selector_extra(per_site: dict, gamma: float, classes: list[str], settings: dict, history: list[dict]) -> dict:
    """The selector's part of fedseg_results.json "extra": its settings; selector_accuracy / routed_own ({site:
    fraction of test cases whose argmax is the own site / that are routed to the own personalized model, i.e.
    argmax own AND confidence > gamma}) and their *_mean over sites; routing ({site: {routed-to model: count}}:
    the test routing confusion matrix); gamma_sweep ({"gammas", "dice": {site: [super-model Dice per gamma]},
    "mean": [mean over sites per gamma]}, every gamma from the same selector outputs and one scoring of each
    model); selector_status; super_learned and super_oracle ({"label", "dice": {site: Dice}, "mean"}: the super
    model with the selector's routing at the job's gamma, and with oracle routing, which uses each case's site
    identity); selector_history (per round: {"round", "accuracy", "routed_own", "confusion"} on the validation
    cases, as in history.json's "selector")."""
    acc = {s: m["selector_accuracy"] for s, m in per_site.items() if "selector_accuracy" in m}
    own = {s: m["routed_own"] for s, m in per_site.items() if "routed_own" in m}
    sweeps = {s: m["gamma_sweep"] for s, m in per_site.items() if "gamma_sweep" in m}
    learned = {s: m["super"]["dice"] for s, m in per_site.items() if "dice" in m.get("super", {})}
    oracle = {s: m["personalized"]["dice"] for s, m in per_site.items() if s in classes and "dice" in m.get("personalized", {})}
    return {
        "selector": dict(settings),
        "selector_accuracy": acc,
        "selector_accuracy_mean": _mean(acc),
        "routed_own": own,
        "routed_own_mean": _mean(own),
        "routing": {s: m.get("routing") for s, m in per_site.items()},
        "gamma_sweep": {
            "gammas": list(GAMMA_SWEEP),
            "dice": sweeps,
            "mean": [float(np.mean([v[i] for v in sweeps.values()])) for i in range(len(GAMMA_SWEEP))] if sweeps else None,
        },
        "selector_status": selector_health(acc, {s: m.get("routing") or {} for s, m in per_site.items()}, classes, gamma),
        "super_learned": {
            "label": f"learned routing (selector, gamma={gamma})",
            "gamma": gamma,
            "dice": learned,
            "mean": _mean(learned),
        },
        "super_oracle": {"label": ORACLE_LABEL, "dice": oracle, "mean": _mean(oracle)},
        "selector_history": [{"round": r["round"], **r["selector"]} for r in history if "selector" in r],
    }


def fedsm_results(per_site: dict[str, dict], use_selector: bool, extra: dict, selector: dict | None = None) -> dict:
    """The results record of the final set's per-site test scores: one row per model (the super model, the
    global one and each site's own personalized one; SoftPull: no super model); ``extra`` (the job's settings)
    followed, with the selector, by ``selector`` (gamma_validation and selector_extra)."""
    labels = MODEL_LABELS[bool(use_selector)]
    return {
        "method": "fedsm" if use_selector else "softpull",
        "section": "testing",
        "models": {label: {s: m[key] for s, m in per_site.items() if key in m} for key, label in labels.items()},
        "extra": {**extra, **(selector or {})},
    }
