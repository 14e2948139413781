"""Every job folder runs with the plain `nvflare simulator` command, as an NVFlare user types it.

    PYTHONPATH=custom FEDSEG_DATALIST=<data>/{SITE_NAME}/datalist.json nvflare simulator jobs/<name> -w <fresh workspace> -n 3 -t 3

Nothing is prepared by hand in the workspace (custom/sitecustomize.py writes the simulation's allow-list, see
its docstring). The jobs are copies of jobs/<name> with a tiny budget (1 round, 1 epoch; FedCross 3
communications), the way a user edits the JSON; the command itself is the one above.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import CUSTOM, REPO, copy_job, in_parallel

from fedseg.fl.allowlist import FEDSEG_CLASSES
from fedseg.report import load_results
from fedseg.sim import run_process_tree

NVFLARE = str(Path(sys.executable).parent / "nvflare")  # the `nvflare` of the environment FedSeg is installed in
TINY = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1}
BUDGET = {
    "fedavg": {"num_rounds": 1},
    "fedprox": {"num_rounds": 1},
    "fedsm": {"num_rounds": 1, "selector": {"epochs": 1}},
    "softpull": {"num_rounds": 1},
    "fedcross": {"num_communications": 3, "visit_epochs": 1},
    "fedcrossens": {"num_communications": 3, "visit_epochs": 1},
}


def tiny_job(name: str, dest: Path) -> Path:
    server = json.loads((REPO / "jobs" / name / "app" / "config" / "config_fed_server.json").read_text())
    args = dict(BUDGET[name])
    if "engine" in server["workflows"][0]["args"]:  # the server's copy of the engine settings
        args["engine"] = {**server["workflows"][0]["args"]["engine"], **TINY}
    if "selector" in args:
        args["selector"] = {**server["workflows"][0]["args"]["selector"], **args["selector"]}
    return copy_job(name, dest, server_args=args, engine=TINY)


def plain_simulator(job: Path, workspace: Path, data: Path) -> tuple[int, str]:
    """The command as typed, in a process tree that is always stopped."""
    env = {**os.environ, "PYTHONPATH": str(CUSTOM), "FEDSEG_DATALIST": f"{data}/{{SITE_NAME}}/datalist.json"}
    out = workspace.parent / f"{workspace.name}.out"
    rc, left, _ = run_process_tree(
        [NVFLARE, "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"],
        env,
        out,
        timeout=900,
        cwd=str(workspace.parent),
    )
    assert not left, f"processes left running: {left}"
    return rc, out.read_text(errors="replace")


def error_logs(workspace: Path) -> str:
    return "\n".join(
        f"== {p}\n{p.read_text(errors='replace')}"
        for p in sorted(workspace.rglob("error_log.txt"))
        if p.read_text(errors="replace").strip()
    )


def check_run(name: str, workspace: Path, rc: int, output: str) -> None:
    assert rc == 0, output[-4000:]
    assert not error_logs(workspace), error_logs(workspace)[-4000:]
    assert "ComponentNotAuthorized" not in output and "not in allow_list" not in output
    resources = json.loads((workspace / "local" / "resources.json").read_text())
    assert set(FEDSEG_CLASSES) <= set(resources["class_allow_list"]) and "*" not in resources["class_allow_list"]
    assert not any(e.endswith(".") for e in resources["class_allow_list"])
    results = load_results(workspace, name)
    sites = ["site-1", "site-2", "site-3"]
    scored = [k for k, v in results["models"].items() if isinstance(v, dict) and sorted(v) == sites]
    assert scored, f"{name}: no model scored at every site: {list(results['models'])}"
    for key in scored:
        for site in sites:
            assert 0.0 <= results["models"][key][site]["dice"] <= 1.0


@pytest.mark.parametrize("pair", [("fedavg", "fedprox"), ("fedsm", "softpull"), ("fedcross", "fedcrossens")])
def test_plain_nvflare_simulator_runs_every_job_folder(pair, tiny2d, tmp_path):
    runs = {}
    for name in pair:
        job = tiny_job(name, tmp_path / "jobs")
        workspace = tmp_path / f"ws_{name}"
        assert not workspace.exists()
        runs[name] = lambda job=job, workspace=workspace: plain_simulator(job, workspace, tiny2d)
    outcomes = in_parallel(**runs)
    for name, (rc, output) in outcomes.items():
        check_run(name, tmp_path / f"ws_{name}", rc, output)


def test_an_existing_simulation_policy_is_kept(tmp_path):
    """A workspace with its own resources.json keeps it: the hook only fills an empty local/."""
    import subprocess

    local = tmp_path / "ws" / "local"
    local.mkdir(parents=True)
    own = {"class_allow_list": ["nvflare.app_common.workflows.fedavg.FedAvg"], "class_list_enforcement_mode": "enforce"}
    (local / "resources.json").write_text(json.dumps(own))
    code = f"import sitecustomize as s; print(s.allow_fedseg_in_simulation({str(tmp_path / 'ws')!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(CUSTOM)}, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "None" and json.loads((local / "resources.json").read_text()) == own
    import sitecustomize

    assert sitecustomize.simulator_workspace(["/x/bin/nvflare", "simulator", "jobs/fedsm", "-w", "w1"]) == "w1"
    assert sitecustomize.simulator_workspace(["/x/bin/nvflare", "simulator", "jobs/fedsm", "--workspace=w2"]) == "w2"
    for argv in (["/x/bin/nvflare", "poc", "start"], ["-m", "simulator"], ["server_train.py", "simulator", "-w", "x"]):
        assert sitecustomize.simulator_workspace(argv) is None
