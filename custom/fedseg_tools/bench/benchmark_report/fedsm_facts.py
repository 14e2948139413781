"""FedSM's selector as data, from the "extra" of its results records (fedseg.fl.fedsm_controller writes them):
per site the share of test cases whose selector argmax is the own site, routed to the own model or to the
global model; the selector status; routing and argmax confusion matrices summed over seeds; the selector round
by round; the super model's Dice per gamma."""

from __future__ import annotations

from fedseg.algorithms.routing import selector_health
from fedseg_tools.bench.report_data import _finite, _first_rec, _mean, run_info, run_keys

HISTORY_POINTS = (0, 0.25, 0.5, 0.75, 1)  # the selector-during-training table: first, quarter, half, ..., last round


def fedsm_keys(cells: list[dict]) -> list[str]:
    return [k for k in run_keys(cells) if run_info(k, _first_rec(cells, k))["method"] == "fedsm"]


def extra_of(cell: dict, key: str) -> dict:
    """The results "extra" of one run in one cell ({} when it has none)."""
    return ((cell["methods"].get(key) or {}).get("results") or {}).get("extra") or {}


def extras_of(cells: list[dict], key: str) -> list[dict]:
    """A run's results "extra", one per seed that ran it."""
    return [extra_of(c, key) for c in cells if key in c.get("methods", {})]


def _first_key(d: dict, *names):
    for n in names:
        if isinstance(d.get(n), dict) and d.get(n):
            return d[n]
    return None


def selector_stats(extra: dict, sites: list[str]) -> dict[str, dict]:
    """{site: {"argmax_own", "routed_own", "routed_global", "cases"}} from a FedSM results record's extra."""
    argmax = (
        _first_key(extra, "selector_argmax_accuracy", "argmax_own_site", "selector_argmax_own_site", "selector_accuracy") or {}
    )
    routed = _first_key(extra, "routed_own", "selector_routed_own", "routed_to_own_model", "selector_routed_own_model") or {}
    routing = extra.get("routing") or {}
    out = {}
    for s in sites:
        counts = routing.get(s) or {}
        n = sum(v for v in counts.values() if _finite(v))
        out[s] = {
            "argmax_own": argmax.get(s),
            "routed_own": routed.get(s) if _finite(routed.get(s)) else (counts.get(s, 0) / n if n else float("nan")),
            "routed_global": counts.get("global", 0) / n if n else float("nan"),
            "cases": n,
        }
    return out


def selector_status_of(extra: dict, sites: list[str]) -> str:
    """A FedSM run's selector status: as the run recorded it, or judged from its test routing by the same rule
    (fedseg.algorithms.routing.selector_health) for results written before runs recorded it; "-" without routing."""
    recorded = (extra.get("selector_status") or {}).get("status")
    accuracy, routing = extra.get("selector_accuracy"), extra.get("routing")
    if recorded or not isinstance(accuracy, dict) or not isinstance(routing, dict) or not sites:
        return recorded or "-"
    return selector_health(accuracy, {s: r or {} for s, r in routing.items()}, sites)["status"]


def summed_counts(extras: list[dict], field: str) -> dict[str, dict[str, float]]:
    """{row: {column: count}} summed over seeds: field "routing" (site -> the model the super model used) or
    "confusion" (true site -> the selector's argmax site)."""
    total: dict[str, dict[str, float]] = {}
    for extra in extras:
        if field == "routing":
            matrix = extra.get("routing") or {}
        else:
            matrix = _first_key(extra, "selector_confusion", "argmax_confusion") or {}
        for s, counts in matrix.items():
            for model, n in (counts or {}).items():
                if _finite(n):
                    total.setdefault(s, {}).setdefault(model, 0.0)
                    total[s][model] += n
    return total


def selector_history(extras: list[dict], sites: list[str]) -> list[tuple[int, dict[str, tuple[float, float]]]]:
    """The selector on the validation cases at five rounds: [(round, {site: (argmax own, routed own)})], mean over
    seeds; [] when the runs recorded no history."""
    hist = [extra.get("selector_history") or [] for extra in extras]
    entries = [h for hs in hist for h in hs if isinstance(h, dict)]
    rounds = sorted({int(h["round"]) for h in entries if _finite(h.get("round"))})
    if not rounds:
        return []
    picks = sorted({rounds[min(len(rounds) - 1, round(q * (len(rounds) - 1)))] for q in HISTORY_POINTS})

    def at(r: int, field: str, site: str) -> float:
        return _mean([(h.get(field) or {}).get(site) for h in entries if h.get("round") == r])

    return [(r, {s: (at(r, "accuracy", s), at(r, "routed_own", s)) for s in sites}) for r in picks]


def gamma_sweep(extra: dict) -> dict[float, dict[str, float]]:
    """The super model's test Dice per gamma, {gamma: {site: dice, "mean": dice}}, from the sweep FedSM records
    ({"gammas": [..], "dice": {site: [Dice per gamma]}, "mean": [mean over sites per gamma] or None}); {} when the
    record has none. Without "mean" the mean over the sites is taken."""
    raw = extra.get("gamma_sweep")
    if not isinstance(raw, dict) or not isinstance(raw.get("gammas"), list):
        return {}
    gammas = [float(g) for g in raw["gammas"]]
    out: dict[float, dict[str, float]] = {}
    for site, values in (raw.get("dice") or {}).items():
        for g, v in zip(gammas, values):
            if _finite(v):
                out.setdefault(g, {})[site] = float(v)
    for g, v in zip(gammas, raw.get("mean") or []):
        if _finite(v):
            out.setdefault(g, {})["mean"] = float(v)
    for row in out.values():
        if "mean" not in row:
            row["mean"] = _mean(list(row.values()))
    return dict(sorted(out.items()))
