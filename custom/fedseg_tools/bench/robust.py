"""Robustness and privacy, measured next to the clean runs: one malicious site of N against FedAvg, FedSM and
FedCross, and DP-SGD at every site for FedAvg, FedProx, FedSM and FedCross.

    python -m fedseg_tools.bench.robust --out OUT [--preset quick] [--rounds 6] [--epochs 2] [--seed 0] [--jobs ...]

Every run of one invocation uses the same data (the preset's built-in 2-D dataset), initial weights, seed and
budget (equal steps: the same number of local steps per site as FedAvg's R rounds x E epochs). Four jobs:

* clean: FedAvg, FedProx, FedSM and FedCross as configured by the benchmark;
* sign_flip and scaled: FedAvg, FedSM and FedCross, the last site malicious (fedseg_tools.bench.attacks): in every
  training task it sends ``sent + factor * (trained - sent)``, factor = -0.95 x (sign_flip) or +0.95 x (scaled)
  FedAvg's ``max_update_ratio`` (default 10): the largest multiple of its own honest update that the magnitude
  check lets through when the honest updates are of a similar size;
* dp: the four methods with DP-SGD at every site (engine "dp", noise multiplier ``--noise``, clip 1, delta 1e-5),
  each in a job of its own (a site's privacy accountant counts every network it trains in one job).

Reported per run (OUT/robust.json, OUT/robust.md): the honest sites' mean and worst test Dice of the method's
deployable model (FedAvg/FedProx: best global; FedSM: super model; FedCross: its model), the change against the
clean run in Dice points, how often the server rejected or bounded the attacker's results (its log), and under
DP the largest epsilon any site reported (its log). A progress line is printed for every job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ATTACKER_CLASS = "fedseg_tools.bench.attacks.AttackingExecutor"
CLEAN_METHODS = ("fedavg", "fedprox", "fedsm", "fedcross")
ATTACKED_METHODS = ("fedavg", "fedsm", "fedcross")
ATTACKS = ("sign_flip", "scaled")
JOBS = ("clean", *ATTACKS, "dp")
SHARE_OF_BOUND = 0.95
DP_DEFAULT = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedsm": "FedSM", "fedcross": "FedCross"}
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_EPSILON = re.compile(r"DP-SGD at site (\S+), task \S+: epsilon ([0-9.eE+-]+) so far")


def attack_factors(max_update_ratio: float) -> dict[str, float]:
    return {"sign_flip": -SHARE_OF_BOUND * max_update_ratio, "scaled": SHARE_OF_BOUND * max_update_ratio}


def honest_dice(record: dict, attacker: str | None) -> dict:
    """The honest sites' per-site test Dice of the run's deployable model, their mean and worst."""
    models = (record.get("results") or {}).get("models") or {}
    per_site = models.get(record.get("headline_model")) or {}
    dice = {
        s: float(v["dice"])
        for s, v in per_site.items()
        if s != attacker and isinstance(v, dict) and isinstance(v.get("dice"), (int, float))
    }
    values = list(dice.values())
    return {
        "per_site": dice,
        "mean": float(np.mean(values)) if values else None,
        "worst": float(min(values)) if values else None,
    }


def _log_lines_in(path: Path, window: dict | None) -> list[str]:
    """The lines of a FLARE log written inside a bench run's time window (local-time stamps)."""
    if window is None or not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_TIME.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            if window["start"] - 1 <= t <= window["end"] + 1:
                out.append(line)
    return out


def screening_counts(server_lines: list[str], attacker: str) -> dict:
    """How often the server rejected or bounded a result of the attacker (the controllers' log lines)."""
    return {
        "rejected": sum(1 for line in server_lines if "REJECTED" in line and f"from {attacker}" in line),
        "bounded": sum(1 for line in server_lines if "BOUNDED" in line and f"from {attacker}" in line),
    }


def last_quarter_gain(curve: list) -> float | None:
    """How much the validation Dice rose over the last quarter of a run ((fraction of the run, Dice) points): near
    0 where the curve has flattened."""
    points = [(float(f), float(d)) for f, d in curve or [] if np.isfinite(d)]
    if len(points) < 2:
        return None
    end = points[-1]
    start = min(points, key=lambda p: abs(p[0] - (end[0] - 0.25)))
    return end[1] - start[1]


def largest_epsilon(site_lines: dict[str, list[str]]) -> float | None:
    """The largest epsilon any site reported having spent (its last DP-SGD log line in the run)."""
    last = {}
    for lines in site_lines.values():
        for line in lines:
            m = _EPSILON.search(line)
            if m:
                last[m.group(1)] = float(m.group(2))
    return max(last.values()) if last else None


def run_robustness(
    out: Path,
    preset_name: str = "quick",
    rounds: int = 6,
    epochs: int = 2,
    seed: int = 0,
    noise: float = DP_DEFAULT["noise_multiplier"],
    only: tuple[str, ...] = JOBS,
    log=print,
    methods: tuple[str, ...] = CLEAN_METHODS,
) -> dict:
    from fedseg.data.synthetic import generate_dataset
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.budget import Budget, plan_method
    from fedseg_tools.bench.collect import meter_records, method_record, timeline, windows
    from fedseg_tools.bench.jobs import build_job, controller_default, label, save_initial_checkpoint, simulate_bench_job
    from fedseg_tools.bench.machine import machine_info
    from fedseg_tools.bench.presets import cell_engine, get_preset

    unknown = sorted(set(methods) - set(CLEAN_METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown or no method(s) {unknown or list(methods)}; the methods are {list(CLEAN_METHODS)}")
    preset = get_preset(preset_name)
    spec = preset.datasets.get("synth2d")
    if spec is None or spec.kind != "synthetic":
        raise ValueError(f"preset {preset_name} has no built-in synth2d dataset")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data" / spec.name
    generate_dataset(str(data), overwrite=True, **spec.options)
    engine = cell_engine(spec, epochs, seed)
    init = save_initial_checkpoint(out / "init.pt", engine, seed)
    counts = site_train_counts(data)
    sites = sorted(counts)
    attacker = sites[-1]
    budget = Budget.from_counts(rounds, epochs, counts, int(resolve_engine(engine)["batch_size"]))
    plans = {m: plan_method(m, budget) for m in CLEAN_METHODS}
    max_ratio = float(controller_default("fedseg.fl.fedavg_controller.FedAvgController", "max_update_ratio"))
    factors = attack_factors(max_ratio)
    dp = {**DP_DEFAULT, "noise_multiplier": float(noise)}
    clean = tuple(m for m in CLEAN_METHODS if m in methods)
    attacked = tuple(m for m in ATTACKED_METHODS if m in methods)
    jobs = {
        "clean": (clean, engine, {}),
        **{a: (attacked, engine, {"attacker": attacker, "factor": factors[a]}) for a in ATTACKS if attacked},
        "dp": (clean, {**engine, "dp": dp}, {}),
    }
    unknown = sorted(set(only) - set(JOBS))
    if unknown:
        raise ValueError(f"unknown job(s) {unknown}; the jobs are {list(JOBS)}")
    jobs = {name: jobs[name] for name in JOBS if name in only and name in jobs}
    record: dict = {
        "dataset": spec.name,
        "sites": sites,
        "attacker": attacker,
        "rounds": rounds,
        "epochs": epochs,
        "seed": seed,
        "methods": list(clean),
        "attack_factors": factors,
        "max_update_ratio": max_ratio,
        "dp": dp,
        "steps_per_site": {s: budget.site_steps(s) for s in sites},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_info(),
        "runs": {},
    }
    # a site's privacy accountant lives as long as its FLARE job: each DP method gets a job of its own, so that
    # the epsilon it reports is its own and not that of every method run before it in the same job
    units = [
        (name, f"{name}_{m}" if name == "dp" else name, [m] if name == "dp" else methods, job_engine, attack)
        for name, (methods, job_engine, attack) in jobs.items()
        for m in (methods if name == "dp" else methods[:1])
    ]
    for i, (job_name, folder, methods, job_engine, attack) in enumerate(units, 1):
        log(f"robust: job {i}/{len(units)} {folder}: {', '.join(NAMES[m] for m in methods)} ...")
        began = time.perf_counter()
        job = build_job(
            out / "jobs",
            f"robust_{folder}",
            [(m, seed) for m in methods],
            plans,
            job_engine,
            {seed: init},
            hd95=False,
            executor_args=attack or None,
            executor_path=ATTACKER_CLASS if attack else None,
        )
        ws = out / "ws" / folder
        result = simulate_bench_job(job, ws, data, sites, preset.timeout, extra_classes=(ATTACKER_CLASS,) if attack else ())
        if result.returncode != 0:
            error = {"error": f"job exited with {result.returncode}", "errors": result.errors()[-2000:]}
            if job_name == "dp":  # one DP method's job: the others keep their rows
                record["runs"].setdefault("dp", {})[methods[0]] = error
            else:
                record["runs"][job_name] = error
            log(f"robust: job {folder} FAILED (exit {result.returncode})")
            continue
        wins, meters = windows(timeline(ws)), meter_records(ws, sites)
        runs = {}
        for method in methods:
            window = wins.get(label(method, seed))
            rec = method_record(method, ws, sites, plans[method].as_dict(), window, meters, label(method, seed))
            entry = {
                "status": rec["status"],
                "honest": honest_dice(rec, attacker),
                "all_sites": honest_dice(rec, None),
                "wall_seconds": rec.get("wall_seconds"),
                "last_quarter_gain": last_quarter_gain(rec.get("curve") or []),
            }
            if attack:
                entry["screening"] = screening_counts(_log_lines_in(ws / "server" / "log.txt", window), attacker)
            if job_name == "dp":
                entry["max_epsilon"] = largest_epsilon({s: _log_lines_in(ws / s / "log.txt", window) for s in sites})
            runs[method] = entry
        if "error" not in record["runs"].get(job_name, {}):
            record["runs"].setdefault(job_name, {}).update(runs)
        log(
            f"robust: job {folder} done in {time.perf_counter() - began:.0f}s: "
            + ", ".join(f"{NAMES[m]} honest {_fmt(r['honest']['mean'])}" for m, r in runs.items())
        )
    record["load_average_at_end"] = list(os.getloadavg())
    (out / "robust.json").write_text(json.dumps(record, indent=2))
    (out / "robust.md").write_text("\n".join(robust_lines(record)) + "\n")
    return record


def _fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and np.isfinite(x) else "-"


def _pts(x, ref) -> str:
    ok = all(isinstance(v, (int, float)) and np.isfinite(v) for v in (x, ref))
    return f"{100 * (x - ref):+.1f}" if ok else "-"


def robust_lines(record: dict | None) -> list[str]:
    """The report section: one malicious site of N, and DP-SGD, next to the clean runs."""
    if not record or not record.get("runs"):
        return []
    runs, attacker = record["runs"], record["attacker"]
    clean = runs.get("clean") or {}
    n = len(record["sites"])
    lines = [
        f"## One malicious site of {n}, and DP-SGD",
        "",
        f"`python -m fedseg_tools.bench.robust` on {record['dataset']} ({n} sites, {record['rounds']} rounds x "
        f"{record['epochs']} epoch(s) of local steps per site, equal steps, seed {record['seed']}; started "
        f"{record['started']}). {attacker} is malicious: in every training task it sends its honest update "
        f"multiplied by {record['attack_factors']['sign_flip']:g} (sign flip) or "
        f"{record['attack_factors']['scaled']:g} (scaled), {SHARE_OF_BOUND:g} x the magnitude check's bound "
        f"({record['max_update_ratio']:g} x the median). Dice: the honest sites' test Dice of each method's "
        "deployable model, mean (worst site); change against the clean run in Dice points.",
        "",
        *([about, ""] if (about := _machine_line(record.get("machine")) + _flattening_line(clean)) else []),
        "| method | clean | sign flip | change | rejected / bounded | scaled | change | rejected / bounded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in ATTACKED_METHODS:
        ref = (clean.get(method) or {}).get("honest", {})
        row = [NAMES[method], f"{_fmt(ref.get('mean'))} ({_fmt(ref.get('worst'))})"]
        for attack in ATTACKS:
            run = (runs.get(attack) or {}).get(method) or {}
            got, screening = run.get("honest", {}), run.get("screening") or {}
            row += [
                f"{_fmt(got.get('mean'))} ({_fmt(got.get('worst'))})" if got else "-",
                _pts(got.get("mean"), ref.get("mean")),
                f"{screening.get('rejected', '-')} / {screening.get('bounded', '-')}" if screening else "-",
            ]
        lines.append("| " + " | ".join(row) + " |")
    dp_runs = runs.get("dp") or {}
    if dp_runs:
        dp = record["dp"]
        lines += [
            "",
            f"DP-SGD at every site (noise multiplier {dp['noise_multiplier']:g}, per-example clip "
            f"{dp['max_grad_norm']:g}, delta {dp['delta']:g}; same budget): mean (worst site) test Dice over all "
            "sites, and the largest epsilon a site reported at the end.",
            "",
            "| method | clean | DP-SGD | change | epsilon |",
            "|---|---|---|---|---|",
        ]
        for method in CLEAN_METHODS:
            ref = (clean.get(method) or {}).get("all_sites", {})
            got = (dp_runs.get(method) or {}).get("all_sites", {})
            lines.append(
                f"| {NAMES[method]} | {_fmt(ref.get('mean'))} ({_fmt(ref.get('worst'))}) | "
                f"{_fmt(got.get('mean'))} ({_fmt(got.get('worst'))}) | {_pts(got.get('mean'), ref.get('mean'))} | "
                f"{_fmt((dp_runs.get(method) or {}).get('max_epsilon'), 2)} |"
            )
    if record.get("note"):  # e.g. rows from a second invocation
        lines += ["", f"Note: {record['note']}."]
    failed = failed_jobs(record)
    if failed:
        lines += ["", f"Jobs that failed: {', '.join(failed)} (robust.json has their errors)."]
    lines.append("")
    return lines


def _machine_line(machine: dict | None) -> str:
    if not machine:
        return ""
    device = machine.get("gpu") or f"{machine.get('cpu', 'CPU')} ({machine.get('cpu_count')} cores), no GPU"
    return f"Machine: {device}; torch {machine.get('torch')}, NVFlare {machine.get('nvflare')}, MONAI {machine.get('monai')}. "


def _flattening_line(clean: dict) -> str:
    gains = {m: r.get("last_quarter_gain") for m, r in clean.items() if isinstance(r, dict)}
    shown = [f"{NAMES.get(m, m)} {100 * g:+.1f}" for m, g in gains.items() if isinstance(g, (int, float))]
    if not shown:
        return ""
    rising = [m for m, g in gains.items() if isinstance(g, (int, float)) and g > 0.01]
    verdict = (
        f"the curves of {', '.join(NAMES.get(m, m) for m in rising)} had not flattened: the changes are at this budget"
        if rising
        else "every curve had flattened (within 1 point)"
    )
    return f"Validation Dice of the clean runs over their last quarter, in points: {', '.join(shown)}; {verdict}."


def failed_jobs(record: dict) -> list[str]:
    """The jobs that failed (a DP method's own job named "dp <method>")."""
    runs = record.get("runs") or {}
    failed = [name for name, r in runs.items() if isinstance(r, dict) and "error" in r]
    dp = runs.get("dp") if isinstance(runs.get("dp"), dict) else {}
    return failed + [f"dp {m}" for m, r in dp.items() if isinstance(r, dict) and "error" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.robust", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder for the data, jobs, workspaces, robust.json and robust.md")
    p.add_argument("--preset", default="quick", help="the benchmark preset whose synth2d dataset and timeout are used")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (FedSM splits them over its 2 networks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=float, default=DP_DEFAULT["noise_multiplier"], help="DP-SGD noise multiplier")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="which of the four jobs to run")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=CLEAN_METHODS,
        default=list(CLEAN_METHODS),
        help="which methods every job runs (the attacks: those of them FedProx aside; DP: one job per method)",
    )
    o = p.parse_args(argv)
    if o.rounds < 1 or o.epochs < 1:
        p.error("--rounds and --epochs must be >= 1")
    record = run_robustness(Path(o.out), o.preset, o.rounds, o.epochs, o.seed, o.noise, tuple(o.jobs), methods=tuple(o.methods))
    print("\n".join(robust_lines(record)))
    return 1 if failed_jobs(record) else 0


if __name__ == "__main__":
    sys.exit(main())
