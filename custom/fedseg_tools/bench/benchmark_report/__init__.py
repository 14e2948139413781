"""BENCHMARKS.md and its plots, generated from the raw results only (raw/results.json, raw/cost.json, ...).

    python -m fedseg_tools.bench --report-only --out bench_results [--publish]

Every number and every sentence of the report is computed from the raw results; nothing is written by hand.
The package reads as facts -> sections -> rendering:

  raw            the raw files: write_raw (results.json, results.csv, methods.csv, run.json), load_raw
  facts          numbers over seeds as data: curves and whether they flattened, comparisons, the headline's
                 answers, local-optimizer pairs, FedCrossEns uncertainty (per-run values: fedseg_tools.bench.report_data)
  fedsm_facts    FedSM's selector, routing, history and gamma sweep from its results records
  *_section      one report section each, rendering its markdown lines from the facts: run_section (title, how
                 the numbers were made, datasets), headline_section, dataset_section (a dataset's tables),
                 fedsm_section, ensemble_section, optimizer_section, stock_section, budget_section, cost_section,
                 gpu_section; beside them fedseg_tools.bench.gap_report, leakage_report, unseen_report and
                 robust.robust_lines
  plots          the PNGs (matplotlib, Agg)
  render         markdown (every section in order), write_report, publish

What the report reads from the methods' results records (fedseg_results.json "extra"):
  FedSM     selector_accuracy {site: share of test cases whose selector argmax is the own site} (or
            selector_argmax_accuracy), routing {site: {model: count}} (the routing confusion matrix; "routed to
            own model" = routed_own {site: share}, else routing[site][site] / cases), selector_confusion
            {site: {predicted site: count}} (argmax confusion, optional), gamma_sweep (the super model's Dice per
            gamma: {"gammas": [..], "dice": {site: [..]}, "mean": [..]}, as fedseg.fl.fedsm_controller writes it),
            selector_history (per round {"round", "accuracy": {site: ..}, "routed_own": {site: ..}} on the
            validation cases), lam; the oracle-routed row is the model "FedSM personalized (own site)"
  FedCrossEns  uncertainty_auroc_per_site {site: AUROC of the member std for erroneous voxels}
  FedAvg/FedProx  models "global (best)" (headline) and "global (last)"
  FedBN     models "personalized (best)" (headline) and "personalized (last)": the global model with each site's own
            normalization; a dataset whose network has no normalization parameters records FedBN as "skipped"
"""

from fedseg_tools.bench.benchmark_report.gpu_section import gpu_table_lines
from fedseg_tools.bench.benchmark_report.raw import load_raw, write_raw
from fedseg_tools.bench.benchmark_report.render import PUBLISH_DIR, markdown, publish, write_report

__all__ = ["PUBLISH_DIR", "gpu_table_lines", "load_raw", "markdown", "publish", "write_raw", "write_report"]
