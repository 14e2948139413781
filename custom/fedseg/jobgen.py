"""Writes FedSeg's FLARE job folders (meta.json + server and client app configs) from one description.

The job folders in jobs/ are this module's output, kept under version control so hospital IT can read and
submit them as they are (a test checks they match). A researcher edits jobs/<name>/app/config/*.json
directly, or regenerates with other settings:

    python -m fedseg.jobgen --out jobs                     # every default job
    python -m fedseg.jobgen --out /tmp/jobs --only fedavg --rounds 20 --engine '{"local_epochs": 2}'
    python -m fedseg.jobgen --out /tmp/jobs --only fedavg --byoc   # code travels inside the job (BYOC)

The network is stated once and written into both the server persistor and the site executor.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from fedseg.algorithms.schedules import check_latin_communications, plan_latin
from fedseg.engine.config import EngineConfig

DEFAULT_ENGINE: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "num_classes": 2,
    "roi_size": [64, 64],
    "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1},
    "batch_size": 4,
    "lr": 0.001,
    "local_epochs": 2,
}
DEFAULT_DATALIST = "$FEDSEG_DATA/{SITE_NAME}/datalist.json"
# How long a site waits before asking the server for its next task. FLARE's default (2 s) added ~2 s of idle
# time per round per site in the benchmark's FL-overhead measurement; 0.5 s keeps most of the gain without
# making every site poll the server four times a second.
TASK_REQUEST_INTERVAL = 0.5
APP = "app"  # one app for the server and every site (deploy_map @ALL), so any site names work


def _component(cid: str, path: str, args: dict | None = None) -> dict:
    return {"id": cid, "path": path, "args": args or {}}


def client_config(engine: dict, datalist: str, method_args: dict | None = None, extra: dict | None = None) -> dict:
    args = {"datalist": datalist, "engine": engine}
    if method_args:
        args["method_args"] = method_args
    config = {
        "format_version": 2,
        "executors": [{"tasks": ["*"], "executor": {"path": "fedseg.fl.executor.SegExecutor", "args": args}}],
        "components": [
            _component("tb_writer", "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"),
            _component(
                "event_to_fed",
                "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."},
            ),
        ],
        "task_data_filters": [],
        "task_result_filters": [],
    }
    config.update(extra or {})
    return config


def server_components(engine: dict, cross_site_eval: bool = True) -> list[dict]:
    """Persistor (builds the network from the engine settings), TensorBoard receiver, and for FedAvg-style jobs
    the pieces of FLARE's cross-site evaluation (the workflows choose their best model themselves)."""
    network = EngineConfig.from_dict(engine).network_args()
    components = [
        _component("persistor", "fedseg.fl.persistor.SegModelPersistor", {"network": network}),
        _component("tb_receiver", "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver", {"events": ["fed.analytix_log_stats"]}),
    ]
    if cross_site_eval:
        components += [
            _component("model_locator", "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator", {"pt_persistor_id": "persistor"}),
            _component("json_generator", "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator"),
        ]
    return components


def cross_site_eval() -> dict:
    return {
        "id": "cross_site_eval",
        "path": "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
        "args": {"model_locator_id": "model_locator", "submit_model_timeout": 600, "validation_timeout": 3600},
    }


def server_config(workflows: list[dict], components: list[dict]) -> dict:
    """The config_fed_server.json shell every FedSeg job shares."""
    return {"format_version": 2, "workflows": workflows, "components": components,
            "task_data_filters": [], "task_result_filters": []}


def fedavg_server(o: argparse.Namespace, fedprox_mu: float = 0.0) -> dict:
    args: dict[str, Any] = {
        "num_rounds": o.rounds,
        "fedprox_mu": fedprox_mu,
        "aggregation": o.aggregation,
        "min_clients": o.min_clients,
        "task_timeout": o.task_timeout,
        "max_local_steps": o.max_local_steps,
    }
    # every site connected at the start of a round takes part in it; FLARE's cross-site evaluation follows
    workflows = [{"id": "fedavg", "path": "fedseg.fl.fedavg_controller.FedAvgController", "args": args}, cross_site_eval()]
    return server_config(workflows, server_components(o.engine))


def meta(name: str, min_clients: int) -> dict:
    return {
        "name": name,
        "resource_spec": {},
        "min_clients": min_clients,
        "deploy_map": {APP: ["@ALL"]},
    }


def job_fedavg(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedavg_server(o), client_config(o.engine, o.datalist)


def job_fedprox(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedavg_server(o, fedprox_mu=o.fedprox_mu), client_config(o.engine, o.datalist)


def fedsm_server(o: argparse.Namespace, use_selector: bool) -> dict:
    from fedseg.methods.fedsm import DEFAULT_SELECTOR

    args: dict[str, Any] = {
        "num_rounds": o.rounds,
        "lam": o.lam,
        "gamma": o.gamma,
        "use_selector": use_selector,
        "min_clients": 1,
        "task_timeout": o.task_timeout,
        "eval_timeout": o.task_timeout,
        "engine": o.engine,
        "final_model": "best",
    }
    if use_selector:
        args["selector"] = dict(DEFAULT_SELECTOR)
    return server_config([{"id": "fedsm", "path": "fedseg.fl.fedsm_controller.FedSMController", "args": args}],
                         server_components(o.engine, cross_site_eval=False))


def job_fedsm(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedsm_server(o, use_selector=True), client_config(o.engine, o.datalist)


def job_softpull(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedsm_server(o, use_selector=False), client_config(o.engine, o.datalist)


# FedCross defaults match jobs/fedavg's budget (10 rounds x 2 local epochs = 20 epochs at every site) at the
# built-in data's 4 sites (DEFAULT_SITES).
# FedCrossEns (K = N, "latin"): every site trains one model per communication, and a Latin schedule needs whole
# blocks of N communications (every model visits every site equally), so the 20 epochs per site are split by
# fedseg.algorithms.schedules.plan_latin: 20 communications x 1-epoch visits (5 blocks of 4; 2-epoch visits
# would give 10 communications, not a multiple of 4).
# FedCross (K = 1, one site trains per communication): 20 communications x 4-epoch visits (cyclic: 5 per site).
DEFAULT_ROUNDS = 10
DEFAULT_SITES = 4
_ENS_COMMUNICATIONS, _ENS_VISIT_EPOCHS = plan_latin(DEFAULT_ROUNDS * DEFAULT_ENGINE["local_epochs"], DEFAULT_SITES,
                                                    DEFAULT_ENGINE["local_epochs"])
FEDCROSS_DEFAULTS = {
    "fedcross": {"num_models": 1, "schedule": "cyclic", "communications": 20, "visit_epochs": 4},
    "fedcrossens": {"num_models": 0, "schedule": "latin", "communications": _ENS_COMMUNICATIONS,
                    "visit_epochs": _ENS_VISIT_EPOCHS},
}


def fedcross_server(o: argparse.Namespace, job: str) -> dict:
    """The FedCross workflow. A "latin" schedule is checked here against --sites when given (the default
    communications are whole blocks for DEFAULT_SITES); the server checks again against the sites connected
    when the job starts."""
    defaults = FEDCROSS_DEFAULTS[job]
    communications = o.communications or defaults["communications"]
    schedule = o.schedule or defaults["schedule"]
    if schedule == "latin" and getattr(o, "sites", None):
        check_latin_communications(communications, o.sites)
    args: dict[str, Any] = {
        "num_models": defaults["num_models"],
        "num_communications": communications,
        "schedule": schedule,
        "seed": o.seed,
        "visit_epochs": defaults["visit_epochs"] if o.visit_epochs is None else o.visit_epochs,
        "visit_steps": o.visit_steps,
        "lr_schedule": o.lr_schedule,
        "task_timeout": o.task_timeout,
        "validate_timeout": o.task_timeout,
        "startup_grace": 300,
        "max_site_failures": 3,
        "retry_on_free_site": True,
        "optimizer_state": "fresh",
        "min_clients": 1,
        "engine": o.engine,
    }
    return server_config([{"id": "fedcross", "path": "fedseg.fl.fedcross_controller.FedCrossController", "args": args}],
                         server_components(o.engine, cross_site_eval=False))


def job_fedcross(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedcross_server(o, "fedcross"), client_config(o.engine, o.datalist)


def job_fedcrossens(o: argparse.Namespace) -> tuple[dict, dict]:
    return fedcross_server(o, "fedcrossens"), client_config(o.engine, o.datalist)


JOBS: dict[str, Callable[[argparse.Namespace], tuple[dict, dict]]] = {
    "fedavg": job_fedavg,
    "fedprox": job_fedprox,
    "fedsm": job_fedsm,
    "softpull": job_softpull,
    "fedcross": job_fedcross,
    "fedcrossens": job_fedcrossens,
}


def write_job(out_dir: str | os.PathLike, name: str, server: dict, client: dict, min_clients: int, byoc: bool = False) -> Path:
    """Write one job folder atomically (a temp folder renamed into place)."""
    out_dir = Path(out_dir)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / APP / "config").mkdir(parents=True)
    _dump(tmp / "meta.json", meta(name, min_clients))
    _dump(tmp / APP / "config" / "config_fed_server.json", server)
    _dump(tmp / APP / "config" / "config_fed_client.json", client)
    if byoc:
        package = Path(__file__).resolve().parent
        shutil.copytree(package, tmp / APP / "custom" / "fedseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedseg.jobgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write job folders into")
    p.add_argument("--only", nargs="*", choices=sorted(JOBS), help="jobs to write (default: all)")
    p.add_argument("--name", help="job name (only with a single --only job)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--min-clients", type=int, default=2)
    p.add_argument("--engine", type=json.loads, default={}, help="JSON engine settings merged over the defaults")
    p.add_argument("--datalist", default=DEFAULT_DATALIST)
    p.add_argument("--fedprox-mu", type=float, default=0.01)
    p.add_argument("--aggregation", choices=["mean", "median", "trimmed_mean"], default="mean",
                   help="FedAvg/FedProx: weighted mean (FedAvg) or a robust coordinate-wise median / trimmed mean")
    p.add_argument("--max-local-steps", type=int, default=0,
                   help="FedAvg/FedProx: most steps a site trains per round, and so the largest weight it can claim (0: no plan)")
    p.add_argument("--lam", type=float, default=0.7, help="FedSM/SoftPull: weight of a site's own personalized model")
    p.add_argument("--gamma", type=float, default=0.9, help="FedSM: selector confidence needed to use a personalized model")
    p.add_argument("--task-timeout", type=int, default=3600, help="seconds per site task (0: no limit)")
    p.add_argument("--communications", type=int,
                   help=f"FedCross: visits per model (default {FEDCROSS_DEFAULTS['fedcross']['communications']} fedcross, "
                        f"{FEDCROSS_DEFAULTS['fedcrossens']['communications']} fedcrossens); a latin schedule needs a multiple of --sites")
    p.add_argument("--sites", type=int,
                   help="FedCross: the number of sites the job is planned for: a latin schedule's communications are checked "
                        f"against it here (the defaults are whole blocks for {DEFAULT_SITES} sites); the server always checks "
                        "them against the sites connected when the job starts")
    p.add_argument("--schedule", choices=["cyclic", "latin", "random", "explicit"],
                   help="FedCross: site-visit schedule (default cyclic for fedcross, latin for fedcrossens)")
    p.add_argument("--visit-epochs", type=int,
                   help=f"FedCross: epochs per visit (default {FEDCROSS_DEFAULTS['fedcross']['visit_epochs']} fedcross, "
                        f"{FEDCROSS_DEFAULTS['fedcrossens']['visit_epochs']} fedcrossens)")
    p.add_argument("--visit-steps", type=int, default=0, help="FedCross: steps per visit; wins over --visit-epochs when > 0")
    p.add_argument("--lr-schedule", choices=["constant", "poly", "cosine"], default="constant",
                   help="FedCross: lr over each model's visits (default constant, as every other method trains)")
    p.add_argument("--seed", type=int, default=0, help="FedCross: seeds the schedule and the models' initialisation "
                                                      "(model 0 is the persistor's; models m > 0 from member_seed(seed, m))")
    p.add_argument("--byoc", action="store_true", help="copy the fedseg package into the job (app/custom/)")
    p.add_argument("--meter", action="store_true",
                   help="add fedseg.fl.meter.TaskMeter to the sites: bytes, time and peak memory of every task")
    return p


def resolve_engine(overrides: dict) -> dict:
    engine = copy.deepcopy(DEFAULT_ENGINE)
    for key, value in overrides.items():
        if key == "network" and isinstance(value, dict):
            engine["network"] = {**engine["network"], **value}
        else:
            engine[key] = value
    EngineConfig.from_dict(engine)  # fail here, not at the sites
    return engine


def main(argv: list[str] | None = None) -> int:
    o = build_parser().parse_args(argv)
    o.engine = resolve_engine(o.engine)
    names = o.only or sorted(JOBS)
    if o.name and len(names) != 1:
        sys.exit("--name needs exactly one --only job")
    for name in names:
        try:
            server, client = JOBS[name](o)
        except ValueError as e:
            sys.exit(f"jobgen: job {name}: {e}")
        server.setdefault("server", {"task_request_interval": TASK_REQUEST_INTERVAL})
        if o.meter:
            from fedseg.fl.meter import add_meter

            add_meter(client)
        path = write_job(o.out, o.name or name, server, client, o.min_clients, o.byoc)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
