"""FedCross (K = 1) and FedCrossEns (K = sites): the site routines, the model sets, real NVFlare simulator runs
of jobs/fedcross and jobs/fedcrossens, a failing site, a stalled site with resume, and ensemble inference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    CUSTOM,
    JOBS,
    TINY_ENGINE,
    copy_job,
    in_parallel,
    set_executor_path,
    simulate,
)

from fedseg.algorithms import UpdateRejected
from fedseg.algorithms.lr_schedule import LrSchedule, lr_at
from fedseg.algorithms.schedules import member_seed
from fedseg.algorithms.screening import check_optimizer_state, fingerprint
from fedseg.data import load_datalist
from fedseg.engine import EngineConfig, SegEngine, load_numpy_state, state_to_numpy
from fedseg.engine.config import resolve_engine
from fedseg.jobgen import FEDCROSS_DEFAULTS
from fedseg.jobgen import main as jobgen_main
from fedseg.methods.fedcross import (
    auroc_from_histograms,
    cross_visit,
    ensemble_maps,
    score_ensemble,
    segment,
    std_histogram,
)
from fedseg.modelset import initial_members, load_members, save_members

OUT = Path("app_server") / "fedcross"
FAULTY_MODULE = "fedseg_faults_cross."  # test-only executor module, allow-listed for these runs
FAULTY = FAULTY_MODULE + "CrossFaultExecutor"


def tiny_engine(data: Path, site: str = "site-1") -> SegEngine:
    cfg = EngineConfig.from_dict(resolve_engine(TINY_ENGINE))
    return SegEngine(cfg, load_datalist(str(data / site / "datalist.json")), site=site)


def server_args(name: str) -> dict:
    return json.loads((JOBS / name / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]


def cross_job(tmp: Path, name: str, **args) -> Path:
    """jobs/<name> with the tiny engine on both sides (the model set records the sites' settings)."""
    engine = {**server_args(name)["engine_config"], **TINY_ENGINE}
    return copy_job(name, tmp, server_args={"engine_config": engine, **args}, engine=TINY_ENGINE)


def history(run) -> list[dict]:
    return json.loads((run.job_dir / OUT / "validation_history.json").read_text())


def results(run) -> dict:
    return json.loads((run.job_dir / "app_server" / "fedseg_results.json").read_text())


# ---- pure functions ----------------------------------------------------------------------------------------
def test_lr_schedule_kinds_and_validation():
    assert lr_at("constant", 0.01, 7, 10) == 0.01
    assert lr_at("poly", 0.01, 0, 10) == 0.01
    assert lr_at("poly", 0.01, 5, 10, power=0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert lr_at("poly", 0.01, 10, 10) == 0.0
    assert lr_at("cosine", 0.01, 5, 10) == pytest.approx(0.005)
    assert lr_at("cosine", 0.01, 10, 10) == pytest.approx(0.0)
    assert lr_at("poly", 0.01, 15, 10) == lr_at("poly", 0.01, 10, 10)  # past the plan: final rate
    for kind in ("poly", "cosine"):
        values = [lr_at(kind, 1.0, p / 4, 3) for p in range(13)]
        assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing over the plan
    for bad in (dict(kind="step"), dict(total=0), dict(position=-1), dict(base_lr=float("nan")), dict(power=True)):
        args = dict(kind="poly", base_lr=0.01, position=1, total=10, power=0.9) | bad
        with pytest.raises(ValueError):
            lr_at(**args)


def test_lr_travels_with_the_model_across_visits():
    s = LrSchedule("poly", 1e-3, total_visits=4)
    assert LrSchedule.from_meta(s.as_meta()) == s
    steps = 5
    # within visit v the rate runs from position v to v + 1: the next visit starts where this one ends
    end_of_visit_1 = s.lr(1 + steps / steps)
    assert s.lr(2) == end_of_visit_1
    with pytest.raises(ValueError):
        LrSchedule("warm", 1e-3, 4)


def adam_state(weights: dict) -> dict:
    state = {}
    for key, value in weights.items():
        state[f"{key}::step"] = np.array(3.0, dtype=np.float32)
        state[f"{key}::exp_avg"] = np.zeros_like(value)
        state[f"{key}::exp_avg_sq"] = np.zeros_like(value)  # Adam keeps both moments
    return state


def test_check_optimizer_state_rejects_bad_states():
    weights = {"a.weight": np.ones((2, 3), np.float32), "a.bias": np.ones(2, np.float32)}
    good = adam_state(weights)
    check_optimizer_state("site-1", good, weights)
    check_optimizer_state("site-1", good, weights, sent=good)
    check_optimizer_state("site-1", {}, weights)  # a model that has not trained yet
    bad_cases = {
        "non-finite": {**good, "a.bias::exp_avg": np.array([np.nan, 0], np.float32)},
        "shape": {**good, "a.weight::exp_avg": np.zeros((3, 2), np.float32)},
        "names no parameter": {**good, "b.weight::exp_avg": np.zeros(2, np.float32)},
        "not a numeric array": {**good, "a.bias::exp_avg": "zeros"},
    }
    for reason, state in bad_cases.items():
        with pytest.raises(UpdateRejected, match=reason) as err:
            check_optimizer_state("site-7", state, weights)
        assert err.value.site == "site-7"
    dropped = {k: v for k, v in good.items() if k != "a.bias::step"}
    with pytest.raises(UpdateRejected, match="keys changed"):
        check_optimizer_state("site-7", dropped, weights, sent=good)


def test_ensemble_maps_and_segment_by_hand():
    # 2 members, 1 image, 2 classes, 3 voxels: foreground probabilities (0.9, 0.7), (0.2, 0.2), (0.6, 0.2)
    fg = torch.tensor([[0.9, 0.2, 0.6], [0.7, 0.2, 0.2]])
    probs = torch.stack([1 - fg, fg], dim=1).unsqueeze(1)  # (K=2, B=1, C=2, 3)
    mean, std, entropy = ensemble_maps(probs)
    assert torch.allclose(mean[0, 1], torch.tensor([0.8, 0.2, 0.4]))
    assert torch.allclose(std[0], torch.tensor([0.1, 0.0, 0.2]), atol=1e-6)  # population std of fg probability
    p = torch.tensor([0.8, 0.2, 0.4])
    assert torch.allclose(entropy[0], -(p * p.log() + (1 - p) * (1 - p).log()), atol=1e-6)
    assert segment(mean).tolist() == [[1, 0, 0]]
    assert segment(mean, threshold=0.3).tolist() == [[1, 0, 1]]
    assert segment(mean, threshold=0.85).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError):
        segment(mean, threshold=1.5)
    _, one_std, _ = ensemble_maps(probs[:1])
    assert torch.count_nonzero(one_std) == 0  # K = 1: no spread
    # three classes: the most probable foreground class above the threshold
    three = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.3, 0.2], [0.1, 0.45, 0.45]]).T.reshape(1, 3, 3)
    assert segment(three, threshold=0.4).tolist() == [[1, 0, 1]]


def brute_auroc(pos, neg) -> float:
    """P(pos > neg) + P(pos == neg) / 2 over every (positive, negative) pair."""
    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def test_auroc_from_histograms_equals_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n_pos, n_neg = rng.integers(1, 400, size=2)
        # values at bin centres: exact (equal values share a bin, distinct values never do); many ties
        top = int(rng.integers(5, 1000))
        pos = (rng.integers(0, top, n_pos) + 0.5) / 2000
        neg = (rng.integers(0, int(rng.integers(1, top + 1)), n_neg) + 0.5) / 2000
        got = auroc_from_histograms(std_histogram(pos), std_histogram(neg))
        assert got == pytest.approx(brute_auroc(pos, neg), abs=1e-12), trial
        # continuous values: exact up to the binning (pairs inside one bin of width 0.0005 count as ties)
        pos, neg = rng.beta(2, 5, n_pos) * 0.5, rng.beta(2, 3, n_neg) * 0.5
        assert auroc_from_histograms(std_histogram(pos), std_histogram(neg)) == pytest.approx(brute_auroc(pos, neg), abs=5e-3)
    assert auroc_from_histograms(std_histogram([0.4, 0.3]), std_histogram([0.1, 0.2])) == 1.0
    assert auroc_from_histograms(std_histogram([0.1]), std_histogram([0.4])) == 0.0
    assert auroc_from_histograms(std_histogram([0.0] * 5), std_histogram([0.0] * 3)) == 0.5  # one model: no spread
    assert math.isnan(auroc_from_histograms(std_histogram([]), std_histogram([0.1])))
    assert std_histogram([0.7, -1.0]).tolist() == [1] + [0] * 998 + [1]  # out of range: clipped into the end bins
    with pytest.raises(ValueError):
        auroc_from_histograms([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        auroc_from_histograms([1, -2], [1, 2])


def test_initial_members_distinct_reproducible_and_rng_untouched():
    args = EngineConfig.from_dict(resolve_engine(TINY_ENGINE)).network_args()
    model0 = {"x": np.zeros(1)}
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    members = initial_members(args, model0, 3, seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is not consumed
    assert members[0] is not model0 and members[0] == model0
    again = initial_members(args, model0, 3, seed=5)
    assert fingerprint(members[1]) == fingerprint(again[1]) and fingerprint(members[2]) == fingerprint(again[2])
    assert fingerprint(members[1]) != fingerprint(members[2])


def test_member_seeds_never_collide_across_runs():
    """Member m of seed s used to be seeded s + m (run 0's member 1 = run 1's member 0). Now every (seed, member)
    pair gets its own seed: child m of SeedSequence(seed); model 0 stays the persistor's initial model."""
    seeds = {(s, m): member_seed(s, m) for s in range(10) for m in range(8)}
    assert len(set(seeds.values())) == len(seeds)
    assert member_seed(3, 5) == int(np.random.SeedSequence(3).spawn(6)[5].generate_state(1, np.uint64)[0])
    with pytest.raises(ValueError):
        member_seed(-1, 0)
    args = EngineConfig.from_dict(resolve_engine(TINY_ENGINE)).network_args()
    model0 = {"x": np.zeros(1)}
    prints = {}
    for s in range(10):
        members = initial_members(args, model0, 8, seed=s)
        assert members[0] == model0  # model 0 = the persistor's initial model, for every seed
        prints.update({(s, m): fingerprint(w) for m, w in enumerate(members) if m > 0})
    assert len(set(prints.values())) == len(prints) == 70  # no two (seed, member) pairs start from the same weights


def test_visits_carry_optimizer_state_and_ensemble_scores_match_the_engine(tiny2d, tmp_path):
    engine = tiny_engine(tiny2d)
    schedule = LrSchedule("poly", 1e-3, total_visits=2)
    w0 = state_to_numpy(engine.new_network())
    w1, o1, stats1 = cross_visit(engine, w0, None, 4, schedule, visits_done=0)
    w2, o2, stats2 = cross_visit(engine, w1, o1, 4, schedule, visits_done=1)
    assert stats1.steps == stats2.steps == 4
    steps = {k: float(v) for k, v in o2.items() if k.endswith("::step")}
    assert steps and set(steps.values()) == {8.0}  # Adam continued counting: the state travelled
    check_optimizer_state("site-1", o2, w2, sent=o1)
    assert fingerprint(w2) != fingerprint(w1) != fingerprint(w0)

    nets = []
    for weights in (w2, w1):
        net = engine.new_network()
        load_numpy_state(net, weights)
        nets.append(net)
    scored = score_ensemble(engine, nets, "testing")
    for net, member in zip(nets, scored.members):
        assert np.allclose(member.dice, engine.evaluate(net, "testing").dice)
    u = scored.uncertainty()
    n_voxels = sum(int(np.prod(item["label"].shape)) for _, item in engine.eval_batches("testing"))
    assert u["n_wrong"] + u["n_right"] == n_voxels and len(u["mean_std_per_case"]) == len(engine.cases("testing"))
    # the AUROC the site reports equals the brute-force AUROC over the same voxels (exact up to the binning)
    stds, wrongs = [], []
    for _, item in engine.eval_batches("testing"):
        probs = torch.stack([engine.predict_probs(net, item["image"].unsqueeze(0)) for net in nets])
        mean, std, _ = ensemble_maps(probs)
        stds.append(std[0].flatten().numpy())
        wrongs.append((mean.argmax(dim=1)[0] != item["label"][0].long()).flatten().numpy())
    std_all, wrong_all = np.concatenate(stds), np.concatenate(wrongs)
    assert scored.hist_wrong.sum() == u["n_wrong"] == wrong_all.sum() and scored.hist_right.sum() == u["n_right"]
    assert u["auroc"] == pytest.approx(brute_auroc(std_all[wrong_all], std_all[~wrong_all]), abs=2e-3)
    same = score_ensemble(engine, [nets[0], nets[0]], "testing")  # identical members: ensemble = member, no spread
    assert np.allclose(same.ensemble.dice, same.members[0].dice) and same.std_sum_wrong == same.std_sum_right == 0

    save_members(tmp_path / "set.pt", [w2, w1], [o2, {}], {"communication": 4})
    members, optimizers, info = load_members(tmp_path / "set.pt")
    assert info["communication"] == 4 and info["num_models"] == 2 and info["method"] == "fedcross"
    assert fingerprint(members[0]) == fingerprint(w2) and optimizers[1] == {}
    assert all(np.array_equal(optimizers[0][k], o2[k]) for k in o2)


def test_job_configs_state_the_fedcross_settings():
    for name, k, kind in (("fedcross", 1, "cyclic"), ("fedcrossens", 0, "latin")):
        args = server_args(name)
        assert args["num_models"] == k and args["schedule"] == kind
        for key in (
            "num_communications",
            "visit_epochs",
            "visit_steps",
            "task_timeout",
            "validate_timeout",
            "seed",
            "engine_config",
        ):
            assert key in args, (name, key)
        client = json.loads((JOBS / name / "app" / "config" / "config_fed_client.json").read_text())
        assert client["executors"][0]["executor"]["args"]["engine"] == args["engine_config"]  # one engine, both sides
    # same total budget as jobs/fedavg at 4 sites: FedAvg R x local_epochs at every site per round
    fedavg = json.loads((JOBS / "fedavg" / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]
    fedavg_client = json.loads((JOBS / "fedavg" / "app" / "config" / "config_fed_client.json").read_text())
    epochs = fedavg_client["executors"][0]["executor"]["args"]["engine"]["local_epochs"]
    fedavg_site_epochs = fedavg["num_rounds"] * epochs * 4
    ens, cross = server_args("fedcrossens"), server_args("fedcross")
    assert ens["num_communications"] * ens["visit_epochs"] * 4 == fedavg_site_epochs
    assert cross["num_communications"] * cross["visit_epochs"] == fedavg_site_epochs
    assert cross["num_communications"] % 4 == 0  # cyclic over 4 sites: every site gets the same number of visits
    assert ens["num_communications"] % 4 == 0  # whole Latin blocks at the built-in data's 4 sites
    assert ens["lr_schedule"] == cross["lr_schedule"] == "constant"  # the rate every other method trains with
    assert (ens["num_communications"], ens["visit_epochs"]) == (20, 1)


def test_jobgen_refuses_a_latin_job_in_partial_blocks(tmp_path):
    with pytest.raises(SystemExit, match="num_communications 10 is not a multiple of the number of sites 4"):
        jobgen_main(["--out", str(tmp_path), "--only", "fedcrossens", "--communications", "10", "--sites", "4"])
    assert not (tmp_path / "fedcrossens").exists()
    jobgen_main(
        ["--out", str(tmp_path), "--only", "fedcrossens", "--communications", "9", "--sites", "3", "--lr-schedule", "poly"]
    )
    args = json.loads((tmp_path / "fedcrossens" / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0][
        "args"
    ]
    assert (args["num_communications"], args["lr_schedule"]) == (9, "poly")
    assert FEDCROSS_DEFAULTS["fedcrossens"]["communications"] % 4 == 0


# ---- simulator runs -------------------------------------------------------------------------------------------
def with_faults(job: Path, faults: list[dict]) -> Path:
    set_executor_path(job, FAULTY)
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["faults"] = faults
    client_file.write_text(json.dumps(client, indent=2))
    return job


@pytest.fixture(scope="module")
def clean_runs(tiny2d, tmp_path_factory) -> dict:
    """jobs/fedcross (K = 1) and jobs/fedcrossens (K = 3 sites), 3 communications each."""
    tmp = tmp_path_factory.mktemp("clean")
    cross = cross_job(tmp / "a", "fedcross", num_communications=3, visit_steps=6, optimizer_state="travel")
    ens = cross_job(tmp / "b", "fedcrossens", num_communications=3, visit_steps=12)
    return in_parallel(
        fedcross=lambda: simulate(cross, tmp / "ws_cross", tiny2d, n=3),
        fedcrossens=lambda: simulate(ens, tmp / "ws_ens", tiny2d, n=3),
    )


@pytest.fixture(scope="module")
def fault_runs(clean_runs, tiny2d, tmp_path_factory) -> dict:
    """faults: FedCrossEns where site-2 raises in communication 1 and site-3 returns NaN weights in 2.
    resume: the FedCross run continued from its last.pt to 5 communications; in communication 4 the
    model's site (site-2) stalls past the 10 s task timeout."""
    tmp = tmp_path_factory.mktemp("faults")
    faulty = with_faults(
        cross_job(tmp / "a", "fedcrossens", num_communications=3, visit_steps=4, max_site_failures=1),
        [
            {"site": "site-2", "communication": 1, "mode": "raise"},
            {"site": "site-3", "communication": 2, "mode": "nan_weights"},
        ],
    )
    last = clean_runs["fedcross"].job_dir / OUT / "last.pt"
    resumed = with_faults(
        cross_job(
            tmp / "b",
            "fedcross",
            num_communications=5,
            visit_steps=6,
            task_timeout=10,
            max_site_failures=1,
            optimizer_state="travel",
            resume_from=str(last),
            validate_every=1,  # site-2 answers a validation in communication 3, so no start-up grace in 4
        ),
        [{"site": "site-2", "communication": 4, "mode": "stall", "seconds": 16}],
    )
    # expect_ok=False: the injected failures are (rightly) in the sites' error logs; the tests check the rest
    run = lambda job, ws, **kw: simulate(job, ws, tiny2d, n=3, expect_ok=False, allow_classes=(FAULTY,), **kw)  # noqa: E731
    return in_parallel(
        faults=lambda: run(faulty, tmp / "ws_faults"),
        resume=lambda: run(resumed, tmp / "ws_resume", resume_dirs=[clean_runs["fedcross"].workspace]),
    )


@pytest.fixture(scope="module")
def fedcross_run(clean_runs):
    return clean_runs["fedcross"]


@pytest.fixture(scope="module")
def fedcrossens_run(clean_runs):
    return clean_runs["fedcrossens"]


def test_fedcrossens_in_partial_latin_blocks_fails_at_once(tiny2d, tmp_path):
    """4 communications at 3 sites: the server refuses the job when it starts (it learns the sites only then),
    before any model is sent anywhere, with an error naming both numbers."""
    job = cross_job(tmp_path, "fedcrossens", num_communications=4, visit_steps=2)
    run = simulate(job, tmp_path / "ws", tiny2d, n=3, expect_ok=False, timeout=300)
    log = run.log("server")
    assert "num_communications 4 is not a multiple of the number of sites 3" in log, log[-3000:]
    assert "FedCross job refused at its start (sites ['site-1', 'site-2', 'site-3'])" in log
    assert "cross_train" not in log and not (run.job_dir / OUT / "last.pt").exists()  # no model ever left the server
    assert not any("cross_train" in run.log(s) for s in ("site-1", "site-2", "site-3"))  # refused before any task


# ---- FedCross (K = 1) -------------------------------------------------------------------------------------------


def test_fedcross_relays_one_model_and_writes_set_history_and_results(fedcross_run):
    hist = history(fedcross_run)
    assert [h["communication"] for h in hist] == [0, 1, 2]
    assert [h["assignment"] for h in hist] == [["site-1"], ["site-2"], ["site-3"]]  # cyclic round-robin
    assert all(h["visits"][0]["status"] == "trained" for h in hist)
    shas = [h["weights_sha1"][0] for h in hist]
    assert len(set(shas)) == 3  # every visit replaced the model
    # validated every ceil(3 sites / 1 model) = 3 communications and after the last: here only after the third
    assert ["val_dice" in h for h in hist] == [False, False, True]
    assert hist[2]["val_n_cases"] == 6 and 0 <= hist[2]["val_dice"] <= 1
    assert [h["validate_s"] > 0 for h in hist] == [False, False, True]
    # the hand-over is measured from the previous visit's result at the server to the next visit's start at its site
    assert hist[0]["handover_s"] is None and all(h["handover_s"] >= 0 for h in hist[1:])
    assert all(h["train_s"] > 0 for h in hist)

    members, optimizers, info = load_members(fedcross_run.job_dir / OUT / "last.pt")
    assert len(members) == 1 and info["communication"] == 2 and info["visits_done"] == [3]
    assert fingerprint(members[0]) == shas[-1]
    assert {float(v) for k, v in optimizers[0].items() if k.endswith("::step")} == {18.0}  # 3 visits x 6 steps
    assert info["engine"]["roi_size"] == [32, 32] and info["network_args"]["out_channels"] == 2
    _, _, best_info = load_members(fedcross_run.job_dir / OUT / "best.pt")
    best_c = 2  # the only validated communication
    assert best_info["communication"] == best_c
    assert (fedcross_run.job_dir / "app_server" / "FL_global_model.pt").exists()

    res = results(fedcross_run)
    assert res["method"] == "fedcross" and set(res["models"]) == {"ensemble", "member 0"}
    for site in ("site-1", "site-2", "site-3"):
        ens, member = res["models"]["ensemble"][site], res["models"]["member 0"][site]
        assert ens["n_cases"] == 3 and len(ens["dice_per_case"]) == 3
        assert ens["dice_per_case"] == member["dice_per_case"]  # an ensemble of one is its member
    assert res["extra"]["best_communication"] == best_c and res["extra"]["train_steps_total"] == 18
    assert res["extra"]["checkpoint_write_seconds"] > 0  # last.pt and best.pt written on the writer thread
    assert res["extra"]["uncertainty_mean_std_wrong"] == 0.0  # one model has no spread
    assert res["extra"]["uncertainty_auroc_mean"] == 0.5  # ... so its std tells wrong from right voxels by chance
    # the learning-rate schedule is a setting, constant by default like every other method, and recorded
    assert (res["extra"]["lr_schedule"], res["extra"]["lr_base"]) == ("constant", 1e-3) and "lr_power" not in res["extra"]
    assert all(h["lr_schedule"] == "constant" and h["lr"] == [1e-3] for h in hist)
    log = fedcross_run.log("server")
    assert "FedCross communication 1/2: model 0 -> site-2" in log
    assert "fedcross: per-site test Dice" in log and "member 0" in log
    assert "model 0 (visit 3) trained 6 steps" in fedcross_run.log("site-3")


# ---- FedCrossEns (K = sites) --------------------------------------------------------------------------------------


def test_fedcrossens_trains_k_models_in_a_latin_square(fedcrossens_run):
    hist = history(fedcrossens_run)
    sites = ["site-1", "site-2", "site-3"]
    assert len(hist) == 3 and all(sorted(h["assignment"]) == sites for h in hist)  # every site hosts one model
    for m in range(3):
        assert sorted(h["assignment"][m] for h in hist) == sites  # each model visited every site once
        assert len({h["weights_sha1"][m] for h in hist}) == 3
    members, _, info = load_members(fedcrossens_run.job_dir / OUT / "last.pt")
    assert len(members) == 3 and info["visits_done"] == [3, 3, 3]
    assert len({fingerprint(w) for w in members}) == 3
    res = results(fedcrossens_run)
    assert res["method"] == "fedcrossens"
    assert set(res["models"]) == {"ensemble", "member 0", "member 1", "member 2"}
    assert all(sorted(per_site) == sites for per_site in res["models"].values())
    assert res["extra"]["train_steps_total"] == 3 * 3 * 12
    assert all(len(h["val_member_dice"]) == 3 for h in hist)
    assert "fedcrossens: per-site test Dice" in fedcrossens_run.log("server")


def test_ensemble_is_more_uncertain_where_it_is_wrong(fedcrossens_run):
    extra = results(fedcrossens_run)["extra"]
    wrong, right = extra["uncertainty_mean_std_wrong"], extra["uncertainty_mean_std_right"]
    assert right > 0 and wrong > right, (wrong, right)
    per_site = results(fedcrossens_run)["models"]["ensemble"]
    assert sum(s["n_wrong"] for s in per_site.values()) > 0 and sum(s["n_right"] for s in per_site.values()) > 0
    with_wrong = [s for s in per_site.values() if s["n_wrong"]]
    pooled_wrong = sum(s["mean_std_wrong"] * s["n_wrong"] for s in with_wrong) / sum(s["n_wrong"] for s in with_wrong)
    assert pooled_wrong == pytest.approx(wrong)  # the overall number is the voxel-weighted pool of the sites'
    assert all(len(s["mean_std_per_case"]) == s["n_cases"] for s in per_site.values())
    # voxel-level AUROC of the std for the ensemble's wrong voxels, computed at every site from histograms
    auroc = extra["uncertainty_auroc_per_site"]
    assert sorted(auroc) == sorted(per_site) and all(0 <= v <= 1 for v in auroc.values())
    assert extra["uncertainty_auroc_mean"] == pytest.approx(np.mean(list(auroc.values())))
    assert extra["uncertainty_auroc_mean"] > 0.5, auroc  # the std flags errors better than chance
    assert all(per_site[s]["uncertainty_auroc"] == auroc[s] for s in auroc)


def run_infer(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "fedseg.infer", "ensemble", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_inference_writes_segmentations_and_uncertainty_maps(fedcrossens_run, tiny2d, tmp_path):
    best = fedcrossens_run.job_dir / OUT / "best.pt"
    datalist = tiny2d / "site-1" / "datalist.json"
    run_infer("--models", str(best), "--input", str(datalist), "--out", str(tmp_path / "dl"))
    summary = json.loads((tmp_path / "dl" / "summary.json").read_text())
    cases = load_datalist(str(datalist))["testing"]
    assert summary["num_models"] == 3 and len(summary["cases"]) == len(cases)
    for case, row in zip(cases, summary["cases"]):
        source = nib.load(case["image"])
        seg = nib.load(tmp_path / "dl" / f"{row['case']}_seg.nii.gz")
        std = nib.load(tmp_path / "dl" / f"{row['case']}_std.nii.gz").get_fdata()
        entropy = nib.load(tmp_path / "dl" / f"{row['case']}_entropy.nii.gz").get_fdata()
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        assert set(np.unique(seg.get_fdata())) <= {0.0, 1.0}
        assert std.min() >= 0 and std.max() <= 0.5 + 1e-6 and std.max() > 0
        assert entropy.min() >= -1e-6 and entropy.max() <= math.log(2) + 1e-6
        assert row["mean_std"] == pytest.approx(std.mean(), rel=1e-5)
        # the written segmentation, read back against the label file, has the Dice the summary states
        truth = nib.load(case["label"]).get_fdata() > 0
        pred = seg.get_fdata() > 0
        assert row["dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()), abs=1e-5)
    # same models, same engine settings: inference reproduces the job's per-case test Dice of the ensemble
    job_dice = results(fedcrossens_run)["models"]["ensemble"]["site-1"]["dice_per_case"]
    assert [r["dice"] for r in summary["cases"]] == pytest.approx(job_dice, abs=1e-5)
    csv_lines = (tmp_path / "dl" / "summary.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("case,mean_std,mean_entropy") and len(csv_lines) == len(cases) + 1
    wrong = np.mean([r["mean_std_wrong"] for r in summary["cases"]])
    right = np.mean([r["mean_std_right"] for r in summary["cases"]])
    assert wrong > right

    # new images: a plain folder, no labels, thresholded (in-process: same main() as the command line)
    from fedseg.infer import main as infer_main

    folder = tiny2d / "site-2" / "imagesTs"
    assert (
        infer_main(
            ["ensemble", "--models", str(best), "--input", str(folder), "--threshold", "0.5", "--out", str(tmp_path / "folder")]
        )
        == 0
    )
    summary = json.loads((tmp_path / "folder" / "summary.json").read_text())
    assert summary["segmentation"].endswith("> 0.5") and len(summary["cases"]) == 3
    assert all("dice" not in r and r["mean_std"] > 0 for r in summary["cases"])
    assert sorted(p.name for p in (tmp_path / "folder").glob("*_std.nii.gz")) == [
        p.name.replace(".nii.gz", "_std.nii.gz") for p in sorted(folder.glob("*.nii.gz"))
    ]


# ---- failures -------------------------------------------------------------------------------------------------
def test_failing_and_poisoning_sites_lose_no_model(fault_runs):
    """site-2 raises in communication 1, site-3 returns NaN weights in communication 2: the job completes,
    the models they held keep their last weights, both sites are left out afterwards, the log says so."""
    run = fault_runs["faults"]
    assert run.returncode == 0, run.log_tail
    assert "injected failure at site-2" in run.errors()  # the site's own error log

    hist = history(run)
    assert [h["active_sites"] for h in hist] == [["site-1", "site-2", "site-3"]] * 2 + [["site-1", "site-3"]]
    m_failed = hist[1]["assignment"].index("site-2")
    assert hist[1]["visits"][m_failed]["status"] == "kept last weights"
    assert hist[1]["weights_sha1"][m_failed] == hist[0]["weights_sha1"][m_failed]
    m_poisoned = hist[2]["assignment"].index("site-3")
    assert hist[2]["visits"][m_poisoned]["failed_at"][0]["reason"].startswith("REJECTED")
    assert hist[2]["weights_sha1"][m_poisoned] == hist[1]["weights_sha1"][m_poisoned]
    assert sum(s is None for s in hist[2]["assignment"]) == 1  # 3 models, 2 sites left: one model sits out
    for h in hist[1:]:
        trained = [v["model"] for v in h["visits"] if v["status"] == "trained"]
        prev = hist[h["communication"] - 1]["weights_sha1"]
        assert all(h["weights_sha1"][m] != prev[m] for m in trained)

    members, _, info = load_members(run.job_dir / OUT / "last.pt")
    assert len(members) == 3 and info["dropped_sites"] == ["site-2", "site-3"]
    assert all(np.isfinite(a).all() for w in members for a in w.values())
    assert sum(info["visits_done"]) == 3 + 2 + 1  # trained visits only
    log = run.log("server")
    assert f"model {m_failed} at site-2: no result" in log
    assert "REJECTED model" in log and "site-3" in log and "non-finite" in log
    assert "site site-2 failed 1 time(s)" in log and "site site-3 failed 1 time(s)" in log
    assert sorted(results(run)["models"]["ensemble"]) == ["site-1", "site-2", "site-3"]  # all still scored at the end


def test_resume_and_retry_a_stalled_visit_on_a_free_site(fault_runs, fedcross_run):
    """The FedCross run continued from its last.pt; in communication 4 the model's site (site-2) stalls past the
    task timeout: the model is retried on a free site in the same communication and site-2 is left out."""
    run = fault_runs["resume"]
    assert run.returncode == 0, run.log_tail
    assert not run.errors(), run.errors()[-3000:]  # a stall is no error: nothing in any error log

    hist = history(run)
    assert [h["communication"] for h in hist] == [0, 1, 2, 3, 4]
    assert hist[:3] == history(fedcross_run)  # the resumed history is kept
    assert hist[3]["assignment"] == ["site-1"] and hist[3]["visits"][0]["status"] == "trained"  # first task: start-up grace
    visit = hist[4]["visits"][0]
    assert hist[4]["assignment"] == ["site-2"] and visit["status"] == "trained" and visit["site"] == "site-1"
    assert visit["failed_at"][0]["site"] == "site-2" and hist[4]["dropped_sites"] == ["site-2"]
    members, optimizers, info = load_members(run.job_dir / OUT / "last.pt")
    assert info["visits_done"] == [5] and info["communication"] == 4
    assert {float(v) for k, v in optimizers[0].items() if k.endswith("::step")} == {30.0}  # optimizer resumed too
    log = run.log("server")
    assert "resuming from" in log and "at communication 3" in log
    assert "no usable result from ['site-2'] (error, timeout after 10s" in log and "model 0 at site-2: no result" in log
    assert "retrying model 0 on free site site-1" in log and "injected stall of 16s at site-2" in run.log("site-2")
    assert results(run)["extra"]["num_communications"] == 5
