"""NVFlare's own stock workflows as peers in the benchmark: CyclicRecipe and FedAvgRecipe on FedSeg's engine.

    results = run_stock("nvflare_cyclic", data_dir, sites, engine_settings, init_ckpt, rounds,
                        local_steps_per_site, seed, out_dir, log=print)

What runs. NVFlare 2.9's recipes, unchanged: nvflare.app_opt.pt.recipes.cyclic.CyclicRecipe (CyclicController:
one model relayed site to site, FIXED order) and nvflare.app_opt.pt.recipes.fedavg.FedAvgRecipe (FedAvg,
weighted by NUM_STEPS_CURRENT_ROUND, IntimeModelSelector on "val_dice"), executed with SimEnv. The sites run
the Client API script fedseg_tools/bench/stock_client.py (in process): FedSeg's SegEngine with the benchmark's
engine settings, a fresh Adam optimizer every visit / round, constant LR, local_steps_per_site[site] steps.

Same footing as FedSeg's methods: the server's persistor is built from the class path
fedseg.engine.networks.SegNetwork + the engine's network arguments and loads `init_ckpt` (absolute path), the
sites read their datalists through FEDSEG_DATALIST=<data_dir>/{SITE_NAME}/datalist.json (as fedseg_tools.sim sets
it), and the budget is the caller's: `rounds` rounds (Cyclic: a round is one visit to every site, in the
order of `sites`, forced with server_config_overrides={"order": sites}; the simulator would otherwise follow
registration order), `local_steps_per_site[site]` steps per visit / round.

Checks. A site that does not ask for its task within task_assignment_timeout is silently skipped by the
CyclicController, and SimEnv can return without error after a failed job: the visits are counted in the
server log AND in the sites' own records, and any difference from the plan raises StockRunError.

Scoring. After the run, in this process (no FLARE): the model the recipe's persistor wrote
(app_server/FL_global_model.pt, "global (last)") and, for FedAvg, the model its IntimeModelSelector kept
(best_FL_global_model.pt, "global (best)": best mean validation Dice of the received models) are scored with
SegEngine.evaluate on every site's testing cases (and validation cases, for the curve's last point). The stock
Cyclic keeps no best model: the last model is reported, and it is the model after the last site's visit.

Processes. SimEnv runs the simulator in the calling process and spawns worker processes (multiprocessing +
setsid'ed client workers), so run_stock runs it in a child process (python -m fedseg_tools.bench.stock --spec ...)
and stops every process of that run (fedseg_tools.sim.ProcessTree: the tree by parent pid plus a marker variable)
when it ends, fails, times out or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

STOCK_METHODS = ("nvflare_cyclic", "nvflare_fedavg")
CLIENT_SCRIPT = Path(__file__).resolve().with_name("stock_client.py")
MODEL_CLASS = "fedseg.engine.networks.SegNetwork"
KEY_METRIC = "val_dice"  # what the Client API script reports on the received model
LAST_MODEL, BEST_MODEL = "global (last)", "global (best)"
HEADLINE_MODEL = {"nvflare_cyclic": LAST_MODEL, "nvflare_fedavg": LAST_MODEL}
DEFAULT_TASK_ASSIGNMENT_TIMEOUT = 60  # s; the recipe's 10 s skips sites that are slow to ask on a loaded machine
DEFAULT_TASK_REQUEST_INTERVAL = 0.5  # s; as fedseg.jobgen's jobs (FLARE's default is 2 s of idle per hand-over)
# server log line of every result the controller received (nvflare/apis/impl/controller.py, _process_result)
_RESULT_LINE = re.compile(r"got result from client (\S+) for task: name=(\S+?),")


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")  # the last line of a traceback
_BEST_LINE = re.compile(r"new best validation metric at round (\d+): (\S+)")


class StockRunError(RuntimeError):
    """The stock run did not do what was planned (failed job, skipped visits, missing model)."""


# ---- the plan (pure) -----------------------------------------------------------------------------------------
def plan_visits(method: str, sites: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, site) of every training task the run must perform, in order for Cyclic (per round: every site
    in the order of `sites`); FedAvg's sites train in parallel, the order inside a round is not fixed."""
    if method not in STOCK_METHODS:
        raise ValueError(f"unknown stock method {method!r}; known: {STOCK_METHODS}")
    if int(rounds) < 1:
        raise ValueError(f"{method}: rounds must be >= 1, got {rounds}")
    if len(sites) < 2 or len(set(sites)) != len(sites):
        raise ValueError(f"{method}: needs at least 2 distinct sites (the recipes require min_clients >= 2), got {sites}")
    return [(r, s) for r in range(int(rounds)) for s in sites]


def check_steps(sites: list[str], local_steps_per_site: dict) -> dict[str, int]:
    missing = sorted(set(sites) - set(local_steps_per_site))
    extra = sorted(set(local_steps_per_site) - set(sites))
    if missing or extra:
        raise ValueError(f"local_steps_per_site must name exactly the sites {sites}: missing {missing}, unknown {extra}")
    steps = {s: int(local_steps_per_site[s]) for s in sites}
    bad = {s: v for s, v in steps.items() if v < 1}
    if bad:
        raise ValueError(f"local_steps_per_site: every site needs >= 1 step, got {bad}")
    return steps


def server_visits(server_log: str, task: str = "train") -> list[str]:
    """Sites whose training result the server received, in log order."""
    return [m.group(1) for m in _RESULT_LINE.finditer(server_log) if m.group(2) == task]


def best_round(server_log: str) -> tuple[int, float] | None:
    """(round, mean validation Dice) of the last "new best" the stock IntimeModelSelector logged, or None."""
    found = _BEST_LINE.findall(server_log)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def visit_problems(method: str, plan: list[tuple[int, str]], logged: list[str], records: list[dict]) -> list[str]:
    """What differs between the planned visits, the results the server logged and the sites' own records."""
    problems = []
    planned_sites = [s for _, s in plan]
    trained = [r for r in sorted(records, key=lambda r: r["t_in"]) if r.get("task") == "train"]
    if len(logged) != len(plan):
        problems.append(
            f"server received {len(logged)} training results, planned {len(plan)} "
            "(a site that did not ask for its task within task_assignment_timeout is skipped)"
        )
    if len(trained) != len(plan):
        problems.append(f"sites recorded {len(trained)} training visits, planned {len(plan)}")
    if method == "nvflare_cyclic":
        if logged != planned_sites:
            problems.append(f"server received results from {logged}, planned in this order: {planned_sites}")
        got = [(r.get("round"), r["site"]) for r in trained]
        if got != list(plan):
            problems.append(f"sites recorded visits (round, site) {got}, planned {list(plan)}")
    else:
        for rnd in sorted({r for r, _ in plan}):
            want = sorted(s for r, s in plan if r == rnd)
            got = sorted(r["site"] for r in trained if r.get("round") == rnd)
            if got != want:
                problems.append(f"round {rnd}: sites {got} trained, planned {want}")
    return problems


def learning_curve(records: list[dict], rounds: int) -> list[tuple[float, float]]:
    """(round / rounds, mean over the round's visits of the validation Dice of the model a site RECEIVED)."""
    by_round: dict[int, list[float]] = {}
    for r in records:
        v = r.get("val_dice")
        if r.get("task") == "train" and r.get("round") is not None and v is not None and math.isfinite(v):
            by_round.setdefault(int(r["round"]), []).append(float(v))
    return [(rnd / max(int(rounds), 1), sum(v) / len(v)) for rnd, v in sorted(by_round.items())]


# ---- the job (runs in the child process) --------------------------------------------------------------------
def build_recipe(spec: dict):
    """The stock recipe of spec["method"], configured only through the recipe's own arguments."""
    method, sites, rounds = spec["method"], list(spec["sites"]), int(spec["rounds"])
    model = {"class_path": MODEL_CLASS, "args": spec["network_args"]}
    common = {
        "name": method,
        "model": model,
        "initial_ckpt": spec["init_ckpt"],
        "num_rounds": rounds,
        "train_script": str(CLIENT_SCRIPT),
        "train_args": f"--config {spec['client_config']}",
    }
    if method == "nvflare_cyclic":
        from nvflare.app_opt.pt.recipes.cyclic import CyclicRecipe

        recipe = CyclicRecipe(
            min_clients=len(sites),
            task_assignment_timeout=int(spec["task_assignment_timeout"]),
            server_config_overrides={"order": sites},
            **common,
        )
    elif method == "nvflare_fedavg":
        from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

        recipe = FedAvgRecipe(min_clients=len(sites), key_metric=KEY_METRIC, **common)
    else:
        raise ValueError(f"unknown stock method {method!r}; known: {STOCK_METHODS}")
    if spec.get("task_request_interval"):
        recipe.add_server_config({"server": {"task_request_interval": float(spec["task_request_interval"])}})
    return recipe


def _child_main(spec_path: str) -> int:
    from nvflare.recipe import SimEnv

    spec = json.loads(Path(spec_path).read_text())
    recipe = build_recipe(spec)
    env = SimEnv(clients=list(spec["sites"]), num_threads=len(spec["sites"]), workspace_root=spec["workspace_root"])
    recipe.run(env)  # SimEnv raises on a non-zero simulator return code
    return 0


# ---- running it ------------------------------------------------------------------------------------------------
def _child_env(data_dir: Path) -> dict:
    from fedseg_tools.sim import package_env

    env = package_env(data_dir)
    env.pop("NVFLARE_SIMULATOR_WORKSPACE_ROOT", None)  # would move the workspace out of out_dir
    return env


def _simulate(spec_file: Path, data_dir: Path, out_file: Path, timeout: float) -> tuple[int, float, list[int], int]:
    """Run the child; (return code or -9 on timeout, seconds, pids still alive after the final kill, processes seen)."""
    from fedseg_tools.sim import run_process_tree

    cmd = [sys.executable, "-m", "fedseg_tools.bench.stock", "--spec", str(spec_file)]
    start = time.perf_counter()
    rc, left, seen = run_process_tree(cmd, _child_env(data_dir), out_file, timeout, cwd=str(spec_file.parent))
    return rc, time.perf_counter() - start, [p.pid for p in left], len(seen)


def read_site_records(workspace: Path, sites: list[str]) -> list[dict]:
    from fedseg_tools.bench.stock_client import VISITS_FILE

    records = []
    for site in sites:
        for path in sorted((workspace / site).rglob(VISITS_FILE)):
            for line in path.read_text().splitlines():
                if line.strip():
                    records.append(json.loads(line))
    return sorted(records, key=lambda r: r["t_in"])


def _errors(workspace: Path, tail: int = 1500) -> str:
    """The exceptions every error log ends with (one line each, first), then each log's tail."""
    causes, tails = [], []
    for path in sorted(workspace.rglob("error_log.txt")):
        text = path.read_text(errors="replace").strip()
        if text:
            where = path.relative_to(workspace).parts[0]
            causes += [f"{where}: {line}" for line in text.splitlines() if _EXCEPTION_LINE.match(line)]
            tails.append(f"== {path.relative_to(workspace)} (last {tail} characters)\n{text[-tail:]}")
    return "\n".join([*dict.fromkeys(causes), *tails])


def load_checkpoint_state(path: Path) -> dict:
    """The state_dict in a checkpoint written by PTFileModelPersistor ({"model": ..., ...}) or by the bench."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)
    return data.get("model", data) if isinstance(data, dict) else data


def site_engines(data_dir: Path, sites: list[str], engine: dict) -> dict:
    from fedseg.data import load_datalist
    from fedseg.engine import EngineConfig, SegEngine

    cfg = EngineConfig.from_dict(engine)
    out = {}
    for site in sites:
        path = data_dir / site / "datalist.json"
        if not path.is_file():
            raise FileNotFoundError(f"[site {site}] no datalist at {path}")
        out[site] = SegEngine(cfg, load_datalist(str(path), site), site=site)
    return out


def score_state(state: dict, engines: dict, section: str = "testing", with_hd95: bool = False) -> dict[str, dict]:
    """{site: {"dice", "dice_std", "n_cases", "dice_per_case", ...}} of one model on every site's section."""
    from fedseg.engine import load_numpy_state

    out = {}
    for site, engine in engines.items():
        net = engine.new_network()
        load_numpy_state(net, state, site)
        result = engine.evaluate(net, section, with_hd95=with_hd95)
        scores = result.summary()
        scores["dice_per_case"] = [float(x) for x in result.case_dice]
        out[site] = scores
    return out


def run_stock(
    method: str,
    data_dir,
    sites: list[str],
    engine_settings: dict,
    init_ckpt,
    rounds: int,
    local_steps_per_site: dict,
    seed: int,
    out_dir,
    log: Callable[[str], None] = print,
    timeout: float = 7200,
    task_assignment_timeout: int = DEFAULT_TASK_ASSIGNMENT_TIMEOUT,
    task_request_interval: float | None = DEFAULT_TASK_REQUEST_INTERVAL,
    with_hd95: bool = False,
) -> dict:
    """Run NVFlare's stock `method` ("nvflare_cyclic" | "nvflare_fedavg") and return its fedseg_results.json record
    (also written to out_dir/<method>/fedseg_results.json). Raises StockRunError when the job failed or a visit is missing.

    data_dir: folder with <site>/datalist.json. sites: the site names (Cyclic's order). engine_settings: the
    benchmark's engine (fedseg.jobgen defaults filled in; "seed" is set to `seed`). init_ckpt: the seeded initial
    network ({"model": state_dict}). rounds: Cyclic rounds (each visits every site once) or FedAvg rounds.
    local_steps_per_site: optimizer steps per visit / round at each site. out_dir: where the run's folder
    out_dir/<method>/ is made (emptied first): fedseg_results.json, the SimEnv workspace sim/<method>/, the spec,
    the sites' config and the child's output <method>.simenv.out."""
    from fedseg.engine.config import resolve_engine

    plan = plan_visits(method, list(sites), rounds)
    steps = check_steps(list(sites), local_steps_per_site)
    data_dir, run_dir = Path(data_dir).resolve(), Path(out_dir).resolve() / method
    init_ckpt = Path(init_ckpt).resolve()
    if not init_ckpt.is_file():
        raise FileNotFoundError(f"{method}: initial checkpoint {init_ckpt} not found")
    engine = resolve_engine({**engine_settings, "seed": int(seed)})
    from fedseg.engine import EngineConfig

    network_args = EngineConfig.from_dict(engine).network_args()
    if re.search(r"\s", str(run_dir)):
        raise ValueError(f"{method}: out_dir {run_dir.parent} contains white space (it is passed in the script's arguments)")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    workspace_root = run_dir / "sim"
    workspace = workspace_root / method
    client_config = run_dir / "stock_client_config.json"
    client_config.write_text(json.dumps({"engine": engine, "local_steps": steps}, indent=2))
    spec = {
        "method": method,
        "sites": list(sites),
        "rounds": int(rounds),
        "network_args": network_args,
        "init_ckpt": str(init_ckpt),
        "client_config": str(client_config),
        "workspace_root": str(workspace_root),
        "task_assignment_timeout": int(task_assignment_timeout),
        "task_request_interval": task_request_interval,
    }
    spec_file = run_dir / "stock_spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))

    log(
        f"{method}: NVFlare stock recipe in SimEnv, {len(sites)} sites x {rounds} rounds, "
        f"steps per visit {steps} ({len(plan)} visits) ..."
    )
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, seconds, left, n_procs = _simulate(spec_file, data_dir, run_dir / f"{method}.simenv.out", timeout)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_log = workspace / "server" / "log.txt"
    logged = server_visits(server_log.read_text(errors="replace")) if server_log.exists() else []
    records = read_site_records(workspace, list(sites))
    problems = [] if rc == 0 else [f"SimEnv child exited with {rc}" + (" (timed out)" if rc == -9 else "")]
    problems += [f"processes still alive after SIGKILL: {left}"] if left else []
    problems += visit_problems(method, plan, logged, records)
    app_server = workspace / "server" / "simulate_job" / "app_server"
    last_file, best_file = app_server / "FL_global_model.pt", app_server / "best_FL_global_model.pt"
    if not last_file.exists():
        problems.append(f"no final model {last_file}")
    if problems:
        out_tail = (run_dir / f"{method}.simenv.out").read_text(errors="replace")[-3000:]
        raise StockRunError(
            f"{method}: " + "; ".join(problems) + f"\nworkspace {workspace}\n"
            f"error logs:\n{_errors(workspace) or '(none)'}\nchild output tail:\n{out_tail}"
        )
    log(f"{method}: {len(logged)} visits done in {seconds:.0f}s; scoring the final model on every site's test cases")

    engines = site_engines(data_dir, list(sites), engine)
    models = {LAST_MODEL: load_checkpoint_state(last_file)}
    if method == "nvflare_fedavg" and best_file.exists():
        models[BEST_MODEL] = load_checkpoint_state(best_file)
    scored = {name: score_state(state, engines, "testing", with_hd95) for name, state in models.items()}
    final_val = {s: v["dice"] for s, v in score_state(models[LAST_MODEL], engines, "validation").items()}
    curve = learning_curve(records, rounds)
    curve.append((1.0, sum(final_val.values()) / len(final_val)))
    trained = [r for r in records if r.get("task") == "train"]
    best = best_round(server_log.read_text(errors="replace")) if method == "nvflare_fedavg" else None
    extra = {
        "workflow": (
            "NVFlare CyclicRecipe (CyclicController, order forced to the site list)"
            if method == "nvflare_cyclic"
            else "NVFlare FedAvgRecipe (FedAvg weighted by NUM_STEPS_CURRENT_ROUND, IntimeModelSelector on val_dice)"
        ),
        "model_selection": (
            "last: the stock CyclicController keeps no best model; the final model is the one after "
            f"the last visit (site {plan[-1][1]})"
            if method == "nvflare_cyclic"
            else "last (FL_global_model.pt) and best (best_FL_global_model.pt, kept by the stock "
            "IntimeModelSelector: the global model sent in round r >= 1 whose mean validation Dice at "
            "the sites was the best; round 0's initial model and the final model are never candidates)"
        ),
        "best_round": best[0] if best else None,
        "best_val_dice_reported": best[1] if best else None,
        "processes_started": n_procs,
        "site_processes": {s: len({r["pid"] for r in trained if r["site"] == s}) for s in sites},
        "site_order": list(sites) if method == "nvflare_cyclic" else None,
        "rounds": int(rounds),
        "local_steps_per_site": steps,
        "local_optimizer": "fresh Adam every visit/round, constant LR",
        "visits": len(trained),
        "seg_steps": int(sum(r.get("steps") or 0 for r in trained)),  # applied (AMP may skip a few)
        "planned_seg_steps": int(sum(steps[s] for _, s in plan)),
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 2),
        "final_validation_dice": final_val,
        "curve": curve,
        "history": [
            {k: r.get(k) for k in ("round", "site", "val_dice", "steps", "skipped", "train_loss", "seconds")} for r in trained
        ],
        "init_ckpt": str(init_ckpt),
        "seed": int(seed),
        "workspace": str(workspace),
    }
    results = {"method": method, "section": "testing", "models": scored, "extra": extra}
    (run_dir / "fedseg_results.json").write_text(json.dumps(results, indent=2))
    return results


def as_method_record(results: dict, plan: dict | None = None) -> dict:
    """The benchmark's per-method record (the keys fedseg_tools.bench.collect.method_record fills) for a stock run."""
    extra = results.get("extra") or {}
    return {
        "method": results["method"],
        "status": "ok",
        "plan": plan or {},
        "results": results,
        "headline_model": HEADLINE_MODEL.get(results["method"]),
        "wall_seconds": extra.get("wall_seconds"),
        "cpu_seconds": extra.get("cpu_seconds"),
        "seg_steps": extra.get("seg_steps"),
        "tasks": extra.get("visits"),
        "curve": [tuple(p) for p in extra.get("curve") or []],
        "traffic": {},
        "memory": {},
        "missing_sites": [],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.stock", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--spec", required=True, help="(internal) the run spec written by run_stock")
    return _child_main(p.parse_args(argv).spec)


if __name__ == "__main__":
    sys.exit(main())
