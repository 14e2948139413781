"""The report's plots (matplotlib, Agg): validation Dice per round of every plotted run (dice_per_round.png),
per-site test Dice bars per dataset (site_dice_<dataset>.png), FedCrossEns uncertainty against error
(fedcrossens_uncertainty.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedseg_tools.bench.benchmark_report.facts import flattened, mean_curve, plotted_runs, uncertainty_points
from fedseg_tools.bench.report_data import _first_rec, _mean, _std, aggregate, run_info, run_name

COLORS = {
    "local": "#8c8c8c",
    "centralized": "#000000",
    "fedavg": "#1f77b4",
    "fedprox": "#17becf",
    "fedbn": "#ff7f0e",
    "fedsm": "#d62728",
    "softpull": "#ff9896",
    "fedcross": "#9467bd",
    "fedcrossens": "#2ca02c",
    "nvflare_cyclic": "#bcbd22",
    "nvflare_fedavg": "#7f7f7f",
}


def _plt():
    import matplotlib  # imported when a plot is drawn: the report's other users need no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw_curves(ax, ds: str, cells: list[dict]) -> None:
    for k in plotted_runs(cells):
        rec = _first_rec(cells, k)
        i = run_info(k, rec)
        curve = mean_curve(cells, k, budget_axis=True)
        if not curve:
            continue
        flat, _ = flattened(mean_curve(cells, k))
        mark = "" if flat in (True, None) else " (not flat)"
        ax.plot(
            [x for x, _ in curve],
            [y for _, y in curve],
            marker="o",
            ms=2,
            lw=1.4,
            color=COLORS.get(i["method"]),
            ls="--" if i["protocol"] == "paper" else "-",
            label=run_name(k, rec) + mark,
        )
    ax.set_title(f"{ds}: validation Dice during training")
    ax.set_xlabel("segmentation steps used / budget B (dashed: paper protocol)")
    ax.set_ylabel("mean validation Dice over sites (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=6, loc="lower right")


def plot_curves(cells_by_ds: dict[str, list[dict]], path: Path) -> Path | None:
    plt = _plt()
    names = list(cells_by_ds)
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6.0 * len(names), 4.4), squeeze=False)
    for ax, ds in zip(axes[0], names):
        _draw_curves(ax, ds, cells_by_ds[ds])
    return _save(plt, fig, path)


def plot_site_bars(ds: str, cells: list[dict], path: Path) -> Path | None:
    plt = _plt()
    keys = plotted_runs(cells)
    aggs = {k: aggregate(cells, k) for k in keys}
    sites = sorted({s for a in aggs.values() for s in a["per_site"]})
    if not sites:
        return None
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * (len(sites) + 1) + 2), 4.2))
    width = 0.8 / max(len(keys), 1)
    groups = sites + ["mean"]
    for i, k in enumerate(keys):
        a, info = aggs[k], run_info(k, _first_rec(cells, k))
        means = [_mean(a["per_site"].get(s, [])) for s in sites] + [_mean(a["dice"])]
        stds = [_std(a["per_site"].get(s, [])) for s in sites] + [_std(a["dice"])]
        xs = np.arange(len(groups)) + (i - (len(keys) - 1) / 2) * width
        ax.bar(
            xs,
            np.nan_to_num(means),
            width,
            yerr=np.nan_to_num(stds),
            label=run_name(k, _first_rec(cells, k)),
            color=COLORS.get(info["method"]),
            capsize=2,
            hatch="//" if info["protocol"] == "paper" else None,
            edgecolor="white" if info["protocol"] == "paper" else None,
        )
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{ds}: per-site test Dice of each run's headline model (hatched: paper protocol)")
    ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_uncertainty(cells_by_ds: dict[str, list[dict]], path: Path) -> Path | None:
    plt = _plt()
    data = {ds: uncertainty_points(cells) for ds, cells in cells_by_ds.items()}
    data = {ds: d for ds, d in data.items() if d[0]}
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(4.6 * len(data), 4.0), squeeze=False)
    for ax, (ds, (xs, ys, sites, _)) in zip(axes[0], data.items()):
        for j, site in enumerate(sorted(set(sites))):
            idx = [i for i, s in enumerate(sites) if s == site]
            ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=12, alpha=0.7, label=site, color=f"C{j}")
        if len(xs) > 2 and np.std(xs) > 0:
            r = float(np.corrcoef(xs, ys)[0, 1])
            ax.set_title(f"{ds}: FedCrossEns (Pearson r = {r:.2f})")
        else:
            ax.set_title(f"{ds}: FedCrossEns")
        ax.set_xlabel("mean member disagreement per case (std of p)")
        ax.set_ylabel("error per case (1 - Dice)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def draw_plots(cells_by_ds: dict[str, list[dict]], out: Path) -> dict[str, Path | None]:
    """Every plot into `out`: {"curves", "bars_<dataset>" ..., "uncertainty"} -> its file (None: nothing to draw)."""
    plots = {"curves": plot_curves(cells_by_ds, out / "dice_per_round.png")}
    for ds, ds_cells in cells_by_ds.items():
        plots[f"bars_{ds}"] = plot_site_bars(ds, ds_cells, out / f"site_dice_{ds}.png")
    plots["uncertainty"] = plot_uncertainty(cells_by_ds, out / "fedcrossens_uncertainty.png")
    return plots
