"""The parts FedSeg's three workflows are built from, checked without FLARE running: the results folder and its
checkpoints, which sites take part, the screening of site results, the results records, and the refusal of a job
that names a constructor argument by its earlier name."""

from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fedseg.algorithms import UpdateRejected
from fedseg.algorithms.packing import pack
from fedseg.algorithms.routing import GLOBAL
from fedseg.fl.checkpoints import ResultsFolder, best_beside, check_folder_name, improves, write_json
from fedseg.fl.fedcross_results import fedcross_results, final_models, validation_scores
from fedseg.fl.fedcross_screening import check_visit, read_cross_scores, screen_visits
from fedseg.fl.fedsm_results import fedsm_results, gamma_on_validation, train_metric_key
from fedseg.fl.fedsm_screening import read_sweep, selector_round, valid_update
from fedseg.fl.results import dp_spent, round_seconds, write_results
from fedseg.fl.screener import Screener
from fedseg.fl.site_health import FailedRounds, SiteHealth
from fedseg.methods.fedsm import GAMMA_SWEEP
from fedseg.report import RESULTS_FILE


class Log:
    """What a Screener reports: rejections (site, what, reason) and warnings."""

    def __init__(self):
        self.rejected: list[tuple[str, str, str]] = []
        self.warnings: list[str] = []

    def reject(self, site: str, what: str, reason: str) -> None:
        self.rejected.append((site, what, reason))

    def screener(self, **thresholds) -> Screener:
        return Screener(self.reject, self.warnings.append, **thresholds)


def model(value: float = 0.0) -> dict:
    return {"w": np.full(4, value, np.float32), "b": np.full(2, value, np.float32)}


# ---- results folder and checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "../x", None])
def test_a_results_dir_is_a_plain_folder_name(name):
    with pytest.raises(ValueError, match="results_dir must be a plain folder name"):
        check_folder_name(name)
    assert check_folder_name("fedcross") == "fedcross"


def test_results_folder_is_made_at_its_first_file_and_writes_json_whole(tmp_path):
    folder = ResultsFolder(tmp_path / "fedavg")
    assert not folder.folder.exists()  # a run that stops before writing leaves no folder
    folder.write_json("history.json", [{"round": 0, "score": np.float32(0.5), "norms": np.arange(2)}])
    assert json.loads((tmp_path / "fedavg" / "history.json").read_text()) == [{"round": 0, "score": 0.5, "norms": [0, 1]}]
    assert sorted(p.name for p in folder.folder.iterdir()) == ["history.json"]  # no .tmp left
    assert folder.path() == tmp_path / "fedavg"
    write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_background_writes_run_in_order_and_a_failure_is_raised(tmp_path):
    folder = ResultsFolder(tmp_path / "out")
    done: list[int] = []
    main = threading.get_ident()
    threads = set()

    def write(i: int):
        def run() -> None:
            time.sleep(0.01 * (3 - i))  # the first write is the slowest: order is kept anyway
            threads.add(threading.get_ident())
            done.append(i)

        return run

    for i in range(3):
        folder.later(write(i))
    folder.done()
    assert done == [0, 1, 2] and main not in threads and folder.write_seconds > 0

    def fail() -> None:
        raise OSError("disk full")

    folder.later(fail)
    with pytest.raises(OSError, match="disk full"):
        folder.done()
    folder.done()  # nothing left to wait for


def test_improves_needs_a_finite_score_above_the_best():
    assert improves(0.5, None) and improves(0.6, 0.5) and improves(0.0, -1.0)
    assert not improves(None, None) and not improves(math.nan, None) and not improves(0.5, 0.5) and not improves(0.4, 0.5)


def test_best_beside_a_resumed_checkpoint(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    assert best_beside(tmp_path / "last.pt") is None
    (tmp_path / "best.pt").write_bytes(b"")
    assert best_beside(tmp_path / "last.pt") == tmp_path / "best.pt"


# ---- which sites take part ------------------------------------------------------------------------------------------
def test_failed_rounds_stop_at_the_limit_in_a_row():
    failed = FailedRounds(3)
    assert [failed.failed(), failed.failed()] == [False, False]
    failed.succeeded()
    assert [failed.failed(), failed.failed(), failed.failed()] == [False, False, True] and failed.count == 3
    assert FailedRounds(0).failed()  # FedSM's max_failed_rounds 0: the first round below min_clients stops the job


def test_site_health_state_survives_a_checkpoint():
    health = SiteHealth(max_failures=1, rejoin_after=2)
    health.start(0, ["a", "b"])
    assert health.failed("a", 0) and health.dropped == ["a"]
    restored = SiteHealth(max_failures=1, rejoin_after=2)
    restored.restore(json.loads(json.dumps(health.state())))
    assert restored.dropped_at == {"a": 0} and restored.failures == {"a": 1}
    assert restored.start(2, ["a", "b"]) == [] and restored.start(3, ["a", "b"]) == ["a"]
    older = SiteHealth(1, 2)
    older.restore({"communication": 4, "dropped_sites": ["b"]})  # a checkpoint that lists only the dropped sites
    assert older.dropped_at == {"b": 4} and older.failures == {}


# ---- screening of site results --------------------------------------------------------------------------------------
def test_screener_rejects_with_the_site_and_field_named():
    log = Log()
    screener = log.screener()
    reference = model()
    assert screener.accept("a", model(0.1), reference, "update")
    assert not screener.accept("b", {"w": reference["w"].astype(np.int8), "b": reference["b"]}, reference, "update")
    assert log.rejected[-1][:2] == ("b", "update") and "dtype int8" in log.rejected[-1][2]
    assert screener.read("c", "metrics", lambda site, m: m["x"], {"x": 1}) == 1
    assert screener.scores({"a": {"val_dice": 0.7}, "b": {"val_dice": 1.5}, "c": "bad"}, "val_dice") == {"a": 0.7}
    assert [r[:2] for r in log.rejected[-2:]] == [("b", "metrics"), ("c", "metrics")]
    nested: list = []
    for _ in range(30):
        nested = [nested]
    assert screener.metadata("a", {"ok": 1}, {"ok": 2}, "train result")
    assert not screener.metadata("d", {"deep": nested}, {}, "train result")
    assert log.rejected[-1][:2] == ("d", "train result")


def test_screener_magnitudes_directions_and_bounding():
    log = Log()
    screener = log.screener(max_update_ratio=10.0, clip_ratio=2.0, min_update_cosine=-0.5)
    assert screener.magnitudes("update", {"a": 1.0, "b": 1.2, "c": 1.1, "evil": 100.0}) == {"evil"}
    assert log.rejected == [("evil", "update", log.rejected[0][2])] and "norm" in log.rejected[0][2]
    base = model()
    updates = {"a": model(1.0), "b": model(1.1), "c": model(0.9), "flip": model(-1.0)}
    opposed, cosines = screener.directions("update", updates, dict.fromkeys(updates, base))
    assert opposed == {"flip"} and set(cosines) == set(updates) and cosines["a"] > 0.9
    bounded, scales = screener.bound(
        "update", {"a": model(1.0), "b": model(1.0), "big": model(3.0)}, dict.fromkeys(["a", "b", "big"], base)
    )
    assert set(scales) == {"big"} and np.allclose(bounded["big"]["w"], 2.0) and bounded["a"] is not None
    assert log.warnings and log.warnings[-1].startswith("BOUNDED update from big")


def test_screener_step_weights_cap_a_claim():
    log = Log()
    screener = log.screener()
    metas = {
        "a": {"NUM_STEPS_CURRENT_ROUND": 10},
        "b": {"NUM_STEPS_CURRENT_ROUND": 12},
        "evil": {"NUM_STEPS_CURRENT_ROUND": 10**6},
    }
    assert screener.step_weights(metas, None, 2.0) == {"a": 10.0, "b": 12.0, "evil": 22.0}
    assert screener.step_weights(metas, 11, 2.0) == {"a": 10.0, "b": 11.0, "evil": 11.0}
    assert screener.step_weights({"x": {}}, None, 2.0) == {} and log.rejected[-1][:2] == ("x", "step count")
    with pytest.raises(ValueError, match="clip_ratio"):
        log.screener(clip_ratio=-1)
    with pytest.raises(ValueError, match="min_update_cosine"):
        log.screener(min_update_cosine=2)


def test_server_plan_keeps_the_operators_ceilings():
    from fedseg.fl.base_controller import SERVER_MAX_WEIGHT_RATIO, server_plan

    assert server_plan({}, None, 4.0) == (None, SERVER_MAX_WEIGHT_RATIO)
    assert server_plan({"max_weight_ratio": 3}, None, 1.0) == (None, 1.0)  # a job may ask for less
    assert server_plan({"max_local_steps": 11}, 20, 0.0) == (11, SERVER_MAX_WEIGHT_RATIO)
    with pytest.raises(ValueError, match="max_local_steps"):
        server_plan({"max_local_steps": 0}, None, 1.0)


# ---- FedCross: visits and scores ------------------------------------------------------------------------------------
def visit(m: int, weights: dict, steps: int = 5):
    return SimpleNamespace(
        meta={"model_index": m, "NUM_STEPS_CURRENT_ROUND": steps}, params=pack({"model": weights, "optim": {}})
    )


def test_check_visit_takes_a_usable_visit_and_names_what_is_wrong():
    sent = model()
    weights, optim, steps = check_visit("a", 0, visit(0, model(0.5)), sent, {}, None)
    assert np.allclose(weights["w"], 0.5) and optim == {} and steps == 5
    with pytest.raises(UpdateRejected, match="result is for model 1, expected 0"):
        check_visit("a", 0, visit(1, model(0.5)), sent, {}, None)
    assert check_visit("a", 0, visit(0, model(0.5), steps=50), sent, {}, 8)[2] == 8  # capped at the plan


def test_screen_visits_rejects_a_lone_visit_far_from_the_model_sent():
    log = Log()
    members = [model(1.0)]
    too_large, scales = screen_visits(log.screener(), {"a": 0}, {"a": visit(0, model(100.0))}, members, [], 3.0)
    assert too_large == {"a"} and scales == {} and "no other visit to compare with" in log.rejected[0][1]
    too_large, _ = screen_visits(log.screener(), {"a": 0}, {"a": visit(0, model(1.5))}, members, [], 3.0)
    assert too_large == set()


def scores(dice: list[float], k: int = 2) -> dict:
    summary = {"n_cases": len(dice), "dice": float(np.mean(dice)), "dice_per_case": dice}
    return {
        "n_cases": len(dice),
        "section": "validation",
        "ensemble": summary,
        "members": [summary] * k,
        "uncertainty": {
            "std_sum_wrong": 2.0,
            "n_wrong": 4,
            "std_sum_right": 1.0,
            "n_right": 10,
            "mean_std_wrong": 0.5,
            "mean_std_right": 0.1,
            "auroc": 0.8,
            "mean_std_per_case": [0.2] * len(dice),
            "mean_entropy_per_case": [0.3] * len(dice),
        },
    }


def test_cross_scores_are_validated_and_summarised():
    log = Log()
    screener = log.screener()
    read = {s: read_cross_scores(screener, s, scores(d), 2) for s, d in (("a", [0.8, 0.6]), ("b", [0.4]))}
    assert read_cross_scores(screener, "c", {**scores([0.5]), "members": []}, 2) is None
    assert log.rejected == [("c", "scores", "metrics.members: not a list of 2 summaries")]
    assert read_cross_scores(screener, "d", {"n_cases": 0}, 2) == {"n_cases": 0, "section": ""}
    summary = validation_scores(read, 2)
    assert summary["val_dice"] == pytest.approx(0.6) and summary["val_n_cases"] == 3  # over cases, not sites
    assert summary["val_per_site"]["b"] == {"ensemble": 0.4, "members": [0.4, 0.4], "n_cases": 1}
    models, uncertainty = final_models(read, 2)
    assert set(models) == {"ensemble", "member 0", "member 1"} and models["ensemble"]["a"]["uncertainty_auroc"] == 0.8
    assert uncertainty["uncertainty_mean_std_wrong"] == pytest.approx(4.0 / 8) and uncertainty["uncertainty_auroc_mean"] == 0.8
    record = fedcross_results({}, 1, "testing", {"num_models": 1}, {"history": []})
    assert (
        record["method"] == "fedcross" and list(record["extra"])[0] == "num_models" and list(record["extra"])[-1] == "history"
    )
    assert fedcross_results(read, 2, "testing", {}, {})["method"] == "fedcrossens"


# ---- FedSM: updates, selector, results ------------------------------------------------------------------------------
def test_fedsm_update_must_hold_what_was_sent():
    log = Log()
    screener = log.screener()
    sent = {"global": model(), "personal": model()}
    assert valid_update(screener, "a", pack({"global": model(0.1), "personal": model(0.2)}), sent, lda=False) is not None
    assert valid_update(screener, "b", pack({"global": model(0.1)}), sent, lda=False) is None
    assert valid_update(screener, "c", pack({**sent, "extra": model()}), sent, lda=False) is None
    assert [r[2] for r in log.rejected] == ["the 'personal' model is missing", "unexpected model group(s) ['extra']"]


def test_fedsm_selector_round_and_sweeps_are_validated():
    log = Log()
    row = {f"val_route/{m}": 1 for m in ("a", "b", GLOBAL)}
    metrics = {
        "a": {"val_selector_acc": 0.9, "val_routed_own": 0.8, **row},
        "b": {"val_selector_acc": 0.5, "val_routed_own": 0.9, **row},  # routed own above its argmax accuracy
        "outsider": {"val_selector_acc": 1.0},
    }
    out = selector_round(log.screener(), 3, metrics, ["a", "b"])
    assert out["accuracy"] == {"a": 0.9} and out["confusion"]["a"] == {"a": 1, "b": 1, GLOBAL: 1}
    assert log.rejected[0][:2] == ("b", "round 3 selector metrics")
    assert read_sweep("a", {"gammas": list(GAMMA_SWEEP), "dice": [0.5] * len(GAMMA_SWEEP)}) == [0.5] * len(GAMMA_SWEEP)
    with pytest.raises(UpdateRejected, match="gammas are not"):
        read_sweep("a", {"gammas": [0.1] * len(GAMMA_SWEEP), "dice": [0.5] * len(GAMMA_SWEEP)})


def test_fedsm_results_record():
    assert train_metric_key("val_super_dice", ["a"]) and train_metric_key("val_route/a", ["a"])
    assert not train_metric_key("val_route/x", ["a"]) and not train_metric_key("secret", ["a"])
    per_site = {"a": {"global": {"dice": 0.5}, "personalized": {"dice": 0.6}, "super": {"dice": 0.7}}}
    record = fedsm_results(per_site, False, {"lam": 0.7})
    assert record["method"] == "softpull" and set(record["models"]) == {"SoftPull global", "SoftPull personalized (own site)"}
    record = fedsm_results(per_site, True, {"lam": 0.7}, {"gamma_validation": None})
    assert record["models"]["FedSM super model"] == {"a": {"dice": 0.7}} and record["extra"] == {
        "lam": 0.7,
        "gamma_validation": None,
    }
    assert gamma_on_validation(per_site, ["a"]) is None  # no site swept gamma: the fixed gamma stays


# ---- the shared records ---------------------------------------------------------------------------------------------
def test_round_seconds_and_privacy_records(tmp_path):
    results = {
        "a": SimpleNamespace(metrics={"train_seconds": 2.0, "validate_seconds": 1.0}),
        "b": SimpleNamespace(metrics=None),
    }
    seconds = round_seconds(results, 0.0, 5.0, 5.5, 6.0)
    assert seconds == {
        "tasks": 5.0,
        "sites": {"a": {"validate_seconds": 1.0, "train_seconds": 2.0}, "b": {}},
        "tasks_beyond_slowest_site": 2.0,
        "screen_and_aggregate": 0.5,
        "save": 0.5,
    }
    assert dp_spent({"b": {"dp_epsilon": 1.5, "dp_delta": 1e-5, "x": 1}, "a": {"loss": 0.1}}) == {
        "b": {"dp_epsilon": 1.5, "dp_delta": 1e-5}
    }
    table = write_results(
        tmp_path, {"method": "fedavg", "section": "testing", "models": {"m": {"a": {"dice": 0.5, "n_cases": 2}}}}
    )
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["method"] == "fedavg" and "m" in table


# ---- arguments renamed ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, old, new",
    [
        ("fedseg.fl.fedcross_controller.FedCrossController", "engine", "engine_config"),
        ("fedseg.fl.fedcross_controller.FedCrossController", "output_dir", "results_dir"),
        ("fedseg.fl.fedsm_controller.FedSMController", "engine", "engine_config"),
        ("fedseg.fl.fedavg_controller.FedAvgController", "output_dir", "results_dir"),
    ],
)
def test_a_job_with_an_old_argument_name_is_refused_with_the_new_name(path, old, new):
    """FLARE builds a workflow from its job's arguments: an earlier job's name for one is a ValueError that names
    the new one (not a TypeError about an unexpected keyword)."""
    from nvflare.fuel.utils.class_utils import instantiate_class

    value = {"lr": 0.01} if old == "engine" else "fedx"
    with pytest.raises(ValueError, match=f"argument '{old}' was renamed '{new}'"):
        instantiate_class(path, {old: value})
    instantiate_class(path, {new: value})
