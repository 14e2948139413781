"""Direct tests of the server's screening math (fedseg.algorithms.screening, robust aggregation): what a
broken or malicious site can send, and what the server makes of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg.algorithms import UpdateRejected, aggregate, robust_average, weighted_average
from fedseg.algorithms.aggregation import trim_count
from fedseg.algorithms.screening import (
    adam_moment_bound,
    cap_step_weights,
    case_dice,
    check_metadata,
    check_optimizer_state,
    clip_scales,
    clip_update,
    numeric_metrics,
    read_int,
    read_score,
    read_step_count,
    read_summary,
    robust_score,
    screen_magnitudes,
    screen_relative,
    state_norm,
    update_norm,
)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3, 0, "12", None, True, [4], 2.5, {"n": 1}])
def test_malformed_step_counts_are_rejected_naming_site_and_field(value):
    with pytest.raises(UpdateRejected) as e:
        read_step_count("site-9", {"NUM_STEPS_CURRENT_ROUND": value}, planned=None)
    assert e.value.site == "site-9" and "NUM_STEPS_CURRENT_ROUND" in e.value.reason


def test_step_counts_are_capped_by_the_plan():
    assert read_step_count("s", {"NUM_STEPS_CURRENT_ROUND": 12}, planned=50) == (12, False)
    assert read_step_count("s", {"NUM_STEPS_CURRENT_ROUND": 12.0}, planned=None) == (12, False)
    assert read_step_count("s", {"NUM_STEPS_CURRENT_ROUND": 10**12}, planned=50) == (50, True)
    with pytest.raises(UpdateRejected, match="missing"):
        read_step_count("s", {}, planned=50)
    with pytest.raises(UpdateRejected, match="missing"):
        read_step_count("s", None, planned=50)


def test_without_a_plan_a_huge_step_count_is_capped_by_the_others_median():
    weights, capped = cap_step_weights({"a": 10, "b": 12, "evil": 10**9}, max_ratio=4)
    assert capped == {"evil": 4 * 11.0} and weights["a"] == 10 and weights["b"] == 12
    assert weights["evil"] / sum(weights.values()) < 0.7  # would be ~1.0 uncapped
    # two sites: the leave-one-out median is the other site's count, so the liar is still capped
    weights, capped = cap_step_weights({"a": 10, "evil": 10**9}, max_ratio=4)
    assert capped == {"evil": 40.0}
    # honest sites of different sizes within the ratio are untouched; ratio 0 switches the cap off
    assert cap_step_weights({"a": 10, "b": 30}, max_ratio=4) == ({"a": 10.0, "b": 30.0}, {})
    assert cap_step_weights({"a": 10, "evil": 10**9}, max_ratio=0)[1] == {}


def test_read_int_and_read_score():
    assert read_int("s", {"model_index": 2.0}, "model_index") == 2
    for bad in (1.5, "0", None, float("nan"), True):
        with pytest.raises(UpdateRejected, match="model_index"):
            read_int("s", {"model_index": bad}, "model_index")
    with pytest.raises(UpdateRejected, match="outside"):
        read_int("s", {"k": 7}, "k", low=0, high=3)
    assert read_score("s", {"val_dice": 0.5}, "val_dice") == 0.5
    for bad in ({"val_dice": 1.5}, {"val_dice": "0.9"}, {"val_dice": float("nan")}, {}, None, "x"):
        with pytest.raises(UpdateRejected):
            read_score("s", bad, "val_dice")


def test_read_summary_keeps_only_valid_known_fields():
    good = {"dice": 0.8, "dice_std": 0.1, "n_cases": 2.0, "dice_per_case": [0.7, 0.9], "hd95": float("nan"), "evil": object()}
    assert read_summary("s", {"ensemble": good}, "ensemble") == {
        "dice": 0.8,
        "dice_std": 0.1,
        "n_cases": 2,
        "dice_per_case": [0.7, 0.9],
    }
    assert read_summary("s", {"n_cases": 0, "dice": float("nan")}) == {"n_cases": 0}
    assert case_dice({"dice": 0.5, "n_cases": 3}) == [0.5, 0.5, 0.5]  # per-case values withheld by the site
    for bad in (
        {**good, "dice_per_case": [0.7]},
        {**good, "dice_per_case": [0.7, 2.0]},
        {**good, "dice": -1},
        {**good, "n_cases": -1},
        {**good, "hd95": -2.0},
        "garbage",
    ):
        with pytest.raises(UpdateRejected):
            read_summary("s", {"m": bad}, "m")


def test_numeric_metrics_drops_everything_but_finite_numbers():
    assert numeric_metrics({"a": 1, "b": "x", "c": float("nan"), "d": True, 5: 1.0, "e": np.float32(0.5)}) == {
        "a": 1.0,
        "e": 0.5,
    }
    assert numeric_metrics("garbage") == {}


def _adam(weights, step=3.0):
    state = {}
    for k, w in weights.items():
        state[f"{k}::step"] = np.array(step, dtype=np.float32)
        state[f"{k}::exp_avg"] = np.zeros_like(w)
        state[f"{k}::exp_avg_sq"] = np.full_like(w, 0.01)
    return state


def test_optimizer_state_checks():
    weights = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    sent = _adam(weights, step=3.0)
    good = _adam(weights, step=8.0)
    check_optimizer_state("s", good, weights, sent, max_new_steps=5)
    check_optimizer_state("s", {}, weights, sent)  # withheld by the site's privacy scope
    negative = dict(good, **{"w::exp_avg_sq": -np.ones((2, 3), np.float32)})
    with pytest.raises(UpdateRejected, match="negative second moment"):
        check_optimizer_state("s", negative, weights, sent)
    with pytest.raises(UpdateRejected, match="went back"):
        check_optimizer_state("s", _adam(weights, step=1.0), weights, sent)
    with pytest.raises(UpdateRejected, match="more than the 5 planned"):
        check_optimizer_state("s", _adam(weights, step=100.0), weights, sent, max_new_steps=5)
    with pytest.raises(UpdateRejected, match="w::step"):
        check_optimizer_state("s", dict(good, **{"w::step": np.array([1.0, 2.0])}), weights, sent)
    with pytest.raises(UpdateRejected, match="not one number >= 0"):
        check_optimizer_state("s", dict(good, **{"w::step": np.array(-1.0)}), weights, None)
    with pytest.raises(UpdateRejected, match="non-finite"):
        check_optimizer_state("s", dict(good, **{"b::exp_avg": np.full(3, np.inf, np.float32)}), weights, sent)
    with pytest.raises(UpdateRejected, match="names no parameter"):
        check_optimizer_state("s", dict(good, **{"evil::step": np.array(1.0)}), weights, sent)
    with pytest.raises(UpdateRejected, match="keys changed"):
        check_optimizer_state("s", {k: v for k, v in good.items() if not k.startswith("b")}, weights, sent)
    with pytest.raises(UpdateRejected, match="not a dict"):
        check_optimizer_state("s", "x", weights, sent)


def test_a_1000x_update_is_rejected_and_honest_ones_are_not():
    rng = np.random.default_rng(0)
    ref = {"w": rng.normal(size=(50,)).astype(np.float32), "w::step": np.array(1.0)}
    honest = {s: {"w": ref["w"] + rng.normal(scale=0.01 * (1 + i), size=50).astype(np.float32)} for i, s in enumerate("abc")}
    evil = {"w": ref["w"] + 1000 * (honest["a"]["w"] - ref["w"])}
    norms = {s: update_norm(u, ref) for s, u in {**honest, "evil": evil}.items()}
    assert math.isclose(norms["evil"], 1000 * norms["a"], rel_tol=1e-3)
    rejected = screen_magnitudes(norms, max_ratio=10)
    assert set(rejected) == {"evil"} and "median" in rejected["evil"]
    # two sites only: each is compared with the other, so the liar is still caught
    assert set(screen_magnitudes({"a": norms["a"], "evil": norms["evil"]}, max_ratio=10)) == {"evil"}
    # one update per round (FedCross K=1): compared with recent accepted ones; none yet: accepted
    assert screen_magnitudes({"evil": norms["evil"]}, recent=[norms["a"], norms["b"]]).keys() == {"evil"}
    assert screen_magnitudes({"evil": norms["evil"]}) == {}
    assert screen_magnitudes(norms, max_ratio=0) == {}


def test_robust_aggregation_resists_one_bad_site_and_mean_is_fedavg():
    honest = {s: {"w": np.full(4, v, np.float32), "n": np.array(v, np.int64)} for s, v in (("a", 1.0), ("b", 2.0), ("c", 3.0))}
    evil = {"w": np.full(4, 1e6, np.float32), "n": np.array(10**6, np.int64)}
    updates = {**honest, "evil": evil}
    median = robust_average(updates, "median")
    assert np.allclose(median["w"], 2.5) and median["w"].dtype == np.float32 and median["n"].dtype == np.int64
    trimmed = robust_average(
        {**honest, "d": {"w": np.full(4, 2.0, np.float32), "n": np.array(2)}, "evil": evil}, "trimmed_mean", trim_fraction=0.2
    )
    assert np.allclose(trimmed["w"], 7 / 3)  # 5 sites: the largest (1e6) and smallest (1) of each coordinate dropped
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    assert np.allclose(aggregate(honest, weights, "mean")["w"], weighted_average(honest, weights)["w"])
    # the result does not depend on the order in which results arrived
    reordered = dict(reversed(list(honest.items())))
    assert aggregate(reordered, weights, "mean")["w"].tobytes() == aggregate(honest, weights, "mean")["w"].tobytes()
    with pytest.raises(ValueError):
        aggregate(honest, weights, "mode")
    with pytest.raises(ValueError):
        robust_average(honest, "trimmed_mean", trim_fraction=0.5)


def test_robust_score_is_the_median():
    assert robust_score([0.1, 0.2, 1.0]) == 0.2
    assert robust_score([]) is None


# ----------------------------------------------------------------------------- number types, bounds, metadata


def test_optimizer_state_dtypes_must_be_what_was_sent():
    weights = {"w": np.zeros(3, np.float32)}
    sent = {
        "w::step": np.array(2.0, np.float32),
        "w::exp_avg": np.zeros(3, np.float32),
        "w::exp_avg_sq": np.ones(3, np.float32),
    }
    check_optimizer_state("s", dict(sent), weights, sent)
    for key, bad in (
        ("w::exp_avg", np.zeros(3, np.int64)),
        ("w::exp_avg_sq", np.ones(3, np.complex64)),
        ("w::exp_avg", np.zeros(3, np.float64)),
        ("w::step", np.array(3, np.int64)),
    ):
        with pytest.raises(UpdateRejected) as e:
            check_optimizer_state("s", {**sent, key: bad}, weights, sent)
        assert key in e.value.reason and f"dtype {bad.dtype}" in e.value.reason and "expected" in e.value.reason
    # nothing sent (a fresh optimizer): the moments must have their parameter's dtype
    with pytest.raises(UpdateRejected, match="expected float32"):
        check_optimizer_state("s", {"w::exp_avg": np.zeros(3, np.int32), "w::exp_avg_sq": np.zeros(3, np.int32)}, weights)


def test_adam_first_moments_are_bounded_by_the_second_whatever_the_gradients():
    import torch

    bound = adam_moment_bound()
    assert math.isclose(bound, 0.01 / (0.001 * (1 - 0.81 / 0.999)))
    # real Adam states on wild gradients satisfy it (and so does their average)
    torch.manual_seed(0)
    states = []
    for scale in (1e-3, 1.0, 1e4):
        p = torch.nn.Parameter(torch.zeros(50))
        opt = torch.optim.Adam([p], lr=1e-3)
        for _ in range(30):
            p.grad = torch.randn(50) * scale * torch.rand(1)
            opt.step()
        st = opt.state[p]
        states.append({k: np.asarray(st[k], np.float32) for k in ("step", "exp_avg", "exp_avg_sq")})
    weights = {"w": np.zeros(50, np.float32)}
    for st in states:
        check_optimizer_state("s", {f"w::{k}": v for k, v in st.items()}, weights)
    avg = {f"w::{k}": np.mean([st[k] for st in states], axis=0).astype(np.float32) for k in ("exp_avg", "exp_avg_sq")}
    check_optimizer_state("s", avg, weights)
    # a poisoned first moment (the next site's Adam steps would explode) is refused, with or without second moments
    poisoned = {"w::exp_avg": np.full(50, 1e4, np.float32), "w::exp_avg_sq": np.zeros(50, np.float32)}
    with pytest.raises(UpdateRejected, match="first moment"):
        check_optimizer_state("s", poisoned, weights)
    with pytest.raises(UpdateRejected, match="without its second moment"):
        check_optimizer_state("s", {"w::exp_avg": np.zeros(50, np.float32)}, weights)


def test_state_norm_measures_moments_against_what_was_sent():
    sent = {"w::exp_avg": np.ones(4, np.float32), "w::exp_avg_sq": np.ones(4, np.float32), "w::step": np.array(1.0)}
    back = {"w::exp_avg": np.full(4, 3.0, np.float32), "w::exp_avg_sq": np.ones(4, np.float32), "w::step": np.array(9.0)}
    assert state_norm(back, sent, "exp_avg") == pytest.approx(4.0)
    assert state_norm(back, sent, "exp_avg_sq") == 0.0
    assert state_norm(back, None, "exp_avg") == pytest.approx(6.0)


def test_norm_bounding_clips_a_sign_flipped_or_scaled_update_to_the_round_median():
    ref = {"w": np.zeros(4, np.float32), "n": np.array(3, np.int64)}
    honest = {s: {"w": np.full(4, v, np.float32), "n": np.array(3, np.int64)} for s, v in (("a", 1.0), ("b", 1.2), ("c", 0.9))}
    evil = {"w": np.full(4, -5.0, np.float32), "n": np.array(3, np.int64)}  # sign flipped, 5x: passes the 10x check
    updates = {**honest, "evil": evil}
    norms = {s: update_norm(u, ref) for s, u in updates.items()}
    assert screen_magnitudes(norms, max_ratio=10) == {}
    scales = clip_scales(norms, clip_ratio=2.0)
    assert set(scales) == {"evil"}
    bounded = {s: clip_update(u, ref, scales[s]) if s in scales else u for s, u in updates.items()}
    assert update_norm(bounded["evil"], ref) == pytest.approx(2.0 * np.median(list(norms.values())), rel=1e-6)
    assert bounded["evil"]["w"].dtype == np.float32 and bounded["evil"]["n"] is evil["n"]
    before = aggregate(updates, dict.fromkeys(updates, 1.0), "mean")["w"][0]
    after = aggregate(bounded, dict.fromkeys(updates, 1.0), "mean")["w"][0]
    assert before < 0 < after  # unbounded the model goes backwards; bounded it still moves forward
    assert clip_scales(norms, 0) == {} and clip_scales({"a": 1.0}, 2.0) == {} and clip_scales({"a": 0.0, "b": 0.0}, 2.0) == {}


def test_a_lone_visit_is_bounded_against_the_recent_visits():
    """FedCross with one model: no peer in the communication, so the recent accepted visits' norms are the median;
    a visit at 9.5x passes the 10x magnitude check and is scaled to 2x that median."""
    recent = [1.0, 1.2, 0.9, 1.1]
    assert clip_scales({"evil": 9.5}, 2.0, recent) == {"evil": pytest.approx(2.0 * 1.1 / 9.5)}
    assert clip_scales({"honest": 1.5}, 2.0, recent) == {}
    assert clip_scales({"evil": 9.5}, 2.0) == {} and clip_scales({"evil": 9.5}, 2.0, [float("nan")]) == {}
    # the communication's other visits and the recent ones form one median
    assert clip_scales({"a": 1.0, "evil": 9.5}, 2.0, [1.0, 1.0]) == {"evil": pytest.approx(2.0 / 9.5)}


def test_trimmed_mean_always_trims_one_per_side_and_refuses_too_few_sites():
    assert trim_count(4, 0.2) == 1 and trim_count(3, 0.0) == 1 and trim_count(10, 0.2) == 2
    with pytest.raises(ValueError, match="at least 3 updates"):
        trim_count(2, 0.2)
    updates = {s: {"w": np.full(2, v, np.float32)} for s, v in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("evil", -1e6))}
    assert np.allclose(robust_average(updates, "trimmed_mean", 0.2)["w"], 1.5)  # 4 sites: the attacker is cut
    with pytest.raises(ValueError):
        robust_average({"a": updates["a"], "b": updates["b"]}, "trimmed_mean", 0.2)


def test_relative_screen_uses_the_model_that_was_sent():
    assert screen_relative(0.5, 10.0, 1.0) is None
    reason = screen_relative(2.2e3, 10.0, 1.0)
    assert "220x the norm 10 of the model that was sent" in reason
    assert screen_relative(2.2e3, 10.0, 0) is None and screen_relative(float("nan"), 10.0, 1.0)


def test_metadata_limits_refuse_deep_wide_long_and_huge_fields_without_recursion():
    ok = {"val_dice": 0.5, "members": [{"dice": 0.5, "dice_per_case": [0.1] * 100}], "section": "validation"}
    check_metadata("s", ok, "metrics")
    deep = 0.5
    for _ in range(100000):  # far beyond Python's recursion limit
        deep = {"x": deep}
    with pytest.raises(UpdateRejected, match="nested deeper than 12"):
        check_metadata("s", {"val_dice": 0.5, "x": deep}, "metrics")
    with pytest.raises(UpdateRejected, match="1000000 entries"):
        check_metadata("s", {f"k{i}": 1.0 for i in range(10**6)}, "metrics")
    with pytest.raises(UpdateRejected, match="a string of 5000 characters"):
        check_metadata("s", {"section": "x" * 5000}, "meta")
    with pytest.raises(UpdateRejected, match="a string of 5000 characters"):
        check_metadata("s", {"x" * 5000: 1.0}, "meta")  # keys too
    with pytest.raises(UpdateRejected, match="entries in all"):
        check_metadata("s", [[0.0] * 1000 for _ in range(10)], "metrics", {"max_items": 5000})


def test_only_the_metric_keys_a_method_defines_are_kept():
    metrics = {"val_dice": 0.5, "junk_1": 1.0, "junk_2": 2.0}
    assert numeric_metrics(metrics, allowed=lambda k: k.startswith("val_")) == {"val_dice": 0.5}


def test_direction_screen_refuses_an_update_that_undoes_the_others():
    from fedseg.algorithms.screening import screen_directions, update_directions

    sent = {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32), "w::exp_avg": np.zeros(4, np.float32)}
    rng = np.random.default_rng(0)
    common = rng.normal(size=6)
    honest = {
        s: {
            "w": (common[:4] + 0.3 * rng.normal(size=4)).astype(np.float32),
            "b": (common[4:] + 0.3 * rng.normal(size=2)).astype(np.float32),
        }
        for s in ("site-1", "site-2", "site-3")
    }
    # the attacker sends its update flipped (and optimizer state, which the direction ignores)
    flipped = {"w": -3 * honest["site-3"]["w"], "b": -3 * honest["site-3"]["b"], "w::exp_avg": np.full(4, 1e6, np.float32)}
    updates = {**honest, "site-4": flipped}
    cosines = update_directions(updates, dict.fromkeys(updates, sent))
    assert all(cosines[s] > 0.1 for s in honest) and cosines["site-4"] < -0.7, cosines
    # leave-one-out, by hand: site-1 against the sum of the three others' directions (unit length each: the large
    # flipped update cannot turn the honest sites' reference around)
    unit = lambda u: (v := np.concatenate([u["b"], u["w"]]).astype(np.float64)) / np.linalg.norm(v)  # noqa: E731
    others = sum(unit(u) for s, u in updates.items() if s != "site-1")
    mine = np.concatenate([honest["site-1"]["b"], honest["site-1"]["w"]]).astype(np.float64)
    assert cosines["site-1"] == pytest.approx(mine @ others / np.linalg.norm(mine) / np.linalg.norm(others))
    rejected = screen_directions(cosines, -0.5)
    assert list(rejected) == ["site-4"] and "points against" in rejected["site-4"]
    assert screen_directions(cosines, -1.0) == {}  # switched off
    # two updates: neither can be told from the other; a zero update has no direction
    assert update_directions(dict(list(honest.items())[:2]), dict.fromkeys(honest, sent)) == {}
    zero = {**honest, "site-4": {"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}}
    cos = update_directions(zero, dict.fromkeys(zero, sent))
    assert np.isnan(cos["site-4"]) and screen_directions(cos, 0.99).keys() <= set(honest)
