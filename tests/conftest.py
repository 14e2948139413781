"""Shared fixtures: tiny built-in datasets and real NVFlare simulator runs of the job folders in jobs/."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
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
    from fedseg.sim import run_simulator

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


def in_parallel(**runs: Callable[[], object]) -> dict:
    """Two simulator runs side by side: a run mostly waits (process start-up, task polling), so pairs
    halve the wall time on a 2-core machine. Every run is waited for; the first failure is raised."""
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in runs.items()}
        wait(futures.values())
    return {name: future.result() for name, future in futures.items()}
