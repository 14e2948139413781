"""Writes FedSeg's FLARE job folders: the recipes of fedseg.recipes, exported (meta.json + one app for all).

The job folders in jobs/ are this module's output, kept under version control so hospital IT can read and
submit them as they are (a test checks they match). A researcher edits jobs/<name>/app/config/*.json
directly, writes a job.py with a recipe (docs/recipes.md), or regenerates with other settings:

    python -m fedseg.jobgen --out jobs                     # every default job
    python -m fedseg.jobgen --out /tmp/jobs --only fedavg --rounds 20 --engine '{"local_epochs": 2}'
    python -m fedseg.jobgen --out /tmp/jobs --only fedavg --byoc   # code travels inside the job (BYOC)

The network is stated once (the engine settings) and written into both the server persistor and the site executor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedseg.engine.config import resolve_engine
from fedseg.fl.executor import DEFAULT_DATALIST
from fedseg.recipes import (  # noqa: F401 - FEDCROSS_DEFAULTS, DEFAULT_SITES re-exported
    DEFAULT_ROUNDS,
    DEFAULT_SITES,
    FEDCROSS_DEFAULTS,
    TASK_REQUEST_INTERVAL,
    FedAvgRecipe,
    FedBNRecipe,
    FedCrossRecipe,
    FedProxRecipe,
    FedSegRecipe,
    FedSMRecipe,
    RecipeError,
)

APP = "app"  # one app for the server and every site (deploy_map @ALL), so any site names work


def recipe_for(name: str, o: argparse.Namespace) -> FedSegRecipe:
    """The recipe of job `name` with jobgen's options (the parser's namespace)."""
    common = {
        "engine": o.engine,
        "datalist": o.datalist,
        "min_clients": o.min_clients,
        "task_timeout": o.task_timeout,
        "meter": bool(getattr(o, "meter", False)),
    }
    if name in ("fedavg", "fedprox", "fedbn"):
        cls = {"fedavg": FedAvgRecipe, "fedprox": FedProxRecipe, "fedbn": FedBNRecipe}[name]
        extra = {"fedprox_mu": o.fedprox_mu} if name == "fedprox" else {}
        return cls(
            name=o.name or name,
            num_rounds=o.rounds,
            aggregation=o.aggregation,
            max_local_steps=o.max_local_steps,
            **extra,
            **common,
        )
    if name in ("fedsm", "softpull"):
        return FedSMRecipe(
            name=o.name or name,
            num_rounds=o.rounds,
            lam=o.lam,
            gamma=o.gamma,
            gamma_policy=getattr(o, "gamma_policy", "validation"),
            softpull_only=name == "softpull",
            **common,
        )
    if name in ("fedcross", "fedcrossens"):
        return FedCrossRecipe(
            name=o.name or name,
            num_models=FEDCROSS_DEFAULTS[name]["num_models"],
            sites=getattr(o, "sites", None),
            num_communications=o.communications,
            schedule=o.schedule,
            visit_epochs=o.visit_epochs,
            visit_steps=o.visit_steps,
            lr_schedule=o.lr_schedule,
            seed=o.seed,
            **common,
        )
    raise KeyError(f"fedseg.jobgen has no job {name!r} (JOBS: {sorted(JOBS)})")


def export_configs(recipe: FedSegRecipe) -> tuple[dict, dict]:
    """(config_fed_server, config_fed_client) of a recipe, as its export writes them."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe.export(tmp)
        config = Path(tmp) / recipe.name / APP / "config"
        return (
            json.loads((config / "config_fed_server.json").read_text()),
            json.loads((config / "config_fed_client.json").read_text()),
        )


def _job(name: str) -> Callable[[argparse.Namespace], tuple[dict, dict]]:
    return lambda o: export_configs(recipe_for(name, argparse.Namespace(**{**vars(o), "name": None})))


JOBS: dict[str, Callable[[argparse.Namespace], tuple[dict, dict]]] = {
    name: _job(name) for name in ("fedavg", "fedprox", "fedbn", "fedsm", "softpull", "fedcross", "fedcrossens")
}


def client_config(
    engine: dict,
    datalist: str,
    method_args: dict | None = None,
    extra: dict | None = None,
    *,
    executor_path: str,
) -> dict:
    """A recipe's client app (site executor, tracking writer) with the executor at executor_path, for a job that
    runs several methods one after another (the benchmark's shared jobs, whose executor serves every FedSeg task)."""
    _, client = export_configs(FedAvgRecipe(engine=engine, datalist=datalist, cross_site_eval=False))
    executor = client["executors"][0]["executor"]
    executor["path"] = executor_path
    if method_args:
        executor["args"]["method_args"] = method_args
    client.update(extra or {})
    return client


def server_components(engine: dict, cross_site_eval: bool = True) -> list[dict]:
    """A recipe's server components: the persistor (the network from the engine settings), the TensorBoard
    receiver and, with cross_site_eval, the pieces of FLARE's cross-site evaluation."""
    server, _ = export_configs(FedAvgRecipe(engine=engine, cross_site_eval=cross_site_eval))
    return server["components"]


def write_job(out_dir: str | os.PathLike, name: str, server: dict, client: dict, min_clients: int, byoc: bool = False) -> Path:
    """Write one job folder from config dicts, atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / APP / "config").mkdir(parents=True)
    _dump(tmp / "meta.json", {"name": name, "resource_spec": {}, "min_clients": min_clients, "deploy_map": {APP: ["@ALL"]}})
    _dump(tmp / APP / "config" / "config_fed_server.json", server)
    _dump(tmp / APP / "config" / "config_fed_client.json", client)
    if byoc:
        _copy_package(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _copy_package(job: Path) -> None:
    package = Path(__file__).resolve().parent
    shutil.copytree(package, job / APP / "custom" / "fedseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def export_job(recipe: FedSegRecipe, out_dir: str | os.PathLike, byoc: bool = False) -> Path:
    """Export a recipe into out_dir/<recipe name> (replacing a folder of that name); with byoc the fedseg package
    is copied into the job (app/custom/fedseg), so the job brings its code."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / recipe.name
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{recipe.name}.") as tmp:
        recipe.export(tmp)
        job = Path(tmp) / recipe.name
        if byoc:
            _copy_package(job)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(job, final)
    return final


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedseg.jobgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder to write job folders into")
    p.add_argument("--only", nargs="*", choices=sorted(JOBS), help="jobs to write (default: all)")
    p.add_argument("--name", help="job name (only with a single --only job)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--min-clients", type=int, default=2)
    p.add_argument("--engine", type=json.loads, default={}, help="JSON engine settings merged over the defaults")
    p.add_argument("--datalist", default=DEFAULT_DATALIST)
    p.add_argument("--fedprox-mu", type=float, default=0.01)
    p.add_argument(
        "--aggregation",
        choices=["mean", "median", "trimmed_mean"],
        default="mean",
        help="FedAvg/FedProx/FedBN: weighted mean (FedAvg) or a robust coordinate-wise median / trimmed mean",
    )
    p.add_argument(
        "--max-local-steps",
        type=int,
        default=0,
        help="FedAvg/FedProx: most steps a site trains per round, and so the largest weight it can claim (0: no plan)",
    )
    p.add_argument("--lam", type=float, default=0.7, help="FedSM/SoftPull: weight of a site's own personalized model")
    p.add_argument("--gamma", type=float, default=0.9, help="FedSM: selector confidence needed to use a personalized model")
    p.add_argument(
        "--gamma-policy",
        choices=("validation", "fixed"),
        default="validation",
        help="FedSM: the final gamma chosen on the sites' validation cases (default) or --gamma as given",
    )
    p.add_argument("--task-timeout", type=int, default=3600, help="seconds per site task (0: no limit)")
    p.add_argument(
        "--communications",
        type=int,
        help=f"FedCross: visits per model (default {FEDCROSS_DEFAULTS['fedcross']['communications']} fedcross, "
        f"{FEDCROSS_DEFAULTS['fedcrossens']['communications']} fedcrossens); a latin schedule needs a multiple of --sites",
    )
    p.add_argument(
        "--sites",
        type=int,
        help="FedCross: the number of sites the job is planned for: a latin schedule's communications are checked "
        f"against it here (the defaults are whole blocks for {DEFAULT_SITES} sites); the server always checks "
        "them against the sites connected when the job starts",
    )
    p.add_argument(
        "--schedule",
        choices=["cyclic", "latin", "random", "explicit"],
        help="FedCross: site-visit schedule (default cyclic for fedcross, latin for fedcrossens)",
    )
    p.add_argument(
        "--visit-epochs",
        type=int,
        help=f"FedCross: epochs per visit (default {FEDCROSS_DEFAULTS['fedcross']['visit_epochs']} fedcross, "
        f"{FEDCROSS_DEFAULTS['fedcrossens']['visit_epochs']} fedcrossens)",
    )
    p.add_argument("--visit-steps", type=int, default=0, help="FedCross: steps per visit; wins over --visit-epochs when > 0")
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "poly", "cosine"],
        default="constant",
        help="FedCross: lr over each model's visits (default constant, as every other method trains)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="FedCross: seeds the schedule and the models' initialisation "
        "(model 0 is the persistor's; models m > 0 from member_seed(seed, m))",
    )
    p.add_argument("--byoc", action="store_true", help="copy the fedseg package into the job (app/custom/)")
    p.add_argument(
        "--meter",
        action="store_true",
        help="add fedseg.fl.meter.TaskMeter to the sites: bytes, time and peak memory of every task",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    o = build_parser().parse_args(argv)
    try:
        o.engine = resolve_engine(o.engine)
    except ValueError as e:
        sys.exit(f"jobgen: --engine: {e}")
    names = o.only or sorted(JOBS)
    if o.name and len(names) != 1:
        sys.exit("--name needs exactly one --only job")
    for name in names:
        try:
            recipe = recipe_for(name, o)
        except (RecipeError, ValueError) as e:
            sys.exit(f"jobgen: job {name}: {e}")
        print(f"wrote {export_job(recipe, o.out, byoc=o.byoc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
