"""Non-federated baselines on the same engine and the same training budget as a federated job.

    python -m fedseg.baselines local       --data data/synth2d --rounds 10 --out results/local
    python -m fedseg.baselines centralized --data data/synth2d --rounds 10 --out results/centralized

Budget: a federated job with R rounds trains R x s_i optimizer steps at site i (s_i = local steps per round).
local-only trains each site's own model for exactly its R x s_i steps; centralized trains one model on all
sites' pooled training cases for sum_i R x s_i steps. Both write fedseg_results.json (per-site test Dice)
and print the same table as a federated run. "local" also scores every site's model on every other site:
that cross-site matrix is how the built-in dataset's site shift is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedseg.data import load_datalist, validate_site_data
from fedseg.engine import EngineConfig, SegEngine
from fedseg.report import format_table


def site_datalists(data_dir: str | Path) -> dict[str, Path]:
    """{site: datalist.json} for every site folder under data_dir."""
    data_dir = Path(data_dir)
    found = {p.parent.name: p for p in sorted(data_dir.glob("*/datalist.json"))}
    if not found:
        raise FileNotFoundError(f"no <site>/datalist.json under {data_dir}")
    return found


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


def run_local(engines: dict[str, SegEngine], rounds: int, section: str = "testing", with_hd95: bool = False, log=print,
              cross_site: bool = True) -> dict:
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
    shift = {
        train_site: {test_site: round(v["dice"], 4) for test_site, v in row.items()} for train_site, row in matrix.items()
    }
    return {
        "method": "local-only",
        "section": section,
        "models": {"local (own site)": own},
        "extra": {"train_steps_total": steps_total, "cross_site_dice_matrix": shift},
    }


def run_centralized(engines: dict[str, SegEngine], cfg: EngineConfig, rounds: int, section: str = "testing", with_hd95: bool = False, log=print) -> dict:
    """One model on all sites' pooled training cases, for the sum of the sites' federated budgets."""
    pooled = {"training": [case for e in engines.values() for case in e.cases("training")]}
    steps = sum(rounds * e.local_steps() for e in engines.values())
    central = SegEngine(cfg, pooled, site="pooled")
    net = central.new_network()
    stats = central.train(net, steps)
    log(f"[centralized] {len(pooled['training'])} pooled cases: {stats.steps} steps, loss {stats.mean_loss:.4f}, {stats.seconds:.1f}s")
    per_site = {site: _score(e, net, section, with_hd95) for site, e in engines.items()}
    return {"method": "centralized", "section": section, "models": {"centralized": per_site}, "extra": {"train_steps_total": stats.steps}}


def main(argv: list[str] | None = None) -> int:
    from fedseg.jobgen import resolve_engine

    p = argparse.ArgumentParser(prog="python -m fedseg.baselines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["local", "centralized"])
    p.add_argument("--data", required=True, help="folder with <site>/datalist.json")
    p.add_argument("--rounds", type=int, default=10, help="rounds of the federated job whose budget to match")
    p.add_argument("--engine", type=json.loads, default={}, help="engine settings over the job defaults (JSON)")
    p.add_argument("--out", required=True, help="output folder for fedseg_results.json")
    p.add_argument("--hd95", action="store_true")
    o = p.parse_args(argv)
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
