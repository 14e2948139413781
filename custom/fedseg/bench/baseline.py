"""Local-only and centralized training for the benchmark, in their own process (so memory is theirs).

    python -m fedseg.bench.baseline --data DIR --engine JSON --rounds R --epochs E --seeds 0 1 2
                                    --inits INIT0.pt INIT1.pt INIT2.pt --out OUT.json [--methods local centralized] [--hd95]

Same engine, network, initial weights (the seed's checkpoint every FL method starts from), seeds and
budget as the federated methods (fedseg.bench.budget): local-only trains site i for R*E*s_i steps, centralized
trains one model on the pooled training cases for B = sum_i R*E*s_i steps. Training runs in R equal chunks with
the mean validation Dice after each (the learning curve). Model selection is the federated methods' rule: the
best-validated model is scored (local: the chunk with the best validation Dice at the site itself; centralized:
the chunk with the best median over sites of the validation Dice, as FedAvg's best model); the last model is
scored too, as an extra row. Wall time and peak resident memory are measured per
site (local) and for the pooled run; local-only also reports its cross-site Dice matrix (trained at row site,
tested at column site): how different the sites are.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np


def _score(engine, net, section: str, hd95: bool) -> dict:
    result = engine.evaluate(net, section, with_hd95=hd95)
    scores = result.summary()
    scores["dice_per_case"] = [float(x) for x in result.case_dice]
    return scores


def _val(engine, net) -> float:
    return float(engine.evaluate(net, "validation").summary()["dice"]) if engine.cases("validation") else float("nan")


def _better(value: float, best: float) -> bool:
    """Strictly better validation score (a NaN never wins over a number; the first of equal scores is kept)."""
    return bool(np.isfinite(value)) and (not np.isfinite(best) or value > best)


def _chunks(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


def _warm_up(engine) -> None:
    """One throw-away training step (first optimizer use, allocator), as the FL sites' bench warm-up does."""
    engine.train(engine.new_network(), 1)


def run(data: str, engine_settings: dict, rounds: int, epochs: int, seeds: list[int], inits: list[str], methods: list[str],
        hd95: bool) -> dict:
    """Every seed in turn with the same site engines (their random streams continue from seed to seed, as the
    sites' do in the shared bench job); a seed sets the initial network."""
    from fedseg.baselines import load_sites
    from fedseg.bench.budget import Budget
    from fedseg.bench.jobs import load_initial_state
    from fedseg.engine import EngineConfig, SegEngine
    from fedseg.jobgen import resolve_engine

    cfg = EngineConfig.from_dict(resolve_engine(engine_settings))
    engines = load_sites(data, cfg)
    budget = Budget(rounds, epochs, {s: e.steps_per_epoch() for s, e in engines.items()})
    for e in engines.values():  # build the cached datasets first, as the FL sites do in the bench warm-up
        for section in ("training", "validation", "testing"):
            if e.cases(section):
                e.dataset(section)
        _warm_up(e)
    pooled = {"training": [case for e in engines.values() for case in e.cases("training")]}
    central = SegEngine(cfg, pooled, site="pooled") if "centralized" in methods else None
    if central is not None:
        central.dataset("training")
        _warm_up(central)
    record: dict = {"budget": {"rounds": rounds, "epochs": epochs, "total_steps": budget.total_steps,
                               "site_steps_per_epoch": budget.site_steps_per_epoch}, "seeds": {}}
    for seed, init in zip(seeds, inits):
        record["seeds"][str(seed)] = _one_seed(engines, central, budget, load_initial_state(init), rounds, methods, hd95)
    return record


def _one_seed(engines: dict, central, budget, init_state: dict, rounds: int, methods: list[str], hd95: bool) -> dict:
    from fedseg.engine import load_numpy_state
    from fedseg.fl.meter import peak_rss_bytes, reset_peak_rss

    out: dict = {}

    if "local" in methods:
        own, last, matrix, seconds, cpu, memory, steps, curves, best_chunk = {}, {}, {}, {}, {}, {}, 0, {}, {}
        for site, engine in engines.items():
            reset_peak_rss()
            net = engine.new_network()
            load_numpy_state(net, init_state, site)
            curve = [(0.0, _val(engine, net))]
            best = None
            began, cpu_began = time.perf_counter(), time.process_time()
            for k, n in enumerate(_chunks(budget.site_steps(site), rounds), start=1):
                steps += engine.train(net, n).steps
                curve.append((k / rounds, _val(engine, net)))
                if best is None or _better(curve[-1][1], best[1]):
                    best = (k, curve[-1][1], copy.deepcopy(net.state_dict()))
            last[site] = _score(engine, net, "testing", hd95)
            best_chunk[site] = best[0]
            net.load_state_dict(best[2])
            own[site] = _score(engine, net, "testing", hd95)
            # timed like a federated method: training, the per-round validation and the final scoring
            seconds[site] = time.perf_counter() - began
            cpu[site] = time.process_time() - cpu_began
            matrix[site] = {other: (own[site] if other == site else _score(e, net, "testing", False))
                            for other, e in engines.items()}
            memory[site] = peak_rss_bytes()
            curves[site] = curve
        out["local"] = {
            "results": {"method": "local-only", "section": "testing",
                        "models": {"local (own site)": own, "local (own site, last)": last},
                        "extra": {"cross_site_dice_matrix": {a: {b: round(v["dice"], 4) for b, v in row.items()}
                                                             for a, row in matrix.items()},
                                  "model_selection": "best validation Dice at the site itself, over R checkpoints",
                                  "best_checkpoint": best_chunk}},
            "wall_seconds": float(sum(seconds.values())),
            "wall_seconds_parallel": float(max(seconds.values())),
            "cpu_seconds": float(sum(cpu.values())),
            "site_seconds": seconds,
            "memory": memory,
            "seg_steps": steps,
            "curve": [(x, float(np.nanmean([curves[s][i][1] for s in curves]))) for i, (x, _) in enumerate(next(iter(curves.values())))],
        }

    if "centralized" in methods:
        reset_peak_rss()
        net = central.new_network()
        load_numpy_state(net, init_state, "pooled")
        curve = [(0.0, float(np.nanmean([_val(e, net) for e in engines.values()])))]
        steps, began, cpu_began = 0, time.perf_counter(), time.process_time()
        best = None
        for k, n in enumerate(_chunks(budget.total_steps, rounds), start=1):
            steps += central.train(net, n).steps
            vals = [_val(e, net) for e in engines.values()]
            curve.append((k / rounds, float(np.nanmean(vals))))
            median = float(np.nanmedian(vals)) if any(np.isfinite(vals)) else float("nan")
            if best is None or _better(median, best[1]):
                best = (k, median, copy.deepcopy(net.state_dict()))
        last = {site: _score(e, net, "testing", hd95) for site, e in engines.items()}
        net.load_state_dict(best[2])
        per_site = {site: _score(e, net, "testing", hd95) for site, e in engines.items()}
        seconds = time.perf_counter() - began
        cpu_seconds = time.process_time() - cpu_began
        out["centralized"] = {
            "results": {"method": "centralized", "section": "testing",
                        "models": {"centralized": per_site, "centralized (last)": last},
                        "extra": {"model_selection": "best median over sites of the validation Dice, over R checkpoints",
                                  "best_checkpoint": best[0]}},
            "wall_seconds": float(seconds),
            "cpu_seconds": float(cpu_seconds),
            "memory": {"pooled": peak_rss_bytes()},
            "seg_steps": steps,
            "curve": curve,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedseg.bench.baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--engine", type=json.loads, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seeds", nargs="+", type=int, required=True)
    p.add_argument("--inits", nargs="+", required=True, help="one initial checkpoint per seed")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", nargs="+", default=["local", "centralized"])
    p.add_argument("--hd95", action="store_true")
    o = p.parse_args(argv)
    if len(o.seeds) != len(o.inits):
        p.error("give one --inits checkpoint per --seeds seed")
    record = run(o.data, o.engine, o.rounds, o.epochs, o.seeds, o.inits, o.methods, o.hd95)
    Path(o.out).parent.mkdir(parents=True, exist_ok=True)
    Path(o.out).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
