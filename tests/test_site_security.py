"""What a code-less job can instantiate at a site, and that a run leaves no process behind.

* The site allow-list names exact classes: every other callable reachable under fedseg is refused by NVFlare's
  own matcher, and a job that tries to widen the allow-list (or call subprocess.run) is refused in a real
  simulator run, with every resources.json unchanged.
* fedseg_tools.sim stops every process of a run on timeout, client workers in their own sessions included.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import CUSTOM, JOBS, TINY_ENGINE, copy_job, set_executor_path, simulate

import fedseg
from fedseg.fl.allowlist import FEDSEG_CLASSES, AllowListError, allow_fedseg, fedseg_allow_list, warnings_for
from fedseg_tools.bench.jobs import BENCH_CLASSES


class _SiteWorkspace:
    """What ComponentPathAuthorizer asks a workspace for: where the site's resources.json is."""

    def __init__(self, resources_file: Path):
        self.resources_file = resources_file

    def get_resources_file_path(self):
        return str(self.resources_file)


@pytest.fixture(scope="module")
def site_resources(tmp_path_factory) -> Path:
    """A site's local/resources.json as the product writes it."""
    local = tmp_path_factory.mktemp("site") / "local"
    allow_fedseg(local / "resources.json")
    return local / "resources.json"


def authorized(path: str, resources_file: Path) -> bool:
    """NVFlare 2.9's own check of one component path against the site's resources.json."""
    from nvflare.apis.fl_exception import UnsafeComponentError
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    try:
        ComponentPathAuthorizer().authorize_component_config({"path": path}, workspace=_SiteWorkspace(resources_file))
        return True
    except UnsafeComponentError:
        return False


def fedseg_modules() -> list[str]:
    names = ["fedseg"]
    for info in pkgutil.walk_packages(fedseg.__path__, "fedseg."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # running a __main__ module runs its program
            names.append(info.name)
    return names


# --------------------------------------------------------------------------------------------------
# The allow-list and NVFlare's matcher (direct)
# --------------------------------------------------------------------------------------------------


def test_allow_list_names_exact_classes_only(site_resources):
    from nvflare.fuel.utils.class_loader import load_class

    resources = json.loads(site_resources.read_text())
    allow = resources["class_allow_list"]
    assert resources["class_list_enforcement_mode"] == "enforce" and warnings_for(resources) == []
    assert not [e for e in allow if e.endswith(".") or e == "*"], "a package prefix is on the list"
    fedseg_entries = [e for e in allow if e.startswith("fedseg")]
    assert sorted(fedseg_entries) == sorted(FEDSEG_CLASSES)
    for entry in FEDSEG_CLASSES:
        assert isinstance(load_class(entry), type), entry
    assert "fedseg.fl.allowlist.allow_fedseg" not in allow and not authorized(
        "fedseg.fl.allowlist.allow_fedseg", site_resources
    )


def test_every_other_fedseg_callable_is_refused(site_resources):
    """Everything a job could name under fedseg (functions, imported modules' callables, classes that are no
    component) is refused by NVFlare's matcher; only the listed classes pass."""
    checked, allowed = 0, []
    for module_name in fedseg_modules():
        module = importlib.import_module(module_name)
        for attr in dir(module):
            if not callable(getattr(module, attr, None)):
                continue
            path = f"{module_name}.{attr}"
            checked += 1
            if authorized(path, site_resources):
                allowed.append(path)
    modules = fedseg_modules()
    assert sorted(allowed) == sorted(p for p in FEDSEG_CLASSES if p.rsplit(".", 1)[0] in modules)
    assert checked > 300, checked  # the whole package was walked (fl, engine, data, bench, ...)


def test_exact_entries_are_not_prefixes(site_resources):
    """NVFlare matches an entry E as E itself or 'E.<anything>' (never 'E<anything>'); 'E.<anything>' cannot be
    loaded, because NVFlare imports everything before the last dot as a module and a class is not one."""
    from nvflare.fuel.utils.class_loader import load_class

    for entry in FEDSEG_CLASSES:
        assert not authorized(entry + "Evil", site_resources)
        assert not authorized(entry.rsplit(".", 1)[0] + ".allow_fedseg", site_resources)
        cls = load_class(entry)
        members = [m for m in dir(cls) if callable(getattr(cls, m, None))]
        assert members
        for member in members:
            path = f"{entry}.{member}"
            if authorized(path, site_resources):  # matched as a sub-path of the entry ...
                with pytest.raises(TypeError, match="Can't load class"):  # ... and still not loadable
                    load_class(path)


def test_allowlist_tool_writes_exact_classes_and_drops_the_old_prefix(tmp_path):
    kit = tmp_path / "hospital-a"
    (kit / "local").mkdir(parents=True)
    provisioned = {
        "format_version": 2,
        "components": [{"id": "resource_manager", "path": "x.y.Z", "args": {"num_of_gpus": 1}}],
        "class_allow_list": ["nvflare.app_common.workflows.fedavg.FedAvg", "fedseg.", "fedseg.old.Gone"],
    }
    (kit / "local" / "resources.json.default").write_text(json.dumps(provisioned))
    out = subprocess.run(
        [sys.executable, "-m", "fedseg.fl.allowlist", str(kit)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    written = json.loads((kit / "local" / "resources.json").read_text())
    assert written["components"] == provisioned["components"]  # the rest of the site's settings is kept
    assert written["class_allow_list"] == fedseg_allow_list()  # exactly FedSeg's needs: the old entries are dropped
    assert written["class_list_enforcement_mode"] == "enforce" and "WARNING" not in out.stderr
    # a prefix or a function is never added; a site's own '*' is reported
    for bad in ("subprocess.", "subprocess.run", "*", "fedseg.fl.allowlist.allow_fedseg"):
        with pytest.raises(AllowListError):
            allow_fedseg(kit / "local" / "resources.json", extra_classes=(bad,))
    assert "*" not in fedseg_allow_list()
    assert warnings_for({"class_allow_list": ["*"]}) and warnings_for({"class_allow_list": ["a.b."]})
    assert (
        subprocess.run(
            [sys.executable, "-m", "fedseg.fl.allowlist", str(tmp_path / "nowhere")],
            capture_output=True,
            timeout=120,
            env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
        ).returncode
        == 2
    )


def test_byoc_roles_reads_every_form_of_a_grant():
    from fedseg.fl.allowlist import byoc_roles

    policy = {
        "permissions": {
            "a": "any",
            "b": {"byoc": "any"},
            "c": {"view": "any"},
            "d": {"byoc": ["o:site"]},
            "e": {"byoc": "not o:site"},
            "f": {"byoc": "None"},
            "g": {"byoc": ["none", "n:x@y.org"]},
            "h": ["none"],
        }
    }
    assert byoc_roles(policy) == ["a", "b", "d", "e", "g"]
    assert byoc_roles(json.loads((CUSTOM.parent / "poc" / "authorization.json").read_text())) == []


def test_generated_jobs_use_only_allowed_classes(tmp_path):
    """Every component path of jobs/, of fedseg.jobgen's output (with the meter) and of a benchmark job that
    runs every method is on the allow-list: the list is complete."""
    from fedseg import jobgen
    from fedseg_tools.bench.budget import METHODS, Budget, plan_methods
    from fedseg_tools.bench.jobs import build_job

    assert jobgen.main(["--out", str(tmp_path / "gen"), "--meter"]) == 0
    fl_methods = [m for m in METHODS if m in jobgen.JOBS]
    plans = plan_methods(fl_methods, Budget(2, 2, {"site-1": 2, "site-2": 2}))
    bench = build_job(tmp_path / "bench", "all", [(m, 0) for m in fl_methods], plans, dict(TINY_ENGINE), {0: "/x/init.pt"})
    allow = set(fedseg_allow_list())

    def paths(obj):
        if isinstance(obj, dict):
            if isinstance(obj.get("path"), str):
                yield obj["path"]
            for v in obj.values():
                yield from paths(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from paths(v)

    def used_in(*roots) -> set:
        return {
            p for root in roots for config in root.rglob("config_fed_*.json") for p in paths(json.loads(config.read_text()))
        }

    product = used_in(JOBS, tmp_path / "gen")  # what runs at sites: only the product's list
    assert {"fedseg.fl.meter.TaskMeter", "fedseg.fl.executor.SegExecutor"} <= product
    assert product <= allow, product - allow
    bench_paths = used_in(bench)  # the benchmark's simulator runs add its workflows
    assert "fedseg_tools.bench.flow.BenchMark" in bench_paths and "fedseg_tools.bench.flow.BenchMark" not in allow
    assert bench_paths <= set(fedseg_allow_list(BENCH_CLASSES)), bench_paths - set(fedseg_allow_list(BENCH_CLASSES))


# --------------------------------------------------------------------------------------------------
# A job that tries to widen the allow-list or run a command: refused in a real simulator run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
def test_codeless_job_cannot_change_site_configuration(side, tiny2d, tmp_path):
    """The job's site (or server) config asks for allow_fedseg (to add subprocess.Popen to the allow-list of the
    resources.json that site reads) and for subprocess.run: both refused, nothing changed, nothing run."""
    ws = tmp_path / "ws"
    marker = tmp_path / "ran_a_command"
    target = ws / ("site-1" if side == "client" else "server") / "local" / "resources.json"
    job = copy_job("fedavg", tmp_path / "jobs", server_args={"num_rounds": 1}, engine={**TINY_ENGINE, "local_epochs": 1})
    config_file = job / "app" / "config" / f"config_fed_{side}.json"
    config = json.loads(config_file.read_text())
    config.setdefault("components", []).extend(
        [
            {
                "id": "widen",
                "path": "fedseg.fl.allowlist.allow_fedseg",
                "args": {"resources_file": str(target), "extra_classes": ["subprocess.Popen"]},
            },
            {"id": "cmd", "path": "subprocess.run", "args": {"args": ["touch", str(marker)]}},
        ]
    )
    config_file.write_text(json.dumps(config, indent=2))
    assert not (job / "app" / "custom").exists()  # code-less: the allow-list applies

    result = simulate(job, ws, tiny2d, n=2, expect_ok=False, timeout=600)
    assert not result.left
    text = result.log_tail + result.errors() + "".join(p.read_text(errors="replace") for p in ws.rglob("log.txt"))
    refused = [line for line in text.splitlines() if "is not in allow_list" in line]
    assert any("'fedseg.fl.allowlist.allow_fedseg'" in line for line in refused), text[-6000:]
    scores = [json.loads(f.read_text()) for f in ws.rglob("cross_val_results.json")]
    assert not any(scores), f"sites ran the job as if nothing had happened: {scores}"
    assert not marker.exists(), "a job ran a command at a site"
    product = ws / "local" / "resources.json"
    expected = tmp_path / "expected" / "resources.json"
    allow_fedseg(expected, extra_classes=("fedseg_faults.FaultySegExecutor", "fedseg_faults_cross.CrossFaultExecutor"))
    assert product.read_bytes() == expected.read_bytes()
    assert target.exists()
    for copy in [ws / name / "local" / "resources.json" for name in ("server", "site-1", "site-2")]:
        if copy.exists():  # the simulator copies <workspace>/local to every site it set up
            assert copy.read_bytes() == product.read_bytes(), copy


NETWORK = {"arch": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "num_res_units": 1}


def test_allowed_classes_refuse_arguments_that_reach_outside_the_job():
    """Arguments a job sets on allowed classes cannot name the server's or a site's own files, nor switch on
    code-running unpickling."""
    from fedseg.fl.meter import TaskMeter
    from fedseg.fl.persistor import SegModelPersistor

    SegModelPersistor(network=NETWORK, global_model_file_name="m.pt", best_global_model_file_name="b.pt")
    for bad in ("../../local/resources.json", "/etc/hosts", "..", ""):
        for key in ("global_model_file_name", "best_global_model_file_name"):
            with pytest.raises(ValueError, match="plain file name"):
                SegModelPersistor(network=NETWORK, **{key: bad})
        with pytest.raises(ValueError, match="plain file name"):
            TaskMeter(file_name=bad)
    with pytest.raises(ValueError, match="load_weights_only"):
        SegModelPersistor(network=NETWORK, load_weights_only=False)


def test_job_environment_cannot_move_server_model_files(tiny2d, tmp_path):
    """A code-less job's config/environment.json (APP_CKPT_DIR) would make NVFlare's persistor write the server's
    model files anywhere (e.g. over the server's local/ configuration): the job is stopped, nothing written there."""
    elsewhere = tmp_path / "server_local"
    elsewhere.mkdir()
    job = copy_job("fedavg", tmp_path / "jobs", server_args={"num_rounds": 1}, engine={**TINY_ENGINE, "local_epochs": 1})
    (job / "app" / "config" / "environment.json").write_text(json.dumps({"APP_CKPT_DIR": str(elsewhere)}))
    result = simulate(job, tmp_path / "ws", tiny2d, n=2, expect_ok=False, timeout=600)
    assert not result.left
    assert list(elsewhere.iterdir()) == [], "the job made the server write outside its app dir"
    text = result.log_tail + result.errors() + result.log("server")
    assert "lie outside the job's app dir" in text, text[-5000:]


# --------------------------------------------------------------------------------------------------
# Process hygiene
# --------------------------------------------------------------------------------------------------


def _run_descendants() -> dict[int, tuple[str, int, float]]:
    """pid -> (command line, session id, create time) of this test process's descendants."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.pid] = (" ".join(p.cmdline()), os.getsid(p.pid), p.create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return out


TIMEOUT = 60


def test_timeout_stops_every_process_of_the_run(tiny2d, tmp_path):
    """A job whose sites stall: run_simulator times out and stops the simulator and its client workers, which
    NVFlare starts in sessions of their own (setsid)."""
    job = copy_job("fedavg", tmp_path / "jobs", server_args={"num_rounds": 1}, engine={**TINY_ENGINE, "local_epochs": 1})
    set_executor_path(job, "fedseg_faults.FaultySegExecutor")
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["faults"] = [
        {"site": s, "round": 0, "mode": "stall", "seconds": 3600} for s in ("site-1", "site-2")
    ]
    client_file.write_text(json.dumps(client, indent=2))

    seen: dict[int, tuple[str, int, float]] = {}
    done = threading.Event()
    start = time.time()

    def watch():
        while not done.is_set():
            seen.update(_run_descendants())
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # the workers start within ~15 s here (2 cores shared with other work); the timeout leaves a margin
        result = simulate(job, tmp_path / "ws", tiny2d, n=2, expect_ok=False, timeout=TIMEOUT)
    finally:
        done.set()
        watcher.join()
    assert result.returncode == -9, result.log_tail  # timed out
    workers = {pid: info for pid, info in seen.items() if "simulator_worker" in info[0]}
    assert workers, f"no client worker started within the {TIMEOUT}s timeout (machine overloaded?): {seen}"
    print(f"first worker after {min(created for _, _, created in workers.values()) - start:.1f}s")
    simulator_sid = min(seen.items(), key=lambda kv: kv[1][2])[1][1]  # the first process: the simulator
    assert any(sid != simulator_sid for _, sid, _ in workers.values()), "workers share the simulator's session"
    assert set(workers) <= set(result.pids), (workers, result.pids)
    alive = []
    for pid, (cmd, _, created) in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, cmd))
        except psutil.NoSuchProcess:
            pass
    assert not alive and not result.left, alive
