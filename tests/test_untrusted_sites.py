"""A malicious site in real FLARE jobs (NVFlare simulator): the job completes and the honest sites' models are
exactly what they are when that site simply fails in the same rounds. And a job cannot make the server read
or write outside its workspace.

Each attack is compared with a reference run of the same job in which the attacking site trains and then
fails ("drop") where the server must reject the attack, and behaves honestly where the server must only
ignore a field (e.g. garbage metrics). Training is deterministic (seeded engine, one thread per site,
aggregation in site order), so "unaffected" is checked to float precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_ENGINE, copy_job, in_parallel, set_executor_path, simulate

from fedseg.modelset import load_members, load_model_set

MALICIOUS = "fedseg_malicious.MaliciousSegExecutor"
ENGINE = {**TINY_ENGINE, "local_epochs": 1}
ATTACKER = "site-3"


def with_attacks(job: Path, attacks: list[dict]) -> Path:
    set_executor_path(job, MALICIOUS)
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["executors"][0]["executor"]["args"]["attacks"] = [{"site": ATTACKER, **a} for a in attacks]
    client_file.write_text(json.dumps(client, indent=2))
    return job


def without_cross_site_eval(job: Path) -> Path:
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["workflows"] = server["workflows"][:1]
    server_file.write_text(json.dumps(server, indent=2))
    return job


def attacked_and_reference(tmp: Path, tiny2d: Path, make_job, attacks: list[dict], reference: list[dict]) -> dict:
    """The job with the attacks and the same job with the reference behaviour, run side by side."""
    jobs = {"attacked": with_attacks(make_job(tmp / "a"), attacks), "reference": with_attacks(make_job(tmp / "r"), reference)}
    # expect_ok=False: the reference's injected failures are (rightly) in the attacker's error log
    runs = in_parallel(
        **{
            name: (lambda j=job, n=name: simulate(j, tmp / f"ws_{n}", tiny2d, n=3, expect_ok=False, allow_classes=(MALICIOUS,)))
            for name, job in jobs.items()
        }
    )
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.log_tail}"
        server_errors = run.workspace / "server" / "error_log.txt"
        assert "Traceback" not in (server_errors.read_text() if server_errors.exists() else ""), f"{name}: server error"
    return runs


def assert_same_arrays(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for key in a:
        np.testing.assert_allclose(
            np.asarray(a[key], np.float64), np.asarray(b[key], np.float64), rtol=0, atol=1e-6, err_msg=f"{what}: {key}"
        )


def rejected_lines(run, site: str = ATTACKER) -> list[str]:
    return [line for line in run.log("server").splitlines() if "REJECTED" in line and site in line]


@pytest.fixture(scope="module")
def fedavg_runs(tiny2d, tmp_path_factory):
    make = lambda d: without_cross_site_eval(
        copy_job(
            "fedavg",
            d,
            server_args={"num_rounds": 6, "min_clients": 1},  # noqa: E731
            engine=ENGINE,
        )
    )
    attacks = [
        {"round": 0, "attack": "steps_nan"},
        {"round": 1, "attack": "scale_1000"},
        {"round": 2, "attack": "metrics_garbage"},
        {"round": 3, "attack": "steps_string"},
        {"round": 4, "attack": "int_tensor"},
        {"round": 5, "attack": "metrics_deep"},
    ]
    reference = [{"round": r, "attack": "drop"} for r in (0, 1, 3, 4, 5)]
    return attacked_and_reference(tmp_path_factory.mktemp("fedavg_attack"), tiny2d, make, attacks, reference)


def test_fedavg_malicious_site_cannot_crash_or_poison_the_global_model(fedavg_runs):
    attacked, reference = fedavg_runs["attacked"], fedavg_runs["reference"]
    out = lambda run: run.job_dir / "app_server" / "fedavg"  # noqa: E731
    history = json.loads((out(attacked) / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4, 5]
    for r in history:
        expected = ["site-1", "site-2", "site-3"] if r["round"] == 2 else ["site-1", "site-2"]
        assert r["accepted"] == expected, r
    # garbage metrics: the update is used, the claim is not
    assert ATTACKER not in history[2]["val_dice"] and ATTACKER in history[2]["accepted"]
    # the 1000x update was measured as such before it was refused
    norms = history[1]["update_norms"]
    assert norms[ATTACKER] > 100 * max(norms["site-1"], norms["site-2"])
    lines = "\n".join(rejected_lines(attacked))
    assert "NUM_STEPS_CURRENT_ROUND" in lines and "not finite" in lines and "not a number" in lines
    assert "update norm" in lines and "metrics.val_dice" in lines
    # an int64 tensor is refused by its dtype, never cast; a metric nested 300 levels deep is refused unformatted
    assert "dtype int64, expected float32 (the dtype the server sent)" in lines
    assert "nested deeper than 12 levels" in lines and ATTACKER not in history[5]["answered"]
    # the global model is exactly the one of the run in which site-3 just failed in rounds 0, 1, 3, 4, 5
    final, _ = load_model_set(out(attacked) / "last.pt")
    expected, _ = load_model_set(out(reference) / "last.pt")
    assert_same_arrays(final["global"], expected["global"], "FedAvg global model")
    assert (attacked.job_dir / "app_server" / "FL_global_model.pt").exists()


@pytest.fixture(scope="module")
def fedsm_runs(tiny2d, tmp_path_factory):
    make = lambda d: copy_job("fedsm", d, server_args={"num_rounds": 7}, engine=ENGINE)  # noqa: E731
    attacks = [
        {"round": 0, "task": "fedsm_train", "attack": "stats_inflated"},
        {"round": 1, "task": "fedsm_train", "attack": "steps_negative"},
        {"round": 2, "task": "fedsm_train", "attack": "metrics_missing"},
        {"round": 3, "task": "fedsm_train", "attack": "scale_1000"},
        {"round": 4, "task": "fedsm_train", "attack": "stats_asymmetric"},
        {"round": 5, "task": "fedsm_train", "attack": "metrics_wide"},
        {"round": 6, "task": "fedsm_train", "attack": "metrics_extra_keys"},
    ]
    reference = [{"round": r, "task": "fedsm_train", "attack": "drop"} for r in (0, 1, 3, 4, 5)]
    return attacked_and_reference(tmp_path_factory.mktemp("fedsm_attack"), tiny2d, make, attacks, reference)


def test_fedsm_malicious_site_cannot_crash_or_poison_the_models(fedsm_runs):
    attacked, reference = fedsm_runs["attacked"], fedsm_runs["reference"]
    out = lambda run: run.job_dir / "app_server" / "fedsm"  # noqa: E731
    history = json.loads((out(attacked) / "history.json").read_text())
    accepted = {r["round"]: r["accepted"] for r in history}
    assert accepted == {
        0: ["site-1", "site-2"],
        1: ["site-1", "site-2"],
        2: ["site-1", "site-2", "site-3"],
        3: ["site-1", "site-2"],
        4: ["site-1", "site-2"],
        5: ["site-1", "site-2"],
        6: ["site-1", "site-2", "site-3"],
    }
    lines = "\n".join(rejected_lines(attacked))
    assert "NUM_STEPS_CURRENT_ROUND" in lines and "update norm" in lines and "a dict or list of 30" in lines
    # the default selector protocol ("lda") sends feature statistics: an inflated scatter is screened against the
    # other sites' (the reference protocol's Adam state is screened in test_fedsm's fault run and test_screening)
    assert "selector feature statistics (spread)" in lines and "scatter is not symmetric" in lines
    # only the metric keys FedSM defines are kept (the history, and last.pt, which holds it)
    assert not any(k.startswith("junk_") for r in history for m in r["metrics"].values() for k in m)
    assert "val_super_dice" in history[6]["metrics"][ATTACKER]
    final, _ = load_model_set(out(attacked) / "last.pt")
    expected, _ = load_model_set(out(reference) / "last.pt")
    assert "selector_optim" not in final
    for group in ("global", "selector"):
        assert_same_arrays(final[group], expected[group], f"FedSM {group}")
    for site in ("site-1", "site-2", "site-3"):
        assert_same_arrays(final["personal"][site], expected["personal"][site], f"FedSM personalized model of {site}")
    assert (out(attacked) / "fedsm_evaluation.json").exists()  # the job went on to its final scoring


@pytest.fixture(scope="module")
def fedcross_runs(tiny2d, tmp_path_factory):
    make = lambda d: copy_job(
        "fedcrossens",
        d,
        engine=ENGINE,
        server_args={  # noqa: E731
            "num_communications": 6,
            "visit_steps": 4,
            "task_timeout": 120,
            "max_site_failures": 10,
        },
    )
    # a site whose visit failed is not asked to validate in that communication: the garbage scores come in 1
    attacks = [
        {"round": 0, "task": "cross_train", "attack": "model_index"},
        {"round": 0, "task": "cross_validate", "attack": "metrics_garbage"},
        {"round": 2, "task": "cross_train", "attack": "adam_negative"},
        {"round": 3, "task": "cross_train", "attack": "scale_1000"},
    ]
    reference = [{"round": r, "task": "cross_train", "attack": "drop"} for r in (0, 2, 3)]
    reference.append({"round": 0, "task": "cross_validate", "attack": "drop"})
    return attacked_and_reference(tmp_path_factory.mktemp("fedcross_attack"), tiny2d, make, attacks, reference)


def test_fedcrossens_malicious_site_cannot_crash_or_poison_any_member(fedcross_runs):
    attacked, reference = fedcross_runs["attacked"], fedcross_runs["reference"]
    out = lambda run: run.job_dir / "app_server" / "fedcross"  # noqa: E731
    history = json.loads((out(attacked) / "validation_history.json").read_text())
    assert len(history) == 6
    for entry in history:  # the member the attacker hosted kept its weights in communications 0, 2 and 3
        at_attacker = [v for v in entry["visits"] if v.get("failed_at") and v["failed_at"][0]["site"] == ATTACKER]
        if entry["communication"] in (0, 2, 3):
            assert len(at_attacker) == 1 and at_attacker[0]["status"] == "kept last weights", entry["visits"]
        else:
            assert not at_attacker, entry["visits"]
    assert [ATTACKER in h["val_missing_sites"] for h in history] == [False, True, False, False, False, False]
    lines = "\n".join(rejected_lines(attacked))
    assert "model_index" in lines and "negative second moment" in lines and "update norm" in lines
    assert "REJECTED scores from site-3" in lines
    members, optims, _ = load_members(out(attacked) / "last.pt")
    ref_members, ref_optims, _ = load_members(out(reference) / "last.pt")
    for m in range(len(members)):
        assert_same_arrays(members[m], ref_members[m], f"FedCrossEns member {m}")
        assert_same_arrays(optims[m], ref_optims[m], f"FedCrossEns member {m} optimizer state")
    results = json.loads((attacked.job_dir / "app_server" / "fedseg_results.json").read_text())
    assert sorted(results["models"]["ensemble"]) == ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def fedcross_travel_runs(tiny2d, tmp_path_factory):
    """FedCross (one model) with its Adam state travelling; site-3 hosts it first, in communications 0, 2 and 4."""
    make = lambda d: copy_job(  # noqa: E731
        "fedcross",
        d,
        engine=ENGINE,
        server_args={
            "num_communications": 6,
            "visit_steps": 4,
            "task_timeout": 120,
            "validate_timeout": 120,
            "max_site_failures": 10,
            "optimizer_state": "travel",
            "schedule": "explicit",
            "explicit_schedule": [["site-3"], ["site-1"], ["site-3"], ["site-2"]],
        },
    )
    attacks = [
        {"round": 0, "task": "cross_train", "attack": "scale_1000"},  # the first visit: no peer to compare with
        {"round": 0, "task": "cross_validate", "attack": "metrics_deep"},  # its first validation (communication 1)
        {"round": 2, "task": "cross_train", "attack": "adam_poison"},  # moments that travel on to the honest sites
        {"round": 4, "task": "cross_train", "attack": "int_tensor"},
    ]
    reference = [{"round": r, "task": "cross_train", "attack": "drop"} for r in (0, 2, 4)]
    reference.append({"round": 0, "task": "cross_validate", "attack": "drop"})
    return attacked_and_reference(tmp_path_factory.mktemp("fedcross_travel_attack"), tiny2d, make, attacks, reference)


def test_fedcross_first_visit_and_travelling_optimizer_state_are_screened(fedcross_travel_runs):
    attacked, reference = fedcross_travel_runs["attacked"], fedcross_travel_runs["reference"]
    out = lambda run: run.job_dir / "app_server" / "fedcross"  # noqa: E731
    history = json.loads((out(attacked) / "validation_history.json").read_text())
    assert len(history) == 6
    for entry in history:
        (visit,) = entry["visits"]
        failed = [f["site"] for f in visit.get("failed_at", [])]
        # the attacker's visits are refused (the model is retried on a free site); no honest visit ever is
        assert failed == ([ATTACKER] if entry["communication"] in (0, 2, 4) else []), entry["visits"]
        assert visit["status"] == "trained" and visit["site"] != ATTACKER
    lines = "\n".join(rejected_lines(attacked))
    assert "no other visit to compare with" in lines and "of the model that was sent" in lines
    assert "first moment(s) larger than any gradients allow" in lines
    assert "dtype int64, expected float32" in lines and "nested deeper than 12 levels" in lines
    assert not [line for line in attacked.log("server").splitlines() if "REJECTED" in line and ATTACKER not in line]
    members, optims, _ = load_members(out(attacked) / "last.pt")
    ref_members, ref_optims, _ = load_members(out(reference) / "last.pt")
    assert_same_arrays(members[0], ref_members[0], "FedCross model")
    assert_same_arrays(optims[0], ref_optims[0], "FedCross travelling optimizer state")


def test_every_rejection_is_an_nvflare_audit_event(audit_events):
    from nvflare.apis.fl_context import FLContext

    from fedseg.fl.fedavg_controller import FedAvgController

    events = audit_events
    controller = FedAvgController(num_rounds=1)
    controller.fl_ctx = FLContext()
    reference = {"w": np.zeros(2, np.float32)}
    assert not controller.screener.accept(ATTACKER, {"w": np.zeros(2, np.int8)}, reference, "update")
    controller.reject(ATTACKER, "metrics", "metrics: nested deeper than 12 levels")
    assert [e["ref"] for e in events] == [f"fedseg:rejected:{ATTACKER}"] * 2
    assert "REJECTED update from site-3: key 'w': dtype int8, expected float32" in events[0]["msg"]
    assert events[1]["msg"] == "REJECTED metrics from site-3: metrics: nested deeper than 12 levels"


def test_step_weights_are_capped_by_the_servers_plan_even_when_the_job_gives_none():
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedseg.fl.fedavg_controller import FedAvgController

    results = {
        s: FLModel(params={}, meta={"NUM_STEPS_CURRENT_ROUND": n})
        for s, n in (("site-1", 10), ("site-2", 12), (ATTACKER, 10**6))
    }
    controller = FedAvgController(num_rounds=1)  # max_local_steps 0, max_weight_ratio 4: the job plans nothing
    controller.server_config = lambda: {}
    assert controller.step_weights(results, None, 4.0) == {"site-1": 10.0, "site-2": 12.0, ATTACKER: 22.0}  # 2 x median
    controller.server_config = lambda: {"max_weight_ratio": 3}  # the server operator's own ceiling
    assert controller.step_weights(results, None, 4.0)[ATTACKER] == 33.0
    assert controller.step_weights(results, None, 1.0)[ATTACKER] == 11.0  # a job may ask for less
    controller.server_config = lambda: {"max_local_steps": 11}  # the operator's step plan
    assert controller.step_weights(results, None, 4.0) == {"site-1": 10.0, "site-2": 11.0, ATTACKER: 11.0}
    assert controller.step_weights(results, 8, 4.0) == {"site-1": 8.0, "site-2": 8.0, ATTACKER: 8.0}  # the smaller plan


def test_trimmed_mean_refuses_to_start_with_too_few_sites():
    from fedseg.fl.fedavg_controller import FedAvgController
    from fedseg.fl.fedsm_controller import FedSMController

    for controller in (FedAvgController, FedSMController):
        with pytest.raises(ValueError, match="needs min_clients >= 3"):
            controller(aggregation="trimmed_mean", min_clients=2)
        controller(aggregation="trimmed_mean", min_clients=3)


def test_a_job_cannot_make_the_server_read_or_write_outside_its_workspace(tiny2d, tmp_path):
    """resume_from outside the job and the server's allowed directories, and a results_dir that is a path:
    the job stops at once with a message that says why and how to allow it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "last.pt").write_bytes(b"not a checkpoint")
    fedavg = without_cross_site_eval(
        copy_job(
            "fedavg", tmp_path / "a", engine=ENGINE, server_args={"num_rounds": 1, "resume_from": str(outside / "last.pt")}
        )
    )
    fedcross = copy_job(
        "fedcross", tmp_path / "b", engine=ENGINE, server_args={"num_communications": 1, "results_dir": "../../x"}
    )
    runs = in_parallel(
        fedavg=lambda: simulate(fedavg, tmp_path / "ws_a", tiny2d, n=2, expect_ok=False),
        fedcross=lambda: simulate(fedcross, tmp_path / "ws_b", tiny2d, n=2, expect_ok=False),
    )
    log = runs["fedavg"].log("server")
    assert "outside the job's workspace and the server's allowed directories" in log and "resume_dirs" in log
    assert "round 0" not in log.split("outside the job's workspace")[1]  # no training after the refusal
    assert "results_dir must be a plain folder name" in runs["fedcross"].log("server")
    assert not (tmp_path / "x").exists()
