"""The Headline section: per dataset the ranking and the yes/no answers with their seed noise (from
facts.headline_facts), then every run's mean and worst-site Dice side by side over the datasets, per protocol,
and the learning curves."""

from __future__ import annotations

import math

from fedseg_tools.bench.benchmark_report.facts import BEAT_MARGIN, MATCH_MARGIN, headline_facts
from fedseg_tools.bench.gap_report import gap_sentence
from fedseg_tools.bench.report_data import (
    _finite,
    _first_rec,
    _mean,
    _pm,
    _pts,
    _std,
    _table,
    aggregate,
    protocol_rows,
    run_name,
)

CURVES_TEXT = (
    "Learning curves on the validation cases (mean over sites and seeds) against the segmentation steps used, "
    'in multiples of the budget B (dashed: a paper-protocol run; "not flat": its last 25% still gain ≥ 0.01). '
    "FedAvg/FedProx/FedSM/SoftPull: each site scores the model it receives at the start of a round (FedAvg/FedProx "
    "end with the final model); FedCross/FedCrossEns: the ensemble after each communication; local-only/"
    "centralized: after each R-th of their steps; stock peers: the received model per round."
)


def _yes(x) -> str:
    return "**yes**" if x else "**no**"


def noise_text(paired: list[float]) -> str:
    """How far a difference stands above the seed-to-seed noise (paired per-seed differences)."""
    n = len(paired)
    if n < 2:
        return "one seed: no error estimate"
    se = _std(paired) / math.sqrt(n)
    m = _mean(paired)
    if se == 0:
        return f"the same difference in all {n} seeds"
    if abs(m) < 2 * se:
        return f"within seed noise: |difference| < 2 standard errors ({100 * se:.1f} points) over {n} seeds"
    return f"{abs(m) / se:.1f} standard errors over {n} seeds"


def _against_fedavg(cells: list[dict], facts: dict) -> list[str]:
    """FedSM's super model and FedCrossEns' ensemble against FedAvg, under each protocol they ran."""
    out = []
    for m, label in (("fedsm", "FedSM super model"), ("fedcrossens", "FedCrossEns ensemble")):
        f = facts[m]
        if not f["per_protocol"]:
            continue
        parts = []
        for protocol, (va, vb, d, paired) in f["per_protocol"].items():
            key = m if protocol == "equal" else f"{m}-paper"
            ratio = _mean(aggregate(cells, key)["ratio"])
            ref = f["reference"][protocol]
            against = f" (FedAvg at the same {ref.rsplit('-', 1)[-1]} steps)" if ref != "fedavg" else ""
            parts.append(
                f"{'equal steps' if protocol == 'equal' else f'paper protocol ({ratio:.2g}B)'} {va:.3f} vs {vb:.3f}"
                f"{against} ({_pts(d)} points; {noise_text(paired)})"
            )
        out.append(
            f"{label} vs FedAvg: " + "; ".join(parts) + f" → beats FedAvg by ≥ {100 * BEAT_MARGIN:.0f} Dice points "
            f"under at least one protocol: {_yes(f['beats_fedavg'])}."
        )
    return out


def _pairs(facts: dict, has_fedcross: bool) -> list[str]:
    """Centralized against local-only, and FedCross against NVFlare's stock cyclic workflow."""
    out = []
    if "centralized_vs_local" in facts:
        f = facts["centralized_vs_local"]
        out.append(
            f"Centralized vs local-only: {f['values'][0]:.3f} vs {f['values'][1]:.3f} ({_pts(f['diff'])} points; "
            f"{noise_text(f['paired'])}) → centralized beats local-only: {_yes(f['beats'])}."
        )
    if "fedcross_vs_stock" in facts:
        f = facts["fedcross_vs_stock"]
        out.append(
            f"FedCross vs NVFlare's stock CyclicRecipe at the same budget: {f['values'][0]:.3f} vs {f['values'][1]:.3f} "
            f"({_pts(f['diff'])} points; {noise_text(f['paired'])}) → FedCross matches the stock cyclic workflow (at most "
            f"{100 * MATCH_MARGIN:.0f} point below): {_yes(f['matches'])}."
        )
    elif has_fedcross:
        out.append("FedCross vs NVFlare's stock CyclicRecipe: not measured in this run.")
    return out


def _flattening(cells: list[dict], facts: dict) -> str:
    if facts["not_flattened"]:
        return (
            "Validation curves NOT flattened (the last 25% of the curve still gain ≥ 0.01): "
            + ", ".join(f"{run_name(k, _first_rec(cells, k))} ({_pts(g)})" for k, g in facts["not_flattened"])
            + ": these runs had not converged; more rounds could change their numbers."
        )
    return "Every validation curve has flattened (the last 25% gain < 0.01)."


def headline_sentences(ds: str, cells: list[dict]) -> list[str]:
    ranked_keys = [k for k, _ in protocol_rows(cells, "equal")]
    mean = {k: _mean(aggregate(cells, k)["dice"]) for k in ranked_keys}
    mean = {k: v for k, v in mean.items() if _finite(v)}
    if not mean:
        return [f"**{ds}**: no results."]
    b = cells[0].get("budget", {})
    order = sorted(mean, key=lambda k: -mean[k])
    ranking = " > ".join(f"{run_name(k, _first_rec(cells, k))} {mean[k]:.3f}" for k in order)
    facts = headline_facts(cells)
    return [
        f"**{ds}** (R={b.get('rounds')}, E={b.get('epochs')}, B={b.get('total_steps')} steps, {len(cells)} seed(s)); "
        f"equal steps, mean test Dice: {ranking}.",
        *_against_fedavg(cells, facts),
        *_pairs(facts, "fedcross" in mean),
        *[s for s in [gap_sentence(cells, facts["gap_closed"])] if s],
        _flattening(cells, facts),
    ]


def _dice_cell(a: dict) -> str:
    if a["dice"]:
        return f"{_pm(a['dice'])} ({_mean(a['ratio']):.2g}B)"
    return f"missing ({', '.join(sorted(set(map(str, a['status'])))) or 'not run'})"


def protocol_summary(cells_by_ds: dict[str, list[dict]], protocol: str) -> list[str]:
    """One protocol's runs over every dataset: mean test Dice (with the steps' multiple of B) and worst site."""
    keys: list[str] = []
    for ds_cells in cells_by_ds.values():
        keys += [k for k, _ in protocol_rows(ds_cells, protocol) if k not in keys]
    rows = []
    for key in keys:
        rec = next((_first_rec(c, key) for c in cells_by_ds.values() if _first_rec(c, key)), {})
        row = [run_name(key, rec)]
        for ds_cells in cells_by_ds.values():
            a = aggregate(ds_cells, key)
            row += [_dice_cell(a), _pm(a["worst"]) if a["dice"] else "-"]
        rows.append(row)
    return [
        f"*{'Equal steps' if protocol == 'equal' else 'Each paper’s own protocol'}:*",
        "",
        _table(["method"] + [h for ds in cells_by_ds for h in (ds, f"{ds} worst site")], rows),
        "",
    ]


def headline_section(cells_by_ds: dict[str, list[dict]], protocols: list[str], curves_png: str | None) -> list[str]:
    """curves_png: how the markdown links the learning-curve plot (None: no plot)."""
    L = ["## Headline", ""]
    for ds, ds_cells in cells_by_ds.items():
        L += [f"- {s}" for s in headline_sentences(ds, ds_cells)]
    L += [
        "",
        "Mean test Dice over sites (each run's headline model), mean ± std over seeds, with the steps it used "
        "(multiples of the budget B), and the worst site's test Dice (each seed's minimum over sites, mean ± std over "
        "seeds):",
        "",
    ]
    for protocol in protocols:
        L += protocol_summary(cells_by_ds, protocol)
    if curves_png:
        L += [f"![Dice per round]({curves_png})", "", CURVES_TEXT, ""]
    return L
