"""Only what is agreed leaves a site: the privacy filter on weights, optimizer state and metrics, and the sections
a site scores for the server. (A FedSM run whose sites strip per-case results: tests/test_fedsm.py.)"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from conftest import TINY_ENGINE
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedseg.algorithms.packing import pack, unpack
from fedseg.algorithms.screening import check_optimizer_state
from fedseg.fl.privacy import LayerPrivacyFilter, SectionRefused, check_scorable_section, strip_metrics

LAYER = "net.model.2.1.conv.unit0.conv"
ZERO_LAST = [r"(^|/)net\.model\.2\.1\."]


def run_filter(filt: LayerPrivacyFilter, dxo: DXO) -> DXO:
    return from_shareable(filt.process(dxo.to_shareable(), FLContext()))


def packed_update(rng) -> dict:
    """A FedCross cross_train reply: pack({"model": weights, "optim": Adam state})."""
    weights = {
        f"{LAYER}.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "net.model.0.conv.weight": rng.normal(size=(4, 4)).astype(np.float32),
    }
    optim = {}
    for name, w in weights.items():
        optim[f"{name}::step"] = np.array(7.0, np.float32)
        optim[f"{name}::exp_avg"] = (rng.normal(size=w.shape) * 1e-5).astype(np.float32)  # an Adam state: |m| <= 7.3 sqrt(v)
        optim[f"{name}::exp_avg_sq"] = np.full(w.shape, 1e-8, np.float32)  # tiny: noise would turn it negative
    return pack({"model": weights, "optim": optim})


# ---- weights and optimizer state -----------------------------------------------------------------------------
def test_optimizer_state_is_sent_untouched_by_noise_and_zeroed_with_its_layer():
    params = packed_update(np.random.default_rng(0))
    filt = LayerPrivacyFilter(zero_vars=ZERO_LAST, noise_vars=[".*"], noise_std=0.5, seed=0, optimizer_state="send")
    out = run_filter(filt, DXO(DataKind.WEIGHTS, data=dict(params))).data
    assert set(out) == set(params)
    # weights: the last layer zeroed, the others perturbed
    assert not np.any(out[f"model/{LAYER}.weight"])
    assert not np.array_equal(out["model/net.model.0.conv.weight"], params["model/net.model.0.conv.weight"])
    # optimizer state: never noise; the zeroed layer's moments are zeroed, its step count stays
    for state in ("step", "exp_avg", "exp_avg_sq"):
        assert np.array_equal(out[f"optim/net.model.0.conv.weight::{state}"], params[f"optim/net.model.0.conv.weight::{state}"])
    for state in ("exp_avg", "exp_avg_sq"):
        assert not np.any(out[f"optim/{LAYER}.weight::{state}"])
    assert out[f"optim/{LAYER}.weight::step"] == 7.0
    # the server's screening accepts the result (finite, moments >= 0, step counts not going back)
    groups = unpack(out)
    check_optimizer_state("site-1", groups["optim"], groups["model"], unpack(params)["optim"])
    assert all(np.all(v >= 0) for k, v in out.items() if k.endswith("::exp_avg_sq"))


def test_optimizer_state_dropped_leaves_only_weights():
    params = packed_update(np.random.default_rng(1))
    filt = LayerPrivacyFilter(optimizer_state="drop")
    dxo = run_filter(filt, DXO(DataKind.WEIGHTS, data=dict(params), meta={"model_index": 1}))
    assert sorted(dxo.data) == sorted(k for k in params if k.startswith("model/"))
    assert list(unpack(dxo.data)) == ["model"]  # the "optim" group is absent
    assert all(np.array_equal(dxo.data[k], params[k]) for k in dxo.data)  # weights unchanged (no noise asked for)
    assert dxo.get_filter_history() == ["LayerPrivacyFilter"] and dxo.meta["model_index"] == 1
    # FedSM: "selector_optim" goes, "selector" stays
    fedsm = pack({"global": {"w": np.ones(2)}, "selector": {"w": np.ones(2)}, "selector_optim": {"w::exp_avg_sq": np.ones(2)}})
    assert sorted(unpack(run_filter(filt, DXO(DataKind.WEIGHTS, data=fedsm)).data)) == ["global", "selector"]
    # ... and so do the "lda" selector's feature statistics (sums over the site's images)
    stats = {"count": np.ones(1), "mean": np.ones(2), "scatter": np.eye(2)}
    fedsm = pack({"global": {"w": np.ones(2)}, "selector_stats": stats})
    assert sorted(unpack(run_filter(filt, DXO(DataKind.WEIGHTS, data=fedsm)).data)) == ["global"]
    # sent, they are never perturbed (noise would make the scatter asymmetric) even where every weight is
    noisy = LayerPrivacyFilter(noise_vars=[".*"], noise_std=0.5, optimizer_state="send", seed=0)
    sent = unpack(run_filter(noisy, DXO(DataKind.WEIGHTS, data=dict(fedsm))).data)
    assert not np.array_equal(sent["global"]["w"], np.ones(2))
    assert all(np.array_equal(sent["selector_stats"][k], v) for k, v in stats.items())


def test_noise_or_zeroing_drops_the_optimizer_state_unless_the_scope_allows_it(caplog):
    params = packed_update(np.random.default_rng(2))
    optim_keys = {k for k in params if "::" in k}
    for args in ({"noise_vars": [".*"], "noise_std": 0.01}, {"zero_vars": ZERO_LAST}):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = run_filter(LayerPrivacyFilter(**args, seed=0), DXO(DataKind.WEIGHTS, data=dict(params))).data
        assert not optim_keys & set(out) and list(unpack(out)) == ["model"], args
        assert "optimizer state dropped" in caplog.text and '"optimizer_state": "send"' in caplog.text
        # explicitly allowed: sent, with a warning that it carries no noise
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = run_filter(
                LayerPrivacyFilter(**args, seed=0, optimizer_state="send"), DXO(DataKind.WEIGHTS, data=dict(params))
            )
        assert optim_keys <= set(out.data) and "optimizer state sent although weights are zeroed or perturbed" in caplog.text
    # a filter that changes no weight (e.g. only strips per-case metrics) sends it, silently
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = run_filter(LayerPrivacyFilter(noise_vars=[".*"]), DXO(DataKind.WEIGHTS, data=dict(params)))
    assert out.get_filter_history() is None or optim_keys <= set(out.data)
    assert "optimizer state" not in caplog.text


def test_filter_arguments_are_checked():
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        LayerPrivacyFilter(optimizer_state="noise")
    with pytest.raises(TypeError, match="share_per_case must be true or false"):
        LayerPrivacyFilter(share_per_case="no")
    with pytest.raises(TypeError, match="zero_vars must be a list"):
        LayerPrivacyFilter(zero_vars="fc.bias")


# ---- metrics -----------------------------------------------------------------------------------------------------
def fedcross_metrics() -> dict:
    """What cross_validate sends (plus case names, which older sites sent)."""
    summary = {"dice": 0.8, "dice_std": 0.1, "n_cases": 2.0, "dice_per_case": [0.7, 0.9]}
    return {
        "section": "validation",
        "n_cases": 2,
        "case_names": ["p1.nii.gz", "p2.nii.gz"],
        "ensemble": dict(summary),
        "members": [dict(summary), dict(summary)],
        "uncertainty": {
            "mean_std_wrong": 0.2,
            "n_wrong": 5,
            "mean_std_per_case": [0.1, 0.2],
            "mean_entropy_per_case": [0.3, 0.4],
        },
    }


def test_metrics_per_case_lists_and_case_names_are_stripped_recursively(caplog):
    filt = LayerPrivacyFilter()
    with caplog.at_level(logging.INFO):
        out = run_filter(filt, DXO(DataKind.METRICS, data=fedcross_metrics())).data
    text = json.dumps(out)
    assert "_per_case" not in text and "case_names" not in text and "p1.nii.gz" not in text
    assert out["ensemble"] == {"dice": 0.8, "dice_std": 0.1, "n_cases": 2.0}
    assert out["members"][1] == {"dice": 0.8, "dice_std": 0.1, "n_cases": 2.0}
    assert out["uncertainty"] == {"mean_std_wrong": 0.2, "n_wrong": 5} and out["n_cases"] == 2
    assert "removed per-case results ['ensemble.dice_per_case', 'members[0].dice_per_case'" in caplog.text
    assert "removed case names ['case_names']" in caplog.text
    # the flags let them through
    both = LayerPrivacyFilter(share_per_case=True, share_case_names=True)
    assert run_filter(both, DXO(DataKind.METRICS, data=fedcross_metrics())).data == fedcross_metrics()
    per_case_only = run_filter(LayerPrivacyFilter(share_per_case=True), DXO(DataKind.METRICS, data=fedcross_metrics())).data
    assert per_case_only["members"][0]["dice_per_case"] == [0.7, 0.9] and "case_names" not in per_case_only


def test_metrics_that_travel_with_weights_are_stripped_too():
    """validate_before_train: the metrics measured on the received model go in the weights DXO's meta."""
    model = FLModel(
        params={"w": np.ones(3, np.float32)},
        params_type=ParamsType.FULL,
        metrics={"val_dice": 0.5, "dice_per_case": [0.4, 0.6]},
        meta={"NUM_STEPS_CURRENT_ROUND": 4},
    )
    out = from_shareable(LayerPrivacyFilter().process(FLModelUtils.to_shareable(model), FLContext()))
    assert out.meta["initial_metrics"] == {"val_dice": 0.5} and out.meta["NUM_STEPS_CURRENT_ROUND"] == 4
    assert np.array_equal(out.data["w"], np.ones(3))
    # FedSM evaluation: per-case lists nested one level down
    evaluation = {"section": "testing", "routing": {"global": 2}, "super": {"dice": 0.7, "dice_per_case": [0.6, 0.8]}}
    stripped, per_case, names = strip_metrics(evaluation, share_per_case=False, share_case_names=False)
    assert stripped == {"section": "testing", "routing": {"global": 2}, "super": {"dice": 0.7}}
    assert per_case == ["super.dice_per_case"] and names == []
    assert evaluation["super"]["dice_per_case"] == [0.6, 0.8]  # the input is not changed


# ---- sections a site scores for the server ---------------------------------------------------------------------
def test_scorable_sections():
    assert check_scorable_section("site-1", "testing") == "testing"
    assert check_scorable_section("site-1", "validation") == "validation"
    for bad in ("training", None, "Testing"):
        with pytest.raises(SectionRefused, match=f"site site-1 refuses to score its {re.escape(repr(bad))} section"):
            check_scorable_section("site-1", bad)


@pytest.fixture(scope="module")
def site_executors(tiny2d):
    """The real site executors (one per method) with their engine on site-1's tiny data (the FLARE START_RUN set-up
    is not needed), by task."""
    from fedseg.data import load_datalist
    from fedseg.engine import SegEngine
    from fedseg.engine.config import resolve_engine
    from fedseg.fl.executor import FedCrossExecutor, FedSMExecutor, SegExecutor

    by_task = {}
    for cls, task in ((SegExecutor, "validate"), (FedCrossExecutor, "cross_validate"), (FedSMExecutor, "fedsm_evaluate")):
        executor = cls(engine=resolve_engine(TINY_ENGINE), tb_writer_id="")
        executor.site = "site-1"
        executor.seg_engine = SegEngine(executor.cfg, load_datalist(str(tiny2d / "site-1" / "datalist.json")), site="site-1")
        by_task[task] = executor
    return by_task


def test_a_site_never_scores_its_training_cases_for_the_server(site_executors, caplog):
    from fedseg.engine import state_to_numpy
    from fedseg.modelset import member_key

    weights = state_to_numpy(site_executors["validate"].seg_engine.new_network())
    site_names = ["site-1", "site-2"]
    tasks = {
        "validate": FLModel(params=weights, meta={"section": "{}"}),
        "cross_validate": FLModel(params=pack({member_key(0): weights}), meta={"section": "{}", "num_models": 1}),
        "fedsm_evaluate": FLModel(
            params=pack({"global": weights, "personal:site-1": weights}), meta={"section": "{}", "site_names": site_names}
        ),
    }

    def run(task: str, section: str):
        model = tasks[task]
        model = FLModel(params=model.params, params_type=ParamsType.FULL, meta={**model.meta, "section": section})
        return site_executors[task].execute(task, FLModelUtils.to_shareable(model), FLContext(), Signal())

    for task in tasks:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            reply = run(task, "training")
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION, task
        assert "site site-1 refuses to score its 'training' section for the server" in caplog.text, task
    # the same tasks on the test cases work, and without a privacy scope the per-case results are sent
    for task in tasks:
        reply = run(task, "testing")
        assert reply.get_return_code() == ReturnCode.OK, task
        assert "dice_per_case" in json.dumps(from_shareable(reply).data), task
