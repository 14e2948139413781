"""Cost of federation, measured in one run: FL overhead ratio and site-executor throughput ratio.

(a) FL overhead. The same FedAvg training (same sites, initial weights, R rounds x E epochs, the same
    SegEngine) once as an NVFlare job in the simulator and once as a plain Python loop in one process
    (for each round: every site trains its local steps in turn, then the step-weighted average). Both at a
    small (E = 1) and a realistic amount of work per round. Reported:
      training-phase ratio = wall time of the FedAvg workflow (first task sent .. last result aggregated)
                             / wall time of the plain loop's rounds,
      job ratio            = wall time of the whole simulator job (start-up, warm-up, shut-down included)
                             / the plain loop's process wall time (imports, data loading included),
      CPU ratio            = CPU seconds of all the job's processes / CPU seconds of the plain loop process.
    The job runs its N sites as N processes that share the machine's cores, the plain loop runs them one after
    the other in one process: on 2 cores a ratio near 1 means the federation costs about what the
    parallelism gains; the CPU ratio is the overhead without that effect.
    Settings compared: FLARE's defaults as the shipped jobs use them (a site asks for its next task every
    task_request_interval = 2 s, workflows check task status every 0.5 s) against the bench's (0.1 s / 0.1 s).

(b) Executor throughput. One site alone (the one with the most training cases) runs FedAvg with the
    realistic work per round; its SegExecutor's training throughput (images per second of the whole "train"
    task, as the TaskMeter times it) against a plain MONAI loop (CacheDataset + DataLoader + the same network,
    DiceCELoss and Adam, written here without the engine) on the same site's data, the same transforms and
    batch size, in a process with the same thread count. Also the engine alone (SegEngine.train) to split the
    gap between the engine and the FLARE executor around it. Executor as shipped against the executor with
    the two settings that cost time every round: validate_before_train (scores the received model on the
    validation cases before training) and per-step TensorBoard tracking (an event to the server per step).

(c) Relay latency. One job runs FedAvg and then FedCross (one model relayed round-robin) from the same initial
    weights at the same steps (small work per round, bench polling settings): the wall ratio of the two
    workflows, and FedCross's hand-over latency per communication (from the last result at the server to the
    next visit starting at its site; the simulator's processes share one clock) with the
    controller's per-communication split into training, validation and hand-over.

(d) Executor throughput at three sizes, each on its own generated site data: the benchmark's network at 64 px
    ("bench2d"), a realistic 2-D configuration ("realistic2d": 256 px, UNet 32-64-128-256, batch 16) and a
    realistic 3-D one ("realistic3d": 96^3 patches, UNet 16-32-64-128-256, batch 2). Per configuration the
    executor's images/s in a one-site FedAvg job against a plain MONAI loop and the engine alone, as in (b), on
    the machine's device (a GPU when torch sees one, else the CPU, which the record says).

    python -m fedseg_tools.bench.cost relay --out OUT [--preset quick] [--rounds 3]
    python -m fedseg_tools.bench.cost throughput --out OUT [--configs bench2d realistic2d realistic3d] [--epochs 1]
    python -m fedseg_tools.bench.cost plain --what fedavg|throughput --data DIR --engine JSON --rounds R --site SITE
                                      --init INIT.pt --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IMG_PER_S = re.compile(r"round (\d+): (\d+) steps, loss [-\d.naif]+, ([\d.]+) img/s")
SHIPPED = {"task_request_interval": None, "task_check_period": None}
TUNED = {"task_request_interval": 0.1, "task_check_period": 0.1}


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


# ---- the plain loops (run in their own process) ----------------------------------------------------------
def plain_fedavg(data: str, engine_settings: dict, rounds: int, init: str) -> dict:
    """FedAvg as a plain loop on the same engine: wall and CPU time of the rounds."""
    from fedseg.algorithms import weighted_average
    from fedseg.engine import EngineConfig, load_numpy_state, state_to_numpy
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.baselines import load_sites
    from fedseg_tools.bench.jobs import load_initial_state

    cfg = EngineConfig.from_dict(resolve_engine(engine_settings))
    engines = load_sites(data, cfg)
    for e in engines.values():
        e.dataset("training")
        e.train(e.new_network(), 1)  # warm-up, as the FL job's BenchWarmup
    global_params = {k: v.numpy() for k, v in load_initial_state(init).items()}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    steps, images = 0, 0
    for _ in range(rounds):
        updates, weights = {}, {}
        for site, e in engines.items():
            net = e.new_network()
            load_numpy_state(net, global_params, site)
            stats = e.train(net, e.local_steps())
            updates[site], weights[site] = state_to_numpy(net), stats.steps
            steps += stats.steps
            images += stats.images
        global_params = weighted_average(updates, weights)
    return {
        "wall_seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
        "steps": steps,
        "images": images,
        "rounds": rounds,
        "epochs": cfg.local_epochs,
    }


def plain_monai(datalist: str, site: str, engine_settings: dict, epochs: int, init: str) -> dict:
    """A plain MONAI training loop (no SegEngine, no FLARE): images per second."""
    import torch
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.losses import DiceCELoss

    from fedseg.data import load_datalist
    from fedseg.engine import EngineConfig
    from fedseg.engine.config import resolve_engine
    from fedseg.engine.engine import train_transforms
    from fedseg.engine.networks import SegNetwork
    from fedseg_tools.bench.jobs import load_initial_state

    cfg = EngineConfig.from_dict(resolve_engine(engine_settings))
    torch.manual_seed(cfg.seed)
    cases = load_datalist(datalist, site)["training"]
    dataset = CacheDataset(cases, transform=train_transforms(cfg), cache_rate=1.0, progress=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0, collate_fn=list_data_collate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the engine trains too
    net = SegNetwork(**cfg.network_args())
    net.load_state_dict(load_initial_state(init))
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    net.train()

    def step(batch) -> int:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"].to(device)), batch["label"].to(device))
        loss.backward()
        optimizer.step()
        return int(batch["image"].shape[0])

    step(next(iter(loader)))  # warm-up
    images, began, cpu0 = 0, time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for batch in loader:
            images += step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return {
        "device": str(device),
        "images": images,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "images_per_second": images / seconds,
        "images_per_cpu_second": images / cpu,
    }


def plain_engine(datalist: str, site: str, engine_settings: dict, rounds: int, init: str) -> dict:
    """SegEngine.train alone, a new network per round as the executor builds one: images per second."""
    from fedseg.data import load_datalist
    from fedseg.engine import EngineConfig, SegEngine, load_numpy_state
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.bench.jobs import load_initial_state

    cfg = EngineConfig.from_dict(resolve_engine(engine_settings))
    engine = SegEngine(cfg, load_datalist(datalist, site), site=site)
    engine.dataset("training")
    engine.train(engine.new_network(), 1)
    state = load_initial_state(init)
    images, seconds, began, cpu0 = 0, 0.0, time.perf_counter(), time.process_time()
    for _ in range(rounds):
        net = engine.new_network()
        load_numpy_state(net, state, site)
        stats = engine.train(net, engine.local_steps())
        images += stats.images
        seconds += stats.seconds
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return {
        "images": images,
        "seconds_in_train": seconds,
        "seconds": wall,
        "cpu_seconds": cpu,
        "images_per_second": images / wall,
        "images_per_cpu_second": images / cpu,
    }


def plain_main(o) -> dict:
    engine = json.loads(o.engine)
    if o.what == "fedavg":
        return plain_fedavg(o.data, engine, o.rounds, o.init)
    datalist = str(Path(o.data) / o.site / "datalist.json")
    return {
        "monai": plain_monai(datalist, o.site, engine, engine["local_epochs"] * o.rounds, o.init),
        "engine": plain_engine(datalist, o.site, engine, o.rounds, o.init),
    }


def _plain_process(args: list[str], out: Path, timeout: float) -> dict:
    """Run one plain reference in a fresh process; its whole wall and CPU time (imports, data) included."""
    from fedseg_tools.sim import package_env

    cmd = [sys.executable, "-m", "fedseg_tools.bench.cost", "plain", *args, "--out", str(out)]
    cpu0, wall0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=package_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"plain loop failed: {(proc.stderr or proc.stdout)[-2000:]}")
    record = json.loads(out.read_text())
    record["process_wall_seconds"] = time.perf_counter() - wall0
    record["process_cpu_seconds"] = _children_cpu() - cpu0
    return record


# ---- the FL side --------------------------------------------------------------------------------------------
def _engine_img_per_s(log_text: str) -> list[float]:
    return [float(m.group(3)) for m in IMG_PER_S.finditer(log_text)]


def _fl_job(
    name: str,
    out_dir: Path,
    data_dir: Path,
    sites: list[str],
    engine: dict,
    rounds: int,
    init: Path,
    settings: dict,
    timeout: float,
    log,
) -> dict:
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.budget import Budget, plan_method
    from fedseg_tools.bench.collect import meter_records, timeline, windows
    from fedseg_tools.bench.jobs import build_job, label, simulate_bench_job

    counts = {s: n for s, n in site_train_counts(data_dir).items() if s in sites}
    batch = int(resolve_engine(engine)["batch_size"])
    budget = Budget.from_counts(rounds, int(engine["local_epochs"]), counts, batch)
    plan = plan_method("fedavg", budget)
    seed = int(engine["seed"])
    job = build_job(
        out_dir / "jobs",
        name,
        [("fedavg", seed)],
        {"fedavg": plan},
        engine,
        {seed: init},
        hd95=False,
        evaluate=False,
        task_request_interval=settings.get("task_request_interval"),
        task_check_period=settings.get("task_check_period"),
        executor_args=settings.get("executor_args"),
    )
    ws = out_dir / "ws" / name
    log(f"cost: {name} ({len(sites)} site(s), {rounds} rounds x {engine['local_epochs']} epochs) ...")
    cpu0 = _children_cpu()
    result = simulate_bench_job(job, ws, data_dir, sites, timeout)
    cpu = _children_cpu() - cpu0
    window = windows(timeline(ws)).get(label("fedavg", seed))
    records = meter_records(ws, sites)
    train = [
        r
        for recs in records.values()
        for r in recs
        if r.get("task_name") == "train" and window and window["start"] <= r["t_in"] <= window["end"]
    ]
    images = sum(int(engine["local_epochs"]) * counts[r["site"]] for r in train)
    task_seconds = sum(r.get("seconds") or 0.0 for r in train)
    logs = "".join((ws / s / "log.txt").read_text(errors="replace") for s in sites if (ws / s / "log.txt").exists())
    engine_rates = _engine_img_per_s(logs)
    per_round: dict[int, float] = {}
    for r in train:
        per_round[int(r.get("round") or 0)] = max(per_round.get(int(r.get("round") or 0), 0.0), r.get("seconds") or 0.0)
    critical = sum(per_round.values())  # the slowest site's task time, round by round
    task_cpu = sum(r.get("cpu_seconds") or 0.0 for r in train)
    server_cpu = window.get("server_cpu_seconds") if window else None
    training_wall = (window["end"] - window["start"]) if window else None
    engine_seconds = images / float(np.mean(engine_rates)) if engine_rates else None
    record = {
        "name": name,
        "sites": sites,
        "rounds": rounds,
        "epochs": int(engine["local_epochs"]),
        "settings": settings,
        "returncode": result.returncode,
        "errors": result.errors()[-2000:],
        "job_wall_seconds": round(result.seconds, 3),
        "job_cpu_seconds": round(cpu, 3),
        "training_wall_seconds": round(window["end"] - window["start"], 3) if window else None,
        "train_tasks": len(train),
        "train_task_seconds": round(task_seconds, 3),
        "images": images,
        "executor_images_per_second": images / task_seconds if task_seconds else None,
        "engine_images_per_second_logged": float(np.mean(engine_rates)) if engine_rates else None,
        "slowest_site_task_seconds": round(critical, 3),
        # what the federation adds per round beyond the slowest site's task: polling, transfer, aggregation, saving
        "overhead_per_round_seconds": round((training_wall - critical) / rounds, 3) if training_wall else None,
        "train_task_cpu_seconds": round(task_cpu, 3),
        "server_cpu_seconds": round(server_cpu, 3) if server_cpu is not None else None,
        "training_cpu_seconds": round(task_cpu + (server_cpu or 0.0), 3),
        "executor_images_per_cpu_second": images / task_cpu if task_cpu else None,
        "meter_seconds": round(sum(r.get("meter_seconds") or 0.0 for r in train), 3),
        "engine_train_seconds_estimate": round(engine_seconds, 3) if engine_seconds else None,
        "bytes_per_round_per_site": (float(np.mean([r["bytes_in"] + r["bytes_out"] for r in train])) if train else None),
    }
    log(
        f"cost: {name}: job {record['job_wall_seconds']:.1f}s, training {record['training_wall_seconds']}s, "
        f"CPU {record['job_cpu_seconds']:.1f}s"
        + (f", executor {record['executor_images_per_second']:.1f} img/s" if record["executor_images_per_second"] else "")
    )
    return record


def _relay_job(
    out_dir: Path,
    data_dir: Path,
    sites: list[str],
    engine: dict,
    rounds: int,
    init: Path,
    timeout: float,
    log,
    task_request_interval: float = TUNED["task_request_interval"],
) -> dict:
    """FedAvg, then FedCross (K = 1) at the same steps from the same initial weights, each in its own job: their
    workflows' wall times and FedCross's per-communication hand-over latency and time split (its controller's
    history). Every site trains with one thread (the simulator's setting): FedAvg's N sites train at once,
    FedCross's one site at a time, so on a machine with fewer cores than sites FedCross also leaves cores idle
    that a federation of hospitals, each on its own machine, would not share. task_request_interval: how often an
    idle site asks the server for a task in both jobs (the bench's 0.1 s by default)."""
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.budget import Budget, plan_method
    from fedseg_tools.bench.collect import server_app_dir, timeline, windows
    from fedseg_tools.bench.jobs import build_job, label, simulate_bench_job

    counts = {s: n for s, n in site_train_counts(data_dir).items() if s in sites}
    budget = Budget.from_counts(rounds, int(engine["local_epochs"]), counts, int(resolve_engine(engine)["batch_size"]))
    seed = int(engine["seed"])
    engines = {"fedavg": engine, "fedcross": engine}
    plans = {m: plan_method(m, budget) for m in engines}
    wall, history, rounds_split = {}, [], []
    log(f"cost: relay (FedAvg {rounds} rounds, then FedCross {plans['fedcross'].communications} communications) ...")
    for method, settings in engines.items():
        job = build_job(
            out_dir / "jobs",
            f"relay_{method}",
            [(method, seed)],
            plans,
            settings,
            {seed: init},
            hd95=False,
            evaluate=False,
            task_request_interval=task_request_interval,
        )
        ws = out_dir / "ws" / f"relay_{method}"
        result = simulate_bench_job(job, ws, data_dir, sites, timeout)
        if result.returncode != 0:
            return {"error": f"relay {method} job exited with {result.returncode}", "errors": result.errors()[-2000:]}
        span = windows(timeline(ws)).get(label(method, seed))
        wall[method] = (span["end"] - span["start"]) if span else None
        results_file = server_app_dir(ws) / "bench" / label(method, seed) / "fedseg_results.json"
        if method == "fedcross" and results_file.exists():
            history = json.loads(results_file.read_text())["extra"]["history"]
        fedavg_history = server_app_dir(ws) / "bench" / label(method, seed) / "fedavg" / "history.json"
        if method == "fedavg" and fedavg_history.exists():
            rounds_split = [r["seconds"] for r in json.loads(fedavg_history.read_text()) if "seconds" in r]
    handovers = [h["handover_s"] for h in history if isinstance(h.get("handover_s"), (int, float))]

    def stats(values: list[float]) -> dict | None:
        if not values:
            return None
        return {"mean": float(np.mean(values)), "median": float(np.median(values)), "max": float(np.max(values))}

    record = {
        "task_request_interval": task_request_interval,
        "fedavg_rounds": rounds,
        "fedcross_communications": plans["fedcross"].communications,
        "fedavg_wall_seconds": wall["fedavg"],
        "fedcross_wall_seconds": wall["fedcross"],
        "fedcross_vs_fedavg_wall": _ratio(wall["fedcross"], wall["fedavg"]),
        "handover_seconds": stats(handovers),
        "communication_seconds": {
            key: stats([h[key] for h in history if key in h]) for key in ("seconds", "train_s", "validate_s")
        },
        "validated_communications": sum("val_dice" in h for h in history),
        # FedAvg's rounds, split (FedAvgController history "seconds"): the same questions for the aggregating baseline
        "fedavg_round_seconds": {
            key: stats([r[key] for r in rounds_split if key in r])
            for key in ("tasks", "tasks_beyond_slowest_site", "screen_and_aggregate", "save")
        },
    }
    log(
        f"cost: relay: FedAvg {_fmt_s(wall['fedavg'])}, FedCross {_fmt_s(wall['fedcross'])}; hand-over median "
        + (f"{record['handover_seconds']['median']:.3f}s" if handovers else "-")
    )
    return record


def _fmt_s(value) -> str:
    return "-" if value is None else f"{value:.1f}s"


LEAN_EXECUTOR = {"validate_before_train": False, "tb_writer_id": ""}


def run_cost(preset, data_dir: Path, spec, out_dir: Path, log=print) -> dict:
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.jobs import save_initial_checkpoint
    from fedseg_tools.bench.presets import cell_engine

    c = preset.cost
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = site_train_counts(data_dir)
    sites = sorted(counts)
    solo = c.throughput_site or max(sites, key=lambda s: (counts[s], s))
    small, real = cell_engine(spec, c.small_epochs, 0), cell_engine(spec, c.realistic_epochs, 0)
    init = save_initial_checkpoint(out_dir / "init.pt", small, 0)
    began = time.time()
    record: dict = {
        "dataset": data_dir.name,
        "sites": sites,
        "train_counts": counts,
        "throughput_site": solo,
        "rounds": c.rounds,
        "small_epochs": c.small_epochs,
        "realistic_epochs": c.realistic_epochs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": list(os.getloadavg()),
    }

    # plain references, each in a fresh process with the sites' thread settings
    log("cost: plain FedAvg loops (small, realistic), plain MONAI and engine loops ...")
    common = ["--data", str(data_dir), "--rounds", str(c.rounds), "--site", solo, "--init", str(init)]
    record["plain"] = {
        "fedavg_small": _plain_process(
            ["--what", "fedavg", "--engine", json.dumps(small)] + common, out_dir / "plain_small.json", preset.timeout
        ),
        "fedavg_realistic": _plain_process(
            ["--what", "fedavg", "--engine", json.dumps(real)] + common, out_dir / "plain_real.json", preset.timeout
        ),
    }
    throughput = _plain_process(
        ["--what", "throughput", "--engine", json.dumps(real), "--rounds", str(c.throughput_rounds)] + common[:2] + common[4:],
        out_dir / "plain_throughput.json",
        preset.timeout,
    )
    record["plain"].update(monai=throughput["monai"], engine=throughput["engine"])

    jobs = {}
    for label, engine in (("small", small), ("realistic", real)):
        for setting_name, settings in (("shipped", SHIPPED), ("tuned", TUNED)):
            jobs[f"fedavg_{label}_{setting_name}"] = _fl_job(
                f"fedavg_{label}_{setting_name}",
                out_dir,
                data_dir,
                sites,
                engine,
                c.rounds,
                init,
                settings,
                preset.timeout,
                log,
            )
    for setting_name, settings in (("shipped", TUNED), ("lean", {**TUNED, "executor_args": LEAN_EXECUTOR})):
        jobs[f"solo_{setting_name}"] = _fl_job(
            f"solo_{setting_name}_executor",
            out_dir,
            data_dir,
            [solo],
            real,
            c.throughput_rounds,
            init,
            settings,
            preset.timeout,
            log,
        )
    record["jobs"] = jobs
    record["relay"] = _relay_job(out_dir, data_dir, sites, small, c.rounds, init, preset.timeout, log)
    record["ratios"] = ratios(record)
    record["seconds"] = round(time.time() - began, 1)
    record["load_average_at_end"] = list(os.getloadavg())
    return record


def _ratio(a, b):
    return float(a) / float(b) if a and b else None


def ratios(record: dict) -> dict:
    """The headline ratios from a cost record (> 1: slower than the plain reference)."""
    plain, jobs = record["plain"], record["jobs"]
    out: dict = {"fl_overhead": {}, "throughput": {}}
    for label in ("small", "realistic"):
        p = plain[f"fedavg_{label}"]
        for setting in ("shipped", "tuned"):
            j = jobs.get(f"fedavg_{label}_{setting}") or {}
            out["fl_overhead"][f"{label}/{setting}"] = {
                "training_wall_ratio": _ratio(j.get("training_wall_seconds"), p["wall_seconds"]),
                "training_cpu_ratio": _ratio(j.get("training_cpu_seconds"), p.get("cpu_seconds")),
                "overhead_per_round_seconds": j.get("overhead_per_round_seconds"),
                "job_wall_ratio": _ratio(j.get("job_wall_seconds"), p["process_wall_seconds"]),
                "cpu_ratio": _ratio(j.get("job_cpu_seconds"), p["process_cpu_seconds"]),
                "fl_training_seconds": j.get("training_wall_seconds"),
                "plain_training_seconds": p["wall_seconds"],
                "fl_job_seconds": j.get("job_wall_seconds"),
                "plain_process_seconds": p["process_wall_seconds"],
            }
    monai = plain["monai"]["images_per_second"]
    monai_cpu = plain["monai"].get("images_per_cpu_second")
    for setting in ("shipped", "lean"):
        j = jobs.get(f"solo_{setting}") or {}
        out["throughput"][setting] = {
            "train_task_seconds": j.get("train_task_seconds"),
            "engine_train_seconds_estimate": j.get("engine_train_seconds_estimate"),
            "meter_seconds": j.get("meter_seconds"),
            "executor_images_per_second": j.get("executor_images_per_second"),
            "engine_images_per_second_logged": j.get("engine_images_per_second_logged"),
            "plain_monai_images_per_second": monai,
            "plain_engine_images_per_second": plain["engine"]["images_per_second"],
            "executor_vs_monai": _ratio(j.get("executor_images_per_second"), monai),
            "engine_vs_monai": _ratio(plain["engine"]["images_per_second"], monai),
            "executor_images_per_cpu_second": j.get("executor_images_per_cpu_second"),
            "plain_monai_images_per_cpu_second": monai_cpu,
            "plain_engine_images_per_cpu_second": plain["engine"].get("images_per_cpu_second"),
            "executor_vs_monai_cpu": _ratio(j.get("executor_images_per_cpu_second"), monai_cpu),
            "engine_vs_monai_cpu": _ratio(plain["engine"].get("images_per_cpu_second"), monai_cpu),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("plain", help="the plain reference loops (used by the benchmark)")
    q.add_argument("--what", choices=["fedavg", "throughput"], required=True)
    q.add_argument("--data", required=True)
    q.add_argument("--engine", required=True)
    q.add_argument("--rounds", type=int, required=True)
    q.add_argument("--site", required=True)
    q.add_argument("--init", required=True)
    q.add_argument("--out", required=True)
    r = sub.add_parser("relay", help="FedAvg against FedCross at the same steps: wall ratio and hand-over latency (part c)")
    r.add_argument("--preset", default="quick", help="preset whose cost dataset and engine are used (default quick)")
    r.add_argument("--rounds", type=int, default=3, help="FedAvg rounds at 1 epoch; FedCross gets the same steps")
    r.add_argument("--out", required=True, help="folder for the data, jobs, workspaces and relay.json")
    r.add_argument(
        "--task-request-interval",
        type=float,
        default=TUNED["task_request_interval"],
        help="seconds between an idle site's task requests in both jobs (default: the bench's 0.1)",
    )
    t = sub.add_parser("throughput", help="executor images/s against a plain MONAI loop at three sizes (part d)")
    t.add_argument("--configs", nargs="+", choices=list(THROUGHPUT_CONFIGS), default=list(THROUGHPUT_CONFIGS))
    t.add_argument("--epochs", type=int, default=1, help="local epochs per round (2 rounds; the first warms up)")
    t.add_argument("--timeout", type=float, default=3600.0, help="per job or plain process, seconds")
    t.add_argument("--out", required=True, help="folder for the data, jobs, workspaces and throughput.json")
    o = p.parse_args(argv)
    if o.cmd == "throughput":
        record = throughput_main(Path(o.out), o.configs, o.epochs, o.timeout)
        print("\n".join(throughput_lines(record)))
        return 0 if all("error" not in r for r in record["configs"].values()) else 1
    if o.cmd == "relay":
        if not 0 < o.task_request_interval <= 10:
            p.error(f"--task-request-interval must be in (0, 10] seconds, got {o.task_request_interval}")
        record = relay_main(o.preset, o.rounds, Path(o.out), o.task_request_interval)
        print(json.dumps(record, indent=2))
        return 0 if "error" not in record else 1
    record = plain_main(o)
    Path(o.out).write_text(json.dumps(record, indent=2))
    return 0


def relay_main(preset_name: str, rounds: int, out: Path, task_request_interval: float = TUNED["task_request_interval"]) -> dict:
    """Part (c) on its own, on the preset's cost dataset (generated or converted under `out`)."""
    from fedseg.data.synthetic import generate_dataset
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.jobs import save_initial_checkpoint
    from fedseg_tools.bench.presets import cell_engine, get_preset

    preset = get_preset(preset_name)
    spec = preset.datasets[(preset.cost.dataset if preset.cost else None) or "synth2d"]
    if spec.kind != "synthetic":
        return {"error": f"the relay measurement runs on a built-in dataset; {preset_name}'s cost dataset is {spec.kind}"}
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data" / spec.name
    generate_dataset(str(data), overwrite=True, **spec.options)
    engine = cell_engine(spec, 1, 0)
    init = save_initial_checkpoint(out / "init.pt", engine, 0)
    sites = sorted(site_train_counts(data))
    record = {
        "dataset": spec.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_at_start": list(os.getloadavg()),
        **_relay_job(out, Path(data), sites, engine, rounds, init, preset.timeout, print, task_request_interval),
        "load_average_at_end": list(os.getloadavg()),
    }
    (out / "relay.json").write_text(json.dumps(record, indent=2))
    return record


# ---- (d) executor throughput at three sizes ----------------------------------------------------------------------
THROUGHPUT_CONFIGS = {
    # dims, synthetic size, training cases of the measured site (2 steps per epoch), engine settings over the
    # defaults (None: the quick preset's synth2d engine, the benchmark's network)
    "bench2d": {"dims": 2, "size": "small", "cases": None, "engine": None},
    "realistic2d": {
        "dims": 2,
        "size": "large",
        "cases": 32,
        "engine": {"roi_size": [256, 256], "batch_size": 16, "network": {"channels": [32, 64, 128, 256]}},
    },
    "realistic3d": {
        "dims": 3,
        "size": "large",
        "cases": 4,
        "engine": {"roi_size": [96, 96, 96], "batch_size": 2, "network": {"channels": [16, 32, 64, 128, 256]}},
    },
}
THROUGHPUT_ROUNDS = 2
THROUGHPUT_SITE = "site-1"


def throughput_engine(name: str, epochs: int) -> dict:
    from fedseg_tools.bench.presets import cell_engine, get_preset

    config = THROUGHPUT_CONFIGS[name]
    if config["engine"] is None:
        return cell_engine(get_preset("quick").datasets["synth2d"], epochs, 0)
    return {**config["engine"], "spatial_dims": config["dims"], "local_epochs": int(epochs), "seed": 0}


def throughput_main(out: Path, configs: list[str], epochs: int = 1, timeout: float = 3600.0, log=print) -> dict:
    """Part (d): per configuration, the executor in a one-site FedAvg job (shipped settings but the bench's
    polling, 2 rounds) against the plain MONAI loop and the engine alone on the same site's data."""
    import torch

    from fedseg.data.synthetic import generate_dataset
    from fedseg_tools.bench.jobs import save_initial_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "rounds": THROUGHPUT_ROUNDS,
        "epochs": int(epochs),
        "configs": {},
    }
    for name in configs:
        config = THROUGHPUT_CONFIGS[name]
        dims, size = config["dims"], config["size"]
        engine = throughput_engine(name, epochs)
        where = out / name
        data = where / "data"
        log(f"cost: throughput {name}: generating {size} {dims}-D data ...")
        generate_dataset(
            str(data), n_sites=2, spatial_dims=dims, seed=0, size=size, cases_per_site=config["cases"], overwrite=True
        )
        init = save_initial_checkpoint(where / "init.pt", engine, 0)
        args = ["--what", "throughput", "--engine", json.dumps(engine), "--rounds", str(THROUGHPUT_ROUNDS)]
        args += ["--data", str(data), "--site", THROUGHPUT_SITE, "--init", str(init)]
        log(f"cost: throughput {name}: plain MONAI loop and engine ...")
        try:
            plain = _plain_process(args, where / "plain.json", timeout)
        except Exception as e:  # noqa: BLE001 - one configuration's failure is recorded, the others still run
            record["configs"][name] = {"engine": engine, "error": f"plain loops: {type(e).__name__}: {e}"}
            continue
        job = _fl_job(f"{name}_executor", where, data, [THROUGHPUT_SITE], engine, THROUGHPUT_ROUNDS, init, TUNED, timeout, log)
        monai, eng = plain["monai"], plain["engine"]
        entry = {
            "engine": engine,
            "monai_images_per_second": monai.get("images_per_second"),
            "engine_images_per_second": eng.get("images_per_second"),
            "executor_images_per_second": job.get("executor_images_per_second"),
            "executor_vs_monai": _ratio(job.get("executor_images_per_second"), monai.get("images_per_second")),
            "engine_vs_monai": _ratio(eng.get("images_per_second"), monai.get("images_per_second")),
            "plain": plain,
            "job": job,
        }
        if job.get("returncode"):
            entry["error"] = f"executor job exited with {job['returncode']}"
        record["configs"][name] = entry
        log(f"cost: throughput {name}: " + " | ".join(throughput_lines({"configs": {name: entry}})[-1:]))
    record["load_average_at_end"] = list(os.getloadavg())
    (out / "throughput.json").write_text(json.dumps(record, indent=2))
    return record


def throughput_lines(record: dict) -> list[str]:
    """The table: images/s of the plain MONAI loop, the engine and the executor, and the two ratios."""
    lines = [
        "| configuration | plain MONAI img/s | engine img/s | executor img/s | executor ÷ MONAI | engine ÷ MONAI |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (record.get("configs") or {}).items():
        if "error" in r and r.get("executor_images_per_second") is None:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        cells = [r.get(k) for k in ("monai_images_per_second", "engine_images_per_second", "executor_images_per_second")]
        ratios_ = [r.get("executor_vs_monai"), r.get("engine_vs_monai")]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{v:.1f}" if v else "-" for v in cells)
            + " | "
            + " | ".join(f"{v:.2f}" if v else "-" for v in ratios_)
            + " |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
