"""Bench job folders, built from fedseg.jobgen's own workflow and site configurations.

Each method's training workflow is the one `python -m fedseg.jobgen` writes for jobs/<method> (same controller
class and arguments), with the budget of fedseg.bench.budget, the seed, and its own persistor (all persistors
start from the same seeded initial checkpoint). The site configuration is jobgen's client_config (the
SegExecutor with the dataset's engine settings) plus HD95 in evaluations and the TaskMeter filters.

Differences from the shipped job folders, all of them stated in the report:
  * the server's task_request_interval (how long a site waits before asking for its next task; FLARE's default
    is 2 s) is set to the preset's value (0.1 s), and the workflows' task_check_period to 0.1 s: measured in
    the report's FL-overhead section;
  * FedAvg/FedProx are scored by BenchGlobalEval (the final global model on every site's test cases) instead
    of FLARE's full cross-site evaluation (which also scores every site's local model everywhere), and without
    IntimeModelSelector's best-model file (the benchmark compares the last model of every method);
  * BenchWarmup and BenchMark workflows around the methods (fedseg.bench.flow).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from fedseg import jobgen
from fedseg.bench.budget import MethodPlan
from fedseg.engine.config import EngineConfig
from fedseg.fl.meter import add_meter

FLOW = "fedseg.bench.flow"
PERSISTOR = "fedseg.fl.persistor.SegModelPersistor"
FAST_CHECK_PERIOD = 0.1
# outputs a method's workflow writes into the server app dir (moved to bench/<method>/ at its end)
METHOD_OUTPUTS = {"fedavg": ["fedavg"], "fedprox": ["fedavg"], "fedsm": ["fedsm"], "softpull": ["fedsm"], "fedcross": ["fedcross"], "fedcrossens": ["fedcrossens"]}


def jobgen_options(engine: dict, seed: int, rounds: int = 1) -> object:
    """jobgen's argparse namespace with its defaults, for the given engine settings (merged over jobgen's)."""
    o = jobgen.build_parser().parse_args(["--out", "unused"])
    o.engine = jobgen.resolve_engine(engine)
    o.seed = int(seed)
    o.rounds = int(rounds)
    return o


def persistor(cid: str, network: dict, init_ckpt: str, prefix: str) -> dict:
    return {"id": cid, "path": PERSISTOR, "args": {"network": network, "source_ckpt_file_full_name": str(init_ckpt),
                                                   "global_model_file_name": f"{prefix}_global.pt",
                                                   "best_global_model_file_name": f"{prefix}_best.pt"}}


def label(method: str, seed: int) -> str:
    """The name of one (method, seed) run inside a bench job (its BenchMark label and output folder)."""
    return f"{method}__s{int(seed)}"


def method_workflows(method: str, plan: MethodPlan, engine: dict, seed: int, task_check_period: float | None,
                     evaluate: bool = True, name: str | None = None) -> tuple[list, str]:
    """(workflows, persistor id) of one method: jobgen's training workflow under the plan, plus its scoring."""
    if method not in jobgen.JOBS:
        raise KeyError(f"fedseg.jobgen has no job {method!r} (JOBS: {sorted(jobgen.JOBS)})")
    name = name or label(method, seed)
    o = jobgen_options(engine, seed, plan.rounds or 1)
    if plan.communications:
        o.communications = plan.communications
    if plan.visit_epochs:
        o.visit_epochs = plan.visit_epochs
    server, _ = jobgen.JOBS[method](o)
    workflow = copy.deepcopy(server["workflows"][0])
    pid = f"persistor_{name}"
    args = workflow["args"]
    args["persistor_id"] = pid
    workflow["id"] = f"{name}_{workflow['id']}"
    workflows = [workflow]
    if method in ("fedavg", "fedprox"):
        if task_check_period:
            args["task_check_period"] = task_check_period
        if evaluate:
            workflows.append({"id": f"{name}_eval", "path": f"{FLOW}.BenchGlobalEval",
                              "args": {"method": method, "persistor_id": pid, "model_file": f"{name}_global.pt"}})
    elif method in ("fedsm", "softpull"):
        args["local_epochs"] = plan.local_epochs
        args["seed"] = int(seed)
    elif method in ("fedcross", "fedcrossens"):
        args["output_dir"] = method
        if task_check_period:
            args["task_check_period"] = task_check_period
    return workflows, pid


def build_job(out_dir: str | Path, name: str, runs: list[tuple[str, int]], plans: dict[str, MethodPlan], engine: dict,
              inits: dict[int, str | Path], hd95: bool = True, meter: bool = True, task_request_interval: float | None = 0.1,
              task_check_period: float | None = FAST_CHECK_PERIOD, warmup: bool = True, executor_args: dict | None = None,
              min_clients: int = 1, evaluate: bool = True) -> Path:
    """A job folder that runs the (method, seed) `runs` one after another; one run = an isolated job.

    Each run starts from inits[seed] and uses the seed for its controller (FedCross schedule and models,
    FedSM selector); the sites' engine seed is engine["seed"] for the whole job."""
    o = jobgen_options(engine, int(engine.get("seed", 0)))
    network = EngineConfig.from_dict(o.engine).network_args()
    first_seed = runs[0][1] if runs else 0
    components = [persistor("persistor", network, inits[first_seed], "init")]
    workflows: list[dict] = []
    if warmup:
        workflows.append({"id": "bench_warmup", "path": f"{FLOW}.BenchWarmup", "args": {"persistor_id": "persistor"}})
    for method, seed in runs:
        name_ = label(method, seed)
        flows, pid = method_workflows(method, plans[method], engine, seed, task_check_period, evaluate, name_)
        components.append(persistor(pid, network, inits[seed], name_))
        workflows.append({"id": f"start_{name_}", "path": f"{FLOW}.BenchMark", "args": {"method": name_, "phase": "start"}})
        workflows += flows
        workflows.append({"id": f"end_{name_}", "path": f"{FLOW}.BenchMark",
                          "args": {"method": name_, "phase": "end", "move": METHOD_OUTPUTS.get(method, [])}})
    # jobgen's TensorBoard receiver, as in every shipped job
    components += [c for c in jobgen.server_components(o.engine, cross_site_eval=False) if c["id"] != "persistor"]
    server = {"format_version": 2, "workflows": workflows, "components": components,
              "task_data_filters": [], "task_result_filters": []}
    if task_request_interval:
        server["server"] = {"task_request_interval": float(task_request_interval)}
    client = jobgen.client_config(o.engine, o.datalist)
    executor = client["executors"][0]["executor"]["args"]
    if hd95:
        executor["hd95"] = True
    executor.update(executor_args or {})
    if meter:
        add_meter(client)
    return jobgen.write_job(out_dir, name, server, client, min_clients)


def save_initial_checkpoint(path: str | Path, engine: dict, seed: int) -> Path:
    """The seeded initial network every method of a (dataset, seed) cell starts from."""
    import torch

    from fedseg.engine.networks import SegNetwork

    network = EngineConfig.from_dict(jobgen.resolve_engine(engine)).network_args()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        net = SegNetwork(**network)
    finally:
        torch.random.set_rng_state(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict()}, path)
    return path


def load_initial_state(path: str | Path) -> dict:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    return data.get("model", data)


def describe(job: Path) -> dict:
    """Workflow ids of a written job (for the run record)."""
    server = json.loads((job / jobgen.APP / "config" / "config_fed_server.json").read_text())
    return {"workflows": [w["id"] for w in server["workflows"]]}
