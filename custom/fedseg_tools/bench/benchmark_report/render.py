"""BENCHMARKS.md: every section in order, rendered from the raw results, with its plots; publishing it into the
repository (docs/benchmarks/ + BENCHMARKS.md at the root)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedseg_tools.bench.benchmark_report.budget_section import budget_section
from fedseg_tools.bench.benchmark_report.cost_section import cost_section
from fedseg_tools.bench.benchmark_report.dataset_section import (
    dataset_header,
    dataset_sites,
    every_model_table,
    hd95_table,
    other_models_table,
    protocol_table,
    run_cost_table,
)
from fedseg_tools.bench.benchmark_report.ensemble_section import auroc_section, uncertainty_summary
from fedseg_tools.bench.benchmark_report.facts import by_dataset
from fedseg_tools.bench.benchmark_report.fedsm_section import ablation_section, fedsm_section
from fedseg_tools.bench.benchmark_report.gpu_section import gpu_section
from fedseg_tools.bench.benchmark_report.headline_section import headline_section
from fedseg_tools.bench.benchmark_report.optimizer_section import optimizer_section, optimizer_summary
from fedseg_tools.bench.benchmark_report.plots import draw_plots
from fedseg_tools.bench.benchmark_report.raw import load_raw
from fedseg_tools.bench.benchmark_report.run_section import datasets_section, how_section, title_lines
from fedseg_tools.bench.benchmark_report.stock_section import stock_section
from fedseg_tools.bench.gap_report import gap_section
from fedseg_tools.bench.leakage_report import leakage_section
from fedseg_tools.bench.robust import robust_lines
from fedseg_tools.bench.tuning_report import tuning_section
from fedseg_tools.bench.unseen_report import unseen_section

PUBLISH_DIR = Path("docs") / "benchmarks"
RAW_FILES = (
    ("results.json", "run record and every cell (all runs, models, sites, seeds)"),
    ("results.csv", "one row per dataset/seed/run/model/site"),
    ("methods.csv", "one row per dataset/seed/run (time, steps, traffic, memory)"),
    ("cost.json", "FL overhead and throughput measurements"),
)


def _link(plot: Path | None, prefix: str) -> str | None:
    return f"{prefix}{plot.name}" if plot else None


def dataset_lines(ds: str, cells: list[dict], protocols: list[str], bars_png: str | None) -> list[str]:
    """One dataset's section: its tables, per-site bars (bars_png: how the markdown links them), and the paragraphs
    of the methods and peers that ran on it."""
    sites = dataset_sites(cells)
    L = dataset_header(ds, cells) + gap_section(ds, cells)
    for protocol in protocols:
        L += protocol_table(cells, protocol, sites)
    L += other_models_table(cells, sites) + hd95_table(cells, sites) + every_model_table(cells, sites)
    if bars_png:
        L += [f"![{ds} per-site Dice]({bars_png})", ""]
    L += fedsm_section(ds, cells, sites) + ablation_section(ds, cells) + auroc_section(ds, cells, sites)
    L += uncertainty_summary(cells) + optimizer_section(ds, cells) + stock_section(ds, cells, sites)
    return L + run_cost_table(cells)


def _uncertainty_figure(png: str | None) -> list[str]:
    if not png:
        return []
    return ["## FedCrossEns: uncertainty against error", "", f"![FedCrossEns uncertainty vs error]({png})", ""]


def _raw_data_section(prefix: str) -> list[str]:
    return ["## Raw data", ""] + [f"- [`{prefix}raw/{f}`]({prefix}raw/{f}): {about}" for f, about in RAW_FILES] + [""]


def markdown(run: dict, cells: list[dict], cost: dict | None, cells_by_ds: dict, plots: dict, prefix: str) -> str:
    """The report's text. plots: {"curves", "bars_<dataset>", "uncertainty"} -> the PNG file or None; prefix: how
    the markdown refers to the PNG and raw files."""
    protocols = run.get("protocols") or ["equal"]
    L = title_lines(run, prefix) + how_section(run, cells) + datasets_section(run, cells_by_ds)
    L += headline_section(cells_by_ds, protocols, _link(plots.get("curves"), prefix))
    L += leakage_section(run, cells_by_ds)
    L += unseen_section(cells_by_ds)
    for ds, ds_cells in cells_by_ds.items():
        L += dataset_lines(ds, ds_cells, protocols, _link(plots.get(f"bars_{ds}"), prefix))
    L += optimizer_summary(cells_by_ds)
    L += tuning_section(cells_by_ds)
    L += budget_section(cells)
    L += cost_section(cost)
    L += _uncertainty_figure(_link(plots.get("uncertainty"), prefix))
    L += gpu_section(run.get("gpu"))
    L += robust_lines(run.get("robust"))
    L += _raw_data_section(prefix)
    return "\n".join(L) + "\n"


def write_report(raw: Path, out: Path, asset_prefix: str = "") -> Path:
    """BENCHMARKS.md + PNGs in `out` from the raw results in `raw`. asset_prefix: how the markdown refers to
    the PNG and raw files (relative to where the markdown is read from)."""
    run, cells, cost = load_raw(raw)
    out.mkdir(parents=True, exist_ok=True)
    cells_by_ds = by_dataset([c for c in cells if c.get("methods")])
    plots = draw_plots(cells_by_ds, out)
    path = out / "BENCHMARKS.md"
    path.write_text(markdown(run, cells, cost, cells_by_ds, plots, asset_prefix))
    return path


# the files a benchmark run writes to raw/ (write_raw, the cost phase): a new report replaces them all, so that no
# file of the previous run stays behind under the new report
REPORT_RAW = ("results.json", "results.csv", "methods.csv", "run.json", "cost.json")


def publish(out: Path, repo: Path) -> list[Path]:
    """Copy raw files + plots to <repo>/docs/benchmarks/ and write <repo>/BENCHMARKS.md pointing at them. Only the
    previous report's own files (REPORT_RAW and the plots) are replaced; the other notes and measurements kept in
    docs/benchmarks/ (pilot, selector study, robustness and GPU runs, ...) stay."""
    target = repo / PUBLISH_DIR
    (target / "raw").mkdir(parents=True, exist_ok=True)
    for stale in [*(target / "raw" / name for name in REPORT_RAW), *target.glob("*.png")]:
        stale.unlink(missing_ok=True)
    written = []
    for f in sorted((out / "raw").iterdir()):
        if f.suffix in (".json", ".csv"):
            shutil.copy2(f, target / "raw" / f.name)
            written.append(target / "raw" / f.name)
    md = write_report(target / "raw", target, asset_prefix=f"{PUBLISH_DIR.as_posix()}/")
    (repo / "BENCHMARKS.md").write_text(md.read_text())
    md.unlink()
    written += sorted(target.glob("*.png")) + [repo / "BENCHMARKS.md"]
    return written
