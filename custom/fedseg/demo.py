"""The FedSeg demo: built-in non-iid dataset -> FedAvg in the NVFlare simulator -> per-site Dice table.

    python -m fedseg.demo --data data/synth2d --sites 4 --rounds 8

Steps: (1) generate the built-in 2-D multi-site dataset (deterministic, seed 0) unless it exists; (2) copy
jobs/fedavg with the requested number of rounds into the workspace and run it with `nvflare simulator`;
(3) print the per-site test Dice of the global model (from FLARE's cross-site evaluation) next to the
untrained network's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from fedseg.baselines import load_sites
from fedseg.engine import EngineConfig
from fedseg.report import format_table, load_results, site_mean
from fedseg.sim import run_simulator

REPO = Path(__file__).resolve().parents[2]


def set_rounds(job_dir: Path, rounds: int) -> None:
    """Change num_rounds of the job's first workflow (the one users edit in config_fed_server.json)."""
    path = job_dir / "app" / "config" / "config_fed_server.json"
    config = json.loads(path.read_text())
    config["workflows"][0]["args"]["num_rounds"] = rounds
    path.write_text(json.dumps(config, indent=2) + "\n")


def untrained_scores(data: Path, engine_settings: dict) -> dict:
    cfg = EngineConfig.from_dict(engine_settings)
    engines = load_sites(data, cfg)
    torch.manual_seed(0)
    net = next(iter(engines.values())).new_network()
    return {site: e.evaluate(net, "testing").summary() for site, e in engines.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedseg.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synth2d")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--job", default=str(REPO / "jobs" / "fedavg"))
    p.add_argument("--workspace", default="workspaces/demo_fedavg")
    o = p.parse_args(argv)

    data = Path(o.data)
    if not (data / "dataset.json").exists():
        from fedseg.data.synthetic import generate_dataset

        print(f"[1/3] generating the built-in dataset ({o.sites} sites, 2-D) in {data} ...", flush=True)
        generate_dataset(str(data), n_sites=o.sites, spatial_dims=2, seed=0, size="small")
    else:
        print(f"[1/3] using the dataset in {data}", flush=True)

    workspace = Path(o.workspace).resolve()
    shutil.rmtree(workspace, ignore_errors=True)
    job = workspace.parent / f"{workspace.name}_job" / "fedavg"
    shutil.rmtree(job.parent, ignore_errors=True)
    shutil.copytree(o.job, job)
    set_rounds(job, o.rounds)
    print(f"[2/3] FedAvg, {o.rounds} rounds, {o.sites} sites in the NVFlare simulator (logs: {workspace}) ...", flush=True)
    result = run_simulator(job, workspace, o.sites, data_root=data)
    errors = result.errors()
    if result.returncode != 0 or errors:
        print(result.log_tail)
        print(errors or f"simulator exited with {result.returncode}", file=sys.stderr)
        return 1
    print(f"      finished in {result.seconds:.0f}s")

    print("[3/3] results", flush=True)
    results = load_results(workspace, "fedavg")
    engine_settings = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["executors"][0]["executor"]["args"]["engine"]
    results["models"] = {"untrained": untrained_scores(data, engine_settings), **results["models"]}
    print(format_table(results, title="FedAvg demo"))
    gain = site_mean(results["models"]["global (last)"]) - site_mean(results["models"]["untrained"])
    print(f"global model vs untrained, mean over sites: {gain:+.3f} Dice")
    print(f"TensorBoard curves: tensorboard --logdir {workspace}/server/simulate_job/tb_events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
