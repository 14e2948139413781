"""Differential privacy at a site (engine setting "dp", fedseg.engine.dp): DP-SGD through Opacus, with the site's
epsilon checked against Opacus's RDP accountant computed here on its own, the per-example clipping seen in the
parameter change of one step, BatchNorm refused, and one real FLARE simulator job (FedAvg, 2 sites, 2 rounds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ENGINE, copy_job, simulate
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedseg.data import load_datalist
from fedseg.engine import EngineConfig, SegEngine, optimizer_state_to_numpy, state_to_numpy
from fedseg.engine.config import resolve_engine
from fedseg.engine.dp import DP_METRICS, DPNetworkError, DPSettings, PrivacyBudgetExceeded, dp_errors
from fedseg.engine.networks import SegNetwork
from fedseg.fl.site_limits import TaskRefused, check_site_dp, read_site_max_epsilon, read_site_requires_dp
from fedseg.recipes import FedAvgRecipe, RecipeError

DP = {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5}
SMALL = {"roi_size": [32, 32], "batch_size": 4, "local_epochs": 1, "network": {"channels": [8, 16]}}
SITES = ["site-1", "site-2"]


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP accountant, stepped here one step at a time."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    return accountant.get_epsilon(delta)


def analysis_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The same from Opacus's RDP analysis functions directly (the accountant's orders)."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


@pytest.fixture(scope="module")
def tiny2sites(tmp_path_factory) -> Path:
    from fedseg.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("dp") / "tiny2sites"
    generate_dataset(str(out), n_sites=2, spatial_dims=2, seed=0, size="tiny")
    return out


def engine(data: Path, site: str = "site-1", training: int | None = None, **changes) -> SegEngine:
    cfg = EngineConfig.from_dict(resolve_engine({**SMALL, "dp": DP, **changes}))
    datalist = load_datalist(str(data / site / "datalist.json"), site)
    if training is not None:
        datalist = {**datalist, "training": datalist["training"][:training]}
    return SegEngine(cfg, datalist, site=site)


# ---- settings and networks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        ({**DP, "noise_multiplier": 0}, "noise_multiplier must be > 0"),
        ({**DP, "max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({**DP, "delta": 1.0}, "delta must be in (0, 1)"),
        ({**DP, "delta": "1e-5"}, "delta must be a finite number"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0}, "missing key(s) ['delta']"),
        ({**DP, "target_epsilon": 3.0}, "unknown key(s) ['target_epsilon']"),
        (1.0, "must be a dict"),
    ],
)
def test_dp_settings_are_checked_where_the_job_is_written(bad, message):
    with pytest.raises(ValueError, match="engine setting 'dp'") as e:
        resolve_engine({"dp": bad})
    assert message in str(e.value)
    assert DPSettings.from_value(DP) == DPSettings(1.1, 1.0, 1e-5)
    assert EngineConfig.from_dict(resolve_engine({})).dp is None  # off unless asked for


def test_batchnorm_is_refused_with_a_message_naming_the_setting(tiny2sites):
    batch = {"network": {"norm": "batch"}, "dp": DP}
    with pytest.raises(DPNetworkError) as e:
        resolve_engine(batch)
    text = str(e.value)
    assert "engine setting 'dp' (DP-SGD) refused" in text and "norm 'batch'" in text and "BatchNorm" in text, text
    with pytest.raises(DPNetworkError, match="engine setting 'dp'"):  # the site's engine refuses it too
        SegEngine(EngineConfig.from_dict({**SMALL, **batch}), {"training": []})
    with pytest.raises(RecipeError, match="engine setting 'dp'"):
        FedAvgRecipe(min_clients=2, engine=batch)
    resolve_engine({"network": {"norm": "batch"}})  # without DP BatchNorm stays allowed


def test_the_engines_networks_are_dp_compatible_by_default():
    cfg = EngineConfig.from_dict(resolve_engine({}))
    assert "norm" not in cfg.network  # the engine's UNet uses build_segmentation_network's default: MONAI instance norm
    assert dp_errors(SegNetwork(**cfg.network_args())) == []
    args = {**cfg.network_args(), "channels": [8, 16]}
    assert dp_errors(SegNetwork(**{**args, "norm": "instance_affine"})) == []
    assert any("BatchNorm" in e for e in dp_errors(SegNetwork(**{**args, "norm": "batch"})))


# ---- the engine: accounting, clipping, randomness ------------------------------------------------------------------
def test_epsilon_is_the_accountants_over_every_network_the_engine_trains(tiny2sites):
    eng = engine(tiny2sites)
    n = len(eng.cases("training"))
    q = SMALL["batch_size"] / n
    assert eng.dp.sample_rate == pytest.approx(q) and eng.dp.num_examples == n
    assert eng.privacy_spent() == {"dp_epsilon": 0.0, "dp_delta": DP["delta"]}
    first = eng.new_network()
    assert eng.train(first, 2).steps == 2
    after2 = eng.privacy_spent()["dp_epsilon"]
    assert after2 == pytest.approx(independent_epsilon(DP["noise_multiplier"], q, 2, DP["delta"]), abs=1e-6)
    second = eng.new_network()  # another network on the same site's data (FedSM's personalized, a FedCross model)
    assert eng.train(second, 1, prox_mu=0.01).steps == 1
    spent = eng.privacy_spent()
    assert set(spent) == set(DP_METRICS) and spent["dp_delta"] == DP["delta"]
    expected = independent_epsilon(DP["noise_multiplier"], q, 3, DP["delta"])
    assert spent["dp_epsilon"] == pytest.approx(expected, abs=1e-6)
    assert spent["dp_epsilon"] == pytest.approx(analysis_epsilon(DP["noise_multiplier"], q, 3, DP["delta"]), abs=1e-6)
    assert spent["dp_epsilon"] > after2 > 0
    # Opacus's hooks are gone: the trained networks are plain networks again
    for net in (first, second):
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in net.parameters())
        assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_a_training_that_would_pass_the_sites_budget_is_refused_whole(tiny2sites):
    """The budget check projects the call's steps with the accountant: a call that fits runs, one that would pass
    max_epsilon trains nothing and records nothing; the epsilon reached never exceeds the budget."""
    eng = engine(tiny2sites)
    q = eng.dp.sample_rate
    eps = {k: independent_epsilon(DP["noise_multiplier"], q, k, DP["delta"]) for k in (2, 3, 5)}
    assert eng.dp.epsilon_after(0) == 0.0 and eng.dp.epsilon_after(3) == pytest.approx(eps[3], abs=1e-6)
    eng.dp.max_epsilon = (eps[3] + eps[5]) / 2  # 3 steps fit, 5 do not
    net = eng.new_network()
    assert eng.train(net, 2).steps == 2
    assert eng.dp.epsilon_after(1) == pytest.approx(eps[3], abs=1e-6)  # projected from what was spent
    before = state_to_numpy(net)
    with pytest.raises(PrivacyBudgetExceeded, match=r"site site-1 stops training: its privacy budget is spent") as err:
        eng.train(net, 3)
    assert f"above the site's max_epsilon {eng.dp.max_epsilon:g}" in str(err.value) and "nothing was trained" in str(err.value)
    after = state_to_numpy(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained
    assert eng.dp.steps == 2 and eng.privacy_spent()["dp_epsilon"] == pytest.approx(eps[2], abs=1e-6)
    assert eng.train(net, 1).steps == 1  # what still fits runs
    spent = eng.privacy_spent()["dp_epsilon"]
    assert spent == pytest.approx(eps[3], abs=1e-6) and spent <= eng.dp.max_epsilon


def test_a_sites_budget_is_read_from_its_own_configuration_and_requires_dp(tmp_path):
    assert read_site_max_epsilon(str(tmp_path), "site-1") is None
    (tmp_path / "local").mkdir()
    for bad in (0, -1, "8", True, float("inf")):
        (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"max_epsilon": bad}))
        with pytest.raises(ValueError, match='"max_epsilon": max_epsilon must be a finite number > 0'):
            read_site_max_epsilon(str(tmp_path), "site-1")
    (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"max_epsilon": 8}))
    assert read_site_max_epsilon(str(tmp_path), "site-1") == 8.0
    check_site_dp("site-1", False, DP, 8.0)
    with pytest.raises(TaskRefused, match='site site-1 requires differential privacy \\("max_epsilon": 8 in its'):
        check_site_dp("site-1", False, None, 8.0)


def test_fedsm_and_fedcross_training_add_every_network_to_the_one_accountant(tiny2sites):
    """FedSM trains a global and a personalized network on the same cases, FedCross one travelling model per visit
    (with its own optimizer state): every step of each goes into the site's one accountant."""
    from fedseg.algorithms.lr_schedule import LrSchedule
    from fedseg.methods.fedcross import cross_visit
    from fedseg.methods.fedsm import fedsm_local_round

    eng = engine(tiny2sites)
    q = eng.dp.sample_rate
    params = state_to_numpy(eng.new_network())
    updated, metrics, steps = fedsm_local_round(eng, {"global": params, "personal": params}, 0, SITES, None, 0.9, 1)
    assert steps == 1 and set(updated) == {"global", "personal"}
    assert eng.privacy_spent()["dp_epsilon"] == pytest.approx(
        independent_epsilon(DP["noise_multiplier"], q, 2, DP["delta"]), abs=1e-6
    )
    _, optim, stats = cross_visit(eng, params, None, 2, LrSchedule(base_lr=1e-3), 0)
    assert stats.steps == 2 and any(k.endswith("::exp_avg") for k in optim)
    _, _, stats = cross_visit(eng, params, optim, 1, LrSchedule(base_lr=1e-3), 1)  # the state travels on
    assert eng.privacy_spent()["dp_epsilon"] == pytest.approx(
        independent_epsilon(DP["noise_multiplier"], q, 5, DP["delta"]), abs=1e-6
    )


def _step_change(eng: SegEngine, net: torch.nn.Module, steps: int = 1) -> float:
    before = {k: torch.as_tensor(v) for k, v in state_to_numpy(net).items()}
    eng.train(net, steps, optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    after = net.state_dict()
    return float(torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before)))


def test_every_examples_gradient_is_clipped(tiny2sites):
    """Plain SGD with lr 1 and (almost) no noise: a step moves the weights by the mean of the clipped per-example
    gradients, never more than max_grad_norm; one case alone moves them by exactly max_grad_norm."""
    clip = 1e-3
    tiny_noise = {**DP, "noise_multiplier": 1e-9, "max_grad_norm": clip}
    plain = engine(tiny2sites, training=1, dp=None)
    net = plain.new_network()
    raw = _step_change(plain, net)  # the same case's gradient without DP
    assert raw > 50 * clip
    one = engine(tiny2sites, training=1, dp=tiny_noise)  # N = 1, batch 4: q = 1, the case is in every step
    assert one.dp.sample_rate == 1.0 and one.dp.expected_batch_size == 1
    moved = _step_change(one, one.new_network())
    assert moved == pytest.approx(clip, rel=1e-3)
    every = engine(tiny2sites, batch_size=8, dp=tiny_noise)  # q = 1: every case, each clipped, averaged
    assert every.dp.sample_rate == 1.0
    net = every.new_network()
    for _ in range(3):
        assert _step_change(every, net) <= clip * (1 + 1e-3)


def test_a_draw_of_no_case_is_a_step_of_noise_alone(tiny2sites):
    """Poisson sampling can draw nobody: that step still counts, and moves the weights by the noise alone, whose
    standard deviation per coordinate is noise_multiplier * max_grad_norm / expected batch size."""
    eng = engine(tiny2sites)
    net = eng.new_network()
    eng._dp_iter = iter([None])  # the next draw is empty
    change = _step_change(eng, net)
    d = sum(p.numel() for p in net.parameters())
    expected = DP["noise_multiplier"] * DP["max_grad_norm"] * math.sqrt(d) / eng.dp.expected_batch_size
    assert change == pytest.approx(expected, rel=0.05)
    assert eng.dp.steps == 1
    assert eng.privacy_spent()["dp_epsilon"] == pytest.approx(
        independent_epsilon(DP["noise_multiplier"], eng.dp.sample_rate, 1, DP["delta"]), abs=1e-6
    )


def test_the_optimizer_keeps_its_state_and_the_noise_is_not_the_jobs_seed(tiny2sites):
    """A travelling optimizer (FedCross) keeps its Adam moments through DP training; two sites with the same job
    seed draw different cases and noise (the sampler and the noise are seeded from the OS, not the job)."""
    results = []
    for _ in range(2):
        eng = engine(tiny2sites, local_steps=2)
        net = eng.new_network()
        torch.manual_seed(0)
        net.load_state_dict(SegNetwork(**eng.cfg.network_args()).state_dict())
        optimizer = eng.new_optimizer(net)
        eng.train(net, 2, optimizer=optimizer)
        state = optimizer_state_to_numpy(optimizer, net)
        assert any(k.endswith("::exp_avg") for k in state) and all(np.isfinite(v).all() for v in state.values())
        results.append(state_to_numpy(net))
    assert any(not np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_a_site_can_require_dp(tmp_path):
    assert read_site_requires_dp(str(tmp_path), "site-1") is False  # no fedseg_site.json
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"require_dp": True}))
    assert read_site_requires_dp(str(tmp_path), "site-1") is True
    check_site_dp("site-1", True, DP)
    check_site_dp("site-1", False, None)
    with pytest.raises(TaskRefused, match='site site-1 requires differential privacy \\("require_dp": true'):
        check_site_dp("site-1", True, None)
    (tmp_path / "local" / "fedseg_site.json").write_text(json.dumps({"require_dp": "yes"}))
    with pytest.raises(ValueError, match='"require_dp" must be true or false'):
        read_site_requires_dp(str(tmp_path), "site-1")


# ---- one real FLARE job ----------------------------------------------------------------------------------------------
def site_steps(data: Path, site: str) -> tuple[float, int]:
    """A site's DP sample rate and steps per round (1 local epoch) in the job below."""
    n = len(json.loads((data / site / "datalist.json").read_text())["training"])
    return min(1.0, TINY_ENGINE["batch_size"] / n), math.ceil(n / TINY_ENGINE["batch_size"])


def epsilon_after_rounds(data: Path, site: str, rounds: int) -> float:
    q, per_round = site_steps(data, site)
    return independent_epsilon(DP["noise_multiplier"], q, per_round * rounds, DP["delta"])


@pytest.fixture(scope="module")
def dp_run(tiny2sites, tmp_path_factory):
    """jobs/fedavg, 2 tiny sites, 3 rounds, 1 local epoch, DP on; no cross-site evaluation. Both sites' own
    configuration caps their privacy loss between what 2 and 3 rounds spend: they train rounds 0 and 1, and refuse
    round 2's training."""
    root = tmp_path_factory.mktemp("dp_job")
    job = copy_job("fedavg", root, server_args={"num_rounds": 3}, engine={**TINY_ENGINE, "local_epochs": 1, "dp": DP})
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["workflows"] = server["workflows"][:1]
    server_file.write_text(json.dumps(server, indent=2))
    two = max(epsilon_after_rounds(tiny2sites, s, 2) for s in SITES)
    three = min(epsilon_after_rounds(tiny2sites, s, 3) for s in SITES)
    assert two < three, (two, three)
    ws = root / "ws"
    (ws / "local").mkdir(parents=True)  # the simulator copies <workspace>/local to every site
    (ws / "local" / "fedseg_site.json").write_text(json.dumps({"require_dp": True, "max_epsilon": (two + three) / 2}))
    run = simulate(job, ws, tiny2sites, n=2, timeout=600, expect_ok=False)  # round 2 fails by design
    assert run.returncode == 0, run.log_tail
    run.max_epsilon = (two + three) / 2
    return run


def test_each_sites_epsilon_after_each_round_is_the_accountants(dp_run, tiny2sites):
    history = json.loads((dp_run.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    for site in SITES:
        q, per_round = site_steps(tiny2sites, site)
        reported = []
        for record in history[:2]:
            dp = record["dp"][site]
            assert record["weights"][site] == per_round  # the steps the site trained this round
            steps = per_round * (record["round"] + 1)
            expected = independent_epsilon(DP["noise_multiplier"], q, steps, DP["delta"])
            assert dp["dp_epsilon"] == pytest.approx(expected, abs=1e-6), (site, record["round"])
            assert dp["dp_delta"] == DP["delta"]
            reported.append(dp["dp_epsilon"])
        assert 0 < reported[0] < reported[1] <= dp_run.max_epsilon
        log = dp_run.log(site)
        lines = [line for line in log.splitlines() if f"DP-SGD at site {site}, task train: epsilon" in line]
        assert len(lines) == 2, log[-3000:]
        assert f"epsilon {reported[1]:.4g} so far at delta 1e-05 ({2 * per_round} DP-SGD steps" in lines[1]
        assert all(line.endswith("not sent: ['train_loss']") for line in lines)  # a loss over training cases
        assert "DP-SGD on (epsilon 0 so far" in log  # the set-up line of a site that requires DP
        assert f"privacy budget max_epsilon {dp_run.max_epsilon:g}" in log


def test_a_site_stops_training_when_its_privacy_budget_is_spent(dp_run):
    """Round 2 would take every site past its max_epsilon: each refuses that training (a log line and an audit
    event at the site, below), nothing is trained or sent, and the server keeps the global model of round 1."""
    history = json.loads((dp_run.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    assert history[2]["accepted"] == [] and "dp" not in history[2], history[2]
    server_log = dp_run.log()
    assert "round 2: 0 valid update(s) [], fewer than min_clients=" in server_log, server_log[-3000:]
    for site in SITES:
        log = dp_run.log(site)
        refusal = f"REFUSED task train at site {site}: site {site} stops training: its privacy budget is spent"
        assert log.count(refusal) == 1, log[-3000:]
        assert f"above the site's max_epsilon {dp_run.max_epsilon:g}" in log
        assert len([line for line in log.splitlines() if "DP-SGD at site" in line and "task train" in line]) == 2


def test_a_sites_refusal_is_an_nvflare_audit_event(audit_events):
    """The simulator keeps no audit log; a deployment's auditor receives the refusal the site logs."""
    from nvflare.apis.fl_context import FLContext

    from fedseg.fl.executor import SegExecutor

    executor = SegExecutor()
    executor.site = "site-1"
    executor.refuse(FLContext(), "train", PrivacyBudgetExceeded("site site-1 stops training: its privacy budget is spent"))
    executor.refuse(FLContext(), "train", TaskRefused("site site-1 refuses task train: local_epochs 3 is above ..."))
    assert [e["ref"] for e in audit_events] == ["fedseg:refused:site-1"] * 2
    assert (
        audit_events[0]["msg"] == "REFUSED task train at site site-1: site site-1 stops training: its privacy budget is spent"
    )
