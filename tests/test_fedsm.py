"""FedSM and SoftPull in the real NVFlare simulator: model set, evaluation, experiment tracking (MLflow and
TensorBoard), resume, failures and bad updates, and sites that filter what they send as a private scope would."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CUSTOM, TINY_ENGINE, copy_job, set_executor_path, simulate

from fedseg.algorithms import weighted_average
from fedseg.algorithms.routing import GLOBAL
from fedseg.engine import load_numpy_state, load_optimizer_state, optimizer_state_to_numpy, state_to_numpy
from fedseg.methods.fedsm import (
    GAMMA_SWEEP,
    SelectorSettings,
    build_selector,
    gamma_sweep,
    routing_summary,
    selector_input,
    train_selector_on,
)
from fedseg.modelset import load_model_set

FEDSM_DIR = Path("app_server") / "fedsm"
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # this process reads the MLflow store with mlflow's client


# ---- the selector's "epoch" protocol against centralized full-batch Adam (torch double precision) ----------------
def _two_sites():
    torch.manual_seed(0)
    s = SelectorSettings(num_sites=2, protocol="epoch", input_size=16, channels=(4, 8), lr=1e-2, epochs=1, batch_size=2)
    init = state_to_numpy(build_selector(2, 1, s).double())
    # 5 and 3 images (batch_size 2: the gradients are accumulated over chunks of 2, 2, 1 and 2, 1)
    images = {0: torch.randn(5, 3, 16, 16, dtype=torch.float64), 1: torch.randn(3, 3, 16, 16, dtype=torch.float64) + 0.5}
    return s, init, images


def _fresh(s, init):
    net = build_selector(2, 1, s).double()
    load_numpy_state(net, init)
    return net


def _federated(s, init, images, optim):
    """Each site: one epoch of the protocol from the shared weights and Adam state; the server averages
    weights and Adam state with weighted_average, weights = image counts."""
    results = {k: train_selector_on(_fresh(s, init), optim, x, k, s) for k, x in images.items()}
    assert all(steps == 1 for _, _, steps in results.values())  # ONE step per local epoch
    counts = {k: float(len(x)) for k, x in images.items()}
    return (
        weighted_average({k: r[0] for k, r in results.items()}, counts),
        weighted_average({k: r[1] for k, r in results.items()}, counts),
    )


def _centralized(s, init, images, optim):
    """ONE full-batch Adam step on the union of both sites' images (mean cross-entropy over all of them)."""
    net = _fresh(s, init)
    optimizer = torch.optim.Adam(net.parameters(), lr=s.lr)
    load_optimizer_state(optimizer, net, {k: np.array(v, copy=True) for k, v in (optim or {}).items()})
    x = torch.cat([images[0], images[1]])
    y = torch.tensor([0] * len(images[0]) + [1] * len(images[1]))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    return state_to_numpy(net), optimizer_state_to_numpy(optimizer, net)


def _max_abs(a: dict, b: dict, keys) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in keys)


def test_epoch_protocol_matches_a_centralized_full_batch_step():
    s, init, images = _two_sites()
    # first step, from zero moments: the averaged first moment and step count ARE the centralized ones, exactly
    fed_w, fed_o = _federated(s, init, images, None)
    cen_w, cen_o = _centralized(s, init, images, None)
    assert sorted(fed_o) == sorted(cen_o)
    m_keys = [k for k in cen_o if k.endswith("::exp_avg")]
    assert _max_abs(fed_o, cen_o, m_keys) < 1e-14 and _max_abs(cen_o, {k: 0 * v for k, v in cen_o.items()}, m_keys) > 1e-3
    assert all(float(fed_o[k]) == float(cen_o[k]) == 1.0 for k in cen_o if k.endswith("::step"))
    # ... so the averaged gradient (m - beta1 * 0) / (1 - beta1) is the full-batch gradient over all 8 images.
    # The weights are not: Adam's first step is ~lr * sign(g) per site, and the mean of the sites' signs is not
    # the sign of the mean (the limit fedseg.methods.fedsm states)
    step = _max_abs(cen_w, init, cen_w)
    assert _max_abs(fed_w, cen_w, cen_w) > 0.1 * step

    # after warm-up: shared moments whose second moment is the sites' mean g^2 (what the averaged v tracks)
    site_v = {k: train_selector_on(_fresh(s, init), None, x, k, s)[1] for k, x in images.items()}
    warm = {}
    for key in init:
        g2 = sum(len(images[k]) / 8 * site_v[k][f"{key}::exp_avg_sq"] / (1 - 0.999) for k in images)
        warm.update(
            {
                f"{key}::step": np.array(50.0, np.float32),
                f"{key}::exp_avg_sq": g2,
                f"{key}::exp_avg": np.random.default_rng(1).normal(0, 1e-3, init[key].shape),
            }
        )
    fed_w, fed_o = _federated(s, init, images, warm)
    cen_w, cen_o = _centralized(s, init, images, warm)
    assert _max_abs(fed_o, cen_o, m_keys) < 1e-14
    assert all(float(fed_o[k]) == float(cen_o[k]) == 51.0 for k in cen_o if k.endswith("::step"))
    # the averaged weights equal the centralized step up to the second moments' (1 - beta2) g_k^2 term
    step = _max_abs(cen_w, init, cen_w)
    assert step > 1e-4 and _max_abs(fed_w, cen_w, cen_w) < 2e-3 * step
    # nothing was changed in place: the shared state the "server" sent is still the warm one
    assert all(float(warm[k]) == 50.0 for k in warm if k.endswith("::step"))


def test_batch_protocol_takes_a_step_per_batch():
    s, init, images = _two_sites()
    s.protocol, s.epochs = "batch", 2
    _, optim, steps = train_selector_on(_fresh(s, init), None, images[0], 0, s)
    assert steps == 2 * 3 and all(float(v) == 6.0 for k, v in optim.items() if k.endswith("::step"))


def test_selector_input_is_on_a_fixed_scale():
    rgb = torch.rand(2, 3, 100, 80) * 255
    x = selector_input(rgb, 64)
    assert x.shape == (2, 9, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
    # the stored-intensity view sees the scale, the appearance view does not; the detail view sees noise
    brighter = selector_input(rgb * 2, 64)
    assert torch.allclose(x[:, :3], brighter[:, :3], atol=1e-5) and not torch.allclose(x[:, 3:6], brighter[:, 3:6])
    smooth = torch.linspace(0, 1, 100).view(1, 1, 100, 1).expand(1, 1, 100, 80)
    noisy = smooth + 0.2 * torch.randn_like(smooth)
    assert float(selector_input(noisy, 32)[:, 2].mean()) > 5 * float(selector_input(smooth, 32)[:, 2].mean())
    # a colour cast survives (z-scored over all channels together), a constant image gives no NaN
    cast = rgb.clone()
    cast[:, 0] += 40
    assert not torch.allclose(x[:, :3], selector_input(cast, 64)[:, :3])
    assert torch.isfinite(selector_input(torch.full((1, 1, 10, 10), 7.0), 16)).all()
    # volumes: input_size_3d voxels per axis, the same network with 3-D convolutions
    settings = SelectorSettings(num_sites=4)
    volume = selector_input(torch.rand(2, 1, 20, 24, 18) * 1000, settings.size(3))
    assert volume.shape == (2, 3, 32, 32, 32) and build_selector(3, 1, settings)(volume).shape == (2, 4)


# ---- routing, confusion row and gamma sweep on synthetic selector outputs ----------------------------------
def test_routing_summary_and_gamma_sweep():
    sites = ["site-1", "site-2", "site-3"]
    probs = np.array(
        [
            [0.95, 0.03, 0.02],  # own site, confident
            [0.60, 0.30, 0.10],  # own site, below 0.9
            [0.20, 0.70, 0.10],  # site-2
            [0.10, 0.05, 0.85],
        ]
    )  # site-3
    summary = routing_summary(probs, 0, sites, 0.9)
    assert summary["selector_accuracy"] == 0.5  # argmax is the own site for 2 of 4 cases
    assert summary["routed_own"] == 0.25  # and only 1 is confident enough to reach the own model
    assert summary["routing"] == {"site-1": 1, "site-2": 0, "site-3": 0, GLOBAL: 3}
    low = routing_summary(probs, 0, sites, 0.65)
    assert low["routing"] == {"site-1": 1, "site-2": 1, "site-3": 1, GLOBAL: 1} and low["routed_own"] == 0.25
    assert routing_summary(probs, 1, sites, 0.0)["selector_accuracy"] == 0.25
    assert routing_summary(probs, 0, sites, 1.0)["routing"][GLOBAL] == 4  # gamma 1: the global model only

    case_dice = {
        GLOBAL: np.array([0.5, 0.5, 0.5, 0.5]),
        "site-1": np.array([0.9, 0.8, 0.7, 0.6]),
        "site-2": np.array([0.1, 0.2, 0.3, 0.4]),
    }  # no scores of site-3's model: its cases use global
    sweep = gamma_sweep(probs, sites, case_dice, [0.0, 0.65, 0.9, 1.0])
    assert sweep == pytest.approx(
        [np.mean([0.9, 0.8, 0.3, 0.5]), np.mean([0.9, 0.5, 0.3, 0.5]), np.mean([0.9, 0.5, 0.5, 0.5]), 0.5]
    )
    assert len(gamma_sweep(probs, sites, case_dice)) == len(GAMMA_SWEEP)


def fedsm_job(tmp_path: Path, name: str = "fedsm", **server_args) -> Path:
    engine = json.loads((Path(__file__).parents[1] / "jobs" / name / "app" / "config" / "config_fed_server.json").read_text())[
        "workflows"
    ][0]["args"]["engine_config"]
    return copy_job(name, tmp_path, server_args={"engine_config": {**engine, **TINY_ENGINE}, **server_args}, engine=TINY_ENGINE)


def all_arrays(groups) -> list[np.ndarray]:
    if isinstance(groups, dict):
        return [a for v in groups.values() for a in all_arrays(v)]
    return [np.asarray(groups)]


# what a recipe or jobgen adds to config_fed_server.json's "components" for MLflow (no tracking_uri: NVFlare's
# default store, <job result dir>/mlflow.db); the job's TensorBoard receiver already takes the server's own events
# and those forwarded from the sites
MLFLOW_COMPONENT = {
    "id": "mlflow_receiver",
    "path": "fedseg.fl.tracking.MLflowServerReceiver",
    "args": {"kw_args": {"experiment_name": "fedseg-fedsm", "run_name": "fedsm"}},
}
SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def fedsm_run(tiny2d, tmp_path_factory):
    """jobs/fedsm on the 3 tiny sites, 3 rounds, with MLflow tracking."""
    tmp = tmp_path_factory.mktemp("fedsm")
    job = fedsm_job(tmp, num_rounds=3)
    path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(path.read_text())
    assert any(c["id"] == "tb_receiver" for c in server["components"])
    server["components"].append(MLFLOW_COMPONENT)
    path.write_text(json.dumps(server, indent=2))
    return simulate(job, tmp / "ws", tiny2d, n=len(SITES))


def test_fedsm_writes_model_set_and_evaluation(fedsm_run):
    out = fedsm_run.job_dir / FEDSM_DIR
    groups, info = load_model_set(out / "last.pt")
    assert info["site_names"] == ["site-1", "site-2", "site-3"] and info["round"] == 2
    assert set(groups) == {"global", "personal", "selector"}  # the default "lda" selector keeps no Adam state
    assert sorted(groups["personal"]) == ["site-1", "site-2", "site-3"]
    assert all(np.isfinite(a).all() for a in all_arrays(groups) if a.dtype.kind == "f")
    # SoftPull with lam=0.7 keeps the personalized models apart from the global one
    key = next(k for k in groups["global"] if k.endswith("weight"))
    assert not np.allclose(groups["personal"]["site-1"][key], groups["global"][key])
    assert (out / "best.pt").exists() and json.loads((out / "history.json").read_text())
    evaluation = json.loads((out / "fedsm_evaluation.json").read_text())
    assert sorted(evaluation) == ["site-1", "site-2", "site-3"]
    for _site, m in evaluation.items():
        assert {"global", "personalized", "super"} <= set(m) and m["section"] == "testing"
        assert sum(m["routing"].values()) == m["super"]["n_cases"]
    accuracy = np.mean([m["selector_accuracy"] for m in evaluation.values()])
    assert accuracy > 0.55, f"selector accuracy {accuracy:.2f} is not well above chance (0.33)"
    results = json.loads((fedsm_run.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert set(results["models"]) == {"FedSM super model", "FedSM global", "FedSM personalized (own site)"}
    assert "FedSM super model" in fedsm_run.log("server")  # the table is printed in the server log


def test_fedsm_final_evaluation_separates_argmax_from_routing_and_sweeps_gamma(fedsm_run):
    evaluation = json.loads((fedsm_run.job_dir / FEDSM_DIR / "fedsm_evaluation.json").read_text())
    extra = json.loads((fedsm_run.job_dir / "app_server" / "fedseg_results.json").read_text())["extra"]
    sites = ["site-1", "site-2", "site-3"]
    for site, m in evaluation.items():
        n = m["super"]["n_cases"]
        assert list(m["routing"]) == [*sites, "global"]  # this site's row of the routing confusion matrix
        assert m["routing"][site] == round(m["routed_own"] * n) and m["routed_own"] <= m["selector_accuracy"]
        sweep = m["gamma_sweep"]
        assert len(sweep) == len(GAMMA_SWEEP)
        # one scoring of each model: the sweep at the gamma used IS the super model, at gamma 1 the global model
        assert sweep[GAMMA_SWEEP.index(extra["gamma"])] == pytest.approx(m["super"]["dice"], abs=1e-9)
        assert sweep[-1] == pytest.approx(m["global"]["dice"], abs=1e-9)
        assert extra["gamma_sweep"]["dice"][site] == sweep
    assert extra["gamma_sweep"]["gammas"] == list(GAMMA_SWEEP)
    assert extra["gamma_sweep"]["mean"] == pytest.approx(
        [np.mean([evaluation[s]["gamma_sweep"][i] for s in sites]) for i in range(len(GAMMA_SWEEP))]
    )
    assert extra["selector_accuracy"] == {s: evaluation[s]["selector_accuracy"] for s in sites}
    assert extra["routed_own"] == {s: evaluation[s]["routed_own"] for s in sites}
    # oracle routing (the site's identity) next to the learned routing, labelled as such
    assert extra["super_oracle"]["dice"] == {s: evaluation[s]["personalized"]["dice"] for s in sites}
    assert "site identity" in extra["super_oracle"]["label"]
    assert extra["super_learned"]["dice"] == {s: evaluation[s]["super"]["dice"] for s in sites}
    assert extra["super_learned"]["mean"] == pytest.approx(np.mean([evaluation[s]["super"]["dice"] for s in sites]))
    assert extra["selector"]["protocol"] == "lda"
    # gamma was chosen on the validation cases, before the test cases were scored: the best mean sweep there
    chosen = extra["gamma_validation"]
    assert extra["gamma_policy"] == "validation" and chosen["gammas"] == list(GAMMA_SWEEP)
    assert sorted(chosen["dice"]) == sites and all(len(v) == len(GAMMA_SWEEP) for v in chosen["dice"].values())
    best = max(chosen["mean_dice"])
    assert extra["gamma"] == max(g for g, d in zip(GAMMA_SWEEP, chosen["mean_dice"]) if d == best)
    assert f"gamma chosen on the sites' validation cases: {extra['gamma']}" in fedsm_run.log("server")
    assert extra["selector_status"]["status"] in ("learned", "unused", "collapsed")
    assert extra["super_learned"]["gamma"] == extra["gamma"]


def test_fedsm_records_the_selector_every_round(fedsm_run):
    out = fedsm_run.job_dir / FEDSM_DIR
    history = json.loads((out / "history.json").read_text())
    sites = ["site-1", "site-2", "site-3"]
    assert [r["round"] for r in history] == [0, 1, 2]
    for record in history:
        selector = record["selector"]  # measured on each site's 2 validation cases with the selector sent that round
        assert sorted(selector["accuracy"]) == sorted(selector["routed_own"]) == sorted(selector["confusion"]) == sites
        for site in sites:
            row = selector["confusion"][site]
            assert list(row) == [*sites, "global"] and sum(row.values()) == 2
            assert row[site] / 2 == pytest.approx(selector["routed_own"][site])
            assert selector["routed_own"][site] <= selector["accuracy"][site]
            assert record["metrics"][site]["val_selector_acc"] == selector["accuracy"][site]
            assert record["metrics"][site]["selector_steps"] == 0  # "lda": the sites send statistics, no steps
        # where the round's time went, as FedAvg says it: each site's validation, training (both networks) and
        # selector work within the tasks, the server's screening and aggregation, and saving
        t = record["seconds"]
        assert sorted(t["sites"]) == sites
        for site, own in t["sites"].items():
            assert sorted(own) == ["selector_seconds", "train_seconds", "validate_seconds"] and own["train_seconds"] > 0
            assert all(own[k] == pytest.approx(record["metrics"][site][k], abs=1e-3) for k in own)
        slowest = max(sum(v.values()) for v in t["sites"].values())
        assert t["tasks"] >= slowest - 2e-3 and t["tasks_beyond_slowest_site"] == pytest.approx(t["tasks"] - slowest, abs=3e-3)
        assert t["screen_and_aggregate"] >= 0 and t["save"] > 0
    results = json.loads((fedsm_run.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert results["extra"]["selector_history"] == [{"round": r["round"], **r["selector"]} for r in history]
    groups, info = load_model_set(out / "last.pt")
    assert info["selector"]["protocol"] == "lda" and len(info["selector_input"]["views_per_channel"]) == 3
    # the sites' selector curves reach the server's TensorBoard
    events = b"".join(p.read_bytes() for p in (fedsm_run.job_dir / "tb_events").rglob("events.out.tfevents*"))
    for tag in (b"fedsm/val_selector_acc", b"fedsm/val_routed_own", b"fedsm/val_route/global", b"fedsm/val_route/site-2"):
        assert tag in events, tag


def test_fedsm_selector_head_is_the_discriminant_of_the_sites_features(fedsm_run, tiny2d):
    """The "lda" protocol: the selector's features never move, and the head the server ends with is exactly the
    linear discriminant of the sites' training features under them (recomputed here from the sites' data)."""
    from fedseg.algorithms.selector_head import fit_lda_head
    from fedseg.methods.fedsm import selector_statistics
    from fedseg_tools.bench.selector_study import site_inputs

    out = fedsm_run.job_dir / FEDSM_DIR
    last, info = load_model_set(out / "last.pt")
    best, _ = load_model_set(out / "best.pt")
    features = [k for k in last["selector"] if not k.startswith("head.")]
    assert features and all(np.array_equal(last["selector"][k], best["selector"][k]) for k in features)
    s = SelectorSettings.from_meta(3, info["selector"])
    inputs, dims, channels = site_inputs(str(tiny2d), info["engine"])
    net = build_selector(dims, channels, s)
    load_numpy_state(net, last["selector"])
    weights, biases = fit_lda_head(
        [selector_statistics(net, inputs[site]["training"]) for site in info["site_names"]], s.shrinkage
    )
    np.testing.assert_allclose(last["selector"]["head.weight"], weights, rtol=1e-3, atol=1e-3 * np.abs(weights).max())
    np.testing.assert_allclose(last["selector"]["head.bias"], biases, rtol=1e-3, atol=1e-3 * np.abs(biases).max())


def test_fedsm_best_set_is_tracked(fedsm_run):
    history = json.loads((fedsm_run.job_dir / FEDSM_DIR / "history.json").read_text())
    scores = [r["score"] for r in history if r.get("score") is not None]
    _, best_info = load_model_set(fedsm_run.job_dir / FEDSM_DIR / "best.pt")
    assert best_info["val_score"] == pytest.approx(max(scores))
    assert best_info["round"] == scores.index(max(scores)) - 1  # the set sent in that round was trained up to the round before
    # the final test scores are for that best-validated set (the model-selection rule of every FedSeg method)
    assert f"final evaluation of the best model set (best.pt: trained up to round {best_info['round']}" in fedsm_run.log(
        "server"
    )


# ---- experiment tracking: the server's own per-round metrics reach MLflow (a local SQLite store) and TensorBoard --
def server_name(result) -> str:
    """The server's identity in the run (the folder TensorBoard writes its own records to)."""
    names = [p.name for p in (result.job_dir / "tb_events").iterdir() if not p.name.startswith("site-")]
    assert len(names) == 1, names
    return names[0]


def expected_series(result) -> dict[str, dict[int, float]]:
    """{tag: {round: value}} the server must have tracked, from its own history.json."""
    history = json.loads((result.job_dir / FEDSM_DIR / "history.json").read_text())
    series: dict[str, dict[int, float]] = {}
    for record in history:
        accuracy = record["selector"]["accuracy"]
        assert accuracy, record  # every site scored the selector it received
        for site, value in accuracy.items():
            series.setdefault(f"fedsm/selector_accuracy/{site}", {})[record["round"]] = value
        series.setdefault("fedsm/selector_accuracy_mean", {})[record["round"]] = sum(accuracy.values()) / len(accuracy)
        series.setdefault("fedsm/val_super_dice", {})[record["round"]] = record["score"]
    assert set(next(iter(series.values()))) == {0, 1, 2}
    return series


def test_mlflow_run_holds_the_servers_selector_accuracy(fedsm_run):
    from mlflow.tracking import MlflowClient

    db = fedsm_run.job_dir / "mlflow.db"
    assert db.is_file(), sorted(p.name for p in fedsm_run.job_dir.iterdir())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("fedseg-fedsm")
    runs = {r.data.tags.get("site"): r for r in client.search_runs([experiment.experiment_id])}
    server = server_name(fedsm_run)
    assert set(runs) == {server, *SITES}, set(runs)
    run_id, expected = runs[server].info.run_id, expected_series(fedsm_run)
    assert set(runs[server].data.metrics) == set(expected)  # the server's own metrics, nothing of the sites'
    for tag, by_round in expected.items():
        logged = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert logged == pytest.approx(by_round), tag
    # the sites' own curves (forwarded from the sites) arrive in their own runs
    assert all("fedsm/val_selector_acc" in runs[site].data.metrics for site in SITES)


def test_tensorboard_gets_the_same_server_tags(fedsm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fedsm_run.job_dir / "tb_events" / server_name(fedsm_run)))
    events.Reload()
    for tag, by_round in expected_series(fedsm_run).items():
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx(by_round, abs=1e-6), tag  # TensorBoard stores float32


def test_fedsm_inference_writes_segmentations(fedsm_run, tiny2d, tmp_path):
    out = tmp_path / "seg"
    datalist = tiny2d / "site-2" / "datalist.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg.infer",
            "fedsm",
            "--models",
            str(fedsm_run.job_dir / FEDSM_DIR / "best.pt"),
            "--input",
            str(datalist),
            "--out",
            str(out),
        ],
        check=True,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
    )
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
    """2 sites: site-2 stalls past the task timeout in round 1; site-1 returns NaN weights in round 2."""
    tmp = tmp_path_factory.mktemp("fedsm_faults")
    # the reference's selector protocol (Adam steps, shared moments): its state is screened like the models
    job = fedsm_job(tmp, num_rounds=3, task_timeout=15, selector={"protocol": "epoch"})
    set_executor_path(job, "fedseg_faults.FaultySegExecutor")
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["faults"] = [
        {"site": "site-2", "round": 1, "mode": "stall", "seconds": 18, "task": "fedsm_train"},
        {"site": "site-1", "round": 2, "mode": "nan", "task": "fedsm_train"},
    ]
    client_file.write_text(json.dumps(client))
    return simulate(job, tmp / "ws", tiny2d, n=2)


def test_fedsm_survives_a_stalled_site(faulty_run):
    history = json.loads((faulty_run.job_dir / FEDSM_DIR / "history.json").read_text())
    by_round = {r["round"]: r for r in history}
    assert "site-2" not in by_round[1]["accepted"] and "site-1" in by_round[1]["accepted"]
    assert "site-2" in by_round[2]["accepted"]  # it comes back in the next round
    assert "no usable result from ['site-2']" in faulty_run.log("server")
    assert (faulty_run.job_dir / "app_server" / "fedseg_results.json").exists()
    # the "epoch" protocol: 4 selector epochs of one Adam step each, from the shared step count, every round
    assert all(m["selector_steps"] == 4 for r in history for s, m in r["metrics"].items() if s in r["accepted"])
    groups, info = load_model_set(faulty_run.job_dir / FEDSM_DIR / "last.pt")
    assert info["selector"]["protocol"] == "epoch"
    assert {float(v) for k, v in groups["selector_optim"].items() if k.endswith("::step")} == {12.0}


def test_fedsm_rejects_nan_update(faulty_run):
    history = json.loads((faulty_run.job_dir / FEDSM_DIR / "history.json").read_text())
    by_round = {r["round"]: r for r in history}
    assert "site-1" in by_round[2]["answered"] and "site-1" not in by_round[2]["accepted"]
    log = faulty_run.log("server")
    # the fault NaNs the update's last float array (the selector's Adam state): refused as non-finite
    rejected = [line for line in log.splitlines() if "REJECTED" in line and "site-1" in line]
    assert any("NaN" in line or "non-finite" in line for line in rejected), rejected
    for name in ("last.pt", "best.pt"):
        groups, _ = load_model_set(faulty_run.job_dir / FEDSM_DIR / name)
        assert all(np.isfinite(a).all() for a in all_arrays(groups) if a.dtype.kind == "f"), name
    # site-1's personalized model was kept, not replaced by its NaN update
    assert "FL_global_model.pt" in {p.name for p in (faulty_run.job_dir / "app_server").iterdir()}


def test_softpull_job(tiny2d, tmp_path):
    job = fedsm_job(tmp_path, name="softpull", num_rounds=1)
    result = simulate(job, tmp_path / "ws", tiny2d, n=2)
    results = json.loads((result.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert set(results["models"]) == {"SoftPull global", "SoftPull personalized (own site)"}
    groups, info = load_model_set(result.job_dir / FEDSM_DIR / "last.pt")
    assert "selector" not in groups and info["use_selector"] is False


# ---- one run: sites that hold the same images and filter their replies as a private scope would ---------------------
PRIVATE_SCOPE_ARGS = {"noise_vars": [".*"], "noise_std": 0.05, "optimizer_state": "send"}
SITE_TASKS = ["fedsm_train", "fedsm_evaluate", "validate", "submit_model"]


def keys_anywhere(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in keys_anywhere(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in keys_anywhere(v)}
    return set()


@pytest.fixture(scope="module")
def private_same_data_run(tiny2d, tmp_path_factory):
    """FedSM, 2 rounds, 2 sites that both hold site-1's images, every site filtering its replies as a private scope
    would (per-case results stripped, weights perturbed, the selector's statistics sent as they are: the noise
    touches no selector output, so the collapse below is the data's, not the filter's).

    The NVFlare 2.9 simulator does not apply a privacy scope at a site: its SimulatorClientRunManager
    .create_job_processing_context_properties leaves out FLContextKey.SCOPE_OBJECT, which
    nvflare.apis.utils.task_utils.get_filters needs. (It copies <workspace>/local/privacy.json to the server too,
    and the server then applies the scope to the results it receives: after they left the sites.) So the filter is
    put in the job's own task_result_filters here; in a deployment it sits in local/privacy.json (tests/test_poc.py)."""
    tmp = tmp_path_factory.mktemp("fedsm_private_same")
    data = tmp / "same"
    for site in ("site-1", "site-2"):
        shutil.copytree(tiny2d / "site-1", data / site)
    job = fedsm_job(tmp, num_rounds=2)
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["engine"]["local_epochs"] = 1
    client["task_result_filters"] = [
        {"tasks": SITE_TASKS, "filters": [{"path": "fedseg.fl.privacy.LayerPrivacyFilter", "args": PRIVATE_SCOPE_ARGS}]}
    ]
    client_file.write_text(json.dumps(client, indent=2))
    return simulate(job, tmp / "ws", data, n=2)


def test_fedsm_says_when_its_selector_cannot_learn(private_same_data_run):
    """Every site holds the same images: no selector can tell them apart. Each image has one argmax for both sites,
    so the sites' argmax accuracies sum to 1 and one is at or below chance: the run must say that the selector
    collapsed, in its results, its table and the server log, instead of presenting a super model."""
    run = private_same_data_run
    results = json.loads((run.job_dir / "app_server" / "fedseg_results.json").read_text())
    status = results["extra"]["selector_status"]
    accuracy = results["extra"]["selector_accuracy"]
    assert sorted(accuracy) == ["site-1", "site-2"] and sum(accuracy.values()) == pytest.approx(1.0)
    assert status["status"] == "collapsed" and status["below_chance"], status
    assert "at or below chance" in status["reasons"][0]
    log = run.log("server")
    assert "SELECTOR COLLAPSED" in log and "WARNING: FedSM selector collapsed" in log


def test_server_receives_no_per_case_results_from_private_sites(private_same_data_run):
    run = private_same_data_run
    out = run.job_dir / "app_server"
    evaluation = json.loads((out / "fedsm" / "fedsm_evaluation.json").read_text())
    results = json.loads((out / "fedseg_results.json").read_text())
    history = json.loads((out / "fedsm" / "history.json").read_text())
    assert sorted(evaluation) == ["site-1", "site-2"] and len(history) == 2  # the run completed
    for name, record in (("fedsm_evaluation.json", evaluation), ("fedseg_results.json", results), ("history.json", history)):
        keys = keys_anywhere(record)
        assert not {k for k in keys if k.endswith("_per_case")} and "case_names" not in keys, name
    for site, metrics in evaluation.items():
        assert np.isfinite(metrics["super"]["dice"]) and metrics["super"]["n_cases"] > 0, site  # summaries still arrive
    for site in ("site-1", "site-2"):
        log = run.log(site)
        assert f"privacy filter at {site}, task fedsm_evaluate: removed per-case results" in log
        assert re.search(
            rf"privacy filter at {site}, task fedsm_train: zeroed 0 tensor\(s\) \[\]; perturbed \d+ tensor\(s\)", log
        )
    # the selector's feature statistics ("optimizer_state": "send") left without noise, which would have made their
    # scatter asymmetric: the server accepted every site's and fitted the selector head from them
    server_log = run.log("server")
    assert "REJECTED selector statistics" not in server_log and "selector head not fitted" not in server_log
    assert "selector head fitted without statistics" not in server_log
    groups, _ = load_model_set(out / "fedsm" / "last.pt")
    assert np.isfinite(groups["selector"]["head.weight"]).all() and np.abs(groups["selector"]["head.weight"]).max() > 0
