"""FedBN: which keys are normalization, the server step that keeps them local, the recipe's network check, and one
real simulator run (2 tiny sites, 2 rounds) next to a job that must refuse a network without normalization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_job, in_parallel, simulate
from torch import nn

from fedseg.algorithms import aggregate, aggregate_shared
from fedseg.engine.networks import network_norm_keys, norm_state_keys
from fedseg.fl.executor import with_own
from fedseg.modelset import load_model_set
from fedseg.recipes import FedBNRecipe, RecipeError
from fedseg.report import load_results

UNET = {"arch": "unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [8, 16], "num_res_units": 1}
SITES = ["site-1", "site-2"]


# ---- which keys are normalization: decided by module type ----------------------------------------------------------
def test_norm_state_keys_follow_module_types_not_names():
    net = nn.Sequential()
    net.add_module("bn", nn.Conv2d(1, 4, 3))  # named like a norm layer, is not one
    net.add_module("a", nn.InstanceNorm2d(4, affine=True))
    net.add_module("b", nn.BatchNorm2d(4))
    net.add_module("c", nn.GroupNorm(2, 4))
    net.add_module("d", nn.InstanceNorm2d(4))  # affine=False, no running statistics: nothing to keep
    net.add_module("e", nn.Sequential(nn.LayerNorm(4)))
    assert norm_state_keys(net) == [
        "a.bias",
        "a.weight",
        "b.bias",
        "b.num_batches_tracked",
        "b.running_mean",
        "b.running_var",
        "b.weight",
        "c.bias",
        "c.weight",
        "e.0.bias",
        "e.0.weight",
    ]
    assert norm_state_keys(nn.InstanceNorm2d(3, affine=True)) == ["bias", "weight"]


def test_the_default_network_has_no_normalization_parameters_and_the_options_do():
    assert network_norm_keys(UNET) == []  # MONAI's "instance": affine=False
    affine = network_norm_keys({**UNET, "norm": "instance_affine"})
    assert affine and {k.rsplit(".", 1)[1] for k in affine} == {"weight", "bias"}
    batch = network_norm_keys({**UNET, "norm": "batch"})
    assert {k.rsplit(".", 1)[1] for k in batch} == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


# ---- the server step ---------------------------------------------------------------------------------------------------
def _update(conv: float, norm: float) -> dict:
    return {"conv.weight": np.full((2, 2), conv, np.float32), "n.weight": np.full(2, norm, np.float32)}


def test_aggregation_averages_only_the_shared_keys():
    updates = {"site-1": _update(1.0, 10.0), "site-2": _update(3.0, 20.0), "site-3": _update(8.0, 90.0)}
    weights = {"site-1": 1.0, "site-2": 1.0, "site-3": 2.0}
    for method in ("mean", "median"):
        out = aggregate_shared(updates, weights, ["n.weight"], method)
        assert list(out) == ["conv.weight", "n.weight"]
        shared_only = aggregate({s: {"conv.weight": u["conv.weight"]} for s, u in updates.items()}, weights, method)
        np.testing.assert_array_equal(out["conv.weight"], shared_only["conv.weight"])
        # the global model's normalization (an unseen site's): the step-weighted mean, whatever the aggregation
        np.testing.assert_allclose(out["n.weight"], (10 + 20 + 2 * 90) / 4)
    # a site's normalization never moves the shared keys
    changed = {**updates, "site-1": _update(1.0, -500.0)}
    np.testing.assert_array_equal(
        aggregate_shared(changed, weights, ["n.weight"])["conv.weight"],
        aggregate_shared(updates, weights, ["n.weight"])["conv.weight"],
    )
    assert aggregate_shared(updates, weights, [])["n.weight"][0] == aggregate(updates, weights)["n.weight"][0]


def test_a_site_puts_its_own_entries_over_the_received_model():
    received = _update(1.0, 2.0)
    mine = with_own(received, {"n.weight": np.array([7.0, 7.0], np.float32)})
    assert mine["conv.weight"] is received["conv.weight"] and mine["n.weight"].tolist() == [7.0, 7.0]
    with pytest.raises(KeyError, match="not in the received model"):
        with_own(received, {"other": np.zeros(1)})


# ---- the recipe ----------------------------------------------------------------------------------------------------------
def test_fedbn_recipe_needs_normalization_parameters(tmp_path):
    with pytest.raises(RecipeError, match=r"FedBNRecipe: engine: network norm 'instance' gives the network no normalization"):
        FedBNRecipe(engine={"network": {"norm": "instance"}})
    with pytest.raises(RecipeError, match="FedBNRecipe: num_rounds"):
        FedBNRecipe(num_rounds=0)
    recipe = FedBNRecipe(engine={"network": {"norm": "batch"}}, cross_site_eval=False)
    recipe.export(str(tmp_path))
    server = json.loads((tmp_path / "fedbn" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["keep_local"] == "norm"
    assert server["components"][0]["args"]["network"]["norm"] == "batch"
    assert FedBNRecipe().engine["network"]["norm"] == "instance_affine"  # the default: instance norm with weight/bias


# ---- one real run ------------------------------------------------------------------------------------------------------
def _set_norm(job: Path, norm: str) -> None:
    """Both copies of the network (server persistor, site engine) get `norm`, as a user edits the job."""
    config = job / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())
    next(c for c in server["components"] if c["id"] == "persistor")["args"]["network"]["norm"] = norm
    client["executors"][0]["executor"]["args"]["engine"]["network"]["norm"] = norm
    (config / "config_fed_server.json").write_text(json.dumps(server, indent=2))
    (config / "config_fed_client.json").write_text(json.dumps(client, indent=2))


@pytest.fixture(scope="module")
def fedbn_runs(tmp_path_factory):
    """jobs/fedbn on 2 tiny sites for 2 rounds, and the same job on a network without normalization parameters (the
    server refuses it before any round: one site is enough)."""
    from fedseg.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("fedbn")
    data = root / "tiny2sites"
    generate_dataset(str(data), n_sites=2, spatial_dims=2, seed=0, size="tiny")
    engine = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1}
    job = copy_job("fedbn", root / "ok", server_args={"num_rounds": 2}, engine=engine)
    refused = copy_job("fedbn", root / "refused", server_args={"num_rounds": 2}, engine=engine)
    _set_norm(refused, "instance")
    return in_parallel(
        ok=lambda: simulate(job, root / "ws_ok", data, n=2),
        refused=lambda: simulate(refused, root / "ws_refused", data, n=1, expect_ok=False, timeout=300),
    )


def _norm_keys(params: dict) -> set[str]:
    return set(network_norm_keys({**UNET, "channels": [16, 32, 64, 128], "norm": "instance_affine"})) & set(params)


def test_fedbn_keeps_each_sites_normalization_and_shares_the_rest(fedbn_runs):
    run = fedbn_runs["ok"]
    app = run.job_dir / "app_server"
    server = {k: v.numpy() for k, v in torch.load(app / "FL_global_model.pt", weights_only=True)["model"].items()}
    norm = _norm_keys(server)
    assert norm and len(norm) < len(server)
    own, personalized = {}, {}
    for site in SITES:
        site_app = run.workspace / site / "simulate_job" / f"app_{site}" / "fedbn"
        own[site] = load_model_set(site_app / "local_norm.pt")[0]["norm"]
        personalized[site] = load_model_set(site_app / "personalized_SRV_FL_global_model.pt")[0]["global"]
        assert set(own[site]) == norm  # exactly the normalization entries, found by module type
        assert set(personalized[site]) == set(server)
        for key in set(server) - norm:  # everything else: the server's global model, bit for bit
            np.testing.assert_array_equal(personalized[site][key], server[key], err_msg=f"{site} {key}")
        for key in norm:  # the site evaluates with its own normalization
            np.testing.assert_array_equal(personalized[site][key], own[site][key])
        assert "own normalization kept" in run.log(site)  # round 1 started from the site's own normalization
    assert any(not np.array_equal(own["site-1"][k], own["site-2"][k]) for k in norm)
    # the global model's normalization (for an unseen site): the step-weighted mean of the sites' last ones
    last = json.loads((app / "fedbn" / "history.json").read_text())[-1]
    assert last["accepted"] == SITES
    w = last["weights"]
    for key in norm:
        mean = sum(w[s] * own[s][key].astype(np.float64) for s in SITES) / sum(w.values())
        np.testing.assert_allclose(server[key], mean, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(server[k], own["site-1"][k]) for k in norm)
    results = load_results(run.workspace, "fedbn")
    assert sorted(results["models"]["personalized (last)"]) == SITES  # global + own normalization, scored at each site


def test_fedbn_job_refuses_a_network_without_normalization_parameters(fedbn_runs):
    run = fedbn_runs["refused"]
    log = run.log("server")
    assert "FedBN refused (keep_local='norm')" in log and "network norm 'instance'" in log, log[-3000:]
    assert not (run.job_dir / "app_server" / "fedbn" / "last.pt").exists()  # no round ran
    assert "site-1" in run.log("site-1") and "task train done" not in run.log("site-1")


# ---- the benchmark: FedBN on the dataset's own network, or not at all -------------------------------------------------
def test_bench_skips_fedbn_where_the_network_has_no_normalization_parameters(tmp_path):
    from fedseg_tools.bench.presets import get_preset
    from fedseg_tools.bench.run import prepare_dataset, run_dataset

    preset = get_preset("smoke")  # the built-in cells' network: MONAI "instance" norm, unchanged
    spec = preset.datasets["synth2d"]
    data, _ = prepare_dataset(spec, tmp_path / "data")
    (cell,) = run_dataset("synth2d", data, spec, preset, ["fedbn"], tmp_path / "ds")
    record = cell["methods"]["fedbn"]
    assert record["status"] == "skipped" and "norm 'instance' has no parameters: FedBN would be FedAvg" in record["error"]
    assert cell["jobs"] == []  # nothing ran


def test_bench_job_runs_fedbn_on_the_datasets_network(tmp_path):
    from fedseg_tools.bench.budget import Budget, plan_method
    from fedseg_tools.bench.jobs import FEDBN_MODELS, build_job, fedbn_refusal, save_initial_checkpoint
    from fedseg_tools.bench.presets import ENGINE_2D

    engine = {**ENGINE_2D, "network": {**ENGINE_2D["network"], "norm": "batch"}, "local_epochs": 1}
    assert fedbn_refusal(engine) == "" and fedbn_refusal(ENGINE_2D)
    init = save_initial_checkpoint(tmp_path / "init.pt", engine, 0)
    plan = plan_method("fedbn", Budget(2, 1, {"site-1": 2, "site-2": 3}))
    assert plan.rounds == 2 and plan.seg_steps_total == 10  # FedAvg's plan: the same steps
    job = build_job(tmp_path / "jobs", "bench_fedbn", [("fedbn", 0)], {"fedbn": plan}, engine, {0: init})
    config = job / "app" / "config"
    server = json.loads((config / "config_fed_server.json").read_text())
    client = json.loads((config / "config_fed_client.json").read_text())
    flows = {w["path"].rsplit(".", 1)[1]: w["args"] for w in server["workflows"]}
    assert flows["FedAvgController"]["keep_local"] == "norm" and flows["FedAvgController"]["num_rounds"] == 2
    assert flows["BenchGlobalEval"]["keep_local"] == "norm" and flows["BenchGlobalEval"]["models"] == FEDBN_MODELS
    persistors = [c for c in server["components"] if c["path"].endswith("SegModelPersistor")]
    assert persistors and all(c["args"]["network"]["norm"] == "batch" for c in persistors)
    assert client["executors"][0]["executor"]["args"]["engine"]["network"]["norm"] == "batch"
