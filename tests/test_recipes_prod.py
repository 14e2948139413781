"""A FedSeg recipe executed with NVFlare's ProdEnv against a running federation, as a hospital's study lead does.

ProdEnv starts nothing: it submits the recipe's job to a federation that is already running, through an admin
startup kit (FLARE API: log in, sign the job with the kit's certificate, submit, monitor, download). Here that
federation is a real localhost POC started with the project's own tool (poc/poc_federation, the way
tests/test_poc.py does it): server + 2 hospitals, FedSeg's authorization policy (no BYOC for anyone, leads submit
and manage their own jobs, members only view), signed jobs required, the sites' exact-class allow-lists enforced,
each site's own tiny data. The port comes from the tool's range, reserved with its lock files. The module's
finalizer stops the POC with the tool's stop and asserts that no process and no listening port is left.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO
from nvflare.apis.job_def import RunStatus
from nvflare.recipe import ProdEnv

sys.path.insert(0, str(REPO / "poc"))
from poc_federation import flare_api  # noqa: E402
from poc_federation.federation import PocFederation  # noqa: E402
from poc_federation.ports import PORT_RANGE, reserve_port  # noqa: E402
from poc_federation.processes import is_alive, port_listeners  # noqa: E402
from poc_federation.provision import hospital_names  # noqa: E402

from fedseg.fl.allowlist import needed_classes, workspace_role  # noqa: E402
from fedseg.recipes import FedAvgRecipe  # noqa: E402
from fedseg.report import load_results  # noqa: E402

LEAD, MEMBER, ADMIN = "lead@hospital-a.org", "member@hospital-a.org", "admin@fedseg.org"
SITES = hospital_names(2)
ENGINE = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1, "lr": 0.002}
JOB_TIMEOUT = 900

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POC start scripts and process sessions are Linux")


def job_ids(fed: PocFederation) -> set[str]:
    """Every job the server knows, as the project admin sees them."""
    session = flare_api.open_session(fed.kit(ADMIN), ADMIN)
    try:
        return {job["job_id"] for job in session.list_jobs() or []}
    finally:
        session.close()


def tiny_recipe(name: str) -> FedAvgRecipe:
    return FedAvgRecipe(name=name, num_rounds=2, min_clients=len(SITES), engine=ENGINE, task_timeout=600)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = PocFederation(tmp_path_factory.mktemp("prod") / "fed")
    port = reserve_port(fed.root)  # the POC tool's own range, locked for this root
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1]
    seen: set[int] = set()
    try:
        fed.prepare(sites=SITES, port=port, size="tiny", gpus="auto")
        fed.start(timeout=240)
        seen.update(fed.processes())
        flare_api.open_session(fed.kit(LEAD), LEAD).close()  # the server accepts logins (a fresh one may not yet)
        yield SimpleNamespace(fed=fed, port=port, seen=seen)
    finally:
        seen.update(fed.processes())
        left = fed.stop()
        assert not left, f"teardown left processes: {left}"
        assert not fed.processes()
        alive = [p for p in seen if is_alive(p)]
        assert not alive, f"POC processes still alive: {alive}"
        assert not port_listeners(port), f"port {port} still listening: {port_listeners(port)}"


def test_lead_runs_fedavg_recipe_with_prodenv_on_a_running_federation(federation):
    fed = federation.fed
    job_name = "fedavg_prodenv"
    env = ProdEnv(startup_kit_location=str(fed.kit(LEAD)), username=LEAD, login_timeout=30.0)
    run = tiny_recipe(job_name).execute(env)
    job_id = run.get_job_id()
    result = None
    try:
        result = run.get_result(timeout=JOB_TIMEOUT)  # monitors, then downloads into the lead kit's transfer/
        federation.seen.update(fed.processes())
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
        log = (fed.kit(site) / job_id / "log.txt").read_text(errors="replace")
        assert f"site {site}: datalist {fed.state['data'][site]} OK" in log, log[-3000:]

    # the downloaded result: FedAvg's global models and cross-site evaluation with a finite Dice at every site
    result = Path(result)
    assert result.is_relative_to(fed.kit(LEAD)), result
    assert list(result.rglob("*best_FL_global_model.pt")), sorted(p.name for p in result.rglob("*"))
    results = load_results(result, "fedavg")
    scored = {m: s for m, s in results["models"].items() if isinstance(s, dict) and sorted(s) == SITES}
    assert scored, results["models"]
    for scores in scored.values():
        for site in SITES:
            dice = scores[site]["dice"]
            assert math.isfinite(dice) and 0.0 <= dice <= 1.0, (site, scores)


def test_member_cannot_submit_a_recipe_with_prodenv(federation):
    """FedSeg's policy holds for ProdEnv too: a member's kit logs in, but the server refuses the job."""
    fed = federation.fed
    env = ProdEnv(startup_kit_location=str(fed.kit(MEMBER)), username=MEMBER, login_timeout=30.0)
    jobs_before = job_ids(fed)
    with pytest.raises(RuntimeError, match=r"member@hospital-a\.org' is not authorized for 'submit_job'"):
        tiny_recipe("fedavg_by_member").execute(env)
    assert job_ids(fed) == jobs_before  # nothing was stored or scheduled
