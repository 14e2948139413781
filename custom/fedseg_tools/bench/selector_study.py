"""FedSM's model selector, federated against its upper bound: the same network trained centrally.

    python -m fedseg_tools.bench.selector_study --data DIR --engine JSON --rounds 24 --seeds 0 1 2 \\
        [--selector '{"epochs": 4, "lr": 1e-3}' ...] --out OUT.json

The selector is a site classifier that every site trains only on its own images, all with its own label
(fedseg.methods.fedsm). Whether the federated protocol can learn it is measured here without segmentation
networks and without FLARE (seconds per setting, not hours): per seed, the federated protocol is simulated
in-process with the site code's own functions (train_selector_on at every site from the shared weights and
Adam state, then the server's weighted_average of weights and moments by training-image count, as
FedSMController does), and the same network is trained centrally on the pooled inputs of all sites with the
same number of optimizer steps (full-batch Adam steps, the union's mean cross-entropy). Both are scored on
every site's test cases: argmax accuracy (the case's site is the top class) and routed-own at the confidence
threshold gamma (argmax own AND confidence > gamma, the share that reaches the own personalized model).
With the "lda" protocol (fixed features, head fitted from the sites' feature statistics) the federated
selector is one exchange of statistics, and the central upper bound stays the fully trained network.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fedseg.algorithms.aggregation import weighted_average
from fedseg.algorithms.selector_head import fit_lda_head
from fedseg.engine import load_numpy_state, load_optimizer_state, optimizer_state_to_numpy, state_to_numpy
from fedseg.methods.fedsm import (
    SelectorSettings,
    build_selector,
    predict_sites,
    section_inputs,
    selector_statistics,
    train_selector_on,
)

SECTIONS = ("training", "validation", "testing")


def site_inputs(data_dir: str, engine_settings: dict) -> tuple[dict[str, dict[str, torch.Tensor]], int, int]:
    """({site: {section: selector inputs}}, spatial_dims, in_channels), sites in name order."""
    from fedseg.engine import EngineConfig
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.baselines import load_sites

    cfg = EngineConfig.from_dict(resolve_engine(engine_settings))
    engines = load_sites(data_dir, cfg)
    size = SelectorSettings(num_sites=len(engines)).size(cfg.spatial_dims)
    inputs = {
        site: {sec: section_inputs(e, sec, size) for sec in SECTIONS if e.cases(sec)} for site, e in sorted(engines.items())
    }
    return inputs, cfg.spatial_dims, cfg.in_channels


def initial_state(spatial_dims: int, in_channels: int, s: SelectorSettings, seed: int) -> tuple[dict, dict]:
    """Seeded selector weights and zero Adam moments, as FedSMController._initial_selector makes them."""
    torch.manual_seed(seed)
    net = build_selector(spatial_dims, in_channels, s)
    optimizer = torch.optim.Adam(net.parameters(), lr=s.lr)
    for p in net.parameters():
        optimizer.state[p].update(
            {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        )
    return state_to_numpy(net), optimizer_state_to_numpy(optimizer, net)


def train_federated(inputs: dict, dims: int, channels: int, s: SelectorSettings, rounds: int, seed: int, log=None):
    """The federated protocol: per round every site trains from the shared state; weights and Adam state are
    averaged weighted by training images. Returns (selector, optimizer steps per site, per-round accuracy)."""
    sites = sorted(inputs)
    weights, optim = initial_state(dims, channels, s, seed)
    if s.protocol == "lda":  # no optimizer steps: one exchange of statistics fits the head (more would repeat it)
        net = _net(weights, dims, channels, s)
        stats = [selector_statistics(net, inputs[site]["training"]) for site in sites]
        w, b = fit_lda_head(stats, s.shrinkage)
        weights = {**weights, "head.weight": w.astype(np.float32), "head.bias": b.astype(np.float32)}
        return _net(weights, dims, channels, s), 0, []
    counts = {site: float(inputs[site]["training"].shape[0]) for site in sites}
    steps = 0
    history = []
    for rnd in range(rounds):
        new_w, new_o = {}, {}
        for index, site in enumerate(sites):
            net = build_selector(dims, channels, s)
            load_numpy_state(net, weights, site)
            new_w[site], new_o[site], n = train_selector_on(net, optim, inputs[site]["training"], index, s, seed + rnd)
        steps += n
        weights, optim = weighted_average(new_w, counts), weighted_average(new_o, counts)
        if log is not None and (rnd + 1) % max(1, rounds // 4) == 0:
            acc = scores(_net(weights, dims, channels, s), inputs, "validation", 0.9)["accuracy_mean"]
            history.append((rnd + 1, acc))
            log(f"    federated round {rnd + 1}: validation argmax accuracy {acc:.3f}")
    return _net(weights, dims, channels, s), steps, history


def train_central(inputs: dict, dims: int, channels: int, s: SelectorSettings, steps: int, seed: int):
    """The upper bound: the same network, the same number of full-batch Adam steps on the pooled inputs, all of
    it trained (features and head)."""
    sites = sorted(inputs)
    weights, optim = initial_state(dims, channels, s, seed)
    net = _net(weights, dims, channels, s)
    x = torch.cat([inputs[site]["training"] for site in sites])
    y = torch.cat([torch.full((inputs[site]["training"].shape[0],), i, dtype=torch.long) for i, site in enumerate(sites)])
    optimizer = torch.optim.Adam(net.parameters(), lr=s.lr)
    load_optimizer_state(optimizer, net, {k: np.array(v, copy=True) for k, v in optim.items()})
    net.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, x.shape[0], s.batch_size * 8):
            part = slice(start, start + s.batch_size * 8)
            (torch.nn.functional.cross_entropy(net(x[part]), y[part], reduction="sum") / x.shape[0]).backward()
        optimizer.step()
    return net


def _net(weights: dict, dims: int, channels: int, s: SelectorSettings):
    net = build_selector(dims, channels, s)
    load_numpy_state(net, copy.deepcopy(weights), "server")
    return net


def scores(net, inputs: dict, section: str, gamma: float) -> dict:
    """Per site: argmax accuracy, routed-own at gamma and mean confidence; their means over sites."""
    sites = sorted(inputs)
    out = {"accuracy": {}, "routed_own": {}, "confidence": {}}
    for index, site in enumerate(sites):
        if section not in inputs[site]:
            continue
        probs = predict_sites(net, inputs[site][section])
        top = probs.argmax(axis=1)
        conf = probs.max(axis=1)
        out["accuracy"][site] = float(np.mean(top == index))
        out["routed_own"][site] = float(np.mean((top == index) & (conf > gamma)))
        out["confidence"][site] = float(np.mean(conf))
    for key in ("accuracy", "routed_own", "confidence"):
        out[f"{key}_mean"] = float(np.mean(list(out[key].values()))) if out[key] else float("nan")
    return out


def study(data_dir: str, engine: dict, rounds: int, seeds: list[int], settings: list[dict], gamma: float, log=print) -> dict:
    inputs, dims, channels = site_inputs(data_dir, engine)
    sizes = {site: {sec: int(t.shape[0]) for sec, t in v.items()} for site, v in inputs.items()}
    log(f"selector study on {data_dir}: sites {sizes}")
    rows = []
    for values in settings:
        s = SelectorSettings.from_meta(len(inputs), values)
        for seed in seeds:
            log(f"  selector {values or 'defaults'}, seed {seed}, R={rounds} ...")
            fed, steps, history = train_federated(inputs, dims, channels, s, rounds, seed, log)
            # the "lda" protocol takes no steps: its upper bound is the network trained centrally with the steps
            # the reference protocol would take (E per round)
            central_steps = steps or s.epochs * rounds
            central = train_central(inputs, dims, channels, s, central_steps, seed)
            row = {
                "selector": values,
                "seed": seed,
                "rounds": rounds,
                "steps": steps,
                "central_steps": central_steps,
                "federated": scores(fed, inputs, "testing", gamma),
                "central": scores(central, inputs, "testing", gamma),
                "federated_history": history,
            }
            log(
                f"    test argmax accuracy federated {row['federated']['accuracy_mean']:.3f} vs central "
                f"{row['central']['accuracy_mean']:.3f}; routed-own at gamma {gamma}: "
                f"{row['federated']['routed_own_mean']:.3f} vs {row['central']['routed_own_mean']:.3f}"
            )
            rows.append(row)
    return {"data": str(data_dir), "sites": sizes, "gamma": gamma, "rows": rows}


def markdown(result: dict, command: str) -> str:
    """Per selector setting: test argmax accuracy and routed-own per site, federated vs central (mean over seeds)."""
    sites = sorted(result["sites"])
    lines = [
        f"# FedSM selector: federated vs central on {Path(result['data']).name}",
        "",
        f"Command: `{command}`. Test cases per site: "
        + ", ".join(f"{s} {result['sites'][s].get('testing', 0)}" for s in sites)
        + f". Cells: argmax accuracy federated / central (routed-own at gamma {result['gamma']} federated / central), "
        "mean over seeds; the last column is the largest shortfall of the federated argmax accuracy at any site.",
        "",
        "| selector | R | seeds | " + " | ".join(sites) + " | mean | largest shortfall |",
        "|---|---|---|" + "---|" * (len(sites) + 2),
    ]
    settings = []
    for row in result["rows"]:
        if row["selector"] not in settings:
            settings.append(row["selector"])
    for values in settings:
        rows = [r for r in result["rows"] if r["selector"] == values]

        def mean(kind, key, site=None, rows=rows):
            return float(np.mean([r[kind][key][site] if site else r[kind][f"{key}_mean"] for r in rows]))

        cells = [
            f"{mean('federated', 'accuracy', s):.3f} / {mean('central', 'accuracy', s):.3f} "
            f"({mean('federated', 'routed_own', s):.3f} / {mean('central', 'routed_own', s):.3f})"
            for s in sites
        ]
        shortfall = max(mean("central", "accuracy", s) - mean("federated", "accuracy", s) for s in sites)
        lines.append(
            f"| {json.dumps(values) if values else 'defaults'} | {rows[0]['rounds']} | {len(rows)} | "
            + " | ".join(cells)
            + f" | {mean('federated', 'accuracy'):.3f} / {mean('central', 'accuracy'):.3f} | {shortfall:+.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedseg_tools.bench.selector_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with <site>/datalist.json")
    p.add_argument("--engine", type=json.loads, default={}, help="engine settings (JSON)")
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--selector", nargs="*", type=json.loads, default=[{}], help="selector settings to compare (JSON)")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = study(args.data, args.engine, args.rounds, args.seeds, args.selector, args.gamma, log=partial(print, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    command = "python -m fedseg_tools.bench.selector_study " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, command)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
