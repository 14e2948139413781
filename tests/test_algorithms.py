"""Unit tests for fedseg.algorithms (pure numpy; no FLARE/torch)."""

import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from fedseg.algorithms import (
    GLOBAL,
    KINDS,
    Route,
    UpdateRejected,
    assign,
    check_update,
    route,
    route_batch,
    softmax,
    softpull,
    softpull_weights,
    validate_explicit,
    weighted_average,
)
from fedseg.algorithms.schedules import check_latin_communications, plan_latin


def make_schedule(kind, sites, num_models, num_communications, seed=0, explicit=None):
    """The whole schedule of a fixed site list, as the FedCross controller asks for it: one assign() per
    communication (result[c][m]: the site of model m at communication c)."""
    return [assign(kind, sites, num_models, c, seed, explicit) for c in range(num_communications)]


def visits_per_model(schedule):
    """Per model, a Counter of how often it visits each site (None: sits out)."""
    return [Counter(site for site in column if site is not None) for column in zip(*schedule)]


def make_model(rng, scale=1.0):
    return {
        "conv.weight": (rng.standard_normal((4, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.standard_normal(4) * scale).astype(np.float16),
        "bn.num_batches_tracked": np.array(int(rng.integers(0, 1000)), dtype=np.int64),
    }


@pytest.fixture
def models():
    rng = np.random.default_rng(123)
    return {f"site-{i}": make_model(rng, scale=i + 1) for i in range(1, 5)}


# ----------------------------------------------------------------------------- no FLARE/torch


def test_modules_do_not_import_flare_or_torch():
    code = "import sys, fedseg.algorithms; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvflare')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- weighted_average


def test_weighted_average_matches_hand_computation():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array(10, dtype=np.int64)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32), "n": np.array(20, dtype=np.int64)}
    out = weighted_average({"a": a, "b": b}, {"a": 1.0, "b": 3.0})  # normalised to 0.25 / 0.75
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], dtype=np.float32))
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64 and int(out["n"]) == 18  # rint(17.5) -> 18 (ties to even)
    assert list(out) == ["w", "n"]


def test_weighted_average_normalises_weights(models):
    raw = {s: float(i + 1) for i, s in enumerate(models)}
    scaled = {s: 1000.0 * w for s, w in raw.items()}
    out1, out2 = weighted_average(models, raw), weighted_average(models, scaled)
    total = sum(raw.values())
    for key in out1:
        expected = sum(raw[s] / total * models[s][key].astype(np.float64) for s in models)
        if np.issubdtype(out1[key].dtype, np.integer):
            assert out1[key] == np.rint(expected)
        else:
            np.testing.assert_allclose(out1[key], expected, rtol=1e-3 if out1[key].dtype == np.float16 else 1e-6)
        np.testing.assert_array_equal(out1[key], out2[key])
        assert out1[key].dtype == models["site-1"][key].dtype


def test_weighted_average_ignores_weights_of_absent_sites_and_copies(models):
    sub = {"site-1": models["site-1"]}
    out = weighted_average(sub, {"site-1": 2.0, "site-9": 5.0})
    for key in out:
        np.testing.assert_array_equal(out[key], models["site-1"][key])
        assert out[key] is not models["site-1"][key]


def test_weighted_average_key_mismatch_raises(models):
    bad = dict(models)
    bad["site-2"] = {k: v for k, v in models["site-2"].items() if k != "conv.bias"}
    with pytest.raises(ValueError, match="conv.bias"):
        weighted_average(bad, dict.fromkeys(bad, 1.0))
    bad["site-2"] = {**models["site-2"], "extra": np.zeros(1)}
    with pytest.raises(ValueError, match="extra"):
        weighted_average(bad, dict.fromkeys(bad, 1.0))


@pytest.mark.parametrize("weights", [{"a": 0.0, "b": 0.0}, {"a": -1.0, "b": 2.0}, {"a": float("nan"), "b": 1.0}, {"a": 1.0}])
def test_weighted_average_bad_weights_raise(weights):
    ups = {"a": {"w": np.ones(2)}, "b": {"w": np.zeros(2)}}
    with pytest.raises(ValueError):
        weighted_average(ups, weights)


def test_weighted_average_shape_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="shape"):
        weighted_average({"a": {"w": np.ones(2)}, "b": {"w": np.ones(3)}}, {"a": 1, "b": 1})
    with pytest.raises(ValueError):
        weighted_average({}, {})


def test_check_update_clean_passes(models):
    ref = models["site-1"]
    check_update("site-2", models["site-2"], ref)
    partial = {k: v for k, v in models["site-2"].items() if k != "conv.bias"}
    check_update("site-2", partial, ref, allow_missing=True)


def _rejected(site, params, ref, **kw):
    with pytest.raises(UpdateRejected) as info:
        check_update(site, params, ref, **kw)
    err = info.value
    assert err.site == site and site in str(err) and err.reason in str(err)
    assert str(err) == f"update from {site} rejected: {err.reason}"
    assert isinstance(err, ValueError)
    return err


def test_check_update_nan_and_inf(models):
    ref = models["site-1"]
    bad = dict(models["site-2"])
    w = bad["conv.weight"].copy()
    w[0, 0, 0], w[1, 1, 1], w[2, 2, 2] = np.nan, np.inf, -np.inf
    bad["conv.weight"] = w
    err = _rejected("site-2", bad, ref)
    assert "'conv.weight'" in err.reason and "3 non-finite" in err.reason and "1 NaN" in err.reason
    bad = {**models["site-2"], "conv.bias": np.array([np.nan, 0, 0, 0], dtype=np.float16)}
    assert "'conv.bias'" in _rejected("site-3", bad, ref).reason


def test_check_update_missing_extra_shape_empty(models):
    ref = models["site-1"]
    missing = {k: v for k, v in models["site-2"].items() if k != "conv.bias"}
    assert "'conv.bias'" in _rejected("site-2", missing, ref).reason
    extra = {**models["site-2"], "head.weight": np.zeros(3, np.float32)}
    err = _rejected("site-2", extra, ref, allow_missing=True)
    assert "'head.weight'" in err.reason and "unexpected" in err.reason
    shape = {**models["site-2"], "conv.weight": np.zeros((3, 4, 3), np.float32)}
    err = _rejected("site-2", shape, ref)
    assert "'conv.weight'" in err.reason and "(3, 4, 3)" in err.reason and "(4, 3, 3)" in err.reason
    assert "empty" in _rejected("site-4", {}, ref).reason
    assert "not a dict" in _rejected("site-4", [1, 2], ref).reason


def test_check_update_names_at_most_five_missing_keys():
    ref = {f"k{i}": np.zeros(1) for i in range(8)}
    err = _rejected("s", {"k0": np.zeros(1)}, ref)
    assert "7 key(s)" in err.reason and "'k5'" in err.reason and "'k6'" not in err.reason and "2 more" in err.reason


def test_check_update_dtype_and_integer_arrays():
    ref = {"w": np.zeros(2, np.float32), "n": np.array(0, np.int64)}
    check_update("s", {"w": np.ones(2, np.float32), "n": np.array(7, np.int64)}, ref)
    err = _rejected("s", {"w": np.array(["a", "b"]), "n": np.array(7)}, ref)
    assert "'w'" in err.reason and "dtype" in err.reason
    assert "'w'" in _rejected("s", {"w": [1.0, 2.0], "n": np.array(7)}, ref).reason
    assert "'n'" in _rejected("s", {"w": np.ones(2, np.float32), "n": np.zeros(2, np.int64)}, ref).reason
    # exactly the dtype the server sent: no other width, no integer or complex tensor (never cast)
    for dtype in (np.float16, np.float64, np.int64, np.int8, np.complex64):
        err = _rejected("s", {"w": np.ones(2, dtype), "n": np.array(7, np.int64)}, ref)
        assert "'w'" in err.reason and f"dtype {np.dtype(dtype)}" in err.reason and "expected float32" in err.reason


def test_update_rejected_pickles():
    err = pickle.loads(pickle.dumps(UpdateRejected("site-1", "bad")))
    assert err.site == "site-1" and err.reason == "bad" and str(err) == "update from site-1 rejected: bad"


# ----------------------------------------------------------------------------- SoftPull


def test_softpull_weights_rows_sum_to_one():
    for n in range(1, 7):
        sites = [f"s{i}" for i in range(n)]
        for lam in (0.0, 0.3, 1.0 / n, 0.9, 1.0):
            m = softpull_weights(sites, lam)
            assert list(m) == sites
            for i in sites:
                assert sum(m[i].values()) == pytest.approx(1.0, abs=1e-12)
                if n > 1:
                    assert m[i][i] == lam
                    assert all(m[i][j] == pytest.approx((1 - lam) / (n - 1)) for j in sites if j != i)
    assert softpull_weights(["only"], 0.2) == {"only": {"only": 1.0}}


@pytest.mark.parametrize("lam", [-0.1, 1.1, float("nan"), "0.5", True])
def test_softpull_invalid_lambda_raises(lam, models):
    with pytest.raises(ValueError):
        softpull_weights(["a", "b"], lam)
    with pytest.raises(ValueError):
        softpull(models, lam)


def test_softpull_lambda_one_keeps_own_models_exactly(models):
    out = softpull(models, 1.0)
    assert list(out) == list(models)
    for s in models:
        assert list(out[s]) == list(models[s])
        for k in models[s]:
            np.testing.assert_array_equal(out[s][k], models[s][k])
            assert out[s][k].dtype == models[s][k].dtype


def test_softpull_lambda_one_over_n_is_plain_average(models):
    n = len(models)
    out = softpull(models, 1.0 / n)
    plain = weighted_average(models, dict.fromkeys(models, 1.0))
    for s in models:
        for k in plain:
            mean = np.mean([models[t][k].astype(np.float64) for t in models], axis=0)
            if np.issubdtype(plain[k].dtype, np.integer):
                mean = np.rint(mean)  # integer arrays get the rounded mean
            tol = 1e-3 if plain[k].dtype == np.float16 else 1e-6
            np.testing.assert_allclose(out[s][k].astype(np.float64), mean, rtol=tol, atol=tol)
            np.testing.assert_allclose(out[s][k], plain[k], rtol=tol)
            assert out[s][k].dtype == models[s][k].dtype


def test_softpull_lambda_zero_is_mean_of_others(models):
    out = softpull(models, 0.0)
    for s in models:
        others = [t for t in models if t != s]
        w = models[s]["conv.weight"]
        expected = np.mean([models[t]["conv.weight"].astype(np.float64) for t in others], axis=0)
        np.testing.assert_allclose(out[s]["conv.weight"], expected, rtol=1e-6)
        assert not np.allclose(out[s]["conv.weight"], w)
        nbt = np.mean([int(models[t]["bn.num_batches_tracked"]) for t in others])
        assert int(out[s]["bn.num_batches_tracked"]) == np.rint(nbt)


def test_softpull_general_lambda_formula(models):
    lam, n = 0.7, len(models)
    out = softpull(models, lam)
    for s in models:
        expected = lam * models[s]["conv.weight"].astype(np.float64) + (1 - lam) / (n - 1) * sum(
            models[t]["conv.weight"].astype(np.float64) for t in models if t != s
        )
        np.testing.assert_allclose(out[s]["conv.weight"], expected, rtol=1e-6, atol=1e-6)


def test_softpull_single_site_returns_own_model(models):
    one = {"site-1": models["site-1"]}
    for lam in (0.0, 0.5, 1.0):
        out = softpull(one, lam)
        assert list(out) == ["site-1"]
        for k, v in models["site-1"].items():
            np.testing.assert_array_equal(out["site-1"][k], v)
            assert out["site-1"][k].dtype == v.dtype


def test_softpull_keeps_each_sites_key_order_and_rejects_key_mismatch(models):
    shuffled = dict(models)
    shuffled["site-3"] = dict(reversed(list(models["site-3"].items())))
    out = softpull(shuffled, 0.5)
    assert list(out["site-3"]) == list(shuffled["site-3"])
    assert list(out["site-1"]) == list(models["site-1"])
    shuffled["site-3"] = {k: v for k, v in models["site-3"].items() if k != "conv.bias"}
    with pytest.raises(ValueError):
        softpull(shuffled, 0.5)
    with pytest.raises(ValueError):
        softpull({}, 0.5)


# ----------------------------------------------------------------------------- routing


SITES3 = ["site-1", "site-2", "site-3"]


def test_route_gamma_one_is_always_global():
    for probs in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [1.0 + 1e-9, 0.0, -1e-9]):
        r = route(probs, SITES3, 1.0)
        assert r.model == GLOBAL and r.is_global
    assert route([1.0, 0.0], ["a", "b"], 1.0).model == GLOBAL
    rng = np.random.default_rng(0)
    q = softmax(rng.standard_normal((50, 3)) * 30)
    assert all(r.is_global for r in route_batch(q, SITES3, 1.0))


def test_route_confident_selects_site_and_threshold():
    r = route([0.05, 0.9, 0.05], SITES3, 0.5)
    assert r == Route(model="site-2", site_index=1, confidence=0.9, probs=[0.05, 0.9, 0.05])
    assert not r.is_global
    below = route([0.3, 0.4, 0.3], SITES3, 0.5)
    assert below.model == GLOBAL and below.site_index == 1 and below.confidence == pytest.approx(0.4)
    assert route([0.5, 0.5, 0.0], SITES3, 0.5).model == GLOBAL  # strict: q[k] must exceed gamma
    assert route([0.2, 0.3, 0.5], SITES3, 0.0).model == "site-3"


def test_route_batch_and_softmax():
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1000.0]])
    q = softmax(logits)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)
    assert np.all(np.isfinite(q)) and q[2, 2] == 1.0
    routes = route_batch(q, SITES3, 0.6)
    assert [r.model for r in routes] == ["site-1", GLOBAL, "site-3"]
    assert route_batch(np.zeros((0, 3)), SITES3, 0.5) == []
    np.testing.assert_allclose(softmax(np.array([1.0, 2.0, 3.0])), np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())
    np.testing.assert_allclose(softmax(np.array([0.0, -np.inf])), [1.0, 0.0])
    assert softmax(np.array([1, 2])).dtype == np.float64
    assert softmax(np.array([1, 2], dtype=np.float32)).dtype == np.float32
    np.testing.assert_allclose(softmax(logits, axis=0).sum(axis=0), 1.0)


@pytest.mark.parametrize(
    "probs",
    [[0.5, 0.5], [[0.2, 0.3, 0.5]], [0.2, 0.3, 0.4], [0.5, 0.6, -0.1], [np.nan, 0.5, 0.5], 0.5],
)
def test_route_bad_probs_raise(probs):
    with pytest.raises(ValueError):
        route(probs, SITES3, 0.5)


def test_route_bad_args_raise():
    with pytest.raises(ValueError):
        route([0.2, 0.8], ["a", "b"], 1.5)
    with pytest.raises(ValueError):
        route([0.2, 0.8], ["a", "b"], -0.1)
    with pytest.raises(ValueError):
        route([0.2, 0.8], ["a", GLOBAL], 0.5)
    with pytest.raises(ValueError):
        route_batch([0.2, 0.3, 0.5], SITES3, 0.5)  # 1-D is not a batch
    with pytest.raises(ValueError):
        route_batch([[0.5, 0.5]], SITES3, 0.5)


# ----------------------------------------------------------------------------- schedules


def sites_n(n):
    return [f"site-{i}" for i in range(1, n + 1)]


def explicit_rows(sites, k):
    # a valid explicit schedule: two rows of the cyclic shift, reversed
    n = len(sites)
    return [[sites[(m + 2 * r + 1) % n] for m in range(k)][::-1] for r in range(2)]


def case_params():
    for kind in KINDS:
        for n in (2, 3, 4, 5):
            for k in sorted({1, 2, n}):
                yield kind, n, k


@pytest.mark.parametrize("kind,n,k", list(case_params()))
def test_schedule_one_model_per_site(kind, n, k):
    sites = sites_n(n)
    explicit = explicit_rows(sites, k) if kind == "explicit" else None
    sched = make_schedule(kind, sites, k, 3 * n, seed=7, explicit=explicit)
    assert len(sched) == 3 * n
    for row in sched:
        assert len(row) == k and len(set(row)) == k and set(row) <= set(sites)


@pytest.mark.parametrize("kind,n,k", [p for p in case_params() if p[0] in ("cyclic", "latin")])
def test_schedule_block_visits_every_site_once(kind, n, k):
    sites = sites_n(n)
    sched = make_schedule(kind, sites, k, 3 * n + 1, seed=3)
    for b in range(3):
        for counts in visits_per_model(sched[b * n : (b + 1) * n]):
            assert counts == dict.fromkeys(sites, 1)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_latin_square_property(n):
    """K = N models over N sites: in every communication every site hosts exactly one model, and in every
    block of N communications every model visits every site exactly once (several seeds, several blocks)."""
    sites = sites_n(n)
    for seed in (0, 1, 7, 123, 2024):
        sched = make_schedule("latin", sites, n, 4 * n, seed=seed)
        for c, row in enumerate(sched):
            assert sorted(row) == sites, (n, seed, c)  # one model per site, every site used
        for b in range(4):
            block = sched[b * n : (b + 1) * n]
            for m in range(n):
                assert sorted(row[m] for row in block) == sites, (n, seed, b, m)  # each site exactly once
        if n >= 3:  # blocks are drawn afresh: not the same square repeated
            assert len({tuple(map(tuple, sched[b * n : (b + 1) * n])) for b in range(4)}) > 1


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_latin_refuses_partial_blocks(n):
    for c in (0, n, 2 * n, 5 * n):
        check_latin_communications(c, n)
    for c in (1, n - 1, n + 1, 2 * n + 1):
        if c % n == 0:
            continue
        with pytest.raises(ValueError, match=rf"num_communications {c} is not a multiple of the number of sites {n}"):
            check_latin_communications(c, n)
    with pytest.raises(ValueError):
        check_latin_communications(4, 0)


def test_plan_latin_whole_blocks():
    assert plan_latin(20, 4, 2) == (20, 1)  # 2-epoch visits would need 10 communications: not a multiple of 4
    assert plan_latin(40, 4, 2) == (20, 2)
    assert plan_latin(24, 4, 4) == (8, 3)
    assert plan_latin(2, 2, 2) == (2, 1)
    assert plan_latin(12, 3, 100) == (3, 4)  # one block of long visits
    for epochs in range(1, 40):
        for n in range(1, 7):
            if epochs % n:
                with pytest.raises(ValueError, match=f"multiple of the number of sites {n}"):
                    plan_latin(epochs, n, 2)
                continue
            c, v = plan_latin(epochs, n, 2)
            assert c * v == epochs and c % n == 0 and 1 <= v <= 2


def test_cyclic_formula():
    sites = sites_n(4)
    sched = make_schedule("cyclic", sites, 2, 6)
    assert sched == [[sites[(m + c) % 4] for m in range(2)] for c in range(6)]
    assert [r[0] for r in make_schedule("cyclic", sites, 1, 5)] == sites + sites[:1]


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_deterministic_by_seed(kind):
    for n in (2, 3, 4, 5):
        sites = sites_n(n)
        for k in sorted({1, 2, n}):
            explicit = explicit_rows(sites, k) if kind == "explicit" else None
            a = make_schedule(kind, sites, k, 4 * n, seed=11, explicit=explicit)
            assert a == make_schedule(kind, sites, k, 4 * n, seed=11, explicit=explicit)
            other = make_schedule(kind, sites, k, 4 * n, seed=12, explicit=explicit)
            if kind in ("latin", "random") and n >= 3:
                assert a != other
            if kind in ("cyclic", "explicit"):
                assert a == other


def test_random_has_no_block_guarantee_but_uses_all_sites():
    sites = sites_n(4)
    sched = make_schedule("random", sites, 1, 400, seed=0)
    counts = visits_per_model(sched)[0]
    assert set(counts) == set(sites) and all(60 < v < 140 for v in counts.values())
    blocks = [visits_per_model(sched[i : i + 4])[0] for i in range(0, 400, 4)]
    assert any(len(b) < 4 for b in blocks)


def test_explicit_validated_and_repeated():
    sites = sites_n(3)
    rows = [["site-1", "site-2"], ["site-3", "site-1"]]
    sched = make_schedule("explicit", sites, 2, 5, explicit=rows)
    assert sched == [rows[0], rows[1], rows[0], rows[1], rows[0]]
    for bad in (
        [["site-1"]],  # wrong length
        [["site-1", "site-1"]],  # duplicate
        [["site-1", "site-9"]],  # unknown
        [],  # empty
        None,  # missing
        ["site-1site-2"],  # a string is not a row
    ):
        with pytest.raises(ValueError):
            validate_explicit(bad, sites, 2)
    assert validate_explicit(((("site-2", "site-3")),), sites, 2) == [["site-2", "site-3"]]
    with pytest.raises(ValueError):
        assign("cyclic", sites, 2, 0, explicit=rows)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="bogus"),
        dict(num_models=0),
        dict(communication=-1),
        dict(seed=-1),
        dict(active_sites=["a", "a", "b"]),
        dict(num_models=1.5),
    ],
)
def test_assign_validation(kwargs):
    args = dict(kind="cyclic", active_sites=sites_n(3), num_models=2, communication=3, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        assign(**args)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_assign_with_removed_site(kind, n):
    sites = sites_n(n)
    for k in sorted({1, 2, n}):
        explicit = explicit_rows(sites, k) if kind == "explicit" else None
        for removed in sites:
            active = [s for s in sites if s != removed]
            for c in range(3 * n):
                row = assign(kind, active, k, c, seed=5, explicit=explicit)
                assert len(row) == k
                used = [s for s in row if s is not None]
                assert len(used) == len(set(used)) and removed not in used and set(used) <= set(active)
                assert len(used) == min(k, len(active))
                if len(active) >= k:
                    assert None not in row
                assert row == assign(kind, active, k, c, seed=5, explicit=explicit)


@pytest.mark.parametrize("kind", KINDS)
def test_assign_sit_out_rotates(kind):
    for k in (2, 3, 4, 5):
        sites = sites_n(k)
        explicit = explicit_rows(sites, k) if kind == "explicit" else None
        for a in range(1, k):
            active = sites[:a]
            rows = [assign(kind, active, k, c, seed=1, explicit=explicit) for c in range(4 * k)]
            for row in rows:
                assert sum(s is not None for s in row) == a
            for start in range(3 * k):
                window = rows[start : start + k]
                trained = [sum(r[m] is not None for r in window) for m in range(k)]
                assert trained == [a] * k  # fair: exactly a trainings each over any k communications


def test_assign_no_active_sites_and_validation():
    assert assign("latin", [], 3, 4) == [None, None, None]
    with pytest.raises(ValueError):
        assign("nope", ["a"], 1, 0)
    with pytest.raises(ValueError):
        assign("cyclic", ["a"], 1, -1)
    with pytest.raises(ValueError):
        assign("cyclic", ["a", "a"], 1, 0)
    with pytest.raises(ValueError):
        assign("explicit", ["a", "b"], 2, 0, explicit=[["a"]])


def test_assign_matches_make_schedule_and_explicit_fallback():
    sites = sites_n(4)
    for kind in ("cyclic", "latin", "random"):
        sched = make_schedule(kind, sites, 3, 8, seed=9)
        assert sched == [assign(kind, sites, 3, c, seed=9) for c in range(8)]
    rows = [["site-1", "site-2", "site-3"]]
    # site-2 fails: models on active sites keep them, the displaced model takes the free site-4
    assert assign("explicit", ["site-1", "site-3", "site-4"], 3, 0, explicit=rows) == ["site-1", "site-4", "site-3"]


def test_package_exports():
    assert "fedseg.algorithms" in sys.modules
    import fedseg.algorithms as alg

    for name in alg.__all__:
        assert hasattr(alg, name)


# ---- FedSM: gamma chosen on validation, and the selector's health ---------------------------------------------
def test_choose_gamma_takes_the_best_validation_mean_and_the_larger_gamma_on_ties():
    from fedseg.algorithms.routing import choose_gamma

    gammas = [0.0, 0.5, 0.9, 1.0]
    gamma, means = choose_gamma(gammas, {"a": [0.5, 0.7, 0.7, 0.6], "b": [0.7, 0.7, 0.7, 0.6]})
    assert means == pytest.approx([0.6, 0.7, 0.7, 0.6]) and gamma == 0.9
    assert choose_gamma(gammas, {"a": [0.9, float("nan"), 0.1, 0.2]})[0] == 0.0
    with pytest.raises(ValueError, match="one Dice per gamma"):
        choose_gamma(gammas, {"a": [0.5, 0.6]})
    with pytest.raises(ValueError):
        choose_gamma([1.5], {"a": [0.5]})


def test_selector_health_names_collapse_and_a_super_model_that_is_the_global_one():
    from fedseg.algorithms.routing import selector_health

    sites = ["a", "b", "c"]
    route = lambda own, glob: {"a": own, "b": 0, "c": 0, "global": glob}  # noqa: E731
    learned = selector_health({"a": 0.9, "b": 0.8, "c": 0.7}, {"a": route(8, 2), "b": route(7, 3)}, sites)
    assert learned["status"] == "learned" and not learned["reasons"] and learned["global_share"] == 0.25
    stuck = selector_health({"a": 1.0, "b": 0.0, "c": 0.0}, {"a": route(9, 1)}, sites)  # everything is "a"
    assert stuck["status"] == "collapsed" and stuck["below_chance"] == ["b", "c"]
    shy = selector_health({"a": 0.9, "b": 0.9, "c": 0.9}, {"a": route(1, 9), "b": route(0, 10)}, sites)
    assert shy["status"] == "unused" and "routed to the global model" in shy["reasons"][0]
    assert shy["global_share"] == pytest.approx(0.95)
    # a right, confident selector whose super model uses gamma 1 (chosen on validation): unused, and why
    chosen = selector_health({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": route(0, 10), "b": route(0, 10)}, sites, gamma=1.0)
    assert chosen["status"] == "unused" and "personalized models scored no better" in chosen["reasons"][1]
    assert len(selector_health({"a": 0.9, "b": 0.9, "c": 0.9}, {"a": route(1, 9)}, sites, gamma=0.9)["reasons"]) == 1


# ---- FedSM selector head in closed form (fedseg.algorithms.selector_head) ----------------------------------
def _lda_features(seed: int = 0):
    """Three sites whose 5-d features differ in mean, with a shared anisotropic covariance."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(5, 5))
    means = [np.zeros(5), np.array([9.0, 0, 0, 3, 0]), np.array([0, -6.0, 6.0, 0, 0])]
    return [rng.normal(size=(n, 5)) @ mix + m for n, m in zip((40, 25, 60), means)]


def test_federated_lda_head_equals_the_head_fitted_on_pooled_features():
    from fedseg.algorithms.selector_head import feature_statistics, fit_lda_head

    sites = _lda_features()
    w, b = fit_lda_head([feature_statistics(f) for f in sites], shrinkage=0.0)
    # centrally: class means and the pooled within-class covariance of the union, by hand
    means = [f.mean(axis=0) for f in sites]
    pooled = sum((f - m).T @ (f - m) for f, m in zip(sites, means)) / (sum(len(f) for f in sites) - len(sites))
    precision = np.linalg.inv(pooled)
    np.testing.assert_allclose(w, np.stack([precision @ m for m in means]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, [-0.5 * m @ precision @ m for m in means], rtol=1e-4, atol=1e-5)
    # and it classifies the sites' own features (well separated by construction)
    accuracy = [np.mean(np.argmax(f @ w.T + b, axis=1) == k) for k, f in enumerate(sites)]
    assert min(accuracy) > 0.9, accuracy


def test_lda_head_shrinkage_and_a_class_without_statistics():
    from fedseg.algorithms.selector_head import feature_statistics, fit_lda_head

    sites = _lda_features(1)
    stats = [feature_statistics(f) for f in sites]
    w0, _ = fit_lda_head(stats, 0.0)
    w1, _ = fit_lda_head(stats, 1.0)  # full shrinkage: a spherical covariance, so w_k is parallel to mu_k
    means = np.stack([f.mean(axis=0) for f in sites])
    assert not np.allclose(w0, w1)
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(w1 / np.linalg.norm(w1, axis=1, keepdims=True), unit, atol=1e-6)
    # site 1 has not sent statistics (None) and site 2 only one image: neither is ever the argmax
    w, b = fit_lda_head([stats[0], None, feature_statistics(sites[2][:1])], 0.1)
    logits = np.concatenate(sites) @ w.T + b
    assert set(np.argmax(logits, axis=1)) == {0}
    with pytest.raises(ValueError, match="no class"):
        fit_lda_head([None, None], 0.1)
    with pytest.raises(ValueError, match="shrinkage"):
        fit_lda_head(stats, 1.5)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda s: {**s, "extra": s["count"]}, "exactly the keys"),
        (lambda s: {k: v for k, v in s.items() if k != "scatter"}, "exactly the keys"),
        (lambda s: {**s, "mean": s["mean"].astype(np.int64)}, "float array"),
        (lambda s: {**s, "mean": s["mean"][:3]}, "shape"),
        (lambda s: {**s, "mean": np.full_like(s["mean"], np.nan)}, "non-finite"),
        (lambda s: {**s, "count": np.array([2.5], dtype=np.float32)}, "whole number"),
        (lambda s: {**s, "count": np.array([-4.0], dtype=np.float32)}, "whole number"),
        (lambda s: {**s, "count": np.array([1e9], dtype=np.float32)}, "whole number"),
        (lambda s: {**s, "scatter": s["scatter"] + np.triu(np.ones((5, 5)), 1).astype(np.float32) * 50}, "symmetric"),
        (lambda s: {**s, "scatter": -s["scatter"]}, "positive semi-definite"),
        (lambda s: [1, 2, 3], "exactly the keys"),
    ],
)
def test_feature_statistics_from_a_site_are_checked(change, problem):
    from fedseg.algorithms import UpdateRejected
    from fedseg.algorithms.selector_head import check_feature_statistics, feature_statistics

    stats = feature_statistics(_lda_features()[0])
    checked = check_feature_statistics("site-1", stats, 5, max_count=1000)
    assert checked["count"][0] == 40 and checked["scatter"].dtype == np.float64
    with pytest.raises(UpdateRejected, match=problem) as info:
        check_feature_statistics("site-1", change(stats), 5, max_count=1000)
    assert "site-1" in str(info.value)


def test_spread_of_statistics_grows_with_an_inflated_scatter():
    from fedseg.algorithms.selector_head import feature_statistics, spread

    stats = feature_statistics(_lda_features()[0])
    assert spread({**stats, "scatter": stats["scatter"] * 100}) == pytest.approx(10 * spread(stats))
    assert spread(feature_statistics(np.zeros((0, 5)))) == 0.0
