"""Faults a federation survives, measured in real NVFlare simulator runs (3 sites, one worker process each):

(a) a site's process is killed with SIGKILL in the middle of a training task: the job completes with the
    others and nothing the dead site could have sent touches a model;
(b) the server is killed mid-job (SIGKILL of the simulator's whole process tree) and a new job resumes from
    its last.pt: it starts at the next round, with the history and the best-model tracking intact;
(c) a site fails for two rounds and is used again afterwards (FedCross: left out, then tried again);
(d) a site whose job process comes up late joins from the next round.

About (d): the simulator registers every site with the server before the job starts, and FLARE fixes a job's
participants when it is deployed, so a site cannot enter the participant list later. What does happen is a
participant whose job process comes up late (slow storage, a busy machine): the test's executor holds the
site's START_RUN set-up until the test releases it, after round 0 has ended without the site.

Plus the pure site bookkeeping (fedseg.fl.site_health.plan_round, fedseg.fl.site_health.SiteHealth,
schedules over a changing site list) tested directly.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import JOBS, TINY_ENGINE, copy_job, set_executor_path, simulate

from fedseg.algorithms.schedules import assign
from fedseg.fl.site_health import SiteHealth, plan_round
from fedseg.modelset import load_members, load_model_set

FAULTY = "fedseg_faults.FaultySegExecutor"
SITES = ["site-1", "site-2", "site-3"]
ENGINE = {**TINY_ENGINE, "local_epochs": 1}
FEDSM_OUT = Path("app_server") / "fedsm"
CROSS_OUT = Path("app_server") / "fedcross"


# ---- pure bookkeeping ----------------------------------------------------------------------------------------
def test_plan_round_keeps_classes_and_names_outsiders():
    assert plan_round(["site-1", "site-2"], ["site-3", "site-2", "site-1"]) == (["site-1", "site-2"], ["site-3"], [])
    assert plan_round(["site-1", "site-2", "site-3"], ["site-3", "site-1"]) == (["site-1", "site-3"], [], ["site-2"])
    assert plan_round(["a"], []) == ([], [], ["a"])


def test_site_health_counts_failed_communications_in_a_row():
    h = SiteHealth(max_failures=3, rejoin_after=2)
    h.start(0, SITES)
    assert not h.failed("site-2", 0) and not h.failed("site-2", 0, validation=True)  # once per communication
    h.tasked(SITES)
    assert h.finish() == [] and h.failures == {"site-1": 0, "site-2": 1, "site-3": 0}
    h.start(1, SITES)
    assert not h.failed("site-2", 1)
    h.tasked(["site-1"])
    h.finish()
    assert h.failures["site-2"] == 2  # site-2 had no successful task: the count stands
    h.start(2, SITES)
    h.tasked(["site-2"])
    assert h.finish() == ["site-2"] and h.failures["site-2"] == 0  # a success resets it
    for c in (3, 4):
        h.start(c, SITES)
        assert not h.failed("site-2", c)
        h.finish()
    h.start(5, SITES)
    assert h.failed("site-2", 5) and h.dropped == ["site-2"] and h.dropped_at == {"site-2": 5}
    h.finish()
    # left out in 5; sits out 6 and 7 (rejoin_after=2); back in 8 if connected, one failure from leaving again
    assert h.start(6, SITES) == [] and h.start(7, SITES) == []
    assert h.start(8, ["site-1"]) == []  # not connected: stays out
    assert h.start(9, SITES) == ["site-2"] and h.dropped == [] and h.failures["site-2"] == 2
    assert h.failed("site-2", 9) and h.dropped_at == {"site-2": 9}


def test_site_health_a_single_missed_validation_never_drops():
    h = SiteHealth(max_failures=1, rejoin_after=0)
    h.start(0, SITES)
    assert not h.failed("site-3", 0, validation=True)  # even with max_failures=1
    h.finish()
    h.start(1, SITES)
    assert h.failed("site-3", 1, validation=True)  # the second one in a row does
    h.start(2, SITES)
    assert h.failed("site-1", 2)  # a failed visit counts fully
    restored = SiteHealth(1, 0)
    restored.restore(h.state())
    assert restored.dropped_at == h.dropped_at and restored.failures == h.failures
    old = SiteHealth(3, 3)
    old.restore({"communication": 4, "dropped_sites": ["site-2"]})  # a checkpoint written before these fields
    assert old.dropped_at == {"site-2": 4} and old.failures == {}


def test_latin_schedule_restarted_over_a_changed_site_list_visits_every_site():
    """What FedCross does when its active sites change at communication c0: assign() over the new list with
    the communication counted from c0, so the next N communications form a full Latin block again."""
    for sites in (["site-1", "site-3"], ["site-1", "site-2", "site-3", "site-4"]):
        rows = [assign("latin", sites, 2, c, seed=0) for c in range(len(sites))]
        for m in range(2):
            assert sorted(r[m] for r in rows) == sorted(sites)
        assert all(len(set(r)) == 2 for r in rows)
    # 3 models over 2 sites: one sits out per communication, each model trains 2 of every 3 communications
    rows = [assign("latin", ["site-1", "site-3"], 3, c, seed=0) for c in range(3)]
    assert [sum(r[m] is not None for r in rows) for m in range(3)] == [2, 2, 2]


# ---- running, killing and watching simulator runs ------------------------------------------------------------
def tree_of(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = {p.pid: p for p in procs}
    for p in procs:
        try:
            out.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(out.values())


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sigkill(procs: list[psutil.Process]) -> None:
    """SIGKILL, then wait until each is gone or a zombie. Never reap (psutil.wait_procs would): the simulator is
    a child of this process, and if it were reaped here its Popen.wait() in fedseg_tools.sim would report 0."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    end = time.monotonic() + 10
    while any(alive(p) for p in procs) and time.monotonic() < end:
        time.sleep(0.1)


def processes_with(module: str, flag: str, value: Path) -> list[psutil.Process]:
    """Processes running `module` with `flag value` on their command line, value exactly (the values are this
    test's own workspaces, so no other run is ever touched)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if module in argv and any(a == flag and b == str(Path(value).resolve()) for a, b in zip(argv, argv[1:])):
            found.append(p)
    return found


RUN_ENV = "FEDSEG_FAULT_TEST_WS"  # every process of a test's run carries its workspace in this variable


def processes_of(workspace: Path) -> list[psutil.Process]:
    """Every process of the run in `workspace`: by the variable it inherited, and by command line."""
    found = {p.pid: p for p in processes_with("nvflare.cli", "-w", workspace)}
    for p in psutil.process_iter():
        try:
            if p.environ().get(RUN_ENV) == str(workspace.resolve()):
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def kill_run(workspace: Path) -> None:
    """SIGKILL a whole simulator run: the simulator, its workers (sessions of their own) and everything under
    them, until none is left."""
    for _ in range(5):
        procs = [p for p in tree_of(processes_of(workspace)) if alive(p)]
        if not procs:
            return
        sigkill(procs)
    raise RuntimeError(f"processes of the run in {workspace} survive SIGKILL: {[p.pid for p in procs]}")


def site_worker(workspace: Path, site: str) -> list[psutil.Process]:
    """The simulator's worker process of one site (it runs that site's client and its job)."""
    return processes_with("nvflare.private.fed.app.simulator.simulator_worker", "-o", workspace / site)


class Background:
    """A simulator run in a thread; kill() SIGKILLs every process of it (kill_run)."""

    def __init__(self, name: str, workspace: Path, run):
        self.name, self.workspace = name, workspace
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(run,), name=name, daemon=True)
        self.thread.start()

    def _run(self, run):
        try:
            self.result = run()
        except BaseException as e:  # noqa: BLE001 (re-raised by get())
            self.error = e

    def kill(self) -> None:
        kill_run(self.workspace)

    def get(self, timeout: float = 900):
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.kill()
            self.thread.join(60)
            raise TimeoutError(f"{self.name}: simulator run still going after {timeout}s")
        if self.error:
            raise self.error
        return self.result


def run_all(starters: dict, until: dict | None = None, limit: float = 900) -> dict:
    """Start every run in the background; call each until[name]() every 0.5 s while its run goes on (it
    returns True when it is done watching); return the results. Every run is killed if anything fails."""
    runs = {name: start() for name, start in starters.items()}
    watching = dict(until or {})
    try:
        deadline = time.monotonic() + limit
        while watching and time.monotonic() < deadline:
            for name in list(watching):
                if not runs[name].thread.is_alive() or watching[name]():
                    del watching[name]
            time.sleep(0.5)
        assert not watching, f"gave up watching {sorted(watching)} after {limit}s"
        return {name: run.get(max(deadline - time.monotonic(), 60)) for name, run in runs.items()}
    finally:
        for run in runs.values():
            if run.thread.is_alive():
                run.kill()
                run.thread.join(60)


def background(name: str, job: Path, workspace: Path, data: Path, **kwargs):
    kwargs.setdefault("expect_ok", False)  # the checks look at what each run wrote; killed runs end non-zero
    kwargs["extra_env"] = {RUN_ENV: str(workspace.resolve())}
    return lambda: Background(name, workspace, lambda: simulate(job, workspace, data, n=3, **kwargs))


def server_args(name: str) -> dict:
    return json.loads((JOBS / name / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]


def job(tmp: Path, name: str, faults: list | None = None, start_gate: dict | None = None, **args) -> Path:
    """jobs/<name> with the tiny engine (1 local epoch) and the fault-injecting executor; FedAvg without its
    cross-site evaluation workflow (it would wait for a dead site's model for its own, long timeout)."""
    if "engine_config" in server_args(name):  # the server's copy of the engine settings (model sets record them)
        args = {"engine_config": {**server_args(name)["engine_config"], **ENGINE}, **args}
    path = copy_job(name, tmp, server_args=args, engine=ENGINE)
    server_file = path / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["workflows"] = [w for w in server["workflows"] if not w["path"].endswith("CrossSiteModelEval")]
    server_file.write_text(json.dumps(server, indent=2))
    set_executor_path(path, FAULTY)
    client_file = path / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"].update(faults=faults or [], start_gate=start_gate or {})
    client_file.write_text(json.dumps(client, indent=2))
    return path


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fedsm_history(run) -> list[dict]:
    return json.loads((run.job_dir / FEDSM_OUT / "history.json").read_text())


def cross_history(run) -> list[dict]:
    return json.loads((run.job_dir / CROSS_OUT / "validation_history.json").read_text())


def trained_at(entry: dict) -> set[str]:
    """The sites whose visit replaced a model in this FedCross communication."""
    return {v["site"] for v in entry["visits"] if v["status"] == "trained"}


# ---- (a) a site process killed with SIGKILL mid-round -----------------------------------------------------------
TIMEOUT = 40  # task timeout of the runs with a dead site: far above a tiny task, even on a loaded machine


def kill_site_when_marked(workspace: Path, marker: Path, site: str, killed: dict):
    """Watcher: once the site's slow task has written its marker (the task is running), SIGKILL the site's
    worker process and everything under it."""

    def watch() -> bool:
        if not marker.exists():
            return False
        procs = tree_of(site_worker(workspace, site))
        assert procs, f"no simulator worker process of {site} under {workspace}"
        sigkill(procs)
        killed[workspace.name] = [p.pid for p in procs]
        return True

    return watch


def site_killed_runs(tmp: Path, data: Path, killed: dict) -> tuple[dict, dict]:
    """FedSM, FedCrossEns and FedAvg; in each, site-2's process is SIGKILLed while it trains in
    round/communication 1 (a slow task holds it there). FedSM also gets a bad update from site-3 (a missing key) in round 1 and from site-1 (a wrong shape) in
    round 2; FedCrossEns gets NaN optimizer state from site-1 in communication 2. Returns run_all's starters and
    watchers; the watchers note the killed pids in `killed`."""
    slow = lambda task, marker: {
        "site": "site-2",
        "round": 1,
        "task": task,
        "mode": "slow",
        "seconds": 300,  # noqa: E731
        "marker": str(marker),
    }
    fedsm = job(
        tmp / "fedsm",
        "fedsm",
        num_rounds=3,
        task_timeout=TIMEOUT,
        eval_timeout=TIMEOUT,
        faults=[
            slow("fedsm_train", tmp / "fedsm.marker"),
            {"site": "site-3", "round": 1, "task": "fedsm_train", "mode": "drop_key"},
            {"site": "site-1", "round": 2, "task": "fedsm_train", "mode": "bad_shape"},
        ],
    )
    ens = job(
        tmp / "ens",
        "fedcrossens",
        num_communications=3,
        visit_steps=4,
        task_timeout=TIMEOUT,
        validate_timeout=TIMEOUT,
        max_site_failures=2,
        faults=[
            slow("cross_train", tmp / "ens.marker"),
            {"site": "site-1", "round": 2, "task": "cross_train", "mode": "nan_optim"},
        ],
    )
    fedavg = job(tmp / "fedavg", "fedavg", num_rounds=3, task_timeout=TIMEOUT, faults=[slow("train", tmp / "fedavg.marker")])
    starters = {
        "fedsm": background("fedsm", fedsm, tmp / "ws_fedsm", data),
        "fedcrossens": background("fedcrossens", ens, tmp / "ws_ens", data),
        "fedavg": background("fedavg", fedavg, tmp / "ws_fedavg", data),
    }
    watchers = {
        "fedsm": kill_site_when_marked(tmp / "ws_fedsm", tmp / "fedsm.marker", "site-2", killed),
        "fedcrossens": kill_site_when_marked(tmp / "ws_ens", tmp / "ens.marker", "site-2", killed),
        "fedavg": kill_site_when_marked(tmp / "ws_fedavg", tmp / "fedavg.marker", "site-2", killed),
    }
    return starters, watchers


@pytest.fixture(scope="module")
def waiting_runs(tiny2d, tmp_path_factory) -> dict:
    """The runs of (a) and of (c, d) side by side, in one run_all: each is the job it is on its own (its own
    workspace, faults and watcher), and each spends most of its time waiting: for the killed site-2 until each
    task of it times out (a), for the late site-3 until round 0 gives up on it (c, d). Started one set after the
    other, these waits added up; side by side they overlap."""
    killed: dict = {}
    parts = {
        "site_killed": site_killed_runs(tmp_path_factory.mktemp("site_killed"), tiny2d, killed),
        "outage": outage_runs_of(tmp_path_factory.mktemp("outage"), tiny2d),
    }
    runs = run_all(
        {f"{part}/{name}": start for part, (starters, _) in parts.items() for name, start in starters.items()},
        until={f"{part}/{name}": watch for part, (_, watchers) in parts.items() for name, watch in watchers.items()},
    )
    out = {part: {name: runs[f"{part}/{name}"] for name in starters} for part, (starters, _) in parts.items()}
    out["site_killed"]["killed"] = killed
    return out


@pytest.fixture(scope="module")
def site_killed(waiting_runs) -> dict:
    return waiting_runs["site_killed"]


def test_fedsm_completes_without_a_killed_site(site_killed):
    run = site_killed["fedsm"]
    assert "ws_fedsm" in site_killed["killed"], "site-2 was not killed"
    assert run.returncode == 0, run.log_tail
    assert "Communication error with client site-2" in run.log("server")  # the simulator lost the worker
    history = fedsm_history(run)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[0]["accepted"] == SITES
    for record in history[1:]:  # after the kill nothing from site-2 reaches a model
        assert "site-2" not in record["answered"] and "site-2" not in record["accepted"]
    assert history[1]["accepted"] == ["site-1"] and "site-3" in history[1]["answered"]  # site-3: key dropped
    assert history[2]["accepted"] == ["site-3"] and "site-1" in history[2]["answered"]  # site-1: wrong shape
    log = run.log("server")
    assert "no usable result from ['site-2']" in log
    assert "REJECTED" in log and "site-3" in log and "site-1" in log
    groups, info = load_model_set(run.job_dir / FEDSM_OUT / "last.pt")
    assert info["round"] == 2 and info["site_names"] == SITES
    assert all(np.isfinite(a).all() for g in (groups["global"], groups["selector"]) for a in g.values())
    evaluation = json.loads((run.job_dir / FEDSM_OUT / "fedsm_evaluation.json").read_text())
    assert sorted(evaluation) == ["site-1", "site-3"]  # the dead site cannot score; the others do
    assert (run.job_dir / "app_server" / "fedseg_results.json").exists()


def test_fedcrossens_completes_without_a_killed_site(site_killed):
    run = site_killed["fedcrossens"]
    assert "ws_ens" in site_killed["killed"], "site-2 was not killed"
    assert run.returncode == 0, run.log_tail
    assert "Communication error with client site-2" in run.log("server")
    hist = cross_history(run)
    assert [h["communication"] for h in hist] == [0, 1, 2]
    assert trained_at(hist[0]) == set(SITES)
    for h in hist[1:]:
        assert "site-2" not in trained_at(h) and "site-2" not in h["val_per_site"]
        m = h["assignment"].index("site-2") if "site-2" in h["assignment"] else None
        if m is not None:  # the model that was at site-2 kept its weights
            assert h["visits"][m]["status"] == "kept last weights"
            assert h["weights_sha1"][m] == hist[h["communication"] - 1]["weights_sha1"][m]
    m1 = hist[2]["assignment"].index("site-1")  # NaN optimizer state: rejected, model kept
    assert hist[2]["visits"][m1]["failed_at"][0]["reason"].startswith("REJECTED")
    assert hist[2]["weights_sha1"][m1] == hist[1]["weights_sha1"][m1]
    assert hist[2]["dropped_sites"] == ["site-2"]  # max_site_failures=2: two failed communications in a row
    members, optimizers, info = load_members(run.job_dir / CROSS_OUT / "last.pt")
    assert info["dropped_sites"] == ["site-2"] and info["site_failures"]["site-2"] == 2
    assert all(np.isfinite(a).all() for o in optimizers for a in o.values())
    log = run.log("server")
    assert "site site-2 failed 2 time(s) in a row" in log and "non-finite" in log


def test_fedavg_completes_without_a_killed_site(site_killed):
    run = site_killed["fedavg"]
    assert "ws_fedavg" in site_killed["killed"], "site-2 was not killed"
    assert run.returncode == 0, run.log_tail
    assert "Communication error with client site-2" in run.log("server")
    history = json.loads((run.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    assert history[0]["accepted"] == SITES
    for record in history[1:]:
        assert record["accepted"] == ["site-1", "site-3"] and "site-2" not in record["answered"]
    _, info = load_model_set(run.job_dir / "app_server" / "fedavg" / "last.pt")
    assert info["round"] == 2


# ---- (b) the server killed mid-job, resumed in a new job -------------------------------------------------------
def kill_server_when_marked(workspace: Path, marker: Path, last: Path, key: str, saved: dict):
    """Watcher: once a site's slow task of the round after `last`'s has started, SIGKILL the whole simulator
    (server, workers, everything under them) and note which round last.pt holds."""

    def watch() -> bool:
        if not marker.exists():
            return False
        kill_run(workspace)
        saved[workspace.name] = int(load_model_set(last)[1][key])
        return True

    return watch


@pytest.fixture(scope="module")
def server_killed(tiny2d, tmp_path_factory) -> dict:
    """FedSM (selector classes site-1 and site-2 only: site-3 trains without being one) and FedAvg with 4 rounds,
    FedCrossEns with 3 communications; site-1 is slow in round 2 and the server is killed then (last.pt holds
    round 1). New jobs
    resume from those last.pt files; the server's own fedseg_server.json allows the killed runs' workspaces."""
    tmp = tmp_path_factory.mktemp("server_killed")
    ws = {name: tmp / f"ws_{name}" for name in ("fedsm", "ens", "fedavg")}
    last = {
        "fedsm": ws["fedsm"] / "server/simulate_job" / FEDSM_OUT / "last.pt",
        "ens": ws["ens"] / "server/simulate_job" / CROSS_OUT / "last.pt",
        "fedavg": ws["fedavg"] / "server/simulate_job/app_server/fedavg/last.pt",
    }
    slow = lambda name, task: [
        {
            "site": "site-1",
            "round": 2,
            "task": task,
            "mode": "slow",
            "seconds": 300,  # noqa: E731
            "marker": str(tmp / f"{name}.marker"),
        }
    ]
    fedsm_args = {"num_rounds": 4, "sites": ["site-1", "site-2"]}
    ens_args = {"num_communications": 3, "visit_steps": 4}  # whole Latin blocks: a multiple of the 3 sites
    saved: dict = {}
    killed = run_all(
        {
            "fedsm": background(
                "fedsm", job(tmp / "a", "fedsm", slow("fedsm", "fedsm_train"), **fedsm_args), ws["fedsm"], tiny2d
            ),
            "ens": background("ens", job(tmp / "b", "fedcrossens", slow("ens", "cross_train"), **ens_args), ws["ens"], tiny2d),
            "fedavg": background(
                "fedavg", job(tmp / "c", "fedavg", slow("fedavg", "train"), num_rounds=4), ws["fedavg"], tiny2d
            ),
        },
        until={
            "fedsm": kill_server_when_marked(ws["fedsm"], tmp / "fedsm.marker", last["fedsm"], "round", saved),
            "ens": kill_server_when_marked(ws["ens"], tmp / "ens.marker", last["ens"], "communication", saved),
            "fedavg": kill_server_when_marked(ws["fedavg"], tmp / "fedavg.marker", last["fedavg"], "round", saved),
        },
    )
    before = {
        "fedsm": fedsm_history(killed["fedsm"]),
        "ens": cross_history(killed["ens"]),
        "fedavg": json.loads((ws["fedavg"] / "server/simulate_job/app_server/fedavg/history.json").read_text()),
        "fedsm_best": load_model_set(last["fedsm"].with_name("best.pt"))[1],
        "ens_best": load_members(last["ens"].with_name("best.pt"))[2],
    }
    resumed = run_all(
        {
            "fedsm": background(
                "fedsm_resumed",
                job(tmp / "d", "fedsm", resume_from=str(last["fedsm"]), **fedsm_args),
                tmp / "ws_fedsm_resumed",
                tiny2d,
                resume_dirs=[ws["fedsm"]],
            ),
            "ens": background(
                "ens_resumed",
                job(tmp / "e", "fedcrossens", resume_from=str(last["ens"]), **ens_args),
                tmp / "ws_ens_resumed",
                tiny2d,
                resume_dirs=[ws["ens"]],
            ),
            "fedavg": background(
                "fedavg_resumed",
                job(tmp / "f", "fedavg", resume_from=str(last["fedavg"]), num_rounds=4),
                tmp / "ws_fedavg_resumed",
                tiny2d,
                resume_dirs=[ws["fedavg"]],
            ),
        }
    )
    return {"killed": killed, "saved": saved, "before": before, "resumed": resumed}


def test_fedsm_resumes_after_the_server_was_killed(server_killed):
    killed, run = server_killed["killed"]["fedsm"], server_killed["resumed"]["fedsm"]
    assert killed.returncode != 0 and server_killed["saved"]["ws_fedsm"] == 1  # killed during round 2
    assert run.returncode == 0, run.log_tail
    before, history = server_killed["before"]["fedsm"], fedsm_history(run)
    assert [r["round"] for r in before] == [0, 1]
    assert [r["round"] for r in history] == [0, 1, 2, 3]  # at most the killed round is trained again
    assert history[:2] == before
    log = run.log("server")
    assert "(saved round 1," in log and "at round 2" in log
    # the per-round selector records carry over too
    extra = json.loads((run.job_dir / "app_server" / "fedseg_results.json").read_text())["extra"]
    assert [r["round"] for r in extra["selector_history"]] == [0, 1, 2, 3]
    # best-set tracking carried over: best.pt is the best of ALL rounds, never a worse later set
    scores = {r["round"]: r["score"] for r in history if r.get("score") is not None}
    best_round = max(scores, key=scores.get)
    _, best = load_model_set(run.job_dir / FEDSM_OUT / "best.pt")
    assert best["val_score"] == pytest.approx(scores[best_round]) and best["round"] == best_round - 1
    assert best["val_score"] >= server_killed["before"]["fedsm_best"]["val_score"]
    groups, info = load_model_set(run.job_dir / FEDSM_OUT / "last.pt")
    assert info["best_score"] == pytest.approx(best["val_score"]) and info["round"] == 3
    # the selector's classes stay the saved list; site-3 trains and has a personalized model, but is no class
    assert info["site_names"] == ["site-1", "site-2"] and sorted(groups["personal"]) == SITES
    assert all(r["accepted"] == SITES for r in history)
    assert "site site-3 is not one of the selector's classes ['site-1', 'site-2']" in log
    evaluation = json.loads((run.job_dir / FEDSM_OUT / "fedsm_evaluation.json").read_text())
    assert "super" in evaluation["site-1"] and "super" not in evaluation["site-3"]
    assert {"global", "personalized"} <= set(evaluation["site-3"])


def test_fedcrossens_resumes_after_the_server_was_killed(server_killed):
    killed, run = server_killed["killed"]["ens"], server_killed["resumed"]["ens"]
    assert killed.returncode != 0 and server_killed["saved"]["ws_ens"] == 1
    assert run.returncode == 0, run.log_tail
    before, hist = server_killed["before"]["ens"], cross_history(run)
    assert [h["communication"] for h in hist] == [0, 1, 2] and hist[:2] == before
    assert "at communication 2" in run.log("server")
    # the Latin schedule goes on where it was: communication 2 is that of the uninterrupted plan
    assert [h["assignment"] for h in hist] == [assign("latin", SITES, 3, c, seed=0) for c in range(3)]
    best_c = int(np.argmax([h["val_dice"] for h in hist]))
    _, _, best = load_members(run.job_dir / CROSS_OUT / "best.pt")
    assert best["communication"] == best_c and best["val_dice"] == pytest.approx(hist[best_c]["val_dice"])
    assert best["val_dice"] >= server_killed["before"]["ens_best"]["val_dice"]
    members, _, info = load_members(run.job_dir / CROSS_OUT / "last.pt")
    assert info["visits_done"] == [3, 3, 3] and info["communication"] == 2


def test_fedavg_resumes_after_the_server_was_killed(server_killed):
    killed, run = server_killed["killed"]["fedavg"], server_killed["resumed"]["fedavg"]
    assert killed.returncode != 0 and server_killed["saved"]["ws_fedavg"] == 1
    assert run.returncode == 0, run.log_tail
    out = run.job_dir / "app_server" / "fedavg"
    before, history = server_killed["before"]["fedavg"], json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2, 3] and history[:2] == before
    scores = {r["round"]: r["score"] for r in history if r.get("score") is not None}
    best_round = max(scores, key=scores.get)
    _, info = load_model_set(out / "last.pt")
    assert info["best_round"] == best_round and info["best_score"] == pytest.approx(scores[best_round])
    assert (out / "best.pt").exists()


# ---- (c) a site down for two rounds comes back; (d) a site whose job process starts late -----------------------
def release_after_first_round(history: Path, gate: Path):
    """Watcher: once round/communication 0 is in the history (it ended without the late site), let the late
    site's job process start."""

    def watch() -> bool:
        if not read_json(history):
            return False
        gate.write_text("go")
        return True

    return watch


def outage_runs_of(tmp: Path, data: Path) -> tuple[dict, dict]:
    """site-3's job process is held until round 0 has ended without it (its first task timed out after 130 s);
    site-2 fails every task of rounds/communications 1 and 2. FedSM and FedAvg run 4 rounds; FedCrossEns runs 6
    communications (Latin: whole blocks of 3) with max_site_failures=2 and rejoin_after=1 (site-2 is left out after communication 2,
    sits out 3 and is tried again in 4). Returns run_all's starters and watchers."""
    # held at most 300 s: a run that fails early must not wait long for the gate
    gates = {name: {"site": "site-3", "file": str(tmp / f"{name}.go"), "seconds": 300} for name in ("fedsm", "ens", "fedavg")}
    down = lambda task: [{"site": "site-2", "rounds": [1, 2], "task": task, "mode": "raise"}]  # noqa: E731
    # round 0 waits TIMEOUT + startup_grace for the held site-3: long enough for the other sites' job processes
    # to come up on a loaded machine (their first task has the same limit)
    common = {"task_timeout": TIMEOUT, "startup_grace": 90}
    fedsm = job(tmp / "a", "fedsm", down("fedsm_train"), gates["fedsm"], num_rounds=4, eval_timeout=TIMEOUT, **common)
    ens = job(
        tmp / "b",
        "fedcrossens",
        down("*"),
        gates["ens"],
        num_communications=6,
        visit_steps=4,
        validate_timeout=TIMEOUT,
        max_site_failures=2,
        rejoin_after=1,
        **common,
    )
    fedavg = job(tmp / "c", "fedavg", down("train"), gates["fedavg"], num_rounds=4, **common)
    starters = {
        "fedsm": background("fedsm", fedsm, tmp / "ws_fedsm", data),
        "ens": background("ens", ens, tmp / "ws_ens", data),
        "fedavg": background("fedavg", fedavg, tmp / "ws_fedavg", data),
    }
    watchers = {
        "fedsm": release_after_first_round(
            tmp / "ws_fedsm/server/simulate_job" / FEDSM_OUT / "history.json", Path(gates["fedsm"]["file"])
        ),
        "ens": release_after_first_round(
            tmp / "ws_ens/server/simulate_job" / CROSS_OUT / "validation_history.json", Path(gates["ens"]["file"])
        ),
        "fedavg": release_after_first_round(
            tmp / "ws_fedavg/server/simulate_job/app_server/fedavg/history.json", Path(gates["fedavg"]["file"])
        ),
    }
    return starters, watchers


@pytest.fixture(scope="module")
def outage_runs(waiting_runs) -> dict:
    return waiting_runs["outage"]


def test_fedsm_uses_a_late_site_and_a_site_back_from_an_outage(outage_runs):
    run = outage_runs["fedsm"]
    assert run.returncode == 0, run.log_tail
    assert "injected late start: released" in run.log("site-3")
    history = fedsm_history(run)
    accepted = [r["accepted"] for r in history]
    assert accepted == [["site-1", "site-2"], ["site-1", "site-3"], ["site-1", "site-3"], SITES]
    assert "site-3" not in history[0]["answered"]  # its first task timed out: the job did not wait for it
    _, info = load_model_set(run.job_dir / FEDSM_OUT / "last.pt")
    assert info["site_names"] == SITES  # the late site was a selector class from the start
    evaluation = json.loads((run.job_dir / FEDSM_OUT / "fedsm_evaluation.json").read_text())
    assert sorted(evaluation) == SITES and all("super" in m for m in evaluation.values())
    assert "injected failure at site-2" in run.errors()


def test_fedcross_leaves_out_a_failing_site_and_tries_it_again(outage_runs):
    run = outage_runs["ens"]
    assert run.returncode == 0, run.log_tail
    hist = cross_history(run)
    assert [h["communication"] for h in hist] == [0, 1, 2, 3, 4, 5]
    # (d) the late site: its first visit timed out, it was not asked to validate, and it trains from communication 1
    assert trained_at(hist[0]) == {"site-1", "site-2"} and "site-3" not in hist[0]["val_per_site"]
    assert all("site-3" in trained_at(h) for h in hist[1:])
    # (c) site-2 fails communications 1 and 2 (train and validate), is left out in 3 and trains again in 4
    assert [h["active_sites"] for h in hist] == [SITES, SITES, SITES, ["site-1", "site-3"], SITES, SITES]
    assert all("site-2" not in trained_at(h) for h in hist[1:4]) and all("site-2" in trained_at(h) for h in hist[4:])
    assert "site-2" in hist[4]["val_per_site"] and hist[4]["rejoined"] == ["site-2"]
    assert hist[2]["dropped_sites"] == ["site-2"] and hist[4]["dropped_sites"] == []
    # the schedule restarted over the remaining sites at 3 and over all three again at 4
    assert hist[3]["assignment"] == assign("latin", ["site-1", "site-3"], 3, 0, seed=0)
    assert [h["assignment"] for h in hist[4:]] == [assign("latin", SITES, 3, c, seed=0) for c in (0, 1)]
    _, _, info = load_members(run.job_dir / CROSS_OUT / "last.pt")
    assert info["dropped_sites"] == [] and info["site_failures"] == {"site-1": 0, "site-2": 0, "site-3": 0}
    log = run.log("server")
    assert "site site-2 failed 2 time(s) in a row" in log and "trying ['site-2'] again" in log
    assert "the latin schedule restarts over 2 site(s) at this communication" in log
    assert "['site-3'] answered every task again" in log  # the late site's first failure was forgiven


def test_fedavg_uses_a_late_site_and_a_site_back_from_an_outage(outage_runs):
    run = outage_runs["fedavg"]
    assert run.returncode == 0, run.log_tail
    history = json.loads((run.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert [r["accepted"] for r in history] == [["site-1", "site-2"], ["site-1", "site-3"], ["site-1", "site-3"], SITES]
    assert all(r["sites"] == SITES for r in history)  # every round asks every participant
