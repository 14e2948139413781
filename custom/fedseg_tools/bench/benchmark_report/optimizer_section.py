"""The local-optimizer-state comparison (FedAvg / FedProx sites keep their Adam state across rounds, or start
every round with a fresh one): a paragraph per dataset and the section over every dataset."""

from __future__ import annotations

from fedseg_tools.bench.benchmark_report.facts import optimizer_rows
from fedseg_tools.bench.report_data import NAMES, _mean, _pm, _pts, _std, _table, local_optimizer_of


def _difference(diffs: list[float]) -> str:
    return f"{_pts(_mean(diffs))} ± {100 * _std(diffs):.1f}"


def optimizer_section(ds: str, cells: list[dict]) -> list[str]:
    rows = optimizer_rows(cells)
    if not rows:
        return []
    table = [[NAMES[m], _pm(v["fresh"]), _pm(v["keep"]), _difference(d)] for m, v, d in rows]
    return [
        f"**Local optimizer state on {ds}**: FedAvg/FedProx sites start every round with a fresh Adam "
        '("fresh") or keep their own Adam moments from round to round ("keep", as NVFlare\'s own learners do); '
        "mean test Dice of the best-validated global model, mean ± std over seeds, and the paired difference in Dice "
        "points:",
        "",
        _table(["method", "fresh", "keep", "keep − fresh (points)"], table),
        "",
    ]


def main_run_optimizers(cells_by_ds: dict[str, list[dict]]) -> list[str]:
    """The local-optimizer settings the main FedAvg/FedProx runs used."""
    return sorted(
        {
            local_optimizer_of(c["methods"][k])
            for ds_cells in cells_by_ds.values()
            for c in ds_cells
            for k in ("fedavg", "fedprox")
            if k in c.get("methods", {}) and local_optimizer_of(c["methods"][k])
        }
    )


def optimizer_summary(cells_by_ds: dict[str, list[dict]]) -> list[str]:
    """The section over every dataset, method and seed (nothing when no dataset ran both settings)."""
    per_ds = {ds: optimizer_rows(ds_cells) for ds, ds_cells in cells_by_ds.items()}
    rows = [
        [ds, NAMES[m], _pm(v["fresh"]), _pm(v["keep"]), _difference(d)] for ds, found in per_ds.items() for m, v, d in found
    ]
    if not rows:
        return []
    all_d = [x for found in per_ds.values() for _, _, d in found for x in d]
    better = "keep" if _mean(all_d) > 0 else "fresh"
    return [
        "## Local optimizer state (FedAvg / FedProx)",
        "",
        'Does a site keep its Adam state across rounds ("keep", as NVFlare\'s own learners do) or start every round '
        'with a fresh Adam ("fresh")? Both, same data, seeds, initial networks and budget:',
        "",
        _table(["dataset", "method", "fresh", "keep", "keep − fresh (Dice points, mean ± std over seeds)"], rows),
        "",
        f"Over every dataset, method and seed: keep − fresh = {_pts(_mean(all_d))} ± {100 * _std(all_d):.1f} points "
        f"({len(all_d)} pairs): **{better}** scored higher"
        + (" (the difference is within one seed std: no real difference)" if abs(_mean(all_d)) < _std(all_d) else "")
        + f". The default the main runs used: `{', '.join(d for d in main_run_optimizers(cells_by_ds) if d)}`.",
        "",
    ]
