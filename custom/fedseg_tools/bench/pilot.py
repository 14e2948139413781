"""Pilot for a real-data cell: which resolution, cases per centre and budget let the benchmark conclude.

    python -m fedseg_tools.bench.pilot --out bench_results/pilot --image-sizes 64 --max-cases 0 100 \\
        --rounds 24 --epochs 1 --seeds 0 1 2 [--publish]

A benchmark cell can only test the papers' claim (federation closes the gap to centralized training) where
there is a gap: centralized must beat local-only by more than 2 standard errors over seeds, and the learning
curves must have flattened at the budget. The pilot trains only those two baselines (no FLARE: minutes, not
hours), on the polyp centres split by video sequence, for every setting asked for, and writes a table: mean
test Dice over centres of each, the paired gap with its standard error, the worst centre, and how much the
validation curve still rose over the last quarter of the budget. max-cases 0 means every case.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np

from fedseg_tools.bench.presets import REPO, SHARED_POLYP, _polyp

GAIN_TAIL = 0.25  # share of the budget over which the curve's remaining rise is measured


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (NaN SE for fewer than 2 values)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


def tail_gain(curve: list[tuple[float, float]], tail: float = GAIN_TAIL) -> float:
    """Rise of a validation curve over its last `tail` share: the last point minus the point at 1 - tail."""
    pts = [(x, y) for x, y in curve if np.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    start = min(pts, key=lambda p: abs(p[0] - (pts[-1][0] - tail * (pts[-1][0] - pts[0][0]))))
    return float(pts[-1][1] - start[1])


MODELS = {"local": "local (own site)", "centralized": "centralized"}  # each baseline's best-validated model


def site_scores(record: dict, method: str, model: str) -> dict[str, float]:
    return {site: float(v["dice"]) for site, v in record[method]["results"]["models"][model].items()}


def summarise(setting: dict, seeds: dict) -> dict:
    """One pilot row from {seed: baselines record}: means, paired gap, worst centre, curve gains."""
    local = [site_scores(r, "local", "local (own site)") for r in seeds.values()]
    central = [site_scores(r, "centralized", "centralized") for r in seeds.values()]
    gaps = [np.mean(list(c.values())) - np.mean(list(lo.values())) for c, lo in zip(central, local)]
    gap, gap_se = mean_se(gaps)
    row = {
        **setting,
        "seeds": sorted(int(s) for s in seeds),
        "local": mean_se([np.mean(list(s.values())) for s in local]),
        "centralized": mean_se([np.mean(list(s.values())) for s in central]),
        "local_worst": mean_se([min(s.values()) for s in local]),
        "centralized_worst": mean_se([min(s.values()) for s in central]),
        "local_per_site": {k: mean_se([s[k] for s in local])[0] for k in local[0]},
        "centralized_per_site": {k: mean_se([s[k] for s in central])[0] for k in central[0]},
        "gap": gap,
        "gap_se": gap_se,
        "conclusive": bool(np.isfinite(gap_se) and gap > 2 * gap_se),
        "local_tail_gain": float(np.mean([tail_gain(r["local"]["curve"]) for r in seeds.values()])),
        "centralized_tail_gain": float(np.mean([tail_gain(r["centralized"]["curve"]) for r in seeds.values()])),
        "cpu_seconds": float(sum(r[m]["cpu_seconds"] for r in seeds.values() for m in ("local", "centralized"))),
    }
    return row


def _pm(pair) -> str:
    m, se = pair
    return f"{m:.3f} ± {se:.3f}" if np.isfinite(se) else f"{m:.3f}"


def markdown(rows: list[dict], command: str, machine: str) -> str:
    lines = [
        "# Pilot: polyp centres split by video sequence, local-only vs centralized",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}. Mean test Dice over centres, mean ± standard error over seeds; the gap is centralized "
        "minus local-only, paired by seed; 'still rising' is the validation Dice gained over the last quarter of "
        "the budget (mean over seeds).",
        "",
        "| px | cases/centre | R × E | B steps | seeds | local-only | centralized | gap ± SE | > 2 SE | worst centre local / central | still rising local / central | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['max_cases'] or 'all'} | {r['rounds']} × {r['epochs']} | {r['total_steps']} | "
            f"{len(r['seeds'])} | {_pm(r['local'])} | {_pm(r['centralized'])} | {r['gap']:+.3f} ± {r['gap_se']:.3f} | "
            f"{'yes' if r['conclusive'] else 'no'} | {r['local_worst'][0]:.3f} / {r['centralized_worst'][0]:.3f} | "
            f"{r['local_tail_gain']:+.3f} / {r['centralized_tail_gain']:+.3f} | {r['cpu_seconds']:.0f} |"
        )
    lines += ["", "Per centre (mean over seeds):", ""]
    sites = sorted(rows[0]["local_per_site"]) if rows else []
    lines.append("| px | cases | R × E | " + " | ".join(f"{s} local / central" for s in sites) + " |")
    lines.append("|---|---|---|" + "---|" * len(sites))
    for r in rows:
        cells = [f"{r['local_per_site'][s]:.3f} / {r['centralized_per_site'][s]:.3f}" for s in sites]
        lines.append(
            f"| {r['image_size']} | {r['max_cases'] or 'all'} | {r['rounds']} × {r['epochs']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def run_setting(
    out: Path,
    image_size: int,
    max_cases: int,
    rounds: int,
    epochs: int,
    seeds: list[int],
    log=print,
    norm: str = "instance_affine",
) -> dict:
    """One setting, seed by seed; every finished seed is kept in out/partial_<setting>.json (a stopped pilot keeps
    what it measured) and reported in a progress line."""
    from fedseg_tools.baselines import run_benchmark_baselines
    from fedseg_tools.bench.jobs import save_initial_checkpoint
    from fedseg_tools.bench.presets import cell_engine
    from fedseg_tools.bench.run import prepare_dataset

    spec = _polyp(max_cases or None, image_size, image_size=image_size, norm=norm)
    data, note = prepare_dataset(spec, out / "data" / f"polyp_{image_size}px_{max_cases or 'all'}")
    log(f"  data: {note}")
    engine = cell_engine(spec, epochs, seeds[0])
    tag = f"{image_size}px_{max_cases or 'all'}_R{rounds}xE{epochs}"
    records, budget = {}, None
    for seed in seeds:
        init = str(save_initial_checkpoint(out / "init" / f"{image_size}px_s{seed}.pt", engine, seed))
        began = time.time()
        record = run_benchmark_baselines(str(data), engine, rounds, epochs, [seed], [init], ["local", "centralized"], False)
        budget, records[str(seed)] = record["budget"], record["seeds"][str(seed)]
        (out / f"partial_{tag}.json").write_text(json.dumps({"budget": budget, "seeds": records}, indent=2, default=str))
        means = {m: np.mean(list(site_scores(records[str(seed)], m, k).values())) for m, k in MODELS.items()}
        log(
            f"  seed {seed}: local-only {means['local']:.3f}, centralized {means['centralized']:.3f} "
            f"({time.time() - began:.0f} s)"
        )
    setting = {
        "image_size": image_size,
        "max_cases": max_cases,
        "rounds": rounds,
        "epochs": epochs,
        "total_steps": budget["total_steps"],
    }
    return summarise(setting, records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedseg_tools.bench.pilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/pilot")
    p.add_argument("--image-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--max-cases", nargs="+", type=int, default=[0], help="cases per centre (0: all)")
    p.add_argument("--rounds", nargs="+", type=int, default=[24])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--norm",
        default="instance_affine",
        help="the network's normalization (default: the standard cell's, instance norm with parameters)",
    )
    p.add_argument("--publish", action="store_true", help="write docs/benchmarks/pilot_polyp.md and its JSON")
    args = p.parse_args(argv)
    if not SHARED_POLYP.is_dir():
        print(f"the pilot needs the polyp centres at {SHARED_POLYP}")
        return 2
    from fedseg_tools.bench.machine import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.image_sizes:
        for cases in args.max_cases:
            for rounds in args.rounds:
                began = time.time()
                print(
                    f"pilot: {size} px, {cases or 'all'} cases/centre, R={rounds} x E={args.epochs}, seeds {args.seeds} ...",
                    flush=True,
                )
                rows.append(
                    run_setting(out, size, cases, rounds, args.epochs, args.seeds, partial(print, flush=True), args.norm)
                )
                r = rows[-1]
                print(
                    f"  local {r['local'][0]:.3f}, centralized {r['centralized'][0]:.3f}, gap {r['gap']:+.3f} ± "
                    f"{r['gap_se']:.3f} ({time.time() - began:.0f} s)",
                    flush=True,
                )
                (out / "pilot.json").write_text(json.dumps(rows, indent=2))
    info = machine_info()
    machine = f"{info.get('cpu', '?')}, {info.get('cpu_count', '?')} cores, GPU: {info.get('gpu') or 'none'}, torch {info.get('torch', '?')}"
    command = "python -m fedseg_tools.bench.pilot " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    text = markdown(rows, command, machine)
    (out / "pilot.md").write_text(text)
    print(text)
    if args.publish:
        target = REPO / "docs" / "benchmarks"
        (target / "pilot_polyp.md").write_text(text)
        (target / "raw").mkdir(parents=True, exist_ok=True)
        (target / "raw" / "pilot_polyp.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
