"""The standard preset's GPU variant: what FedSeg costs on one GPU shared by 4 simulated sites, with AMP on.

    python -m fedseg_tools.bench.gpu --out bench_gpu            # on a CUDA machine; refuses to run without one
    python -m fedseg_tools.bench.gpu --out bench_gpu --report   # only print the table from bench_gpu/raw/gpu.json
    python -m fedseg_tools.bench.gpu --out bench_gpu --from-workspace WS --batch-size 4   # rows from a finished FL workspace

Runs the standard preset's synth2d cell (same data, engine, R x E budget and methods as the committed CPU report)
with every method under the equal-steps protocol, seed 0, in the NVFlare simulator with the 4 sites as 4
concurrent worker processes on GPU 0 (no -gpu split, so they share the card), then writes raw/gpu.json: per
method the wall time, its ratio to FedAvg's in the same run, and per site the peak GPU memory PyTorch allocated in
the site process during any task (TaskMeter's peak_gpu_bytes) and training images per second of training-task time
(segmentation steps x batch size / seconds of the site's training tasks, which include scoring the received model on
the site's validation cases). It measures speed and memory, not accuracy: one seed, one protocol, no ablation.
The FedSeg benchmark report (BENCHMARKS.md) reads raw/gpu.json, when present, for its GPU table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

GPU_FILE = "gpu.json"
GPU_METHODS = ("fedavg", "fedprox", "fedsm", "softpull", "fedcross", "fedcrossens")
BASELINES = ("local", "centralized")


def gpu_preset():
    from fedseg_tools.bench.presets import get_preset

    preset = get_preset("standard")
    spec = preset.datasets["synth2d"]
    spec.engine = {**spec.engine, "amp": True}
    preset.name = "standard-gpu"
    preset.datasets = {"synth2d": spec}
    preset.seeds = [0]
    preset.protocols = ["equal"]
    preset.fedsm_ablation = preset.optimizer_measure = False
    preset.stock = []
    preset.parallel = 1
    preset.description = (
        "the standard preset's GPU variant: synth2d, seed 0, equal steps, every method, AMP on, 4 sites sharing one GPU"
    )
    return preset


def gpu_rows(results: dict) -> list[dict]:
    """One row per method of the first cell of raw/results.json: wall seconds, x FedAvg, per-site peak GPU memory
    and training images/s (pure: reads what the run recorded)."""
    cell = results["cells"][0]
    if cell.get("error"):
        raise RuntimeError(f"the GPU run's cell {cell.get('dataset')} failed: {cell['error']}")
    batch = int((cell.get("budget") or {}).get("batch_size") or cell["engine"]["batch_size"])
    methods = cell.get("methods") or {}
    fedavg_wall = (methods.get("fedavg") or {}).get("wall_seconds")
    rows = []
    for name in (*GPU_METHODS, *BASELINES):
        rec = methods.get(name)
        if not rec or rec.get("status") not in ("ok", "partial"):
            continue
        wall = rec.get("wall_seconds")
        steps = rec.get("site_seg_steps") or {}
        seconds = rec.get("site_train_task_seconds") or {}
        rate = {s: steps[s] * batch / seconds[s] for s in steps if seconds.get(s)}
        rows.append(
            {
                "method": name,
                "dataset": cell["dataset"],
                "wall_seconds": wall,
                "x_fedavg": (wall / fedavg_wall) if wall and fedavg_wall else None,
                "peak_gpu_bytes": dict(rec.get("gpu_memory") or {}),
                "train_images_per_second": rate,
                "seg_steps": rec.get("seg_steps"),
            }
        )
    return rows


def rows_from_workspace(workspace: Path, batch_size: int, dataset: str = "synth2d") -> list[dict]:
    """GPU rows straight from a finished bench simulator workspace (its timeline and the sites' meter files), for a
    run whose FL job finished but whose cell record was never written (e.g. the command limit cut the baselines)."""
    from fedseg_tools.bench.collect import meter_records, method_record, timeline, windows

    workspace = Path(workspace)
    sites = sorted(p.parent.parent.name for p in workspace.glob("*/simulate_job/fedseg_meter.jsonl"))
    records = meter_records(workspace, sites)
    methods = {}
    for name, window in windows(timeline(workspace)).items():
        method = name.split("__")[0]  # bench labels are <method>__s<seed>
        methods[method] = method_record(method, workspace, sites, {}, window, records, name)
    return gpu_rows({"cells": [{"dataset": dataset, "budget": {"batch_size": batch_size}, "methods": methods}]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output folder (raw/gpu.json, raw/results.json, runs/)")
    p.add_argument("--rounds", type=int, help="override R (default: the standard preset's)")
    p.add_argument("--report", action="store_true", help="only print the table of OUT/raw/gpu.json")
    p.add_argument("--from-workspace", help="write OUT/raw/gpu.json from this finished bench simulator workspace")
    p.add_argument("--batch-size", type=int, default=4, help="with --from-workspace: the engine's batch size")
    argv = list(sys.argv[1:] if argv is None else argv)
    o = p.parse_args(argv)
    out = Path(o.out).resolve()
    if o.from_workspace:
        (out / "raw").mkdir(parents=True, exist_ok=True)
        gpu = {
            "command": "python -m fedseg_tools.bench.gpu " + " ".join(shlex.quote(a) for a in argv),
            "rows": rows_from_workspace(Path(o.from_workspace), o.batch_size),
        }
        (out / "raw" / GPU_FILE).write_text(json.dumps(gpu, indent=2, default=str))
    elif not o.report:
        import torch

        if not torch.cuda.is_available():
            print(
                "fedseg_tools.bench.gpu: no CUDA device here; this variant measures a GPU and runs only on one", file=sys.stderr
            )
            return 2
        from fedseg_tools.bench.run import resolve_datasets, run_benchmark

        preset = gpu_preset()
        if o.rounds:
            preset.rounds = o.rounds
        command = "python -m fedseg_tools.bench.gpu " + " ".join(shlex.quote(a) for a in argv)
        run_info = run_benchmark(preset, out, resolve_datasets(preset, None, None), command, cost=False)
        results = json.loads((out / "raw" / "results.json").read_text())
        gpu = {
            "command": command,
            "machine": run_info.get("machine"),
            "started": run_info.get("started"),
            "seconds": run_info.get("seconds"),
            "preset": preset.description,
            "rounds": preset.rounds,
            "epochs": preset.epochs,
            "engine": preset.datasets["synth2d"].engine,
            "rows": gpu_rows(results),
        }
        (out / "raw" / GPU_FILE).write_text(json.dumps(gpu, indent=2, default=str))
    from fedseg_tools.bench.benchmark_report import gpu_table_lines

    gpu = json.loads((out / "raw" / GPU_FILE).read_text())
    print("\n".join(gpu_table_lines(gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
