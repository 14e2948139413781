"""Experiment tracking: the server's own per-round metrics reach MLflow (a local SQLite store in the workspace)
and TensorBoard, in a real simulator run of a tiny FedSM job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUSTOM, TINY_ENGINE, copy_job, simulate

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # this process reads the store with mlflow's client

FEDSM_DIR = "fedsm"
# what a recipe or jobgen adds to config_fed_server.json's "components" for MLflow (no tracking_uri: NVFlare's
# default store, <job result dir>/mlflow.db)
MLFLOW_COMPONENT = {
    "id": "mlflow_receiver",
    "path": "fedseg.fl.tracking.MLflowServerReceiver",
    "args": {"kw_args": {"experiment_name": "fedseg-fedsm", "run_name": "fedsm"}},
}
# TensorBoard: NVFlare's receiver with its default events (the server's own and those forwarded from sites)
TB_COMPONENT = {"id": "tb_receiver", "path": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver", "args": {}}


def with_tracking(job: Path) -> Path:
    """Add the MLflow receiver to the job and let its TensorBoard receiver take the server's own events too."""
    path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(path.read_text())
    server["components"] = [c for c in server["components"] if c["id"] != "tb_receiver"] + [TB_COMPONENT, MLFLOW_COMPONENT]
    path.write_text(json.dumps(server, indent=2))
    return job


@pytest.fixture(scope="module")
def tracked_fedsm(tiny2d, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    engine = json.loads((CUSTOM.parent / "jobs" / "fedsm" / "app" / "config" / "config_fed_server.json").read_text())[
        "workflows"
    ][0]["args"]["engine"]
    job = copy_job("fedsm", tmp, server_args={"engine": {**engine, **TINY_ENGINE}, "num_rounds": 2}, engine=TINY_ENGINE)
    return simulate(with_tracking(job), tmp / "ws", tiny2d, n=2)


def server_name(result) -> str:
    """The server's identity in the run (the folder TensorBoard writes its own records to)."""
    names = [p.name for p in (result.job_dir / "tb_events").iterdir() if not p.name.startswith("site-")]
    assert len(names) == 1, names
    return names[0]


def expected_series(result) -> dict[str, dict[int, float]]:
    """{tag: {round: value}} the server must have tracked, from its own history.json."""
    history = json.loads((result.job_dir / "app_server" / FEDSM_DIR / "history.json").read_text())
    series: dict[str, dict[int, float]] = {}
    for record in history:
        accuracy = record["selector"]["accuracy"]
        assert accuracy, record  # every site scored the selector it received
        for site, value in accuracy.items():
            series.setdefault(f"fedsm/selector_accuracy/{site}", {})[record["round"]] = value
        series.setdefault("fedsm/selector_accuracy_mean", {})[record["round"]] = sum(accuracy.values()) / len(accuracy)
        series.setdefault("fedsm/val_super_dice", {})[record["round"]] = record["score"]
    assert set(next(iter(series.values()))) == {0, 1}
    return series


def test_mlflow_run_holds_the_servers_selector_accuracy(tracked_fedsm):
    from mlflow.tracking import MlflowClient

    db = tracked_fedsm.job_dir / "mlflow.db"
    assert db.is_file(), sorted(p.name for p in tracked_fedsm.job_dir.iterdir())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("fedseg-fedsm")
    runs = {r.data.tags.get("site"): r for r in client.search_runs([experiment.experiment_id])}
    server = server_name(tracked_fedsm)
    assert set(runs) == {server, "site-1", "site-2"}, set(runs)
    run_id, expected = runs[server].info.run_id, expected_series(tracked_fedsm)
    assert set(runs[server].data.metrics) == set(expected)  # the server's own metrics, nothing of the sites'
    for tag, by_round in expected.items():
        logged = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert logged == pytest.approx(by_round), tag
    # the sites' own curves (forwarded from the sites) arrive in their own runs
    assert all("fedsm/val_selector_acc" in runs[site].data.metrics for site in ("site-1", "site-2"))


def test_tensorboard_gets_the_same_server_tags(tracked_fedsm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_fedsm.job_dir / "tb_events" / server_name(tracked_fedsm)))
    events.Reload()
    for tag, by_round in expected_series(tracked_fedsm).items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(by_round, abs=1e-6), tag  # TensorBoard stores float32


def test_importing_the_receiver_turns_mlflow_telemetry_off(tmp_path):
    """mlflow's telemetry would send to the internet; a site has no such egress. In a clean environment (no CI or
    pytest variables, which mlflow itself treats as 'do not send'), importing the receiver leaves no client."""
    code = (
        "import fedseg.fl.tracking\nfrom mlflow.telemetry.client import get_telemetry_client\nprint(get_telemetry_client())\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(CUSTOM)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "None", out.stdout
