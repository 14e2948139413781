"""Leave-one-centre-out: how each method's deployable model does on a centre that never took part.

A holdout cell (DatasetSpec.holdout names a centre, i.e. a site folder) prepares the data exactly as the normal
cell (same conversion, split and downscaling), then runs the federation (the FL simulator jobs and the
local-only / centralized baselines) on a folder that holds only the OTHER centres (hard links:
runs/<dataset>/<dataset>_federation/). The held-out centre's test cases are kept aside. After the cell's runs, every
method's deployable model is scored on them by the same engine evaluation as everywhere (SegEngine: per-case
Dice of the argmax over the foreground classes, mean over cases):

  FedAvg / FedProx   the best global model (<run>/fedavg/best.pt)
  FedBN              the best global model (<run>/fedbn/best.pt): its normalization parameters are the sites'
                     step-weighted average, which is what a site without normalization of its own gets
  SoftPull           the global model: without a selector nothing routes an unseen centre to a personalized model
  FedSM              the super model, its selector facing the unseen centre at the run's gamma: each case goes
                     to a personalized model (confidence above gamma) or the global model; the cases routed to
                     each model are counted; and FedSM's global model alone
  FedCross           its model (best set)
  FedCrossEns        the ensemble (mean of the members' softmax) and its uncertainty: the mean over cases of the
                     per-voxel std of the members' foreground probability (fedseg.methods.fedcross), on the
                     unseen centre's and on the seen centres' test cases
  centralized        its best-validated model
  local-only         every trained centre's own best-validated model; the mean and the best over them

Only the runs of the main group are scored (both protocols); a holdout cell runs no FedSM ablation, no
optimizer-state runs, no NVFlare stock peers and no matched-step baselines. Each scored run gets
cell["unseen"]["runs"][key]: Dice on the unseen centre (mean and std over its cases) and, for comparison, the
mean over the seen centres of the same method's headline model (from the run's own final evaluation). The
report section is fedseg_tools.bench.unseen_report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedseg_tools.bench.presets import DatasetSpec, Preset

LOCO_TAG = "_loco_"
GLOBAL = "global"  # fedseg.algorithms.routing.GLOBAL: the routed-to name of the global model


# ---- datasets ---------------------------------------------------------------------------------------------------
def loco_name(dataset: str, centre: str) -> str:
    return f"{dataset}{LOCO_TAG}{centre}"


def dataset_centres(spec: DatasetSpec) -> list[str]:
    """The centres (site folders) a dataset spec will have, without preparing it ([] when unknown)."""
    if spec.kind == "synthetic":
        return [f"site-{k + 1}" for k in range(int(spec.options.get("n_sites", 0)))]
    if spec.kind == "datalist":
        return sorted(p.parent.name for p in Path(spec.source).glob("*/datalist.json"))
    if spec.options.get("sites"):
        return list(spec.options["sites"])
    from fedseg.data.convert import IMAGE_DIR_NAMES

    source = Path(spec.source)
    found = (
        [p.name for p in source.iterdir() if p.is_dir() and any((p / d).is_dir() for d in IMAGE_DIR_NAMES)]
        if source.is_dir()
        else []
    )
    return sorted(found)


def loco_specs(spec: DatasetSpec, centres: list[str] | None = None) -> dict[str, DatasetSpec]:
    """One holdout spec per centre (default: all of the dataset's): the same data and engine, no FedSM ablation."""
    out = {}
    for centre in centres if centres is not None else dataset_centres(spec):
        name = loco_name(spec.name, centre)
        what = spec.description or spec.name
        out[name] = dataclasses.replace(
            spec,
            name=name,
            holdout=centre,
            ablation=False,
            description=f"{what}; leave-one-centre-out: {centre} kept out of training, scored as the unseen centre",
        )
    return out


def add_loco_datasets(specs: dict[str, DatasetSpec], preset_loco: bool, holdout: list[str] | None) -> dict[str, DatasetSpec]:
    """The holdout specs to add: with the preset's loco flag one per centre of every polyp dataset; with `holdout`
    (centre names) one per named centre of every dataset that has it. SystemExit for a centre no dataset has."""
    base = {n: s for n, s in specs.items() if not s.holdout and not getattr(s, "leakage_of", "")}
    out: dict[str, DatasetSpec] = {}
    if preset_loco:
        for spec in base.values():
            if spec.kind == "polyp":
                out.update(loco_specs(spec))
    if holdout:
        unmatched = set(holdout)
        for spec in base.values():
            have = [c for c in holdout if c in dataset_centres(spec)]
            unmatched -= set(have)
            out.update(loco_specs(spec, have))
        if unmatched:
            raise SystemExit(f"--holdout {sorted(unmatched)}: no dataset has such a centre (site folder)")
    return out


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # a hard link is a real file inside the federation folder (the sites' data-root check)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def federation_dir(data_dir: Path, holdout: str, dst: Path) -> Path:
    """dst/<site>/... for every site of data_dir except `holdout` (hard links, copies across file systems)."""
    from fedseg_tools.baselines import site_datalists

    sites = site_datalists(data_dir)
    if holdout not in sites:
        raise FileNotFoundError(f"{data_dir} has no centre {holdout!r} to hold out (its centres: {sorted(sites)})")
    if len(sites) < 2:
        raise ValueError(f"{data_dir}: holding out {holdout} leaves no centre to train on")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for site, datalist in sites.items():
        if site != holdout:
            shutil.copytree(datalist.parent, dst / site, copy_function=_link_or_copy)
    return dst


def holdout_preset(preset: Preset) -> Preset:
    """The preset a holdout cell runs under: the main runs only (what the unseen centre scores)."""
    p = preset.copy()
    p.fedsm_ablation = p.optimizer_measure = p.matched_steps = p.tuning = False
    p.stock = []
    return p


# ---- where the benchmark keeps each run's models -------------------------------------------------------------
def fl_model_set(ds_dir: Path, cell: dict, key: str, method: str) -> tuple[Path, Path]:
    """(best.pt, the server app dir with the job's config) of one FL run of a cell: the last simulator job that ran
    it (a retry comes after the shared job) moved its outputs to <app>/bench/<label>/<output>/ (fedseg_tools.bench.flow)."""
    from fedseg_tools.bench.collect import server_app_dir
    from fedseg_tools.bench.jobs import METHOD_OUTPUTS, label

    name = label(key, cell["seed"])
    for job in reversed(cell.get("jobs") or []):
        if name in (job.get("runs") or []):
            app = server_app_dir(Path(ds_dir) / "ws" / job["name"])
            path = app / "bench" / name / METHOD_OUTPUTS[method][0] / "best.pt"
            if path.is_file():
                return path, app
    raise FileNotFoundError(f"no best.pt of run {name} in the cell's simulator workspaces under {ds_dir / 'ws'}")


def baseline_model(ds_dir: Path, seed: int, name: str) -> Path:
    """A best-validated local-only ("local-<site>") or centralized model the baselines process saved."""
    from fedseg_tools.baselines import saved_models_dir

    newest_first = sorted(Path(ds_dir).glob("baselines_s*.json"), key=lambda f: f.stat().st_mtime, reverse=True)
    for results in newest_first:  # an earlier run in the same folder may have left other seed batches
        path = saved_models_dir(results) / f"s{seed}" / f"{name}.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no saved baseline model {name}.pt for seed {seed} under {ds_dir}")


# ---- scoring (the engine's evaluation) -----------------------------------------------------------------------
class Scorer:
    """Scores networks on the test cases of the unseen centre and of the seen ones; one engine per (data, settings)."""

    def __init__(self, unseen: Path, seen: dict[str, Path]):
        self.unseen, self.seen = Path(unseen), dict(seen)
        self._engines: dict[tuple[str, str], object] = {}

    def engine(self, cfg, datalist: Path | None = None):
        from fedseg.data import load_datalist
        from fedseg.engine import SegEngine

        path = Path(datalist or self.unseen)
        key = (str(path), json.dumps(cfg.to_dict(), sort_keys=True, default=str))
        if key not in self._engines:
            self._engines[key] = SegEngine(cfg, load_datalist(str(path), path.parent.name), site=path.parent.name)
        return self._engines[key]

    def network(self, cfg, weights: dict, what: str):
        from fedseg.engine import load_numpy_state

        net = self.engine(cfg).new_network()
        load_numpy_state(net, weights, site=what)
        return net

    def evaluate(self, cfg, net):
        return self.engine(cfg).evaluate(net, "testing")


def dice_summary(result) -> dict:
    """Mean and std over cases of the per-case Dice of an EvalResult."""
    per_case = np.asarray(result.case_dice, dtype=float)
    return {
        "dice": float(per_case.mean()) if per_case.size else float("nan"),
        "dice_std": float(per_case.std()) if per_case.size else float("nan"),
        "n_cases": int(per_case.size),
    }


def seen_mean(rec: dict, model: str | None = None) -> float:
    """Mean over the seen centres of a run's model (default: its headline model), from its own final evaluation."""
    per_site = ((rec.get("results") or {}).get("models") or {}).get(model or rec.get("headline_model")) or {}
    values = [v.get("dice") for v in per_site.values() if isinstance(v.get("dice"), (int, float)) and math.isfinite(v["dice"])]
    return float(np.mean(values)) if values else float("nan")


def routed_case_dice(case_dice: dict[str, np.ndarray], chosen: list[str]) -> np.ndarray:
    """The super model's per-case Dice: case i scored by the model it was routed to (a name in case_dice)."""
    return np.array([float(case_dice[m][i]) for i, m in enumerate(chosen)], dtype=float)


def routing_counts(chosen: list[str], site_names: list[str]) -> dict[str, int]:
    """{personalized model of each site, and "global": number of cases routed to it}."""
    counts = dict.fromkeys([*site_names, GLOBAL], 0)
    for m in chosen:
        counts[m] += 1
    return counts


def seen_global_share(rec: dict) -> float:
    """The share of the seen centres' test cases FedSM's own final evaluation routed to the global model."""
    routing = ((rec.get("results") or {}).get("extra") or {}).get("routing") or {}
    total = sum(int(v) for row in routing.values() for v in (row or {}).values())
    return sum(int((row or {}).get(GLOBAL, 0)) for row in routing.values()) / total if total else float("nan")


def _read(path: Path, job_config: Path | None = None):
    from fedseg.export.modelsets import read_trained_models

    return read_trained_models(path, job_config)


def score_global(rec: dict, model_set: Path, app: Path | None, scorer: Scorer) -> dict:
    """One global network (FedAvg/FedProx/FedBN best, SoftPull's global, centralized)."""
    from fedseg.export.modelsets import GLOBAL as GLOBAL_NAME

    trained = _read(model_set, app)
    net = scorer.network(trained.engine, trained.network_weights(GLOBAL_NAME), f"global model of {model_set}")
    return {**dice_summary(scorer.evaluate(trained.engine, net)), "model": "global model", "model_set": str(model_set)}


def score_fedsm(rec: dict, model_set: Path, app: Path | None, scorer: Scorer) -> dict:
    """FedSM's super model facing the unseen centre (routing counted) and its global model alone."""
    from fedseg.engine import load_numpy_state
    from fedseg.methods.fedsm import new_selector, predict_sites, routed_models, section_inputs

    trained = _read(model_set)
    cfg, names = trained.engine, trained.site_names()
    engine = scorer.engine(cfg)
    gamma = ((rec.get("results") or {}).get("extra") or {}).get("gamma")
    gamma = float(gamma if isinstance(gamma, (int, float)) and math.isfinite(gamma) else trained.info["gamma"])
    settings = trained.selector_settings()
    selector = new_selector(engine, settings)
    load_numpy_state(selector, trained.groups["selector"], site="selector")
    probs = predict_sites(selector, section_inputs(engine, "testing", settings.size(cfg.spatial_dims)))
    chosen = routed_models(probs, names, gamma)
    results = {GLOBAL: scorer.evaluate(cfg, scorer.network(cfg, trained.network_weights(GLOBAL), "FedSM global"))}
    for site in sorted(set(chosen) - {GLOBAL}):
        net = scorer.network(cfg, trained.network_weights(f"personalized:{site}"), f"FedSM personalized {site}")
        results[site] = scorer.evaluate(cfg, net)
    super_dice = routed_case_dice({m: r.case_dice for m, r in results.items()}, chosen)
    counts = routing_counts(chosen, names)
    return {
        "dice": float(super_dice.mean()) if super_dice.size else float("nan"),
        "dice_std": float(super_dice.std()) if super_dice.size else float("nan"),
        "n_cases": int(super_dice.size),
        "model": "super model",
        "gamma": gamma,
        "routing": counts,
        "global_share": counts[GLOBAL] / len(chosen) if chosen else float("nan"),
        "seen_global_share": seen_global_share(rec),
        "global": dice_summary(results[GLOBAL]),
        "seen_global_dice": seen_mean(rec, "FedSM global"),
        "model_set": str(model_set),
    }


def mean_case_std(scores) -> float:
    values = np.asarray(scores.mean_std_per_case, dtype=float)
    return float(values.mean()) if values.size else float("nan")


def score_fedcross(rec: dict, model_set: Path, app: Path | None, scorer: Scorer) -> dict:
    """The ensemble of the best set (one member for FedCross) and, with K > 1 members, its uncertainty: the mean
    per-case std of the members' probabilities on the unseen centre and on the seen centres' test cases."""
    from fedseg.methods.fedcross import score_ensemble

    trained = _read(model_set)
    cfg = trained.engine
    nets = [scorer.network(cfg, trained.network_weights(f"member:{m}"), f"member {m}") for m in range(trained.num_members())]
    unseen = score_ensemble(scorer.engine(cfg), nets, "testing")
    out = {**dice_summary(unseen.ensemble), "model": "ensemble" if len(nets) > 1 else "model", "members": len(nets)}
    if len(nets) > 1:
        seen = {site: score_ensemble(scorer.engine(cfg, path), nets, "testing") for site, path in scorer.seen.items()}
        pooled = [v for s in seen.values() for v in s.mean_std_per_case]
        out["uncertainty"] = {
            "unseen": mean_case_std(unseen),
            "seen": float(np.mean(pooled)) if pooled else float("nan"),
            "seen_per_site": {site: mean_case_std(s) for site, s in seen.items()},
        }
    return {**out, "model_set": str(model_set)}


def score_local(cell: dict, ds_dir: Path, scorer: Scorer) -> dict:
    """Every trained centre's own best model on the unseen centre: the mean and the best over them."""
    per_model = {}
    for site in cell["sites"]:
        path = baseline_model(ds_dir, cell["seed"], f"local-{site}")
        per_model[site] = {**score_global({}, path, None, scorer), "model": f"local-only model of {site}"}
    dice = {s: r["dice"] for s, r in per_model.items()}
    best = max(dice, key=lambda s: dice[s] if math.isfinite(dice[s]) else -1.0)
    return {
        "dice": float(np.mean(list(dice.values()))),
        "spread_over_models": float(np.std(list(dice.values()))),
        "n_cases": per_model[best]["n_cases"],
        "model": "each trained centre's own model",
        "per_model": per_model,
        "best_dice": dice[best],
        "best_site": best,
    }


FL_SCORERS: dict[str, Callable] = {
    "fedavg": score_global,
    "fedprox": score_global,
    "fedbn": score_global,
    "softpull": score_global,
    "fedsm": score_fedsm,
    "fedcross": score_fedcross,
    "fedcrossens": score_fedcross,
}


def score_run(key: str, rec: dict, cell: dict, ds_dir: Path, scorer: Scorer) -> dict:
    method = rec["method"]
    if method == "local":
        got = score_local(cell, ds_dir, scorer)
    elif method == "centralized":
        got = score_global(rec, baseline_model(ds_dir, cell["seed"], "centralized"), None, scorer)
    else:
        path, app = fl_model_set(ds_dir, cell, key, method)
        got = FL_SCORERS[method](rec, path, app, scorer)
    return {"method": method, "protocol": rec.get("protocol", "equal"), "seen_dice": seen_mean(rec), **got}


def score_cell(cell: dict, ds_dir: Path, unseen: Path, federation: Path, log: Callable[[str], None] = print) -> dict:
    """cell["unseen"]: every main-group run that finished, scored on the unseen centre's test cases."""
    began = time.time()
    seen = {site: Path(federation) / site / "datalist.json" for site in cell["sites"]}
    scorer = Scorer(unseen, seen)
    out = {"centre": Path(unseen).parent.name, "seen_sites": list(cell["sites"]), "runs": {}}
    for key, rec in (cell.get("methods") or {}).items():
        scorable = rec.get("method") in (*FL_SCORERS, "local", "centralized")
        if rec.get("status") not in ("ok", "partial") or rec.get("group", "main") != "main" or not scorable:
            continue
        try:
            out["runs"][key] = score_run(key, rec, cell, ds_dir, scorer)
        except Exception as e:  # noqa: BLE001 - a run whose model cannot be scored is recorded; the others go on
            log(f"{cell['dataset']}: unseen centre: {key} FAILED {type(e).__name__}: {e}")
            out["runs"][key] = {
                "method": rec.get("method"),
                "protocol": rec.get("protocol"),
                "error": f"{type(e).__name__}: {e}",
            }
    done = [r for r in out["runs"].values() if "n_cases" in r]
    out["n_cases"] = done[0]["n_cases"] if done else 0
    out["seconds"] = round(time.time() - began, 1)
    return out
