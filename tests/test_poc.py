"""Deployment: POC federation (localhost only), the three submission ways and a recipe run with NVFlare's ProdEnv,
roles and FedSeg's authorization policy (no BYOC, leads manage only their own jobs), signing, privacy scope, GPU
planning, port reservation, provisioning of the real-deployment project, and teardown that leaves nothing behind.

One POC (server + hospital-a/b, hospital-a with the privacy scope on) is shared by the module: 2 hospitals are
enough for every check here (a filtered site beside an unfiltered one, two leads of two orgs). Its port comes from
the tool's range, reserved with its lock files; its finalizer stops it and asserts that no process of it and no
listening port is left, whatever the tests did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, assert_fedavg_result_scored, copy_job

sys.path.insert(0, str(REPO / "poc"))
from poc_federation import flare_api  # noqa: E402
from poc_federation.common import PocError  # noqa: E402
from poc_federation.federation import PocFederation  # noqa: E402
from poc_federation.gpus import plan_gpus, set_gpu_capacity  # noqa: E402
from poc_federation.ports import PORT_RANGE, acquire_port, port_lock_file, release_port, reserve_port  # noqa: E402
from poc_federation.processes import find_processes, is_alive, port_listeners, process_listeners  # noqa: E402
from poc_federation.provision import hospital_names, load_authorization_policy  # noqa: E402

LEAD, MEMBER, ADMIN = "lead@hospital-a.org", "member@hospital-a.org", "admin@fedseg.org"
OTHER_LEAD = "lead@hospital-b.org"
SITES = hospital_names(2)
PRIVATE_SITE = "hospital-a"
FINAL_LAYER = "net.model.2.1.conv.unit0.conv"  # what poc/privacy.json zeroes in FedSeg's UNet
TINY = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1}
JOB_TIMEOUT = 420
SERVER_MODELS = ["SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POC start scripts and process sessions are Linux")


def ss_listeners() -> str:
    """`ss -ltnp` output ('' when ss is not installed): an independent check of listening sockets."""
    if not shutil.which("ss"):
        return ""
    return subprocess.run(["ss", "-ltnp"], capture_output=True, text=True, timeout=30).stdout


def assert_nothing_left(fed: PocFederation, port: int, pids: set[int]) -> None:
    left = fed.processes()
    assert not left, f"processes left behind: {left}"
    alive = [p for p in pids if is_alive(p)]
    assert not alive, f"POC processes still alive: {alive}"
    assert not port_listeners(port), f"port {port} still listening: {port_listeners(port)}"
    ss = ss_listeners()
    assert f":{port} " not in ss, ss
    for pid in pids:
        assert f"pid={pid}," not in ss, ss


# --------------------------------------------------------------------------------------------------
# The shared POC
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    root = tmp_path_factory.mktemp("poc")
    job = copy_job("fedavg", root / "src_jobs", server_args={"num_rounds": 1}, engine=TINY)
    fed = PocFederation(root / "fed")
    port = reserve_port(fed.root)  # the POC tool's own range, locked for this root
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1]
    seen: set[int] = set()
    try:
        fed.prepare(sites=SITES, port=port, size="tiny", gpus="auto", privacy_sites=[PRIVATE_SITE])
        fed.start(timeout=240)
        seen.update(fed.processes())
        yield SimpleNamespace(fed=fed, job=job, port=port, seen=seen)
    finally:
        seen.update(fed.processes())
        left = fed.stop()
        assert not left, f"teardown left processes: {left}"
        assert_nothing_left(fed, port, seen)


@pytest.fixture(scope="module")
def api_job(poc):
    """FedAvg (1 round + cross-site evaluation) submitted by the hospital lead through the FLARE API."""
    result = poc.fed.submit(poc.job, via="api", user=LEAD, timeout=JOB_TIMEOUT)
    poc.seen.update(poc.fed.processes())
    return result


def site_job_log(fed: PocFederation, site: str, job_id: str) -> str:
    path = fed.kit(site) / job_id / "log.txt"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_per_site_results(result_dir: str) -> dict:
    """FLARE's cross-site evaluation: every site scored the global model and every site's model on its own
    test cases; the per-site Dice table (fedseg.report) shows all sites."""
    from fedseg.report import find_results, format_table, load_results

    cse_file = find_results(result_dir)
    assert cse_file.name == "cross_val_results.json", cse_file
    cse = json.loads(cse_file.read_text())
    assert sorted(cse) == SITES, cse
    for scores in cse.values():
        # every site's model and the server's last global model; FedAvgController also has a best model
        assert set(SITES + ["SRV_FL_global_model.pt"]) <= set(scores) <= set(SITES + SERVER_MODELS), scores
        for metrics in scores.values():
            assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_cases"] == 3, metrics
    table = format_table(load_results(result_dir))
    assert all(site in table for site in SITES), table
    return cse


# --------------------------------------------------------------------------------------------------
# POC tests
# --------------------------------------------------------------------------------------------------


def test_poc_listens_on_localhost_only(poc):
    fed = poc.fed
    listeners = fed.check_localhost()  # raises on any non-loopback listener of a POC process
    assert fed.processes() and listeners
    assert any(port == poc.port and addr == "127.0.0.1" for _, addr, port in listeners), listeners
    server_conf = json.loads((fed.kit("server") / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server_conf["service"]["target"] == f"localhost:{poc.port}" and server_conf["admin_server"] == "localhost"
    ss = ss_listeners()
    for pid, _, port in listeners:
        lines = [ln for ln in ss.splitlines() if f"pid={pid}," in ln and f":{port} " in ln]
        if ss:
            assert lines and all(" 127.0.0.1:" in ln or " [::1]:" in ln for ln in lines), (pid, port, ss)
    # HOME was redirected: the nvflare CLI state is inside the POC root
    assert (fed.home / ".nvflare" / "config.conf").exists()


def test_fedavg_through_flare_api(poc, api_job):
    fed = poc.fed
    assert api_job.status == "FINISHED:COMPLETED", api_job
    assert_per_site_results(api_job.result_dir)
    data = fed.state["data"]
    for site in SITES:
        log = site_job_log(fed, site, api_job.job_id)
        # the site found its own folder through local/fedseg_site.json (not the job's $FEDSEG_DATA default)
        assert data[site] == str(fed.root / "data" / site / "datalist.json")
        assert f"site {site}: datalist {data[site]} OK" in log, log[-3000:]
        if fed.state["gpu"]["gpu_ids"]:
            assert "device cuda" in log
        # code-less job: the package came from the site's local/custom, the job carries no code
        kit_code = fed.kit(site) / "local" / "custom"
        assert (kit_code / "fedseg" / "fl" / "executor.py").exists()
        # only the runtime: no benchmark, demo, simulator runner, CLI or POC tooling travels to a hospital
        assert sorted(p.name for p in kit_code.iterdir()) == ["fedseg"]
        tooling = [p for p in kit_code.rglob("*.py") if p.stem in ("bench", "demo", "sim", "cli", "baselines", "poc_env")]
        assert not tooling and not list(kit_code.rglob("bench")), tooling
        app = fed.kit(site) / api_job.job_id / f"app_{site}"
        assert not (app / "custom").exists()
        # signed by the submitter's kit and accepted by a site that requires signed jobs
        assert (app / ".__nvfl_sig.json").exists() and (app / ".__nvfl_submitter.crt").exists()
        assert json.loads((fed.kit(site) / "startup" / "fed_client.json").read_text())["require_signed_jobs"] is True
        err = fed.kit(site) / api_job.job_id / "error_log.txt"
        assert not err.exists() or not err.read_text().strip(), err.read_text()
    stored = Path(api_job.result_dir) / "job" / "fedavg"
    assert (stored / ".__nvfl_sig.json").exists()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((stored / ".__nvfl_submitter.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == LEAD


def test_member_submission_refused_lead_accepted(poc, api_job):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    fed = poc.fed
    staged = fed.root / "jobs" / "fedavg"
    with pytest.raises(AuthorizationError, match=r"member@hospital-a\.org' is not authorized for 'submit_job'"):
        flare_api.submit_job(fed.kit(MEMBER), staged, MEMBER, wait=False)
    job_id, out = fed.console_submit(MEMBER, staged)  # the admin console says the same
    assert job_id is None and "not authorized" in out, out
    # the lead's submission (api_job) was accepted and ran under the lead's name and role
    session = flare_api.open_session(fed.kit(MEMBER), MEMBER)
    try:  # a member may still view
        meta = session.get_job_meta(api_job.job_id)
        assert any(j.get("job_id") == api_job.job_id for j in session.list_jobs())
    finally:
        session.close()
    assert meta["submitter_name"] == LEAD and meta["submitter_role"] == "lead"
    assert meta["status"] == "FINISHED:COMPLETED"


PROBE = """
from pathlib import Path


class Probe:
    def __init__(self, marker):
        Path(marker).write_text("code a job brought ran here")
"""


def test_byoc_job_of_a_lead_is_refused(poc):
    """A lead's job that carries code (app/custom/) is refused at deployment: nobody has the byoc right, and
    the code it brings never runs, on the server or at any site."""
    fed = poc.fed
    marker = fed.root / "byoc_ran"
    job = copy_job("fedavg", fed.root / "src_jobs_byoc", server_args={"num_rounds": 1}, engine=TINY)
    (job / "app" / "custom").mkdir()
    (job / "app" / "custom" / "fedseg_probe.py").write_text(PROBE)
    for side in ("server", "client"):
        config_file = job / "app" / "config" / f"config_fed_{side}.json"
        config = json.loads(config_file.read_text())
        config["components"].append({"id": "probe", "path": "fedseg_probe.Probe", "args": {"marker": str(marker)}})
        config_file.write_text(json.dumps(config, indent=2))
    staged = fed.stage_job(job, name="byoc")
    outcome = flare_api.submit_job(fed.kit(LEAD), staged, LEAD, wait=True, timeout=JOB_TIMEOUT)
    poc.seen.update(fed.processes())
    assert outcome.status == "FINISHED:FAILED_TO_RUN", outcome
    assert not marker.exists(), "code brought by a job ran"
    server_log = (fed.kit("server") / "log.txt").read_text(errors="replace")
    assert "BYOC not permitted" in server_log, server_log[-3000:]
    for site in SITES:
        assert not (fed.kit(site) / outcome.job_id / f"app_{site}" / "custom").exists()


def test_a_lead_cannot_manage_another_leads_job(poc, api_job):
    """lead@hospital-b.org may not abort, delete, clone or download lead@hospital-a.org's job."""
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    session = flare_api.open_session(poc.fed.kit(OTHER_LEAD), OTHER_LEAD)
    try:
        for action in (
            session.abort_job,
            session.delete_job,
            session.clone_job,
            lambda job_id: session.download_job_result(job_id, str(poc.fed.root / "stolen")),
        ):
            with pytest.raises(AuthorizationError, match="not authorized"):
                action(api_job.job_id)
        assert session.get_job_meta(api_job.job_id)["submitter_name"] == LEAD  # viewing is allowed
    finally:
        session.close()
    assert not (poc.fed.root / "stolen").exists()


def test_fedseg_authorization_policy_is_installed_everywhere(poc):
    policy = json.loads((REPO / "poc" / "authorization.json").read_text())
    for name in ["server"] + SITES:
        installed = poc.fed.kit(name) / "local" / "authorization.json"
        assert json.loads(installed.read_text()) == policy, installed
        # provisioning's default stays beside it; NVFlare reads authorization.json first
        assert (poc.fed.kit(name) / "local" / "authorization.json.default").exists()


def test_privacy_scope_filters_what_the_server_receives(poc, api_job):
    import torch
    from nvflare.apis.dxo import from_file

    fed = poc.fed
    assert api_job.status == "FINISHED:COMPLETED"  # the job completes with the filter on
    assert (fed.kit(PRIVATE_SITE) / "local" / "privacy.json").exists()
    logs = {s: site_job_log(fed, s, api_job.job_id) for s in SITES}
    for task in ("train", "submit_model"):
        assert re.search(rf"privacy filter at {PRIVATE_SITE}, task {task}: zeroed 2 tensor\(s\)", logs[PRIVATE_SITE])
    for site in SITES:
        if site != PRIVATE_SITE:
            assert "privacy filter" not in logs[site]

    workspace = Path(api_job.result_dir) / "workspace"
    shared = {s: from_file(str(workspace / "cross_site_val" / "model_shareables" / s)) for s in SITES}
    # what hospital-a sent (its submitted model, as stored by the server) went through the filter
    assert shared[PRIVATE_SITE].get_filter_history() == ["LayerPrivacyFilter"]
    for suffix in ("weight", "bias"):
        assert not np.any(shared[PRIVATE_SITE].data[f"{FINAL_LAYER}.{suffix}"]), "hospital-a's output layer left the site"
    for site in SITES:
        if site != PRIVATE_SITE:
            assert not shared[site].get_filter_history()
            assert np.any(shared[site].data[f"{FINAL_LAYER}.bias"])

    # ... and so did its training update: the new global output layer is the step-weighted average of the
    # other sites' layers with zeros from hospital-a (1 round; unfiltered sites send the same weights twice).
    steps = {}
    for site, log in logs.items():
        m = re.search(r"round 0: (\d+) steps", log)
        assert m, log[-2000:]
        steps[site] = int(m.group(1))
    expected = sum(steps[s] * shared[s].data[f"{FINAL_LAYER}.bias"].astype(np.float64) for s in SITES if s != PRIVATE_SITE)
    expected /= sum(steps.values())
    global_bias = torch.load(workspace / "app_server" / "FL_global_model.pt", weights_only=False)["model"][
        f"{FINAL_LAYER}.bias"
    ]
    np.testing.assert_allclose(np.asarray(global_bias, dtype=np.float64), expected, rtol=1e-4, atol=1e-6)


def test_submit_through_nvflare_job_cli_and_admin_console(poc):
    """Both other submission ways, run concurrently (two jobs at once on the same federation)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        cli = pool.submit(poc.fed.submit, poc.job, via="cli", user=LEAD, timeout=JOB_TIMEOUT, stage_name="fedavg_cli")
        time.sleep(1)
        console = pool.submit(
            poc.fed.submit, poc.job, via="console", user=ADMIN, timeout=JOB_TIMEOUT, stage_name="fedavg_console"
        )
        while not (cli.done() and console.done()):
            poc.seen.update(poc.fed.processes())
            time.sleep(2)
        results = {"cli": cli.result(), "console": console.result()}
    for via, result in results.items():
        assert result.status == "FINISHED:COMPLETED", (via, result)
        assert_per_site_results(result.result_dir)
    assert "nvflare.cli --format json job submit" in (poc.fed.logs / "cli.log").read_text()
    assert "Submitted job: " + results["console"].job_id in (poc.fed.logs / "console.log").read_text()
    assert results["cli"].job_id != results["console"].job_id


def test_fedsm_and_fedcrossens_deploy_the_same_way(poc):
    """The custom controllers' jobs run on the POC exactly like FedAvg: code-less, allow-listed, signed."""
    from concurrent.futures import ThreadPoolExecutor

    from fedseg.report import load_results

    root = poc.fed.root / "src_jobs_custom"
    fedsm_engine = json.loads((REPO / "jobs" / "fedsm" / "app" / "config" / "config_fed_server.json").read_text())
    engine = {**fedsm_engine["workflows"][0]["args"]["engine_config"], **TINY}
    jobs = {
        "fedsm": copy_job("fedsm", root, server_args={"num_rounds": 1, "engine_config": engine}, engine=TINY),
        "fedcrossens": copy_job(
            "fedcrossens",
            root,
            server_args={"num_communications": len(SITES), "engine_config": engine},  # one Latin block
            engine=TINY,
        ),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(poc.fed.submit, job, via="api", user=LEAD, timeout=JOB_TIMEOUT, stage_name=name)
            for name, job in jobs.items()
        }
        while not all(f.done() for f in futures.values()):
            poc.seen.update(poc.fed.processes())
            time.sleep(2)
    expected_model = {"fedsm": "FedSM super model", "fedcrossens": "ensemble"}
    for name, future in futures.items():
        result = future.result()
        assert result.status == "FINISHED:COMPLETED", (name, result)
        record = load_results(result.result_dir)
        assert sorted(record["models"][expected_model[name]]) == SITES, (name, record["models"].keys())


# --------------------------------------------------------------------------------------------------
# A FedSeg recipe executed with NVFlare's ProdEnv against the running federation, as a hospital's study lead does:
# ProdEnv starts nothing, it submits through an admin startup kit (FLARE API: log in, sign the job with the kit's
# certificate, submit, monitor, download).
# --------------------------------------------------------------------------------------------------


def job_ids(fed: PocFederation) -> set[str]:
    """Every job the server knows, as the project admin sees them."""
    session = flare_api.open_session(fed.kit(ADMIN), ADMIN)
    try:
        return {job["job_id"] for job in session.list_jobs() or []}
    finally:
        session.close()


def tiny_recipe(name: str):
    from fedseg.recipes import FedAvgRecipe

    # 1 round: FedAvgController scores the model the sites received, so the round also gives a best model
    engine = {**TINY, "lr": 0.002}
    return FedAvgRecipe(name=name, num_rounds=1, min_clients=len(SITES), engine=engine, task_timeout=600)


def test_lead_runs_fedavg_recipe_with_prodenv_on_a_running_federation(poc):
    from nvflare.apis.job_def import RunStatus
    from nvflare.recipe import ProdEnv

    from fedseg.fl.allowlist import needed_classes, workspace_role

    fed = poc.fed
    job_name = "fedavg_prodenv"
    env = ProdEnv(startup_kit_location=str(fed.kit(LEAD)), username=LEAD, login_timeout=30.0)
    run = tiny_recipe(job_name).execute(env)
    job_id = run.get_job_id()
    result = None
    try:
        result = run.get_result(timeout=JOB_TIMEOUT)  # monitors, then downloads into the lead kit's transfer/
        poc.seen.update(fed.processes())
    finally:
        if result is None:  # not done in time: leave no job running for the next test (Run.abort is a no-op now)
            env.abort_job(job_id)
    status = run.get_status()  # cached by get_result
    assert status == RunStatus.FINISHED_COMPLETED.value, (status, result)
    assert result is not None

    # the job ran under the lead's name and role, signed by the lead's kit, at every site, without code
    session = flare_api.open_session(fed.kit(ADMIN), ADMIN)
    try:
        meta = session.get_job_meta(job_id)
    finally:
        session.close()
    assert (meta["name"], meta["submitter_name"], meta["submitter_role"]) == (job_name, LEAD, "lead"), meta
    for kit in ["server", *SITES]:
        resources = json.loads((fed.kit(kit) / "local" / "resources.json").read_text())
        assert resources["class_list_enforcement_mode"] == "enforce", kit
        assert set(needed_classes(workspace_role(fed.kit(kit)))) <= set(resources["class_allow_list"]), kit
    for site in SITES:
        app = fed.kit(site) / job_id / f"app_{site}"
        assert (app / "config" / "config_fed_client.json").is_file(), sorted(p.name for p in app.parent.iterdir())
        assert not (app / "custom").exists(), f"{site}: the job brought code"
        assert (app / ".__nvfl_sig.json").exists() and (app / ".__nvfl_submitter.crt").exists(), site
        log = site_job_log(fed, site, job_id)
        assert f"site {site}: datalist {fed.state['data'][site]} OK" in log, log[-3000:]

    # the downloaded result: FedAvg's global models and cross-site evaluation with a finite Dice at every site
    result = Path(result)
    assert result.is_relative_to(fed.kit(LEAD)), result
    assert_fedavg_result_scored(result, SITES)


def test_member_cannot_submit_a_recipe_with_prodenv(poc):
    """FedSeg's policy holds for ProdEnv too: a member's kit logs in, but the server refuses the job."""
    from nvflare.recipe import ProdEnv

    fed = poc.fed
    env = ProdEnv(startup_kit_location=str(fed.kit(MEMBER)), username=MEMBER, login_timeout=30.0)
    jobs_before = job_ids(fed)
    with pytest.raises(RuntimeError, match=r"member@hospital-a\.org' is not authorized for 'submit_job'"):
        tiny_recipe("fedavg_by_member").execute(env)
    assert job_ids(fed) == jobs_before  # nothing was stored or scheduled


# --------------------------------------------------------------------------------------------------
# Without a running POC
# --------------------------------------------------------------------------------------------------


def test_real_deployment_project_provisions_every_site_and_admin(tmp_path):
    import yaml
    from cryptography import x509

    project = yaml.safe_load((REPO / "poc" / "project.yml").read_text())
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nvflare.cli",
            "provision",
            "-p",
            str(REPO / "poc" / "project.yml"),
            "-w",
            str(tmp_path / "prov"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    prod = tmp_path / "prov" / project["name"] / "prod_00"
    by_type = {t: [p for p in project["participants"] if p["type"] == t] for t in ("server", "client", "admin")}
    assert len(by_type["client"]) >= 3 and {p.get("role") for p in by_type["admin"]} >= {"project_admin", "lead", "member"}
    server = by_type["server"][0]
    assert "." in server["name"]  # a host name
    conf = json.loads((prod / server["name"] / "startup" / "fed_server.json").read_text())
    assert conf["servers"][0]["service"]["target"] == f"{server['name']}:{server['fed_learn_port']}"
    assert conf["require_signed_jobs"] is True
    for site in by_type["client"]:
        kit = prod / site["name"]
        for f in ("startup/start.sh", "startup/fed_client.json", "startup/client.crt", "startup/rootCA.pem"):
            assert (kit / f).exists(), kit / f
        client_conf = json.loads((kit / "startup" / "fed_client.json").read_text())
        assert client_conf["servers"][0]["service"]["target"] == f"{server['name']}:{server['fed_learn_port']}"
        resources = json.loads((kit / "local" / "resources.json.default").read_text())
        gpu = next(c for c in resources["components"] if c["id"] == "resource_manager")["args"]
        assert gpu["num_of_gpus"] == site["capacity"]["num_of_gpus"] >= 1
        assert gpu["mem_per_gpu_in_GiB"] == site["capacity"]["mem_per_gpu_in_GiB"]
    for admin in by_type["admin"]:
        kit = prod / admin["name"]
        assert (kit / "startup" / "fl_admin.sh").exists()
        admin_conf = json.loads((kit / "startup" / "fed_admin.json").read_text())["admin"]
        assert admin_conf["host"] == server["name"] and admin_conf["port"] == server["fed_learn_port"]
        cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == admin["name"]
        assert cert.subject.get_attributes_for_oid(x509.NameOID.UNSTRUCTURED_NAME)[0].value == admin["role"]
    authz = json.loads((prod / server["name"] / "local" / "authorization.json.default").read_text())["permissions"]
    assert authz["lead"]["submit_job"] == "any" and authz["member"] == {"view": "any"}

    # What docs/deployment.md tells the server's and every hospital's IT to do with a fresh kit: the check finds
    # provisioning's default (leads may bring code, FedSeg's classes not allowed), the two steps fix both.
    tool = [sys.executable, "-m", "fedseg.fl.allowlist"]
    tool_env = dict(env, PYTHONPATH=str(REPO / "custom"))
    for name in [server["name"], *(c["name"] for c in by_type["client"])]:
        kit = prod / name
        out = subprocess.run([*tool, str(kit), "--check"], env=tool_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "['project_admin', 'lead'] have the byoc right" in out.stdout, out.stdout + out.stderr
        assert "FedSeg classes not allowed" in out.stdout, out.stdout
        shutil.copy(REPO / "poc" / "authorization.json", kit / "local" / "authorization.json")
        assert subprocess.run([*tool, str(kit)], env=tool_env, capture_output=True, timeout=120).returncode == 0
        out = subprocess.run([*tool, str(kit), "--check"], env=tool_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def _policy_rights() -> list[str]:
    """Every right NVFlare 2.9 checks against authorization.json: the command categories, the admin commands
    authorized through the policy (not by a fixed role check), byoc, and the Flower right."""
    from nvflare.fuel.hci.reg import CommandModule
    from nvflare.private.fed.server import info_coll_cmd, job_cmds, shell_cmd, sys_cmd, training_cmds
    from nvflare.security.security import COMMAND_CATEGORIES

    rights = {"byoc", "server-predeployed-flwr", "submit_job"}  # submit_job: also checked by sites at deployment
    role_checked = {"must_be_project_admin", "authorize_study_admin", "authorize_list_studies"}
    for module in (info_coll_cmd, job_cmds, shell_cmd, sys_cmd, training_cmds):
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, CommandModule) and cls.__module__ == module.__name__:
                for spec in cls.get_spec(cls.__new__(cls)).cmd_specs:
                    if spec.authz_func and spec.authz_func.__name__ not in role_checked:
                        rights.add(COMMAND_CATEGORIES.get(spec.name, spec.name))
    return sorted(rights)


def test_authorization_policy_is_nvflares_default_without_byoc():
    """FedSeg's policy (poc/authorization.json) grants exactly what NVFlare's provisioned default grants, except
    byoc (and Flower's server-predeployed apps): for every role, every right, own or other org, own or other's job."""
    import yaml
    from nvflare.fuel.sec.authz import AuthzContext, Person
    from nvflare.lighter import templates
    from nvflare.security.security import FLAuthorizer

    default_text = yaml.safe_load((Path(templates.__file__).parent / "master_template.yml").read_text())["default_authz"]
    policy = load_authorization_policy()  # also checks that no role has byoc
    fedseg_authz, default_authz = FLAuthorizer("hospital_a", policy), FLAuthorizer("hospital_a", json.loads(default_text))
    rights = _policy_rights()
    assert {"manage_job", "download_job", "view", "operate", "shell_commands", "clone_job", "byoc"} <= set(rights)
    differences = {}
    for role in ("project_admin", "org_admin", "lead", "member"):
        for right in rights:
            for user_org in ("hospital_a", "hospital_b"):
                for own_job in (True, False):
                    user = Person(f"u@{user_org}.org", user_org, role)
                    submitter = user if own_job else Person("s@hospital_c.org", "hospital_c", "lead")
                    ctx = AuthzContext(right=right, user=user, submitter=submitter)
                    got, default = fedseg_authz.authorize(ctx)[0], default_authz.authorize(ctx)[0]
                    if got != default:
                        differences.setdefault(role, set()).add((right, got))
    assert differences == {"project_admin": {("byoc", False), ("server-predeployed-flwr", False)}, "lead": {("byoc", False)}}, (
        differences
    )
    lead = Person(LEAD, "hospital_a", "lead")
    other = Person(OTHER_LEAD, "hospital_b", "lead")
    assert not fedseg_authz.authorize(AuthzContext("manage_job", user=other, submitter=lead))[0]
    assert fedseg_authz.authorize(AuthzContext("manage_job", user=lead, submitter=lead))[0]
    assert not fedseg_authz.authorize(AuthzContext("submit_job", user=Person(MEMBER, "hospital_a", "member")))[0]


def test_port_reservation_never_hands_out_a_port_twice(tmp_path):
    """Eight processes reserve a port from the same 16 at once: eight different ports; a reserved port is
    refused to another POC root; a stale lock (its process gone, its root gone) is taken over."""
    go = tmp_path / "go"
    code = (
        "import sys, time, pathlib; sys.path[:0] = sys.argv[1:3]; from poc_federation.ports import reserve_port; "
        "print(reserve_port(sys.argv[3], 18960, 18975), flush=True); "
        "[time.sleep(0.1) for _ in range(600) if not pathlib.Path(sys.argv[4]).exists()]"
    )
    roots = [tmp_path / f"root{i}" for i in range(8)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(REPO / "poc"), str(REPO / "custom"), str(r), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in roots
    ]
    try:
        ports = [int(p.stdout.readline()) for p in procs]
        assert len(set(ports)) == 8, ports
        assert not acquire_port(ports[0], tmp_path / "another_root")
    finally:
        go.touch()
        for p in procs:
            p.wait(timeout=60)
    # their processes are gone and their roots never prepared: stale, so a new root may take one over
    assert acquire_port(ports[0], tmp_path / "another_root")
    for root, port in zip([tmp_path / "another_root", *roots[1:]], ports):
        release_port(port, root)
        assert not port_lock_file(port).exists()


def test_privacy_filter_unit():
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.apis.fl_context import FLContext

    from fedseg.fl.privacy import LayerPrivacyFilter

    scope = json.loads((REPO / "poc" / "privacy.json").read_text())
    assert scope["default_scope"] == scope["scopes"][0]["name"] == "hospital_private"
    args = scope["scopes"][0]["task_result_filters"][0]["args"]
    params = {
        f"{FINAL_LAYER}.weight": np.ones((2, 16, 3, 3), np.float32),
        f"{FINAL_LAYER}.bias": np.ones(2, np.float32),
        "net.model.0.conv.unit0.conv.weight": np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16),
    }
    filt = LayerPrivacyFilter(**args, seed=0)
    out = from_shareable(filt.process(DXO(DataKind.WEIGHTS, data=dict(params)).to_shareable(), FLContext()))
    assert not np.any(out.data[f"{FINAL_LAYER}.weight"]) and not np.any(out.data[f"{FINAL_LAYER}.bias"])
    other = out.data["net.model.0.conv.unit0.conv.weight"]
    assert other.dtype == np.float32 and not np.array_equal(other, params["net.model.0.conv.unit0.conv.weight"])
    assert np.abs(other - params["net.model.0.conv.unit0.conv.weight"]).max() < 0.1  # small perturbation
    assert out.get_filter_history() == ["LayerPrivacyFilter"]
    metrics = from_shareable(filt.process(DXO(DataKind.METRICS, data={"dice": 0.5}).to_shareable(), FLContext()))
    assert metrics.data == {"dice": 0.5}
    with pytest.raises(TypeError):
        LayerPrivacyFilter(zero_vars="fc.bias")  # list form only
    # FedSM / FedCross updates: several models under "<group>/" prefixes, optimizer state under "::" keys
    packed = {
        f"global/{FINAL_LAYER}.bias": np.ones(2, np.float32),
        f"model/{FINAL_LAYER}.bias": np.ones(2, np.float32),
        "selector_optim/net.layer.weight::exp_avg_sq": np.full(8, 1e-8, np.float32),
    }
    out = from_shareable(filt.process(DXO(DataKind.WEIGHTS, data=dict(packed)).to_shareable(), FLContext()))
    assert not np.any(out.data[f"global/{FINAL_LAYER}.bias"]) and not np.any(out.data[f"model/{FINAL_LAYER}.bias"])
    assert "selector_optim/net.layer.weight::exp_avg_sq" not in out.data  # the sample scope keeps optimizer state at the site


def test_gpu_plan_and_job_staging(tmp_path):
    sites = hospital_names(3)
    cpu = plan_gpus(sites, [], 0.0)
    assert cpu["gpu_ids"] == [] and cpu["resource_spec"] == {} and cpu["site_capacity"] == {}
    gpu = plan_gpus(sites, [0, 1], 80.0, job_mem_gib=4)
    assert gpu["assignments"] == {"hospital-a": [0], "hospital-b": [1], "hospital-c": [0]}  # round-robin, as poc start -gpu
    assert gpu["site_capacity"]["hospital-b"] == {"num_of_gpus": 1, "mem_per_gpu_in_GiB": 80}
    assert gpu["resource_spec"] == {"@default": {"num_of_gpus": 1, "mem_per_gpu_in_GiB": 4.0}}
    resources = tmp_path / "resources.json"
    resources.write_text(
        json.dumps(
            {
                "components": [
                    {
                        "id": "resource_manager",
                        "path": "nvflare.app_common.resource_managers.gpu_resource_manager.GPUResourceManager",
                        "args": {"num_of_gpus": 0, "mem_per_gpu_in_GiB": 0},
                    }
                ]
            }
        )
    )
    set_gpu_capacity(resources, 1, 80)
    assert json.loads(resources.read_text())["components"][0]["args"]["num_of_gpus"] == 1

    fed = PocFederation(tmp_path / "root")
    fed.state = {"gpu": gpu}
    staged = fed.stage_job(REPO / "jobs" / "fedavg", scope="hospital_private", num_rounds=2)
    meta = json.loads((staged / "meta.json").read_text())
    assert meta["resource_spec"] == gpu["resource_spec"] and meta["scope"] == "hospital_private"
    server = json.loads((staged / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["num_rounds"] == 2
    # CPU-only: the same job runs; a GPU request in a job is dropped from the staged copy
    fed.state = {"gpu": cpu}
    src = copy_job("fedavg", tmp_path / "src")
    meta_file = src / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "resource_spec": {"@default": {"num_of_gpus": 1}}}))
    assert json.loads((fed.stage_job(src) / "meta.json").read_text())["resource_spec"] == {}


@pytest.mark.slow
def test_stop_kills_every_marked_process_and_frees_ports(tmp_path):
    """The teardown on its own: processes that ignore SIGTERM, grandchildren, listeners are all gone."""
    fed = PocFederation(tmp_path / "root")
    fed.state = {"port": reserve_port(fed.root), "sessions": []}
    port = fed.state["port"]
    listener = (
        f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); "
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    )
    tree = f"{sys.executable} -c \"{listener}\" & (trap '' TERM; sleep 600) & sleep 600"
    proc = subprocess.Popen(["bash", "-c", tree], env=fed.env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not port_listeners(port):
            time.sleep(0.2)
        pids = set(fed.processes())
        assert len(pids) >= 4 and proc.pid in pids, pids
        assert process_listeners(pids) and all(addr == "127.0.0.1" for _, addr, _ in process_listeners(pids))
        assert find_processes(tmp_path / "elsewhere") == {}  # another root's processes are not ours
        assert fed.stop(timeout=12) == {}
        assert not port_lock_file(port).exists()  # the port's reservation ends with the POC
        proc.wait(timeout=10)
        assert_nothing_left(fed, port, pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.poc
def test_start_names_the_site_that_never_registers(tmp_path):
    """A site whose kit is broken never registers: start fails within its timeout, naming the missing site and
    showing its log, and stopping leaves nothing behind."""
    fed = PocFederation(tmp_path / "fed")
    port = reserve_port(fed.root)
    seen: set[int] = set()
    try:
        fed.prepare(sites=["hospital-a", "hospital-b"], port=port, size="tiny", gpus="none")
        config = fed.kit("hospital-b") / "startup" / "fed_client.json"
        config.write_text(config.read_text().replace(str(port), str(port + 1)))  # a server nobody runs
        started = time.monotonic()
        with pytest.raises(PocError) as err:
            fed.start(timeout=45)
        seen.update(fed.processes())
        message = str(err.value)
        assert time.monotonic() - started < 45 + 60, message  # one bounded probe past the deadline at most
        assert "did not become ready in time" in message and "missing: hospital-b" in message, message
        assert "registered: hospital-a" in message, message
        assert f"--- {fed.kit('hospital-b') / 'log.txt'} (tail)" in message, message
    finally:
        seen.update(fed.processes())
        assert fed.stop() == {}
        assert_nothing_left(fed, port, seen)


@pytest.mark.poc
def test_run_command_stops_everything_on_ctrl_c(tmp_path):
    """`fedseg_poc.py run` interrupted while its job runs: it aborts, stops every process and exits 130."""
    # rounds enough that the job cannot finish before the interrupt lands, even on a fast machine (30 rounds
    # finished in 65 s on a loaded one, before it); interrupted, the job never runs them
    job = copy_job("fedavg", tmp_path / "src_jobs", server_args={"num_rounds": 400}, engine=TINY)
    root = tmp_path / "run"
    port = reserve_port(root)
    cmd = [
        sys.executable,
        str(REPO / "poc" / "fedseg_poc.py"),
        "--root",
        str(root),
        "run",
        "--sites",
        "2",
        "--size",
        "tiny",
        "--gpus",
        "none",
        "--port",
        str(port),
        "--job",
        str(job),
        "--timeout",
        "300",
    ]
    out_file = tmp_path / "run.out"
    seen: set[int] = set()
    with open(out_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    fed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and "submitted fedavg" not in out_file.read_text():
            time.sleep(0.5)
        assert proc.poll() is None, out_file.read_text()
        fed = PocFederation(root)
        seen.update(fed.processes())
        assert any("server_train" in c for c in fed.processes().values()), fed.processes()
        sent_at = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        rc = proc.wait(timeout=180)
        text = out_file.read_text()
        assert rc == 130, f"exit {rc} ({time.monotonic() - sent_at:.0f}s after the interrupt):\n{text}"
        assert "interrupted" in text and "processes left: 0" in text, text
        assert_nothing_left(PocFederation(root), port, seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        PocFederation(root).stop(timeout=30)  # no-op when the command cleaned up
