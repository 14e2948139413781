"""Bench job folders, built from fedseg.jobgen's own workflow and site configurations.

Each method's training workflow is the one `python -m fedseg.jobgen` writes for jobs/<method> (same controller
class and arguments), with the budget of fedseg_tools.bench.budget, the seed, and its own persistor (all persistors
start from the same seeded initial checkpoint). The site configuration is jobgen's client_config (the
SegExecutor with the dataset's engine settings) plus HD95 in evaluations and the TaskMeter filters.

Differences from the shipped job folders, all of them stated in the report:
  * the server's task_request_interval (how long a site waits before asking for its next task; FLARE's default
    is 2 s) is set to the preset's value (0.1 s), and the workflows' task_check_period to 0.1 s: measured in
    the report's FL-overhead section;
  * FedAvg/FedProx/FedBN are scored by BenchGlobalEval instead of FLARE's full cross-site evaluation (which also
    scores every site's local model everywhere): the best-validated global model (FedAvgController's
    fedavg/best.pt, chosen by the median over sites of the validation Dice of the model they received) is
    the headline, as every method's model is its best-validated one; the last model is an extra row; FedBN's
    sites score them with their own normalization (personalized models). FedBN runs only where the dataset's
    engine network has normalization parameters (fedbn_refusal), on that same network as every other method;
  * one learning-rate policy for every method: FedCross/FedCrossEns get the preset's lr_schedule
    ("constant", as every other method trains); FedSM's final scores use its best set where its controller
    has a `final_model` argument;
  * BenchWarmup and BenchMark workflows around the methods (fedseg_tools.bench.flow).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path

from fedseg import jobgen
from fedseg.engine.config import EngineConfig
from fedseg.fl.meter import add_meter
from fedseg_tools.bench.budget import MethodPlan, RunSpec

# The benchmark's workflows and executor: allowed only in the benchmark's own simulator runs (passed to
# fedseg_tools.sim.run_simulator), never at a site. Class paths, not imports: building a job loads no torch.
BENCH_CLASSES = (
    "fedseg_tools.bench.executor.MultiMethodExecutor",
    "fedseg_tools.bench.flow.BenchWarmup",
    "fedseg_tools.bench.flow.BenchMark",
    "fedseg_tools.bench.flow.BenchGlobalEval",
)
MULTI_METHOD_EXECUTOR = BENCH_CLASSES[0]

FLOW = "fedseg_tools.bench.flow"
PERSISTOR = "fedseg.fl.persistor.SegModelPersistor"
FAST_CHECK_PERIOD = 0.1
# outputs a method's workflow writes into the server app dir (moved to bench/<method>/ at its end)
METHOD_OUTPUTS = {
    "fedavg": ["fedavg"],
    "fedprox": ["fedavg"],
    "fedbn": ["fedbn"],
    "fedsm": ["fedsm"],
    "softpull": ["fedsm"],
    "fedcross": ["fedcross"],
    "fedcrossens": ["fedcrossens"],
}
# FedAvg/FedProx: the models BenchGlobalEval scores (files FedAvgController writes under its results_dir)
FEDAVG_MODELS = {"global (best)": "fedavg/best.pt", "global (last)": "fedavg/last.pt"}
# FedBN: the same files under its own folder, each scored by every site with its own normalization
FEDBN_MODELS = {"personalized (best)": "fedbn/best.pt", "personalized (last)": "fedbn/last.pt"}
DEFAULT_LR_SCHEDULE = "constant"


def jobgen_options(engine: dict, seed: int, rounds: int = 1, lr_schedule: str = DEFAULT_LR_SCHEDULE) -> object:
    """jobgen's argparse namespace with its defaults, for the given engine settings (merged over jobgen's)."""
    o = jobgen.build_parser().parse_args(["--out", "unused"])
    o.engine = jobgen.resolve_engine(engine)
    o.seed = int(seed)
    o.rounds = int(rounds)
    o.lr_schedule = lr_schedule
    return o


def controller_arguments(path: str) -> set[str]:
    """The keyword arguments a workflow class accepts (empty when it cannot be imported)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return set()
    return {k for k in inspect.signature(cls.__init__).parameters if k != "self"}


def controller_default(path: str, arg: str):
    """A workflow class's default for one argument (None when unknown)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        param = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters.get(arg)
    except (ImportError, AttributeError):
        return None
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def fedbn_refusal(engine: dict) -> str:
    """Why FedBN cannot run on this engine's network ("" when it can): with no normalization parameters (e.g.
    MONAI's "instance" norm, affine=False) FedBN would be FedAvg under another name."""
    from fedseg.engine.networks import network_norm_keys

    network = EngineConfig.from_dict(jobgen.resolve_engine(engine)).network_args()
    if network_norm_keys(network):
        return ""
    return (
        f"network norm {network.get('norm', 'instance')!r} has no parameters: FedBN would be FedAvg (FedBN keeps the "
        "normalization parameters at the sites; every method runs on the dataset's one network)"
    )


def persistor(cid: str, network: dict, init_ckpt: str, prefix: str) -> dict:
    return {
        "id": cid,
        "path": PERSISTOR,
        "args": {
            "network": network,
            "source_ckpt_file_full_name": str(init_ckpt),
            "global_model_file_name": f"{prefix}_global.pt",
            "best_global_model_file_name": f"{prefix}_best.pt",
        },
    }


def checkpoint_dirs(job: str | os.PathLike) -> list[str]:
    """The folders of the initial checkpoints a bench job's persistors start from: the benchmark, as the server's
    operator of its own simulator runs, allows them (fedseg_tools.sim.run_simulator resume_dirs)."""
    config = json.loads((Path(job) / "app" / "config" / "config_fed_server.json").read_text())
    paths = [c.get("args", {}).get("source_ckpt_file_full_name") for c in config.get("components", [])]
    return sorted({os.path.dirname(os.path.abspath(p)) for p in paths if isinstance(p, str) and p})


def simulate_bench_job(
    job: Path, workspace: Path, data_dir: Path, sites: list[str], timeout: float, extra_classes: tuple[str, ...] = ()
):
    """Run a bench job in the NVFlare simulator, one client per site, with the benchmark's allow-list (and
    extra_classes, e.g. the robustness benchmark's attacker) and its own initial checkpoints allowed
    (fedseg_tools.sim.run_simulator's result)."""
    from fedseg_tools.sim import run_simulator

    return run_simulator(
        job,
        workspace,
        len(sites),
        data_root=data_dir,
        clients=sites,
        timeout=timeout,
        allow_classes=BENCH_CLASSES + tuple(extra_classes),
        resume_dirs=checkpoint_dirs(job),
    )


def label(method: str, seed: int) -> str:
    """The name of one (method, seed) run inside a bench job (its BenchMark label and output folder)."""
    return f"{method}__s{int(seed)}"


def method_workflows(
    method: str,
    plan: MethodPlan,
    engine: dict,
    seed: int,
    task_check_period: float | None,
    evaluate: bool = True,
    name: str | None = None,
    options: dict | None = None,
    lr_schedule: str = DEFAULT_LR_SCHEDULE,
) -> tuple[list, str]:
    """(workflows, persistor id) of one method: jobgen's training workflow under the plan, plus its scoring.
    options: overrides of the training workflow's arguments (e.g. {"lam": 0.5}); an argument the workflow
    class does not take is an error."""
    if method not in jobgen.JOBS:
        raise KeyError(f"fedseg.jobgen has no job {method!r} (JOBS: {sorted(jobgen.JOBS)})")
    name = name or label(method, seed)
    o = jobgen_options(engine, seed, plan.rounds or 1, lr_schedule)
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
    accepted = controller_arguments(workflow["path"])
    if method in ("fedavg", "fedprox", "fedbn"):
        if task_check_period:
            args["task_check_period"] = task_check_period
        if "local_optimizer" in accepted and "local_optimizer" not in args:  # explicit, so the record states it
            args["local_optimizer"] = controller_default(workflow["path"], "local_optimizer")
        if evaluate:
            workflows.append(
                {
                    "id": f"{name}_eval",
                    "path": f"{FLOW}.BenchGlobalEval",
                    "args": {
                        "method": method,
                        "persistor_id": pid,
                        "models": dict(FEDBN_MODELS if method == "fedbn" else FEDAVG_MODELS),
                        "validation_model": "personalized (last)" if method == "fedbn" else "global (last)",
                        **({"keep_local": "norm"} if method == "fedbn" else {}),
                    },
                }
            )
    elif method in ("fedsm", "softpull"):
        args["local_epochs"] = plan.local_epochs
        args["seed"] = int(seed)
        if "final_model" in accepted:
            args["final_model"] = "best"
    elif method in ("fedcross", "fedcrossens"):
        args["results_dir"] = method
        args["lr_schedule"] = lr_schedule
        if task_check_period:
            args["task_check_period"] = task_check_period
    for key, value in (options or {}).items():
        if accepted and key not in accepted:
            raise ValueError(f"{name}: option {key!r} is not an argument of {workflow['path']} ({sorted(accepted)})")
        args[key] = value
    return workflows, pid


def build_job(
    out_dir: str | Path,
    name: str,
    runs: list[tuple[str, int]],
    plans: dict[str, MethodPlan],
    engine: dict,
    inits: dict[int, str | Path],
    hd95: bool = True,
    meter: bool = True,
    task_request_interval: float | None = 0.1,
    task_check_period: float | None = FAST_CHECK_PERIOD,
    warmup: bool = True,
    executor_args: dict | None = None,
    min_clients: int = 1,
    evaluate: bool = True,
    specs: dict[str, RunSpec] | None = None,
    lr_schedule: str = DEFAULT_LR_SCHEDULE,
    executor_path: str | None = None,
) -> Path:
    """A job folder that runs the (key, seed) `runs` one after another; one run = an isolated job.

    key: a RunSpec key of `specs` (its method, protocol and controller options; plans[key] its plan) or, without
    specs, a method name. Each run starts from inits[seed] and uses the seed for its controller (FedCross
    schedule and models, FedSM selector); the sites' engine seed is engine["seed"] for the whole job."""
    specs = specs or {}
    o = jobgen_options(engine, int(engine.get("seed", 0)))
    network = EngineConfig.from_dict(o.engine).network_args()
    first_seed = runs[0][1] if runs else 0
    components = [persistor("persistor", network, inits[first_seed], "init")]
    workflows: list[dict] = []
    if warmup:
        workflows.append({"id": "bench_warmup", "path": f"{FLOW}.BenchWarmup", "args": {"persistor_id": "persistor"}})
    for key, seed in runs:
        spec = specs.get(key) or RunSpec(key, key)
        method = spec.method
        name_ = label(key, seed)
        flows, pid = method_workflows(
            method, plans[key], engine, seed, task_check_period, evaluate, name_, spec.options, lr_schedule
        )
        components.append(persistor(pid, network, inits[seed], name_))
        workflows.append({"id": f"start_{name_}", "path": f"{FLOW}.BenchMark", "args": {"method": name_, "phase": "start"}})
        workflows += flows
        workflows.append(
            {
                "id": f"end_{name_}",
                "path": f"{FLOW}.BenchMark",
                "args": {"method": name_, "phase": "end", "move": METHOD_OUTPUTS.get(method, [])},
            }
        )
    # jobgen's TensorBoard receiver, as in every shipped job
    components += [c for c in jobgen.server_components(o.engine, cross_site_eval=False) if c["id"] != "persistor"]
    server = {
        "format_version": 2,
        "workflows": workflows,
        "components": components,
        "task_data_filters": [],
        "task_result_filters": [],
    }
    if task_request_interval:
        server["server"] = {"task_request_interval": float(task_request_interval)}
    client = jobgen.client_config(o.engine, o.datalist, executor_path=executor_path or MULTI_METHOD_EXECUTOR)
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


def workflow_args(job: Path) -> dict[str, dict]:
    """{run label: the arguments of its training workflow} of a written job (recorded with each run, so the
    report states the settings every number was made with)."""
    server = json.loads((job / jobgen.APP / "config" / "config_fed_server.json").read_text())
    out: dict[str, dict] = {}
    for w in server["workflows"]:
        if w["path"].startswith(FLOW):
            continue
        name = w["id"].rsplit("_", 1)[0]  # "<label>_<jobgen's workflow id>"
        out.setdefault(name, {k: v for k, v in w["args"].items() if k != "engine_config"})
    return out
