"""fedseg.recipes: lossless components, argument checks, and each recipe run to completion with SimEnv."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CUSTOM, in_parallel
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from fedseg.fl.allowlist import FEDSEG_CLASSES
from fedseg.recipes import FedAvgRecipe, FedCrossRecipe, FedProxRecipe, FedSMRecipe, RecipeError
from fedseg.report import load_results
from fedseg_tools.sim import run_process_tree

ENGINE = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1, "lr": 0.002}
SITES = ["site-1", "site-2"]  # the SimEnv runs: 2 sites are enough to aggregate, route and travel


# ---- every FedSeg component keeps its constructor arguments: FedJob's export reproduces them ------------------------
def nondefault_components() -> dict[str, tuple[object, dict]]:
    from fedseg.fl.executor import FedCrossExecutor, FedSMExecutor, SegExecutor
    from fedseg.fl.fedavg_controller import FedAvgController
    from fedseg.fl.fedcross_controller import FedCrossController
    from fedseg.fl.fedsm_controller import FedSMController
    from fedseg.fl.meter import TaskMeter
    from fedseg.fl.persistor import SegModelPersistor
    from fedseg.fl.privacy import LayerPrivacyFilter

    executor = {
        "datalist": "/data/{SITE_NAME}/list.json",
        "engine": {"lr": 0.01, "roi_size": [32, 32]},
        "validate_before_train": False,
        "eval_section": "validation",
        "tb_writer_id": "writer",
        "method_args": {"local_epochs": 2},
        "hd95": True,
    }
    base = {
        "min_clients": 2,
        "task_timeout": 10,
        "startup_grace": 20,
        "max_update_ratio": 5.0,
        "persistor_id": "p2",
        "task_check_period": 0.25,
    }
    args = {
        "fedseg.fl.executor.SegExecutor": (SegExecutor, executor),
        "fedseg.fl.executor.FedSMExecutor": (FedSMExecutor, {**executor, "datalist": "/d2/{SITE_NAME}.json"}),
        "fedseg.fl.executor.FedCrossExecutor": (FedCrossExecutor, {**executor, "tb_writer_id": "w2"}),
        "fedseg.fl.fedavg_controller.FedAvgController": (
            FedAvgController,
            {
                **base,
                "num_rounds": 3,
                "fedprox_mu": 0.1,
                "local_epochs": 2,
                "local_steps": 5,
                "max_local_steps": 7,
                "max_weight_ratio": 2.0,
                "aggregation": "median",
                "trim_fraction": 0.1,
                "local_optimizer": "keep",
                "keep_local": "norm",
                "max_failed_rounds": 2,
                "resume_from": "r.pt",
                "results_dir": "out",
            },
        ),
        "fedseg.fl.fedsm_controller.FedSMController": (
            FedSMController,
            {
                **base,
                "num_rounds": 3,
                "lam": 0.5,
                "gamma": 0.8,
                "use_selector": False,
                "selector": {"epochs": 1},
                "engine_config": {"lr": 0.01},
                "local_epochs": 2,
                "local_steps": 3,
                "eval_timeout": 11,
                "max_failed_rounds": 2,
                "aggregation": "median",
                "max_weight_ratio": 2.0,
                "sites": ["a", "b"],
                "resume_from": "r.pt",
                "start_round": 2,
                "seed": 3,
                "final_model": "last",
            },
        ),
        "fedseg.fl.fedcross_controller.FedCrossController": (
            FedCrossController,
            {
                **base,
                "num_models": 2,
                "num_communications": 4,
                "schedule": "explicit",
                "explicit_schedule": [["a", "b"]],
                "seed": 3,
                "visit_epochs": 2,
                "visit_steps": 5,
                "lr_schedule": "poly",
                "lr": 0.01,
                "lr_power": 0.5,
                "validate_timeout": 9,
                "max_site_failures": 2,
                "rejoin_after": 1,
                "retry_on_free_site": False,
                "optimizer_state": "travel",
                "engine_config": {"lr": 0.01},
                "resume_from": "r.pt",
                "final_section": "validation",
                "results_dir": "out",
            },
        ),
        "fedseg.fl.persistor.SegModelPersistor": (
            SegModelPersistor,
            {
                "network": {"arch": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8]},
                "source_ckpt_file_full_name": "/srv/ckpt.pt",
                "seed": 3,
                "global_model_file_name": "g.pt",
                "best_global_model_file_name": "b.pt",
            },
        ),
        "fedseg.fl.privacy.LayerPrivacyFilter": (
            LayerPrivacyFilter,
            {
                "zero_vars": ["a\\.b"],
                "noise_vars": [".*"],
                "noise_std": 0.1,
                "seed": 1,
                "optimizer_state": "drop",
                "share_per_case": True,
                "share_case_names": True,
                "data_kinds": ["WEIGHTS"],
            },
        ),
        "fedseg.fl.meter.TaskMeter": (TaskMeter, {"direction": "in", "file_name": "m.jsonl", "serialize": False}),
    }
    return {path: (cls(**kwargs), kwargs) for path, (cls, kwargs) in args.items()}


def exported_args(app_dir: Path) -> dict[str, dict]:
    server = json.loads((app_dir / "config" / "config_fed_server.json").read_text())
    client = json.loads((app_dir / "config" / "config_fed_client.json").read_text())
    found = {}
    for item in server["workflows"] + server["components"] + client["components"]:
        found[item["path"]] = item["args"]
    for item in client["executors"]:
        found[item["executor"]["path"]] = item["executor"]["args"]
    for chain in client["task_data_filters"] + client["task_result_filters"]:
        for f in chain["filters"]:
            found[f["path"]] = f["args"]
    return found


def test_fedjob_export_reproduces_every_component_argument(tmp_path):
    components = nondefault_components()
    assert set(components) == set(FEDSEG_CLASSES) - {"fedseg.fl.tracking.MLflowServerReceiver"}
    job = FedJob(name="lossless", min_clients=1)
    job.set_app_packages(["fedseg"])
    for i, (path, (obj, _)) in enumerate(components.items()):
        if path.endswith("Controller") or path.endswith("Persistor"):
            job.to_server(obj, id=f"c{i}")
        elif path.endswith("Executor"):
            job.to_clients(obj, tasks=[f"task{i}"])
        else:
            job.to_clients(obj, filter_type=FilterType.TASK_RESULT, tasks=[f"task{i}"])
    job.export_job(str(tmp_path))
    exported = exported_args(tmp_path / "lossless" / "app")
    for path, (_, given) in components.items():
        assert exported[path] == given, path


# ---- arguments are checked when the recipe is built ------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FedCrossRecipe(num_models=4, sites=4, num_communications=10), "not a multiple"),
        (lambda: FedCrossRecipe(num_models=3), "num_models must be 1"),
        (lambda: FedCrossRecipe(num_models=5, sites=4), "more than the 4 sites"),
        (lambda: FedSMRecipe(lam=1.5), "lam must be a number in"),
        (lambda: FedSMRecipe(softpull_only=True, selector={"epochs": 1}), "only without softpull_only"),
        (lambda: FedSMRecipe(selector={"epoch": 1}), "unknown selector setting"),
        (lambda: FedAvgRecipe(engine={"roi_size": [32, 32, 32]}), "FedAvgRecipe: engine: roi_size"),
        (lambda: FedAvgRecipe(engine={"lrr": 0.1}), "unknown engine setting"),
        (lambda: FedAvgRecipe(tracking="wandb"), "tracking must be one of"),
        (lambda: FedAvgRecipe(num_rounds=0), "num_rounds must be an integer >= 1"),
        (lambda: FedProxRecipe(fedprox_mu=0), "fedprox_mu must be > 0"),
    ],
)
def test_recipes_refuse_bad_arguments_with_the_argument_named(make, message):
    with pytest.raises(RecipeError, match=message):
        make()


def test_recipes_name_their_method_and_executor(tmp_path):
    cases = {
        "fedsm": (FedSMRecipe(), "FedSMExecutor", True),
        "softpull": (FedSMRecipe(softpull_only=True), "FedSMExecutor", False),
        "fedcross": (FedCrossRecipe(), "FedCrossExecutor", 1),
        "fedcrossens": (FedCrossRecipe(num_models=4, sites=4), "FedCrossExecutor", 4),
    }
    for name, (recipe, executor, flag) in cases.items():
        assert recipe.name == name
        recipe.export(str(tmp_path))
        app = tmp_path / name / "app"
        assert not (app / "custom").exists()  # the package is installed at the sites, not shipped (no BYOC)
        client = json.loads((app / "config" / "config_fed_client.json").read_text())
        server = json.loads((app / "config" / "config_fed_server.json").read_text())
        assert client["executors"][0]["executor"]["path"] == f"fedseg.fl.executor.{executor}"
        args = server["workflows"][0]["args"]
        assert args.get("use_selector", args.get("num_models")) == flag
    mlflow = FedAvgRecipe(tracking="mlflow", cross_site_eval=False)
    mlflow.export(str(tmp_path / "ml"))
    server = json.loads((tmp_path / "ml" / "fedavg" / "app" / "config" / "config_fed_server.json").read_text())
    assert [c["path"] for c in server["components"]] == [
        "fedseg.fl.persistor.SegModelPersistor",
        "fedseg.fl.tracking.MLflowServerReceiver",
    ]


# ---- each recipe runs to completion in SimEnv (a job.py as a user writes it) ------------------------------------------
JOB_PY = """
from nvflare.recipe import SimEnv
from fedseg.recipes import {cls}

recipe = {cls}({args})
run = recipe.execute(SimEnv(num_clients={n}, num_threads={n}, workspace_root={root!r}))
print("RESULT", run.get_result())
"""


def run_job_py(tmp_path: Path, tiny2d: Path, label: str, cls: str, args: str) -> tuple[int, str, Path]:
    script = tmp_path / f"job_{label}.py"
    root = tmp_path / f"sim_{label}"
    script.write_text(textwrap.dedent(JOB_PY.format(cls=cls, args=args, n=len(SITES), root=str(root))))
    env = {**os.environ, "PYTHONPATH": str(CUSTOM), "FEDSEG_DATALIST": f"{tiny2d}/{{SITE_NAME}}/datalist.json"}
    env.pop("NVFLARE_SIMULATOR_WORKSPACE_ROOT", None)
    out = tmp_path / f"job_{label}.out"
    rc, left, _ = run_process_tree([sys.executable, str(script)], env, out, timeout=900, cwd=str(tmp_path))
    assert not left, f"processes left running: {left}"
    return rc, out.read_text(errors="replace"), root


def check_sim(label: str, name: str, rc: int, output: str, root: Path) -> dict:
    workspace = root / name
    assert rc == 0, output[-4000:]
    errors = "\n".join(p.read_text() for p in workspace.rglob("error_log.txt") if p.read_text().strip())
    assert not errors, errors[-4000:]
    assert f"RESULT {workspace}" in output
    results = load_results(workspace, name)
    scored = {k: v for k, v in results["models"].items() if isinstance(v, dict) and sorted(v) == SITES}
    assert scored, f"{label}: no model scored at every site: {list(results['models'])}"
    for scores in scored.values():
        assert all(0.0 <= scores[s]["dice"] <= 1.0 for s in SITES)
    return results


ENGINE_ARG = f"engine={ENGINE!r}, min_clients={len(SITES)}"
RUNS = {  # the smallest budgets that still run each method's workflow through (FedCross: every site trains once)
    "fedavg": ("FedAvgRecipe", f"num_rounds=1, {ENGINE_ARG}", "fedavg"),
    "fedsm": ("FedSMRecipe", f"num_rounds=1, selector={{'epochs': 1}}, {ENGINE_ARG}", "fedsm"),
    "fedcross": ("FedCrossRecipe", f"num_communications={len(SITES)}, visit_epochs=1, {ENGINE_ARG}", "fedcross"),
    "fedcrossens": (
        "FedCrossRecipe",
        f"num_models={len(SITES)}, sites={len(SITES)}, num_communications={len(SITES)}, visit_epochs=1, {ENGINE_ARG}",
        "fedcrossens",
    ),
}


@pytest.mark.parametrize("pair", [("fedavg", "fedsm"), ("fedcross", "fedcrossens")])
def test_each_recipe_runs_to_completion_in_simenv(pair, tiny2d, tmp_path):
    outcomes = in_parallel(
        **{label: (lambda label=label: run_job_py(tmp_path, tiny2d, label, *RUNS[label][:2])) for label in pair}
    )
    for label, (rc, output, root) in outcomes.items():
        name = RUNS[label][2]
        results = check_sim(label, name, rc, output, root)
        # the recipe wrote FedSeg's allow-list into the workspace it created (exact classes, enforced)
        resources = json.loads((root / name / "local" / "resources.json").read_text())
        assert set(FEDSEG_CLASSES) <= set(resources["class_allow_list"])
        assert resources["class_list_enforcement_mode"] == "enforce"
        if name == "fedsm":
            assert any("super" in k for k in results["models"]), list(results["models"])
        if name == "fedcrossens":
            assert any("ensemble" in k for k in results["models"]), list(results["models"])
