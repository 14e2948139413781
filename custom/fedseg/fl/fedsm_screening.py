"""FedSM's screening of what the sites return (no FLARE): the model set of a training result, group by group, the
selector's per-round measurements, and the final scores. A rejection goes through the workflow's Screener
(fedseg.fl.screener), named by site and field; the round goes on without what was rejected.
"""

from __future__ import annotations

import numpy as np

from fedseg.algorithms import UpdateRejected
from fedseg.algorithms.packing import unpack
from fedseg.algorithms.routing import GLOBAL
from fedseg.algorithms.screening import check_optimizer_state, read_int, read_score, read_summary, state_norm, update_norm
from fedseg.algorithms.selector_head import check_feature_statistics, spread
from fedseg.fl.screener import Screener
from fedseg.methods.fedsm import GAMMA_SWEEP

OPTIONAL_GROUPS = ("selector_optim", "selector_stats")  # a site's privacy scope may withhold them
MAX_SELECTOR_IMAGES = 10_000_000  # images a site's selector statistics may claim (their count weights the covariance)
SCREENED_GROUPS = ("global", "personal", "selector")  # the models whose updates are compared across the sites


def expected_groups(sent: dict, lda: bool) -> dict:
    """The groups a site's update must hold: what it was sent, except that with the "lda" protocol the
    selector comes back as feature statistics (the site must not change the selector itself)."""
    if lda and "selector" in sent:
        return {**{g: r for g, r in sent.items() if g != "selector"}, "selector_stats": None}
    return sent


def valid_update(screener: Screener, site: str, params, sent: dict, lda: bool) -> dict | None:
    """The site's unpacked update if every part passes the checks, else None (rejected, with the site).

    The selector's optimizer state and feature statistics may be absent (a site's privacy scope can withhold
    them); when present the state must be a sane Adam state (finite, second moments >= 0, step counts that
    only go forward) and the statistics a count, mean and symmetric positive semi-definite scatter."""
    try:
        update = unpack(params)
    except (KeyError, AttributeError, TypeError) as e:
        screener.reject(site, "update", f"cannot unpack: {e}")
        return None
    expected = expected_groups(sent, lda)
    for group, reference in expected.items():
        if group in OPTIONAL_GROUPS and group not in update:
            continue  # a site's privacy scope may withhold its optimizer state and its feature statistics
        if group not in update:
            screener.reject(site, "update", f"the '{group}' model is missing")
            return None
        if group == "selector_stats":
            dim = int(np.asarray(sent["selector"]["head.weight"]).shape[1])
            stats = screener.read(
                site, "selector statistics", check_feature_statistics, update[group], dim, MAX_SELECTOR_IMAGES
            )
            if stats is None:
                return None
            update[group] = stats
        elif group == "selector_optim":
            continue  # checked below, against the selector it belongs to
        elif not screener.accept(site, update[group], reference, f"{group} model"):
            return None
    unexpected = sorted(set(update) - set(expected))
    if unexpected:
        screener.reject(site, "update", f"unexpected model group(s) {unexpected}")
        return None
    if "selector_optim" in update:
        try:
            check_optimizer_state(site, update["selector_optim"], update["selector"], sent.get("selector_optim"))
        except UpdateRejected as e:
            screener.reject(site, "selector optimizer state", e.reason)
            return None
    return update


def screen_updates(screener: Screener, updates: dict[str, dict], sent: dict[str, dict]) -> dict[str, dict]:
    """The updates left after the magnitude checks of every model (and of the selector's first Adam moments and
    feature statistics) and the direction check of the global model; the others are rejected."""
    too_large: set[str] = set()
    for group in SCREENED_GROUPS:
        norms = {s: update_norm(u[group], sent[s][group]) for s, u in updates.items() if group in u}
        too_large |= screener.magnitudes(f"{group} model update", norms)
    # the selector's first Adam moments (what would make the next steps explode): their change from what was
    # sent, against the other sites'. The second moments grow with the SQUARE of a site's gradients (an
    # honest site with 10x larger gradients differs 100x), so they are bounded by Adam's invariant only
    # (check_optimizer_state: exp_avg**2 <= K exp_avg_sq, which bounds every next Adam step to a few x lr)
    norms = {
        s: state_norm(u["selector_optim"], sent[s].get("selector_optim"), "exp_avg")
        for s, u in updates.items()
        if u.get("selector_optim")
    }
    too_large |= screener.magnitudes("selector optimizer state (exp_avg)", norms)
    # the global model's update against the other sites' (the personalized models differ by design)
    kept = {s: u for s, u in updates.items() if s not in too_large}
    opposed, _ = screener.directions(
        "global model update", {s: u["global"] for s, u in kept.items()}, {s: sent[s]["global"] for s in kept}
    )
    too_large |= opposed
    # the spread of a site's selector features (a scatter inflated to swamp the pooled covariance)
    spreads = {s: spread(u["selector_stats"]) for s, u in updates.items() if "selector_stats" in u}
    too_large |= screener.magnitudes("selector feature statistics (spread)", spreads)
    return {s: u for s, u in updates.items() if s not in too_large}


def bound_updates(screener: Screener, updates: dict[str, dict], sent: dict[str, dict]) -> dict[str, dict]:
    """Norm bounding (Screener.bound) of each model the sites return, against what each was sent."""
    out = {s: dict(u) for s, u in updates.items()}
    for group in SCREENED_GROUPS:
        with_group = {s: u[group] for s, u in out.items() if group in u}
        bounded, _ = screener.bound(f"{group} model update", with_group, {s: sent[s][group] for s in with_group})
        for site, params in bounded.items():
            out[site][group] = params
    return out


def selector_round(screener: Screener, rnd: int, metrics: dict[str, object], classes: list[str]) -> dict:
    """The selector SENT this round, as the class sites measured it on their validation cases before training
    ({site: metrics}): {"accuracy": {site: fraction whose argmax is the own site}, "routed_own": {site: fraction
    routed to the own personalized model (argmax own and confidence > gamma)}, "confusion": {true site:
    {routed-to model (a class site or "global"): count}}}. A site that reports no selector fields (no validation
    cases) is absent; one whose fields are malformed is left out (rejected)."""
    models = [*classes, GLOBAL]
    out: dict[str, dict] = {"accuracy": {}, "routed_own": {}, "confusion": {}}
    for site, m in sorted(metrics.items()):
        if site not in classes or not isinstance(m, dict) or "val_selector_acc" not in m:
            continue
        try:
            accuracy = read_score(site, m, "val_selector_acc")
            own = read_score(site, m, "val_routed_own", 0.0, accuracy)  # routed own implies argmax own
            row = {name: read_int(site, m, f"val_route/{name}", 0, 10**7) for name in models}
        except UpdateRejected as e:
            screener.reject(site, f"round {rnd} selector metrics", e.reason)
            continue
        out["accuracy"][site], out["routed_own"][site], out["confusion"][site] = accuracy, own, row
    return out


def valid_evaluation(screener: Screener, site: str, metrics, sites: list[str], use_selector: bool) -> dict | None:
    """A site's final scores, validated field by field (None, rejected, when malformed)."""
    try:
        out = {"section": str((metrics or {}).get("section", "testing"))[:20]}
        for key in ("super", "global", "personalized"):
            if isinstance(metrics, dict) and key in metrics:
                out[key] = read_summary(site, metrics, key)
        if use_selector and isinstance(metrics, dict) and "selector_accuracy" in metrics:
            out["selector_accuracy"] = read_score(site, metrics, "selector_accuracy")
            if "routed_own" in metrics:  # routed to the own model implies argmax own site
                out["routed_own"] = read_score(site, metrics, "routed_own", 0.0, out["selector_accuracy"])
            routing = metrics.get("routing")
            if isinstance(routing, dict):  # {model name: count}: names are the server's own site names
                out["routing"] = {
                    k: int(v)
                    for k, v in routing.items()
                    if k in (GLOBAL, *sites) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 10**7
                }
            if "gamma_sweep" in metrics:
                out["gamma_sweep"] = read_sweep(site, metrics["gamma_sweep"])
        return out
    except UpdateRejected as e:
        screener.reject(site, "final scores", e.reason)
        return None


def read_sweep(site: str, sweep) -> list[float]:
    """A site's gamma sweep ({"gammas": the server's GAMMA_SWEEP, "dice": one Dice in [0, 1] per gamma})."""
    gammas = sweep.get("gammas") if isinstance(sweep, dict) else None
    if (
        not isinstance(gammas, list)
        or len(gammas) != len(GAMMA_SWEEP)
        or not all(
            isinstance(g, (int, float)) and not isinstance(g, bool) and float(g) == w for g, w in zip(gammas, GAMMA_SWEEP)
        )
    ):
        raise UpdateRejected(site, f"metrics.gamma_sweep: gammas are not the {list(GAMMA_SWEEP)} the server sent")
    dice = sweep.get("dice")
    if not isinstance(dice, list) or len(dice) != len(GAMMA_SWEEP):
        raise UpdateRejected(site, f"metrics.gamma_sweep.dice: not a list of {len(GAMMA_SWEEP)} values")
    return [read_score(site, {"gamma_sweep.dice": d}, "gamma_sweep.dice") for d in dice]
