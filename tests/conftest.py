"""Shared fixtures: tiny built-in datasets and real NVFlare simulator runs of the job folders in jobs/."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import sys
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUSTOM = REPO / "custom"
JOBS = REPO / "jobs"
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(CUSTOM))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _terminate(signum, frame):
    # a CI timeout or `kill` sends SIGTERM: turn it into KeyboardInterrupt so pytest still runs the fixture
    # finalizers that stop the simulators and the POC federation
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)


# ---- markers: `make test-fast` runs -m "not slow and not poc and not gpu" -----------------------------------------
MARKERS = {
    "slow": "takes more than ~5 s: a FLARE simulator job, a POC federation, a subprocess that trains or benchmarks, "
    "real data converted, processes waited for",
    "poc": "starts a POC federation (also slow)",
    "gpu": "needs CUDA; skipped where torch.cuda.is_available() is False",
}
STARTS_A_RUN = frozenset({"simulate", "in_parallel"})  # this file's helpers that start simulator runs
# module fixtures that start a POC federation (tests/test_poc.py)
POC_FIXTURES = frozenset({"poc", "federation"})
TESTS = Path(__file__).resolve().parent
UNMARKED_LIMIT_S = 5.0


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _starts_a_run(code: types.CodeType, namespace: dict, seen: set) -> bool:
    """Whether code calls simulate()/in_parallel(), itself or through functions of the test files (helpers,
    lambdas and nested functions included)."""
    if code in seen:
        return False
    seen.add(code)
    for name in code.co_names:
        if name in STARTS_A_RUN:
            return True
        obj = namespace.get(name)
        if (
            inspect.isfunction(obj)
            and Path(obj.__code__.co_filename).resolve().parent == TESTS
            and _starts_a_run(obj.__code__, obj.__globals__, seen)
        ):
            return True
    return any(isinstance(c, types.CodeType) and _starts_a_run(c, namespace, seen) for c in code.co_consts)


def _fixture_functions(item):
    info = getattr(item, "_fixtureinfo", None)
    for name in item.fixturenames:  # the whole closure: fixtures of fixtures too
        for fixturedef in info.name2fixturedefs.get(name, ()) if info else ():
            func = inspect.unwrap(getattr(fixturedef, "func", None) or (lambda: None))
            if inspect.isfunction(func):
                yield func


# The files that took longest (pytest --durations, 2 cores), run first: `make test` hands whole files to its
# workers (pytest-xdist --dist loadfile) in collection order, so the long ones must not start last.
LONGEST_FIRST = (
    "test_faults.py",
    "test_poc.py",
    "test_untrusted_sites.py",
    "test_export.py",
    "test_fedsm.py",
    "test_bench.py",
    "test_fedcross.py",
    "test_site_security.py",
    "test_cli.py",
    "test_foundation.py",
    "test_bench_robust.py",
    "test_recipes.py",
    "test_data.py",
    "test_recipes_poc.py",
    "test_stock.py",
    "test_bench_unseen.py",
)


def pytest_collection_modifyitems(config, items):
    """slow: a test that starts a simulator run (simulate/in_parallel, in the test or in a fixture it uses);
    poc: a test that uses a POC fixture. A poc test is slow too. Other slow tests carry the marker themselves.
    gpu tests are skipped without CUDA. Files in LONGEST_FIRST order first, the others after them as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
    cache: dict = {}

    def starts_a_run(func) -> bool:
        if func.__code__ not in cache:
            cache[func.__code__] = _starts_a_run(func.__code__, func.__globals__, set())
        return cache[func.__code__]

    cuda = None
    for item in items:
        if POC_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.poc)
        if item.get_closest_marker("poc") or (
            item.get_closest_marker("slow") is None
            and any(starts_a_run(f) for f in [getattr(item, "function", None), *_fixture_functions(item)] if f)
        ):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)"))


_unmarked_slow: list[tuple[float, str]] = []


def pytest_runtest_logreport(report):
    """Note unmarked tests that took long: they belong in `make test-fast` only if they are quick."""
    if report.when in ("setup", "call") and report.duration > UNMARKED_LIMIT_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.duration, f"{report.nodeid} ({report.when})"))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section(f"tests not marked slow that took over {UNMARKED_LIMIT_S:.0f} s")
        for duration, name in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{duration:7.1f}s {name}")


@pytest.fixture(scope="session")
def tiny2d(tmp_path_factory) -> Path:
    """3 non-iid sites, 2-D, tiny (32-40 px): the data every simulator test runs on."""
    from fedseg.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("data") / "tiny2d"
    generate_dataset(str(out), n_sites=3, spatial_dims=2, seed=0, size="tiny")
    return out


@pytest.fixture(scope="session")
def tiny3d(tmp_path_factory) -> Path:
    from fedseg.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("data") / "tiny3d"
    generate_dataset(str(out), n_sites=2, spatial_dims=3, seed=0, size="tiny")
    return out


def copy_job(
    name: str,
    dest: Path,
    server_args: dict | None = None,
    client_args: dict | None = None,
    engine: dict | None = None,
    workflow: int = 0,
) -> Path:
    """Copy jobs/<name> to dest and change a few settings the way a user edits the JSON configs."""
    job = dest / name
    shutil.rmtree(job, ignore_errors=True)
    shutil.copytree(JOBS / name, job)
    config_dir = job / "app" / "config"
    server_file, client_file = config_dir / "config_fed_server.json", config_dir / "config_fed_client.json"
    server, client = json.loads(server_file.read_text()), json.loads(client_file.read_text())
    server["workflows"][workflow]["args"].update(server_args or {})
    executor_args = client["executors"][0]["executor"]["args"]
    executor_args.update(client_args or {})
    if engine:
        executor_args["engine"].update(engine)
    server_file.write_text(json.dumps(server, indent=2))
    client_file.write_text(json.dumps(client, indent=2))
    return job


def set_executor_path(job: Path, path: str) -> None:
    """Swap the site executor class (tests use fault-injecting subclasses from tests/helpers)."""
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["path"] = path
    client_file.write_text(json.dumps(client, indent=2))


def simulate(job: Path, workspace: Path, data: Path, n: int = 3, expect_ok: bool = True, **kwargs):
    """Run the job in the NVFlare simulator (a process group that is always stopped)."""
    from fedseg_tools.sim import run_simulator

    extra_env = kwargs.pop("extra_env", {})
    helpers = str(Path(__file__).resolve().parent / "helpers")
    extra_env.setdefault(
        "PYTHONPATH", os.pathsep.join([str(CUSTOM), helpers]) if kwargs.get("on_pythonpath", True) else helpers
    )
    kwargs.setdefault("timeout", 900)
    # the tests' fault-injecting executors, by exact class path (as the product allows its own classes)
    kwargs.setdefault("allow_classes", ("fedseg_faults.FaultySegExecutor", "fedseg_faults_cross.CrossFaultExecutor"))
    resume_dirs = kwargs.pop("resume_dirs", None)
    if resume_dirs:  # the server operator's own setting: where a job may resume from (fedseg_server.json)
        (workspace / "local").mkdir(parents=True, exist_ok=True)
        (workspace / "local" / "fedseg_server.json").write_text(json.dumps({"resume_dirs": [str(d) for d in resume_dirs]}))
    result = run_simulator(job, workspace, n, data_root=data, extra_env=extra_env, **kwargs)
    if expect_ok:
        assert result.returncode == 0, result.log_tail
        errors = result.errors()
        assert not errors, errors[-5000:]
    return result


TINY_ENGINE = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 3}


def assert_fedavg_result_scored(result: Path, sites: list[str]) -> None:
    """A FedAvg job's downloaded result: its best global model, and a finite Dice in [0, 1] at every site for
    every model the cross-site evaluation scored at all of them."""
    import math

    from fedseg.report import load_results

    assert list(result.rglob("*best_FL_global_model.pt")), sorted(p.name for p in result.rglob("*"))
    results = load_results(result, "fedavg")
    scored = {m: s for m, s in results["models"].items() if isinstance(s, dict) and sorted(s) == sites}
    assert scored, results["models"]
    for scores in scored.values():
        for site in sites:
            dice = scores[site]["dice"]
            assert math.isfinite(dice) and 0.0 <= dice <= 1.0, (site, scores)


@pytest.fixture
def audit_events(monkeypatch) -> list[dict]:
    """NVFlare's auditor replaced by a recorder: the job audit events ({"ref", "msg"}) added during the test."""
    from nvflare.fuel.sec.audit import Auditor, AuditService

    events: list[dict] = []

    class Recorder(Auditor):
        def __init__(self):
            pass

        def add_job_event(self, job_id, scope_name="", task_name="", task_id="", ref="", msg=""):
            events.append({"ref": ref, "msg": msg})
            return "event-1"

    monkeypatch.setattr(AuditService, "the_auditor", Recorder())
    return events


def in_parallel(**runs: Callable[[], object]) -> dict:
    """Two simulator runs side by side: a run mostly waits (process start-up, task polling), so pairs
    halve the wall time on a 2-core machine. Every run is waited for; the first failure is raised."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in runs.items()}
        wait(futures.values())
    return {name: future.result() for name, future in futures.items()}
