"""A dataset's FedSM paragraphs: the selector on the test cases, the routing and argmax confusion matrices, the
selector during training, the gamma sweep (FedSM under equal steps and under its own protocol), and the
ablation (SoftPull lambda, half vs full budget per network, learned vs oracle routing)."""

from __future__ import annotations

from fedseg_tools.bench.benchmark_report.dataset_section import ORACLE_NOTE
from fedseg_tools.bench.benchmark_report.fedsm_facts import (
    extra_of,
    extras_of,
    fedsm_keys,
    gamma_sweep,
    selector_history,
    selector_stats,
    selector_status_of,
    summed_counts,
)
from fedseg_tools.bench.report_data import (
    NAMES,
    _finite,
    _first_rec,
    _fmt,
    _mean,
    _pm,
    _table,
    aggregate,
    run_info,
    run_keys,
    run_name,
)

SELECTOR_INTRO = (
    "(mean over seeds): share whose selector argmax is the own site / "
    "share routed to the own personalized model / share routed to the global model (confidence below gamma). "
    'Only "routed to own model" is what the super model uses; the argmax alone is not enough when the '
    "confidence stays below gamma. gamma: the threshold each seed's run used (chosen on the sites' validation "
    'cases unless the run fixed it); status per seed: "learned", "collapsed" (some site\'s argmax accuracy at or '
    'below chance) or "unused" (90% or more of the cases routed to the global model: the super model is the '
    "global model)."
)


def _selector_row(cells: list[dict], key: str, sites: list[str]) -> list[str] | None:
    """One run's row of the selector table (None when its runs routed no test case)."""
    extras = extras_of(cells, key)
    stats = [selector_stats(extra, sites) for extra in extras]
    if not any(st[s]["cases"] for st in stats for s in sites):
        return None

    def mean_of(site: str, field: str) -> float:
        return _mean([st[site][field] for st in stats])

    row = [run_name(key, _first_rec(cells, key))]
    for s in sites:
        row.append(f"{_fmt(mean_of(s, 'argmax_own'))} / {_fmt(mean_of(s, 'routed_own'))} / {_fmt(mean_of(s, 'routed_global'))}")
    row.append(_fmt(min((mean_of(s, "argmax_own") for s in sites), default=float("nan"))))
    return row + [
        ", ".join(_fmt(e["gamma"], 2) for e in extras if _finite(e.get("gamma"))) or "-",
        ", ".join(selector_status_of(e, sites) for e in extras),
    ]


def selector_table(ds: str, cells: list[dict], keys: list[str], sites: list[str]) -> list[str]:
    rows = [row for k in keys if (row := _selector_row(cells, k, sites))]
    if not rows:
        return []
    header = ["run"] + [f"{s}: argmax own / routed own / global" for s in sites]
    L = [
        f"**FedSM selector on {ds}'s test cases** {SELECTOR_INTRO}",
        "",
        _table(header + ["lowest argmax-own", "gamma per seed", "selector status per seed"], rows),
        "",
    ]
    if any("collapsed" in r[-1] or "unused" in r[-1] for r in rows):
        L += ["**Warning: in some runs the FedSM selector collapsed or was unused; their super model is not FedSM's.**", ""]
    return L


def confusion_tables(cells: list[dict], key: str, sites: list[str]) -> list[str]:
    """The routing confusion matrix and, where recorded, the selector's argmax confusion matrix of one run."""
    name, extras = run_name(key, _first_rec(cells, key)), extras_of(cells, key)
    L: list[str] = []
    routing = summed_counts(extras, "routing")
    if routing:
        cols = sites + ["global"]
        L += [
            f"Routing confusion matrix, {name} (test cases summed over seeds; row: the "
            "site a case comes from, column: the model the super model used):",
            "",
            _table(["from \\ routed to"] + cols, [[s] + [_fmt(routing.get(s, {}).get(m, 0), 0) for m in cols] for s in sites]),
            "",
        ]
    confusion = summed_counts(extras, "confusion")
    if confusion:
        L += [
            f"Selector argmax confusion matrix, {name} (summed over seeds; row: true site, "
            "column: the selector's most probable site, whatever its confidence):",
            "",
            _table(["true \\ argmax"] + sites, [[s] + [_fmt(confusion.get(s, {}).get(m, 0), 0) for m in sites] for s in sites]),
            "",
        ]
    return L


def history_table(cells: list[dict], key: str, sites: list[str]) -> list[str]:
    """The selector round by round on the validation cases: when does it tell the sites apart?"""
    history = selector_history(extras_of(cells, key), sites)
    if not history:
        return []
    rows = [
        [r + 1] + [f"{_fmt(acc, 2)} / {_fmt(own, 2)}" for acc, own in (per_site[s] for s in sites)] for r, per_site in history
    ]
    return [
        f"Selector during training, {run_name(key, _first_rec(cells, key))}: argmax own site / routed to own model on "
        "each site's validation cases, at five rounds (mean over seeds):",
        "",
        _table(["round"] + sites, rows),
        "",
    ]


def gamma_table(cells: list[dict], key: str, sites: list[str]) -> list[str]:
    sweeps = [gamma_sweep(extra) for extra in extras_of(cells, key)]
    gammas = sorted({g for sw in sweeps for g in sw})
    if not gammas:
        return []
    rows = [
        [_fmt(g, 2)]
        + [_fmt(_mean([sw.get(g, {}).get(s) for sw in sweeps])) for s in sites]
        + [_pm([sw.get(g, {}).get("mean") for sw in sweeps])]
        for g in gammas
    ]
    return [
        f"Gamma sweep, {run_name(key, _first_rec(cells, key))}: the super model's test Dice for every gamma, from one "
        "pass of the selector (gamma = 1: global model only; mean over seeds):",
        "",
        _table(["gamma"] + sites + ["mean over sites"], rows),
        "",
    ]


def fedsm_section(ds: str, cells: list[dict], sites: list[str]) -> list[str]:
    keys = fedsm_keys(cells)
    if not keys:
        return []
    main = keys[:2]  # FedSM under equal steps and under its own protocol
    L = selector_table(ds, cells, keys, sites)
    for k in main:
        L += confusion_tables(cells, k, sites)
    for k in main:
        L += history_table(cells, k, sites)
    for k in main:
        L += gamma_table(cells, k, sites)
    return L


# ---- the ablation -------------------------------------------------------------------------------------------
def _lam(cells: list[dict], key: str):
    rec = _first_rec(cells, key)
    return run_info(key, rec)["options"].get("lam", ((rec.get("results") or {}).get("extra") or {}).get("lam"))


def _ablation_row(cells: list[dict], key: str) -> list[str]:
    i = run_info(key, _first_rec(cells, key))
    fedsm = i["method"] == "fedsm"
    budget = "full (E per network, 2B)" if i["protocol"] == "paper" else "half (E/2 per network, B)"
    learned = aggregate(cells, key, "FedSM super model") if fedsm else None
    oracle = aggregate(cells, key, "FedSM personalized (own site)" if fedsm else "SoftPull personalized (own site)")
    glob = aggregate(cells, key, "FedSM global" if fedsm else "SoftPull global")
    routed = []
    if fedsm:
        routed = [
            _mean([st["routed_own"] for st in selector_stats(extra_of(c, key), c.get("sites", [])).values()])
            for c in cells
            if key in c.get("methods", {})
        ]
    return [
        NAMES[i["method"]],
        _fmt(_lam(cells, key), 2),
        budget,
        _pm(learned["dice"]) if learned else "- (no selector)",
        _pm((learned or oracle)["worst"]),
        _pm(oracle["dice"]),
        _pm(glob["dice"]),
        _fmt(_mean(routed)) if routed else "-",
    ]


def ablation_section(ds: str, cells: list[dict]) -> list[str]:
    """FedSM ablation: SoftPull lambda, half vs full budget per network, learned vs oracle routing."""
    keys = [k for k in run_keys(cells) if run_info(k, _first_rec(cells, k))["method"] in ("fedsm", "softpull")]
    if not any(run_info(k, _first_rec(cells, k))["group"] == "ablation" for k in keys):
        return []

    def order(k):
        i, lam = run_info(k, _first_rec(cells, k)), _lam(cells, k)
        return (i["method"] != "fedsm", i["protocol"] != "equal", lam if _finite(lam) else 9.0)

    rows = [_ablation_row(cells, k) for k in sorted(keys, key=order)]
    return [
        f"**FedSM ablation on {ds}** (mean ± std over seeds of the mean test Dice over sites). Learned routing: the "
        "super model (selector + gamma); oracle routing: every site's own personalized model, which uses the site's "
        "identity (not available to a deployed super model for an image of unknown origin). λ: SoftPull weight of a "
        "site's own model (1 = purely local personalized models).",
        "",
        _table(
            [
                "method",
                "λ",
                "budget per network",
                "super model (learned routing)",
                "worst site (super model; SoftPull: personalized)",
                f"personalized (own site) ({ORACLE_NOTE})",
                "global model",
                "routed to own model",
            ],
            rows,
        ),
        "",
    ]
