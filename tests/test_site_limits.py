"""A site caps what the server may ask of it (local/fedseg_site.json "limits", safe defaults): a task beyond a cap
fails at that site, naming the site, the setting, the value and the cap, and nothing runs."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ENGINE, copy_job, in_parallel, simulate

from fedseg.fl.site_limits import DEFAULT_LIMITS, TaskRefused, check_task_limits, read_site_limits


def test_defaults_and_the_sites_own_caps(tmp_path):
    assert read_site_limits(str(tmp_path), "site-1") == DEFAULT_LIMITS  # no fedseg_site.json: the defaults
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"limits": {"max_gammas": 3}}))
    assert read_site_limits(str(tmp_path), "site-1") == {**DEFAULT_LIMITS, "max_gammas": 3}
    for bad in ({"max_gammas": -1}, {"max_gammas": 2.5}, {"max_gamas": 3}, {"max_gammas": True}, []):
        (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"limits": bad}))
        with pytest.raises(ValueError, match="limits"):
            read_site_limits(str(tmp_path), "site-1")


@pytest.mark.parametrize(
    "meta, setting, value, cap",
    [
        ({"local_steps": 10**6}, "local_steps", 10**6, "max_local_steps"),
        ({"visit_steps": 10**6}, "visit_steps", 10**6, "max_local_steps"),
        ({"local_epochs": 10**4}, "local_epochs", 10**4, "max_local_epochs"),
        ({"visit_epochs": 10**4}, "visit_epochs", 10**4, "max_local_epochs"),
        ({"num_models": 1000}, "num_models", 1000, "max_models"),
        ({"gammas": [0.5] * 1000}, "number of gammas", 1000, "max_gammas"),
        ({"selector": {"input_size": 8192}}, "selector input_size", 8192, "max_selector_input_size"),
        ({"selector": {"input_size_3d": 1024}}, "selector input_size_3d", 1024, "max_selector_input_size_3d"),
        ({"selector": {"epochs": 10**5}}, "selector epochs", 10**5, "max_selector_epochs"),
    ],
)
def test_a_request_beyond_a_cap_is_refused(meta, setting, value, cap):
    with pytest.raises(TaskRefused) as caught:
        check_task_limits("hospital-a", "some_task", meta, DEFAULT_LIMITS)
    message = str(caught.value)
    assert "hospital-a" in message and setting in message and str(value) in message and cap in message, message
    assert str(DEFAULT_LIMITS[cap]) in message, message


def test_requests_within_the_caps_pass():
    check_task_limits(
        "hospital-a",
        "fedsm_evaluate",
        {"local_steps": 100, "num_models": 4, "gammas": [0.1, 0.5, 0.9], "selector": {"input_size": 64, "epochs": 2}},
        DEFAULT_LIMITS,
    )
    check_task_limits("hospital-a", "train", {"local_steps": None, "gammas": None, "selector": None}, DEFAULT_LIMITS)


def refusal_run(tiny2d, root, site_config: dict, server_args: dict, engine: dict):
    """jobs/fedavg (1 round, no cross-site evaluation) on 2 sites whose own local/fedseg_site.json is site_config."""
    ws = root / "ws"
    (ws / "local").mkdir(parents=True)  # the simulator copies <workspace>/local to every site
    (ws / "local" / "fedseg_site.json").write_text(json.dumps(site_config))
    job = copy_job("fedavg", root / "jobs", server_args={"num_rounds": 1, **server_args}, engine={**TINY_ENGINE, **engine})
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["workflows"] = server["workflows"][:1]
    server_file.write_text(json.dumps(server, indent=2))
    return lambda: simulate(job, ws, tiny2d, n=2, expect_ok=False, timeout=600)


@pytest.fixture(scope="module")
def refusals(tiny2d, tmp_path_factory):
    """Two runs side by side: the server asks 3 local epochs of sites that allow 2; a job without DP at sites that
    require it."""
    root = tmp_path_factory.mktemp("refusals")
    return in_parallel(
        cap=refusal_run(tiny2d, root / "cap", {"limits": {"max_local_epochs": 2}}, {"local_epochs": 3}, {"local_epochs": 1}),
        dp=refusal_run(tiny2d, root / "dp", {"require_dp": True}, {}, {"local_epochs": 1}),
    )


def test_site_refuses_a_task_beyond_its_cap_in_a_run(refusals):
    """Every train task fails at the sites, nothing trains."""
    result = refusals["cap"]
    assert not result.left
    for site in ("site-1", "site-2"):
        log = result.log(site)
        expected = f"REFUSED task train at site {site}: site {site} refuses task train: local_epochs 3 is above this site's cap max_local_epochs = 2"
        assert expected in log, log[-3000:]
        assert " steps, loss " not in log, "a site trained although it refused the task"


def test_a_site_that_requires_dp_refuses_a_job_without_it_in_a_run(refusals):
    """Both sites refuse the job when it starts (their own "require_dp"): every task fails, nothing trains, the
    server's round has no update and its global model is the initial one."""
    result = refusals["dp"]
    assert not result.left
    for site in ("site-1", "site-2"):
        log = result.log(site)
        assert (
            f'REFUSED the job at site {site}: site {site} requires differential privacy ("require_dp": true in its local/fedseg_site.json) '
            'but the job\'s engine has no "dp" setting' in log
        ), log[-3000:]
        assert " steps, loss " not in log, "a site trained although it refused the job"
    history = json.loads((result.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert [r["accepted"] for r in history] == [[]], history
