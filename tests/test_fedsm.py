"""FedSM and SoftPull in the real NVFlare simulator: model set, evaluation, resume, failures and bad updates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CUSTOM, TINY_ENGINE, copy_job, set_executor_path, simulate

from fedseg.modelset import load_model_set

FEDSM_DIR = Path("app_server") / "fedsm"


def fedsm_job(tmp_path: Path, name: str = "fedsm", **server_args) -> Path:
    engine = json.loads((Path(__file__).parents[1] / "jobs" / name / "app" / "config" / "config_fed_server.json")
                        .read_text())["workflows"][0]["args"]["engine"]
    return copy_job(name, tmp_path, server_args={"engine": {**engine, **TINY_ENGINE}, **server_args}, engine=TINY_ENGINE)


def all_arrays(groups) -> list[np.ndarray]:
    if isinstance(groups, dict):
        return [a for v in groups.values() for a in all_arrays(v)]
    return [np.asarray(groups)]


@pytest.fixture(scope="module")
def fedsm_run(tiny2d, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fedsm")
    job = fedsm_job(tmp, num_rounds=4)
    return simulate(job, tmp / "ws", tiny2d, n=3)


def test_fedsm_writes_model_set_and_evaluation(fedsm_run):
    out = fedsm_run.job_dir / FEDSM_DIR
    groups, info = load_model_set(out / "last.pt")
    assert info["site_names"] == ["site-1", "site-2", "site-3"] and info["round"] == 3
    assert set(groups) == {"global", "personal", "selector", "selector_optim"}
    assert sorted(groups["personal"]) == ["site-1", "site-2", "site-3"]
    assert all(np.isfinite(a).all() for a in all_arrays(groups) if a.dtype.kind == "f")
    # SoftPull with lam=0.7 keeps the personalized models apart from the global one
    key = next(k for k in groups["global"] if k.endswith("weight"))
    assert not np.allclose(groups["personal"]["site-1"][key], groups["global"][key])
    assert (out / "best.pt").exists() and json.loads((out / "history.json").read_text())
    evaluation = json.loads((out / "fedsm_evaluation.json").read_text())
    assert sorted(evaluation) == ["site-1", "site-2", "site-3"]
    for site, m in evaluation.items():
        assert {"global", "personalized", "super"} <= set(m) and m["section"] == "testing"
        assert sum(m["routing"].values()) == m["super"]["n_cases"]
    accuracy = np.mean([m["selector_accuracy"] for m in evaluation.values()])
    assert accuracy > 0.55, f"selector accuracy {accuracy:.2f} is not well above chance (0.33)"
    results = json.loads((fedsm_run.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert set(results["models"]) == {"FedSM super model", "FedSM global", "FedSM personalized (own site)"}
    assert "FedSM super model" in fedsm_run.log("server")  # the table is printed in the server log


def test_fedsm_best_set_is_tracked(fedsm_run):
    history = json.loads((fedsm_run.job_dir / FEDSM_DIR / "history.json").read_text())
    scores = [r["score"] for r in history if r.get("score") is not None]
    _, best_info = load_model_set(fedsm_run.job_dir / FEDSM_DIR / "best.pt")
    assert best_info["val_score"] == pytest.approx(max(scores))
    assert best_info["round"] == scores.index(max(scores)) - 1  # the set sent in that round was trained up to the round before


def test_fedsm_resumes_from_a_saved_set(fedsm_run, tiny2d, tmp_path):
    saved = fedsm_run.job_dir / FEDSM_DIR / "last.pt"
    job = fedsm_job(tmp_path, num_rounds=5, resume_from=str(saved))
    result = simulate(job, tmp_path / "ws", tiny2d, n=3, resume_dirs=[fedsm_run.workspace])
    history = json.loads((result.job_dir / FEDSM_DIR / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]  # the saved history carries over
    assert f"resuming from {saved}" in result.log("server")


def test_fedsm_inference_writes_segmentations(fedsm_run, tiny2d, tmp_path):
    out = tmp_path / "seg"
    datalist = tiny2d / "site-2" / "datalist.json"
    subprocess.run([sys.executable, "-m", "fedseg.infer", "fedsm", "--models", str(fedsm_run.job_dir / FEDSM_DIR / "best.pt"),
                    "--input", str(datalist), "--out", str(out)], check=True, env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"})
    summary = json.loads((out / "summary.json").read_text())
    records = summary["cases"]
    cases = json.loads(datalist.read_text())["testing"]
    assert len(records) == len(cases)
    for case, record in zip(cases, records):
        image = nib.load(str(datalist.parent / case["image"]))
        seg = nib.load(str(out / record["segmentation"]))
        assert seg.shape == image.shape and np.allclose(seg.affine, image.affine)
        assert record["model"] in ("global", "site-1", "site-2", "site-3") and 0 <= record["confidence"] <= 1
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1} and "dice" in record
    assert sum(summary["routing"].values()) == len(cases)


@pytest.fixture(scope="module")
def faulty_run(tiny2d, tmp_path_factory):
    """site-2 stalls past the task timeout in round 1; site-3 returns NaN weights in round 2."""
    tmp = tmp_path_factory.mktemp("fedsm_faults")
    job = fedsm_job(tmp, num_rounds=3, task_timeout=15)
    set_executor_path(job, "fedseg_faults.FaultySegExecutor")
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["faults"] = [
        {"site": "site-2", "round": 1, "mode": "stall", "seconds": 18, "task": "fedsm_train"},
        {"site": "site-3", "round": 2, "mode": "nan", "task": "fedsm_train"},
    ]
    client_file.write_text(json.dumps(client))
    return simulate(job, tmp / "ws", tiny2d, n=3)


def test_fedsm_survives_a_stalled_site(faulty_run):
    history = json.loads((faulty_run.job_dir / FEDSM_DIR / "history.json").read_text())
    by_round = {r["round"]: r for r in history}
    assert "site-2" not in by_round[1]["accepted"] and {"site-1", "site-3"} <= set(by_round[1]["accepted"])
    assert "site-2" in by_round[2]["accepted"]  # it comes back in the next round
    assert "no usable result from ['site-2']" in faulty_run.log("server")
    assert (faulty_run.job_dir / "app_server" / "fedseg_results.json").exists()


def test_fedsm_rejects_nan_update(faulty_run):
    history = json.loads((faulty_run.job_dir / FEDSM_DIR / "history.json").read_text())
    by_round = {r["round"]: r for r in history}
    assert "site-3" in by_round[2]["answered"] and "site-3" not in by_round[2]["accepted"]
    log = faulty_run.log("server")
    assert "REJECTED" in log and "update from site-3 rejected" in log and "NaN" in log
    for name in ("last.pt", "best.pt"):
        groups, _ = load_model_set(faulty_run.job_dir / FEDSM_DIR / name)
        assert all(np.isfinite(a).all() for a in all_arrays(groups) if a.dtype.kind == "f"), name
    # site-3's personalized model was kept, not replaced by its NaN update
    assert "FL_global_model.pt" in {p.name for p in (faulty_run.job_dir / "app_server").iterdir()}


def test_softpull_job(tiny2d, tmp_path):
    job = fedsm_job(tmp_path, name="softpull", num_rounds=2)
    result = simulate(job, tmp_path / "ws", tiny2d, n=2)
    results = json.loads((result.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert set(results["models"]) == {"SoftPull global", "SoftPull personalized (own site)"}
    groups, info = load_model_set(result.job_dir / FEDSM_DIR / "last.pt")
    assert "selector" not in groups and info["use_selector"] is False
