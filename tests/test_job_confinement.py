"""What a job's own arguments cannot reach on the server: another job's checkpoint (the persistor's source
checkpoint) is refused unless it lies in this job's folder or a folder the server operator allows; an MLflow
store outside the job's folder, or on a tracking server, is refused. Real simulator runs (two, side by side, of one
site each: what is checked happens on the server)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ENGINE, copy_job, in_parallel, simulate

from fedseg.engine.networks import SegNetwork


def _server_config(job):
    path = job / "app" / "config" / "config_fed_server.json"
    return path, json.loads(path.read_text())


def _set_component_args(job, component_id: str, **args) -> None:
    path, config = _server_config(job)
    for component in config["components"]:
        if component["id"] == component_id:
            component["args"].update(args)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def runs(tiny2d, tmp_path_factory):
    """'refused': the persistor names another job's model; 'allowed': the same, with the model's folder listed by
    the server operator in local/fedseg_server.json ("resume_dirs"). jobs/fedavg, 1 round on 1 site, no
    cross-site evaluation."""
    tmp = tmp_path_factory.mktemp("confine")
    other_job = tmp / "server_ws" / "other-job-id" / "app_server"
    other_job.mkdir(parents=True)
    job = copy_job(
        "fedavg", tmp / "jobs", server_args={"num_rounds": 1, "min_clients": 1}, engine={**TINY_ENGINE, "local_epochs": 1}
    )
    _, config = _server_config(job)
    network = next(c for c in config["components"] if c["id"] == "persistor")["args"]["network"]
    stolen = other_job / "FL_global_model.pt"
    torch.save({"model": SegNetwork(**network).state_dict()}, stolen)
    _set_component_args(job, "persistor", source_ckpt_file_full_name=str(stolen))
    path, config = _server_config(job)
    receiver = "fedseg.fl.tracking.MLflowServerReceiver"
    config["components"] += [
        {"id": "mlflow_outside", "path": receiver, "args": {"tracking_uri": f"sqlite:///{tmp / 'outside' / 'mlflow.db'}"}},
        {"id": "mlflow_inside", "path": receiver, "args": {"tracking_uri": "sqlite:///tracking/mlflow.db"}},
    ]
    config["workflows"] = config["workflows"][:1]
    path.write_text(json.dumps(config, indent=2))
    (tmp / "outside").mkdir()

    def run(name, **kwargs):
        return lambda: simulate(job, tmp / name, tiny2d, n=1, expect_ok=False, timeout=600, **kwargs)

    results = in_parallel(refused=run("refused"), allowed=run("allowed", resume_dirs=[other_job.parent]))
    return results, stolen, tmp


def test_persistor_source_checkpoint_is_confined(runs):
    results, stolen, _ = runs
    refused = results["refused"]
    assert not refused.left
    log = refused.log("server") + refused.errors()
    assert f"source_ckpt_file_full_name {str(stolen)!r}" in log and "resume_dirs" in log, log[-5000:]
    assert f"Loading checkpoint from {stolen}" not in log, "the other job's model was loaded"
    assert not (refused.job_dir / "app_server" / "FL_global_model.pt").exists()

    allowed = results["allowed"]
    unexpected = [e for e in allowed.errors().splitlines() if e.startswith("20") and "tracking_uri" not in e]
    assert allowed.returncode == 0 and not unexpected, allowed.errors()[-5000:]
    assert f"Loading checkpoint from {stolen}" in allowed.log("server")


def test_mlflow_store_stays_in_the_job(runs):
    """sqlite:////elsewhere/mlflow.db would create a database outside the job: refused, nothing created there;
    a store inside the job's folder works."""
    results, _, tmp = runs
    allowed = results["allowed"]
    log = allowed.log("server")
    assert "Receiver initialize failed" in log and f"tracking_uri 'sqlite:///{tmp / 'outside' / 'mlflow.db'}' refused" in log
    assert list((tmp / "outside").iterdir()) == [], "a store was created outside the job"
    assert (allowed.job_dir / "tracking" / "mlflow.db").is_file()


def test_mlflow_uri_that_reaches_out_is_refused():
    from fedseg.fl.tracking import MLflowServerReceiver, store_path

    for uri in (
        "http://tracker.example:5000",
        "https://x",
        "databricks://profile",
        "postgresql://u@h/db",
        "sqlite://host/x.db",
    ):
        with pytest.raises(ValueError, match="refused"):
            MLflowServerReceiver(tracking_uri=uri)
    assert store_path("sqlite:////abs/m.db") == ("sqlite", "/abs/m.db")
    assert store_path("sqlite:///rel/m.db?mode=rw") == ("sqlite", "rel/m.db")
    assert store_path("file:///abs/store") == ("file", "/abs/store")
    assert store_path("mlruns") == ("file", "mlruns")
    MLflowServerReceiver()  # NVFlare's default store: the job's own mlflow.db
