"""The FedSeg demo: the built-in non-iid dataset, every method on the same training budget, one per-site table.

    python -m fedseg_tools.demo --data data/synth2d --sites 4 --rounds 8

Steps: (1) generate the built-in 2-D multi-site dataset (deterministic, seed 0) unless it exists; (2) run the
shipped job folders jobs/fedavg, jobs/fedsm, jobs/fedcross and jobs/fedcrossens in the NVFlare simulator, two
at a time, each configured for the same number of segmentation training steps as FedAvg with R rounds of
E local epochs (fedseg_tools.bench.budget: FedSM trains its two networks E/2 epochs each, FedCross relays one model
over N*R communications, FedCrossEns moves N models over R communications); meanwhile train the local-only
and centralized baselines on the same budget; (3) print one per-site test-Dice table (with the mean over sites
and the worst site, the minimum over sites) and save it as a PNG.

The demo's budget is small (minutes on 2 CPU cores): it shows the product working, it does not compare the
methods. For that, see BENCHMARKS.md (`make bench-standard`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fedseg.engine import EngineConfig
from fedseg.jobgen import main as write_jobs
from fedseg.report import format_table, load_results, site_mean, worst_site
from fedseg_tools.baselines import load_sites, run_centralized, run_local
from fedseg_tools.bench.budget import Budget, plan_method
from fedseg_tools.sim import run_simulator

# (row label in the table, job, the model of that job's results shown in the row)
ROWS = [
    ("FedAvg", "fedavg", "global (best)"),
    ("FedSM super model", "fedsm", "FedSM super model"),
    ("FedCross", "fedcross", "ensemble"),
    ("FedCrossEns ensemble", "fedcrossens", "ensemble"),
]


def configure(job: Path, method: str, budget: Budget) -> dict:
    """Set the job's workflow to `method`'s share of the budget; returns the plan's settings."""
    plan = plan_method(method, budget)
    path = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    args = config["workflows"][0]["args"]
    if method == "fedavg":
        args["num_rounds"] = plan.rounds
        args["local_epochs"] = plan.local_epochs
    elif method == "fedsm":
        args.update(num_rounds=plan.rounds, local_epochs=plan.local_epochs)
    else:
        args.update(num_communications=plan.communications, visit_epochs=plan.visit_epochs)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return {
        "rounds": plan.rounds,
        "local_epochs": plan.local_epochs,
        "communications": plan.communications,
        "visit_epochs": plan.visit_epochs,
        "steps": plan.seg_steps_total,
    }


def untrained_scores(engines: dict) -> dict:
    torch.manual_seed(0)
    net = next(iter(engines.values())).new_network()
    return {site: e.evaluate(net, "testing").summary() for site, e in engines.items()}


def save_png(table: dict, path: Path) -> None:
    """Grouped bars: test Dice per site, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({s for per_site in table.values() for s in per_site})
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(sites), 4.2))
    width = 0.8 / max(len(table), 1)
    for i, (label, per_site) in enumerate(table.items()):
        values = [per_site[s]["dice"] if s in per_site else 0.0 for s in sites]
        mean, worst = site_mean(per_site), worst_site(per_site)
        ax.bar([x + i * width for x in range(len(sites))], values, width, label=f"{label} ({mean:.3f}, worst {worst:.3f})")
    ax.set_xticks([x + width * (len(table) - 1) / 2 for x in range(len(sites))], sites)
    ax.set_ylabel("test Dice (mean over cases)")
    ax.set_ylim(0, 1)
    ax.set_title("FedSeg demo: every method on the same training budget")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/synth2d")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8, help="R: FedAvg rounds of E local epochs set the budget of every method")
    p.add_argument("--workspace", default="workspaces/demo")
    o = p.parse_args(argv)
    began = time.perf_counter()

    data = Path(o.data)
    if not (data / "dataset.json").exists():
        from fedseg.data.synthetic import generate_dataset

        print(f"[1/3] generating the built-in dataset ({o.sites} sites, 2-D) in {data} ...", flush=True)
        generate_dataset(str(data), n_sites=o.sites, spatial_dims=2, seed=0, size="small")
    else:
        print(f"[1/3] using the dataset in {data}", flush=True)

    root = Path(o.workspace).resolve()
    shutil.rmtree(root, ignore_errors=True)
    # the job folders as fedseg.jobgen writes them (the repository's jobs/), so an installed package runs as well
    with contextlib.redirect_stdout(io.StringIO()):
        write_jobs(["--out", str(root / "jobs"), "--only", *[job_name for _, job_name, _ in ROWS]])
    engine_settings = json.loads((root / "jobs" / "fedavg" / "app" / "config" / "config_fed_client.json").read_text())[
        "executors"
    ][0]["executor"]["args"]["engine"]
    cfg = EngineConfig.from_dict(engine_settings)
    engines = load_sites(data, cfg)
    budget = Budget.from_counts(
        o.rounds, cfg.local_epochs, {s: len(e.cases("training")) for s, e in engines.items()}, cfg.batch_size
    )
    plans = {}
    for _, job_name, _ in ROWS:
        plans[job_name] = configure(root / "jobs" / job_name, job_name, budget)
    print(
        f"[2/3] budget B = {budget.total_steps} segmentation steps per method (FedAvg: R={o.rounds} rounds x "
        f"E={cfg.local_epochs} epochs at {len(engines)} sites); jobs in the NVFlare simulator, two at a time "
        f"(logs: {root}) ...",
        flush=True,
    )

    def simulate(job_name: str):
        start = time.perf_counter()
        result = run_simulator(root / "jobs" / job_name, root / job_name, len(engines), data_root=data)
        print(f"      {job_name}: finished in {time.perf_counter() - start:.0f}s ({plans[job_name]})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {job_name: pool.submit(simulate, job_name) for _, job_name, _ in ROWS}
        baselines = [
            run_local(engines, o.rounds, log=lambda *_: None, cross_site=False),
            run_centralized(engines, cfg, o.rounds, log=lambda *_: None),
        ]
        print(f"      local-only and centralized trained ({time.perf_counter() - began:.0f}s)", flush=True)
        results = {name: f.result() for name, f in futures.items()}
    failed = {n: r for n, r in results.items() if r.returncode != 0 or r.errors()}
    for name, r in failed.items():
        print(f"{name} failed:\n{r.log_tail}\n{r.errors()}", file=sys.stderr)
    if failed:
        return 1

    print("[3/3] results", flush=True)
    table = {
        "untrained": untrained_scores(engines),
        "local-only (own site)": baselines[0]["models"]["local (own site)"],
        "centralized (pooled data)": baselines[1]["models"]["centralized"],
    }
    for label, job_name, model in ROWS:
        table[label] = load_results(root / job_name, job_name)["models"][model]
    print(format_table({"models": table}, title=f"FedSeg demo, every method at B = {budget.total_steps} steps"))
    png = root / "demo_dice.png"
    try:
        save_png(table, png)
    except ImportError:  # matplotlib is an extra of the installed package
        png = "none (matplotlib is not installed: pip install 'fedseg[bench]')"
    (root / "demo_results.json").write_text(
        json.dumps({"budget_steps": budget.total_steps, "plans": plans, "models": table}, indent=2)
    )
    print(f"plot: {png}\nper-job tables: python -m fedseg.report {root}/<job>   TensorBoard: tensorboard --logdir {root}")
    print("a demo budget: it shows every method working, not which is best (see BENCHMARKS.md)")
    print(f"demo finished in {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
