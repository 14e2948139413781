"""fedseg_tools.poc_env.FedSegPocEnv: a FedSeg recipe run in NVFlare's POC environment, localhost only.

The end-to-end test provisions and starts a real POC (server + 2 sites, tiny data), runs FedAvgRecipe through
recipe.execute(env), checks every listening socket while the job runs, reads the downloaded results, and stops
every process in a finally. Its port comes from FedSegPocEnv's own range (19000-19499), reserved with the lock files
of fedseg_tools.localhost_poc, shared with poc/fedseg_poc.py (tests/test_poc.py uses 18500-18999).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import CUSTOM, assert_fedavg_result_scored
from nvflare.apis.job_def import RunStatus

from fedseg.fl.allowlist import needed_classes, workspace_role
from fedseg.recipes import FedAvgRecipe
from fedseg_tools.localhost_poc import (
    acquire_port,
    bind_server_to_localhost,
    localhost_problem,
    release_port,
    reserve_port,
    site_target_problem,
)
from fedseg_tools.poc_env import (
    MARK_ENV,
    PORT_RANGE,
    FedSegPocEnv,
    PocEnvError,
    render_project,
    site_datalists,
    site_pythonpath,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POC start scripts are Linux shell")

ENGINE = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1, "lr": 0.002}
SITES = ["site-1", "site-2"]


# ---- the pieces, on files and values --------------------------------------------------------------------------
def test_project_has_the_server_on_the_port_and_the_given_sites():
    project = render_project(["a-site", "b-site"], 19123)
    server = [p for p in project["participants"] if p["type"] == "server"]
    assert [(s["name"], s["fed_learn_port"]) for s in server] == [("server", 19123)]
    assert "admin_port" not in server[0]  # the admin console shares the FL port
    assert [p["name"] for p in project["participants"] if p["type"] == "client"] == ["a-site", "b-site"]
    assert "admin@nvidia.com" in [p["name"] for p in project["participants"] if p["type"] == "admin"]


def test_server_is_bound_to_localhost(tmp_path):
    startup = tmp_path / "server" / "startup"
    startup.mkdir(parents=True)
    conf = {"servers": [{"name": "p", "service": {"target": "server:19001", "scheme": "http"}, "admin_port": 19001}]}
    (startup / "fed_server.json").write_text(json.dumps(conf))
    bind_server_to_localhost(tmp_path / "server", 19001)
    server = json.loads((startup / "fed_server.json").read_text())["servers"][0]
    assert server["service"] == {"target": "localhost:19001", "scheme": "http"}
    assert (server["admin_server"], server["admin_port"]) == ("localhost", 19001)
    site_startup = tmp_path / "site-1" / "startup"
    site_startup.mkdir(parents=True)
    (site_startup / "fed_client.json").write_text(json.dumps({"servers": [{"service": {"target": "server:19001"}}]}))
    problem = site_target_problem(tmp_path / "site-1", 19001)
    assert problem == f"site-1: {site_startup / 'fed_client.json'} connects to 'server:19001', expected 'localhost:19001'"
    (site_startup / "fed_client.json").write_text(json.dumps({"servers": [{"service": {"target": "localhost:19001"}}]}))
    assert site_target_problem(tmp_path / "site-1", 19001) is None


def test_listeners_off_localhost_or_without_the_server_are_refused():
    ok = [(1, "127.0.0.1", 19001), (2, "127.0.0.1", 40000), (3, "::1", 40001)]
    assert localhost_problem(ok, 19001) is None
    assert "non-loopback" in localhost_problem([*ok, (4, "0.0.0.0", 19001)], 19001)
    assert "non-loopback" in localhost_problem([*ok, (4, "::", 40002)], 19001)
    assert "does not listen on 127.0.0.1:19002" in localhost_problem(ok, 19002)


def test_site_datalists_name_the_site_and_the_missing_file(tmp_path):
    for site in SITES:
        (tmp_path / site).mkdir()
        (tmp_path / site / "datalist.json").write_text("{}")
    paths = site_datalists(f"{tmp_path}/{{SITE_NAME}}/datalist.json", SITES)
    assert paths == {s: tmp_path / s / "datalist.json" for s in SITES}
    assert site_datalists(None, SITES) == {}
    with pytest.raises(PocEnvError, match="site-3: datalist .*site-3/datalist.json does not exist"):
        site_datalists(f"{tmp_path}/{{SITE_NAME}}/datalist.json", [*SITES, "site-3"])
    with pytest.raises(PocEnvError, match=r"sites without a datalist \['site-2'\]"):
        site_datalists({"site-1": tmp_path / "site-1" / "datalist.json"}, SITES)


def test_sites_do_not_import_fedseg_from_this_checkout():
    assert site_pythonpath(os.pathsep.join([str(CUSTOM), "/opt/x"])) == "/opt/x"
    assert site_pythonpath(str(CUSTOM)) is None


def test_a_port_is_reserved_for_one_root_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    port = reserve_port(a, *PORT_RANGE)  # FedSegPocEnv's own range, disjoint from the POC tool's
    assert PORT_RANGE == (19000, 19499) and 19000 <= port <= 19499
    try:
        assert acquire_port(port, a)  # the same root again
        assert not acquire_port(port, b)
    finally:
        release_port(port, a)
    assert acquire_port(port, b)
    release_port(port, b)


def test_stop_ends_every_process_of_the_root_also_without_a_poc(tmp_path):
    """stop() finds the POC's processes by the marker variable (and their children) and ends them when the admin
    shutdown cannot reach a server."""
    env = FedSegPocEnv(workspace=tmp_path / "env", clients=SITES)
    env.stop_wait = 1
    marked = subprocess.Popen(
        ["bash", "-c", "sleep 300 & sleep 300; wait"], env={**os.environ, MARK_ENV: str(env.root)}, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while len(env.processes()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = set(env.processes())
        assert marked.pid in pids and len(pids) == 3, env.processes()
        env.stop()
        marked.wait(timeout=10)
        assert not env.processes()
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        if marked.poll() is None:
            os.killpg(marked.pid, 9)
            marked.wait()


# ---- a recipe in the POC, end to end --------------------------------------------------------------------------
@pytest.mark.poc
def test_fedavg_recipe_runs_in_fedseg_poc_env_on_localhost_only(tiny2d, tmp_path):
    env = FedSegPocEnv(
        workspace=tmp_path / "poc_env", clients=SITES, datalist=f"{tiny2d}/{{SITE_NAME}}/datalist.json", start_timeout=300
    )
    # 1 round: FedAvgController scores the model the sites received, so the round also gives a best model
    recipe = FedAvgRecipe(num_rounds=1, min_clients=2, engine=ENGINE, task_timeout=600)
    seen: dict[int, str] = {}
    listening: set[tuple[int, str, int]] = set()
    pythonpaths: dict[int, str] = {}
    try:
        run = recipe.execute(env)
        port = env.port
        prod = env.prod_dir
        # the kits as deploy prepared them
        for kit in ["server", *SITES]:
            resources = json.loads((prod / kit / "local" / "resources.json").read_text())
            assert set(needed_classes(workspace_role(prod / kit))) <= set(resources["class_allow_list"]), kit
            assert resources["class_list_enforcement_mode"] == "enforce", kit
            assert (prod / kit / "local" / "custom" / "fedseg" / "fl" / "executor.py").is_file(), kit
        for site in SITES:
            site_conf = json.loads((prod / site / "local" / "fedseg_site.json").read_text())
            assert site_conf == {"datalist": str(tiny2d / site / "datalist.json")}
        # while the job runs: every listening socket of every POC process (job processes included) on loopback
        deadline = time.monotonic() + 900
        status = run.get_status()
        while status in (None, RunStatus.SUBMITTED.value, RunStatus.DISPATCHED.value, RunStatus.RUNNING.value):
            assert time.monotonic() < deadline, f"job still {status} after 900 s"
            listeners = env.check_localhost()  # raises on a non-loopback listener
            listening.update(listeners)
            for pid, cmd in env.processes().items():
                seen[pid] = cmd
                try:
                    pythonpaths[pid] = psutil.Process(pid).environ().get("PYTHONPATH", "")
                except psutil.Error:
                    pass
            time.sleep(3)
            status = run.get_status()
        result = run.get_result(timeout=600)  # downloads, copies out of the POC, stops the POC, removes its workspace
        status = run.get_status()
    finally:
        env.stop()
    assert status == RunStatus.FINISHED_COMPLETED.value, status
    assert any(addr == "127.0.0.1" and p == port for _, addr, p in listening), listening
    jobs = {pid: cmd for pid, cmd in seen.items() if "worker_process" in cmd or "runner_process" in cmd}
    assert len(jobs) >= 3, f"the job's server and site processes were not seen: {seen}"
    # fedseg is not installed in the venv and no POC process has this checkout on its PYTHONPATH: the server and
    # the sites ran the copy in their local/custom
    assert set(jobs) <= set(pythonpaths)
    assert not [p for p, path in pythonpaths.items() if str(CUSTOM) in path.split(os.pathsep)], pythonpaths
    # every process of the POC is gone, and nothing listens on its port
    assert not env.processes()
    alive = [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, {p: seen[p] for p in alive}
    assert not [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert not Path(env.poc_workspace).exists()
    # the results, copied out of the POC workspace before it was removed
    result = Path(result)
    assert result.parent == env.root / "results" and result.is_dir()
    assert_fedavg_result_scored(result, SITES)
