"""Non-federated baselines on the same engine and the same training budget as a federated job.

    python -m fedseg_tools.baselines local       --data data/synth2d --rounds 10 --out results/local
    python -m fedseg_tools.baselines centralized --data data/synth2d --rounds 10 --out results/centralized

Budget: a federated job with R rounds trains R x s_i optimizer steps at site i (s_i = local steps per round).
local-only trains each site's own model for exactly its R x s_i steps; centralized trains one model on all
sites' pooled training cases for sum_i R x s_i steps. Both write fedseg_results.json (per-site test Dice)
and print the same table as a federated run. "local" also scores every site's model on every other site:
that cross-site matrix is how the built-in dataset's site shift is measured.

The benchmark's variant (fedseg_tools.bench runs it in a process of its own, so the memory measured is the baselines'):

    python -m fedseg_tools.baselines benchmark --data DIR --engine JSON --rounds R --epochs E --seeds 0 1 2
                                         --inits INIT0.pt INIT1.pt INIT2.pt --out OUT.json
                                         [--methods local centralized] [--hd95]

Same engine, network, initial weights (the seed's checkpoint every FL method starts from), seeds and budget as
the federated methods (fedseg_tools.bench.budget): local-only trains site i for R*E*s_i steps, centralized trains one
model on the pooled training cases for B = sum_i R*E*s_i steps. Training runs in R equal chunks with the mean
validation Dice after each (the learning curve). Model selection is the federated methods' rule: the
best-validated model is scored (local: the chunk with the best validation Dice at the site itself; centralized:
the chunk with the best median over sites of the validation Dice, as FedAvg's best model); the last model is
scored too, as an extra row. Wall time and peak resident memory are measured per site (local) and for the
pooled run; local-only also reports its cross-site Dice matrix (trained at row site, tested at column site).
The best-validated models are saved as one-network model sets next to OUT.json (saved_models_dir:
OUT_models/s<seed>/local-<site>.pt and centralized.pt; fedseg.export.modelsets reads them as a "global" model), so
they can be scored later on data they never saw (fedseg_tools.bench.unseen).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from fedseg.data import load_datalist, validate_site_data
from fedseg.engine import EngineConfig, SegEngine, load_numpy_state
from fedseg.report import format_table


def site_datalists(data_dir: str | Path) -> dict[str, Path]:
    """{site: datalist.json} for every site folder under data_dir."""
    data_dir = Path(data_dir)
    found = {p.parent.name: p for p in sorted(data_dir.glob("*/datalist.json"))}
    if not found:
        raise FileNotFoundError(f"no <site>/datalist.json under {data_dir}")
    return found


def site_train_counts(data_dir: str | Path) -> dict[str, int]:
    """{site: number of training cases} for every site folder under data_dir."""
    return {site: len(json.loads(p.read_text()).get("training") or []) for site, p in site_datalists(data_dir).items()}


def load_sites(data_dir: str | Path, cfg: EngineConfig) -> dict[str, SegEngine]:
    engines = {}
    for site, path in site_datalists(data_dir).items():
        validate_site_data(str(path), site, num_classes=cfg.num_classes)
        engines[site] = SegEngine(cfg, load_datalist(str(path), site), site=site)
    return engines


def _score(engine: SegEngine, net, section: str, with_hd95: bool) -> dict:
    result = engine.evaluate(net, section, with_hd95=with_hd95)
    scores = result.summary()
    scores["dice_per_case"] = [float(x) for x in result.case_dice]
    return scores


def run_local(
    engines: dict[str, SegEngine],
    rounds: int,
    section: str = "testing",
    with_hd95: bool = False,
    log=print,
    cross_site: bool = True,
) -> dict:
    """Each site trains alone for its federated share of the budget; scored on its own site and, with
    cross_site, on every other site (the site-shift matrix)."""
    matrix: dict[str, dict] = {}
    own: dict[str, dict] = {}
    steps_total = 0
    for site, engine in engines.items():
        steps = rounds * engine.local_steps()
        net = engine.new_network()
        stats = engine.train(net, steps)
        steps_total += stats.steps
        log(f"[local] {site}: {stats.steps} steps, loss {stats.mean_loss:.4f}, {stats.seconds:.1f}s")
        others = engines if cross_site else {site: engine}
        matrix[site] = {other: _score(e, net, section, with_hd95) for other, e in others.items()}
        own[site] = matrix[site][site]
    shift = {train_site: {test_site: round(v["dice"], 4) for test_site, v in row.items()} for train_site, row in matrix.items()}
    return {
        "method": "local-only",
        "section": section,
        "models": {"local (own site)": own},
        "extra": {"train_steps_total": steps_total, "cross_site_dice_matrix": shift},
    }


def run_centralized(
    engines: dict[str, SegEngine], cfg: EngineConfig, rounds: int, section: str = "testing", with_hd95: bool = False, log=print
) -> dict:
    """One model on all sites' pooled training cases, for the sum of the sites' federated budgets."""
    pooled = {"training": [case for e in engines.values() for case in e.cases("training")]}
    steps = sum(rounds * e.local_steps() for e in engines.values())
    central = SegEngine(cfg, pooled, site="pooled")
    net = central.new_network()
    stats = central.train(net, steps)
    log(
        f"[centralized] {len(pooled['training'])} pooled cases: {stats.steps} steps, loss {stats.mean_loss:.4f}, {stats.seconds:.1f}s"
    )
    per_site = {site: _score(e, net, section, with_hd95) for site, e in engines.items()}
    return {
        "method": "centralized",
        "section": section,
        "models": {"centralized": per_site},
        "extra": {"train_steps_total": stats.steps},
    }


# ---- the benchmark's variant: seeds, shared initial weights, learning curves, best-validated model ----------
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


def run_benchmark_baselines(
    data: str,
    engine_settings: dict,
    rounds: int,
    epochs: int,
    seeds: list[int],
    inits: list[str],
    methods: list[str],
    hd95: bool,
    models_dir: Path | None = None,
) -> dict:
    """Every seed in turn with the same site engines (their random streams continue from seed to seed, as the
    sites' do in the shared bench job); a seed sets the initial network."""
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.bench.budget import Budget
    from fedseg_tools.bench.jobs import load_initial_state

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
    record: dict = {
        "budget": {
            "rounds": rounds,
            "epochs": epochs,
            "total_steps": budget.total_steps,
            "site_steps_per_epoch": budget.site_steps_per_epoch,
        },
        "seeds": {},
    }
    for seed, init in zip(seeds, inits):
        saver = ModelSaver(models_dir / f"s{seed}", cfg) if models_dir is not None else None
        record["seeds"][str(seed)] = _benchmark_seed(
            engines, central, budget, load_initial_state(init), rounds, methods, hd95, saver
        )
    return record


def saved_models_dir(out_file: str | Path) -> Path:
    """Where the benchmark variant saves its best-validated models for the results file out_file."""
    out_file = Path(out_file)
    return out_file.parent / f"{out_file.stem}_models"


class ModelSaver:
    """Writes a best-validated network as a one-network model set ({"global": weights}) that records its engine."""

    def __init__(self, folder: Path, cfg: EngineConfig):
        self.folder, self.cfg = Path(folder), cfg

    def __call__(self, name: str, net, **info) -> None:
        from fedseg.engine import state_to_numpy
        from fedseg.modelset import save_model_set

        self.folder.mkdir(parents=True, exist_ok=True)
        save_model_set(self.folder / f"{name}.pt", {"global": state_to_numpy(net)}, {"engine": self.cfg.to_dict(), **info})


def _benchmark_seed(
    engines: dict, central, budget, init_state: dict, rounds: int, methods: list[str], hd95: bool, saver=None
) -> dict:
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
            if saver is not None:
                saver(f"local-{site}", net, model="local-only (best)", site=site, best_checkpoint=best[0])
            # timed like a federated method: training, the per-round validation and the final scoring
            seconds[site] = time.perf_counter() - began
            cpu[site] = time.process_time() - cpu_began
            matrix[site] = {
                other: (own[site] if other == site else _score(e, net, "testing", False)) for other, e in engines.items()
            }
            memory[site] = peak_rss_bytes()
            curves[site] = curve
        out["local"] = {
            "results": {
                "method": "local-only",
                "section": "testing",
                "models": {"local (own site)": own, "local (own site, last)": last},
                "extra": {
                    "cross_site_dice_matrix": {
                        a: {b: round(v["dice"], 4) for b, v in row.items()} for a, row in matrix.items()
                    },
                    "model_selection": "best validation Dice at the site itself, over R checkpoints",
                    "best_checkpoint": best_chunk,
                },
            },
            "wall_seconds": float(sum(seconds.values())),
            "wall_seconds_parallel": float(max(seconds.values())),
            "cpu_seconds": float(sum(cpu.values())),
            "site_seconds": seconds,
            "memory": memory,
            "seg_steps": steps,
            "curve": [
                (x, float(np.nanmean([curves[s][i][1] for s in curves])))
                for i, (x, _) in enumerate(next(iter(curves.values())))
            ],
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
        if saver is not None:
            saver("centralized", net, model="centralized (best)", best_checkpoint=best[0])
        seconds = time.perf_counter() - began
        cpu_seconds = time.process_time() - cpu_began
        out["centralized"] = {
            "results": {
                "method": "centralized",
                "section": "testing",
                "models": {"centralized": per_site, "centralized (last)": last},
                "extra": {
                    "model_selection": "best median over sites of the validation Dice, over R checkpoints",
                    "best_checkpoint": best[0],
                },
            },
            "wall_seconds": float(seconds),
            "cpu_seconds": float(cpu_seconds),
            "memory": {"pooled": peak_rss_bytes()},
            "seg_steps": steps,
            "curve": curve,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.baselines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    for kind in ("local", "centralized"):
        k = kinds.add_parser(kind, help=f"{kind} training on the budget of a federated job of --rounds rounds")
        k.add_argument("--data", required=True, help="folder with <site>/datalist.json")
        k.add_argument("--rounds", type=int, default=10, help="rounds of the federated job whose budget to match")
        k.add_argument("--engine", type=json.loads, default={}, help="engine settings over the job defaults (JSON)")
        k.add_argument("--out", required=True, help="output folder for fedseg_results.json")
        k.add_argument("--hd95", action="store_true")
    b = kinds.add_parser("benchmark", help="local and centralized as the benchmark runs them (seeds, curves)")
    b.add_argument("--data", required=True)
    b.add_argument("--engine", type=json.loads, required=True)
    b.add_argument("--rounds", type=int, required=True)
    b.add_argument("--epochs", type=int, required=True)
    b.add_argument("--seeds", nargs="+", type=int, required=True)
    b.add_argument("--inits", nargs="+", required=True, help="one initial checkpoint per seed")
    b.add_argument("--out", required=True, help="output JSON file")
    b.add_argument("--methods", nargs="+", default=["local", "centralized"], choices=["local", "centralized"])
    b.add_argument("--hd95", action="store_true")
    o = p.parse_args(argv)
    if o.kind == "benchmark":
        if len(o.seeds) != len(o.inits):
            b.error("give one --inits checkpoint per --seeds seed")
        record = run_benchmark_baselines(
            o.data, o.engine, o.rounds, o.epochs, o.seeds, o.inits, o.methods, o.hd95, saved_models_dir(o.out)
        )
        Path(o.out).parent.mkdir(parents=True, exist_ok=True)
        Path(o.out).write_text(json.dumps(record, indent=2))
        return 0
    return _run_plain(o)


def _run_plain(o: argparse.Namespace) -> int:
    from fedseg.engine.config import resolve_engine

    cfg = EngineConfig.from_dict(resolve_engine(o.engine))
    engines = load_sites(o.data, cfg)
    start = time.perf_counter()
    if o.kind == "local":
        results = run_local(engines, o.rounds, with_hd95=o.hd95)
    else:
        results = run_centralized(engines, cfg, o.rounds, with_hd95=o.hd95)
    results["extra"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fedseg_results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    if o.kind == "local":
        print("cross-site Dice (row: trained on, column: tested on):")
        for train_site, row in results["extra"]["cross_site_dice_matrix"].items():
            print(f"  {train_site}: " + "  ".join(f"{t}={d:.3f}" for t, d in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
