"""Foundation: engine, job folders, FedAvg/FedProx in the real NVFlare simulator (code-less and BYOC),
baselines and the result table. (The data errors a site reports: tests/test_case_names.py.)"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CUSTOM, JOBS, REPO, TINY_ENGINE, copy_job, simulate

from fedseg.data import load_datalist
from fedseg.engine import EngineConfig, SegEngine, load_numpy_state, state_to_numpy
from fedseg.engine.config import DEFAULT_ENGINE, resolve_engine
from fedseg.report import format_table, load_results, site_mean
from fedseg_tools.baselines import load_sites, run_centralized, run_local


def tiny_cfg(**extra) -> EngineConfig:
    return EngineConfig.from_dict(resolve_engine({**TINY_ENGINE, **extra}))


def untrained_mean_dice(data: Path, sites: list[str]) -> float:
    engines = {s: e for s, e in load_sites(data, tiny_cfg()).items() if s in sites}
    assert sorted(engines) == sorted(sites)
    torch.manual_seed(0)
    net = next(iter(engines.values())).new_network()
    return float(np.mean([e.evaluate(net, "testing").summary()["dice"] for e in engines.values()]))


# ---- engine ----------------------------------------------------------------------------------------------
def test_engine_trains_2d_and_beats_untrained(tiny2d):
    engine = SegEngine(tiny_cfg(), load_datalist(str(tiny2d / "site-1" / "datalist.json")), site="site-1")
    net = engine.new_network()
    before = engine.evaluate(net, "testing").summary()["dice"]
    stats = engine.train(net, 80)
    after = engine.evaluate(net, "testing", with_hd95=True).summary()
    assert stats.steps == 80 and np.isfinite(stats.mean_loss)
    assert after["dice"] > before + 0.2 and after["dice"] > 0.55, (before, after)
    assert np.isfinite(after["hd95"])
    assert after["n_cases"] == len(engine.cases("testing"))


def test_engine_3d_multiclass(tmp_path):
    from fedseg.data.synthetic import generate_dataset

    generate_dataset(str(tmp_path / "d"), n_sites=2, spatial_dims=3, seed=1, num_classes=3, size="tiny")
    cfg = EngineConfig.from_dict(
        resolve_engine(
            {
                "spatial_dims": 3,
                "num_classes": 3,
                "roi_size": [16, 16, 16],
                "network": {"channels": [8, 16, 32]},
                "batch_size": 2,
            }
        )
    )
    engine = SegEngine(cfg, load_datalist(str(tmp_path / "d" / "site-1" / "datalist.json")), site="site-1")
    net = engine.new_network()
    engine.train(net, 3)
    result = engine.evaluate(net, "testing")
    assert result.dice.shape == (len(engine.cases("testing")), 2)  # per case, per foreground class
    summary = result.summary()
    assert "dice_class1" in summary and "dice_class2" in summary


def test_numpy_state_roundtrip_and_errors():
    cfg = tiny_cfg()
    engine = SegEngine(cfg, {"training": []}, site="x")
    a, b = engine.new_network(), engine.new_network()
    load_numpy_state(b, state_to_numpy(a))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    params = state_to_numpy(a)
    params.pop(next(iter(params)))
    with pytest.raises(KeyError, match="missing"):
        load_numpy_state(b, params, site="site-9")


# ---- jobs ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the generator's subprocess spends ~7 s importing torch and MONAI
def test_job_folders_match_the_generator(tmp_path):
    """jobs/ is the generator's output: a hand edit that breaks consistency (e.g. network on one side) fails here."""
    subprocess.run(
        [sys.executable, "-m", "fedseg.jobgen", "--out", str(tmp_path)],
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(JOBS) for p in JOBS.rglob("*") if p.is_file())
    assert generated == committed
    for rel in generated:
        assert filecmp.cmp(tmp_path / rel, JOBS / rel, shallow=False), f"jobs/{rel} differs from the generator"


def test_fedavg_in_simulator_codeless_job(tiny2d, tmp_path):
    """jobs/fedavg as an installed site runs it: no code in the job, fedseg importable and allow-listed."""
    job = copy_job("fedavg", tmp_path, server_args={"num_rounds": 3}, engine=TINY_ENGINE)
    assert not (job / "app" / "custom").exists()
    sites = ["site-1", "site-2"]  # two sites show all of it: the aggregate, each site's own scores, the table
    result = simulate(job, tmp_path / "ws", tiny2d, n=len(sites))
    run_dir = result.job_dir
    assert (run_dir / "app_server" / "FL_global_model.pt").exists()
    assert (run_dir / "app_server" / "best_FL_global_model.pt").exists()
    assert list((run_dir / "tb_events").rglob("events.out.tfevents*")), "no TensorBoard curves streamed to the server"
    results = load_results(result.workspace, "fedavg")
    final = results["models"]["global (last)"]
    assert sorted(final) == sites
    for site, scores in final.items():
        n_test = len(json.loads((tiny2d / site / "datalist.json").read_text())["testing"])
        assert scores["n_cases"] == n_test and len(scores["dice_per_case"]) == n_test
    assert {f"site update: {site}" for site in sites} <= set(results["models"])
    assert site_mean(final) > untrained_mean_dice(tiny2d, sites) + 0.05
    site_log = result.log("site-1")
    assert "received model val_dice=" in site_log and "steps/epoch" in site_log
    assert "FedProx" not in site_log  # plain FedAvg: no proximal term
    # every round says where its time went: the tasks, each site's own validation and training within them, the
    # server's screening and aggregation, and saving
    history = json.loads((run_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    for r in history:
        t = r["seconds"]
        assert sorted(t["sites"]) == sites
        assert all(v["validate_seconds"] > 0 and v["train_seconds"] > 0 for v in t["sites"].values())
        slowest = max(v["validate_seconds"] + v["train_seconds"] for v in t["sites"].values())
        assert t["tasks"] >= slowest - 1e-3 and t["tasks_beyond_slowest_site"] == pytest.approx(t["tasks"] - slowest, abs=2e-3)
        assert t["screen_and_aggregate"] >= 0 and t["save"] > 0
    table = format_table(results)
    assert "global (last)" in table and "site-2" in table


def test_fedprox_job_sets_a_proximal_term():
    server = json.loads((JOBS / "fedprox" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["fedprox_mu"] > 0


def test_byoc_job_carries_its_code(tiny2d, tmp_path):
    """The jobs with the package bundled (BYOC) run with fedseg NOT on PYTHONPATH. jobgen writes the FedAvg and
    FedProx jobs alike but for the name and mu, so the FedProx job's run stands for both (mu = 0, the FedAvg path,
    runs in the code-less job above); its sites train with the proximal term."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg.jobgen",
            "--out",
            str(tmp_path),
            "--only",
            "fedavg",
            "fedprox",
            "--byoc",
            "--rounds",
            "1",
            "--engine",
            json.dumps({**TINY_ENGINE, "local_epochs": 1}),
        ],
        check=True,
        cwd=REPO,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
    )
    fedavg, job = tmp_path / "fedavg", tmp_path / "fedprox"
    files = sorted(p.relative_to(job) for p in job.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(fedavg) for p in fedavg.rglob("*") if p.is_file())
    assert Path("app/custom/fedseg/fl/executor.py") in files
    differ = sorted(str(f) for f in files if not filecmp.cmp(fedavg / f, job / f, shallow=False))
    assert differ == ["app/config/config_fed_server.json", "meta.json"], differ
    configs = [json.loads((j / "app" / "config" / "config_fed_server.json").read_text()) for j in (fedavg, job)]
    mus = [c["workflows"][0]["args"].pop("fedprox_mu") for c in configs]
    assert mus[0] == 0 < mus[1] and configs[0] == configs[1], mus
    metas = [json.loads((j / "meta.json").read_text()) for j in (fedavg, job)]
    assert [m.pop("name") for m in metas] == ["fedavg", "fedprox"] and metas[0] == metas[1]
    result = simulate(job, tmp_path / "ws", tiny2d, n=2, on_pythonpath=False)
    assert "global (last)" in load_results(result.workspace)["models"]
    # the code that ran is the job's own copy, deployed into each site's app
    assert (result.workspace / "site-1" / "simulate_job" / "app_site-1" / "custom" / "fedseg" / "engine").is_dir()
    for site in ("site-1", "site-2"):
        log = result.log(site)
        assert " steps, loss " in log and f"FedProx mu={mus[1]}" in log, log[-3000:]


# ---- baselines and report ----------------------------------------------------------------------------------
def test_baselines_same_budget_and_tables(tiny2d, tmp_path):
    engines = load_sites(tiny2d, tiny_cfg())
    budget = sum(2 * e.local_steps() for e in engines.values())
    local = run_local(engines, rounds=2, log=lambda *_: None)
    central = run_centralized(engines, tiny_cfg(), rounds=2, log=lambda *_: None)
    assert local["extra"]["train_steps_total"] == budget == central["extra"]["train_steps_total"]
    matrix = local["extra"]["cross_site_dice_matrix"]
    assert sorted(matrix) == sorted(engines) and all(sorted(row) == sorted(engines) for row in matrix.values())
    (tmp_path / "fedseg_results.json").write_text(json.dumps(central))
    out = subprocess.run(
        [sys.executable, "-m", "fedseg.report", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    assert "centralized" in out and "site-1" in out and "mean over sites" in out


def test_default_engine_is_valid():
    cfg = EngineConfig.from_dict(DEFAULT_ENGINE)
    assert cfg.network_args()["out_channels"] == cfg.num_classes
    with pytest.raises(ValueError, match="unknown engine setting"):
        EngineConfig.from_dict({"learning_rate": 1})


@pytest.mark.parametrize("arch", ["unet", "segresnet", "dynunet"])
def test_selectable_networks_train_and_infer(arch, tiny2d):
    cfg = tiny_cfg(network={"arch": arch, "channels": [8, 16, 32]})
    engine = SegEngine(cfg, load_datalist(str(tiny2d / "site-1" / "datalist.json")), site="site-1")
    net = engine.new_network()
    assert type(net.net).__name__.lower() == arch
    stats = engine.train(net, 2)
    assert stats.steps == 2 and np.isfinite(stats.mean_loss)
    assert engine.evaluate(net, "testing").dice.shape[0] == len(engine.cases("testing"))


def test_fedprox_proximal_term_is_half_mu_times_the_squared_distance_to_the_received_weights():
    from fedseg.engine.engine import _proximal_term

    assert _proximal_term(torch.nn.Linear(3, 2), 0.0) == (None, None)
    net = torch.nn.Linear(3, 2)  # 8 parameters
    prox_loss, reference = _proximal_term(net, 0.2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    loss = prox_loss(net, reference)
    assert float(loss.detach()) == pytest.approx(0.2 / 2 * 8 * 0.25)
    loss.backward()
    # d/dw = mu * (w - w_received) on the trained network; the received copy stays frozen
    assert all(torch.allclose(p.grad, torch.full_like(p, 0.2 * 0.5)) for p in net.parameters())
    assert all(r.grad is None and not r.requires_grad for r in reference.parameters())
