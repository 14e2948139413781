"""The robustness and privacy benchmark (fedseg_tools.bench.robust): its attacker, what it reads from a run, its report
section, and one real run of two of its jobs (a sign-flipping site; DP-SGD everywhere) on the smoke data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedseg_tools.bench.attacks import scaled_update
from fedseg_tools.bench.robust import (
    attack_factors,
    honest_dice,
    largest_epsilon,
    last_quarter_gain,
    main,
    robust_lines,
    run_robustness,
    screening_counts,
)


def test_the_attack_scales_every_received_weight_and_nothing_else():
    sent = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float32)}
    returned = {
        "w": np.array([2.0, 0.0], np.float32),
        "b": np.array([0.5], np.float32),
        "w::exp_avg": np.ones(2, np.float32),  # optimizer state: untouched
        "extra": np.ones(3, np.float32),  # not sent: untouched
        "count": np.array([4], np.int64),  # not a float: untouched
    }
    out = scaled_update(sent, returned, -9.5)
    np.testing.assert_allclose(out["w"], [1.0 - 9.5, 2.0 + 19.0])
    assert out["w"].dtype == np.float32 and np.array_equal(out["b"], sent["b"])
    for key in ("w::exp_avg", "extra", "count"):
        assert out[key] is returned[key]
    assert attack_factors(10.0) == {"sign_flip": -9.5, "scaled": 9.5}


def test_what_a_run_record_and_its_logs_give():
    record = {
        "headline_model": "global (best)",
        "results": {"models": {"global (best)": {"site-1": {"dice": 0.8}, "site-2": {"dice": 0.6}, "site-3": {"dice": 0.1}}}},
    }
    assert honest_dice(record, "site-3") == {"per_site": {"site-1": 0.8, "site-2": 0.6}, "mean": 0.7, "worst": 0.6}
    assert honest_dice({}, "site-3")["mean"] is None
    server = [
        "2026-12-07 10:00:00,000 - C - WARNING - REJECTED update from site-3: cosine -0.99 below -0.5",
        "2026-12-07 10:00:01,000 - C - WARNING - BOUNDED update from site-3: norm 9.1 above 2x the round's median",
        "2026-12-07 10:00:02,000 - C - WARNING - REJECTED update from site-1: not finite",
    ]
    assert screening_counts(server, "site-3") == {"rejected": 1, "bounded": 1}
    sites = {
        "site-1": ["... DP-SGD at site site-1, task train: epsilon 3.5 so far at delta 1e-05 (...)", "... epsilon 4.25 so far"],
        "site-2": ["... DP-SGD at site site-2, task cross_train: epsilon 5.125 so far at delta 1e-05 (...)"],
    }
    assert largest_epsilon(sites) == 5.125 and largest_epsilon({"site-1": []}) is None


def test_report_section_shows_clean_attacked_and_dp_side_by_side():
    def run(mean, worst, **extra):
        return {"honest": {"mean": mean, "worst": worst}, "all_sites": {"mean": mean - 0.01, "worst": worst}, **extra}

    record = {
        "dataset": "synth2d",
        "sites": ["site-1", "site-2", "site-3", "site-4"],
        "attacker": "site-4",
        "rounds": 6,
        "epochs": 1,
        "seed": 0,
        "started": "2026-12-07 17:00:00 UTC",
        "attack_factors": {"sign_flip": -9.5, "scaled": 9.5},
        "max_update_ratio": 10.0,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5},
        "machine": {"cpu": "Some CPU", "cpu_count": 2, "torch": "2.13.0", "nvflare": "2.9.0", "monai": "1.6.1"},
        "runs": {
            "clean": {m: run(0.80, 0.70, last_quarter_gain=0.002) for m in ("fedavg", "fedprox", "fedsm", "fedcross")},
            "sign_flip": {"fedavg": run(0.79, 0.69, screening={"rejected": 6, "bounded": 0})},
            "scaled": {"error": "job exited with 1"},
            "dp": {"fedavg": run(0.60, 0.40, max_epsilon=7.5), "fedsm": {"error": "job exited with 1"}},
        },
    }
    text = "\n".join(robust_lines(record))
    assert "## One malicious site of 4, and DP-SGD" in text
    assert "| FedAvg | 0.800 (0.700) | 0.790 (0.690) | -1.0 | 6 / 0 | - | - | - |" in text
    assert "| FedSM | 0.800 (0.700) | - | - | - | - | - | - |" in text  # not measured: no number invented
    assert "| FedAvg | 0.790 (0.700) | 0.590 (0.400) | -20.0 | 7.50 |" in text
    assert "Jobs that failed: scaled, dp fedsm" in text
    assert "Machine: Some CPU (2 cores), no GPU; torch 2.13.0" in text
    assert "FedAvg +0.2, FedProx +0.2, FedSM +0.2, FedCross +0.2; every curve had flattened (within 1 point)" in text
    assert last_quarter_gain([(0.0, 0.1), (0.5, 0.4), (0.75, 0.5), (1.0, 0.55)]) == pytest.approx(0.05)
    assert last_quarter_gain([]) is None
    assert robust_lines(None) == [] and robust_lines({"runs": {}}) == []


@pytest.mark.slow
def test_a_sign_flipping_site_and_dp_sgd_measured_in_real_runs(tmp_path):
    """Two of the four jobs on the smoke data (2 sites, 1 round of 2 epochs): site-2 flips its updates in a job of
    FedAvg, FedSM and FedCross; then DP-SGD at both sites in FedProx's own job (--methods: 2 jobs, not 5)."""
    smoke = ["--preset", "smoke", "--rounds", "1", "--epochs", "2"]
    attacked, private = tmp_path / "attack", tmp_path / "dp"
    assert main(["--out", str(attacked), *smoke, "--jobs", "sign_flip", "--methods", "fedavg", "fedsm", "fedcross"]) == 0
    record = json.loads((attacked / "robust.json").read_text())
    assert record["attacker"] == "site-2" and set(record["runs"]) == {"sign_flip"}
    assert set(record["runs"]["sign_flip"]) == {"fedavg", "fedsm", "fedcross"}
    attacker_log = (attacked / "ws" / "sign_flip" / "site-2" / "log.txt").read_text()
    for task in ("train", "fedsm_train", "cross_train"):
        assert f"ATTACK by site-2 on task {task}: update x -9.5" in attacker_log
    assert "ATTACK" not in (attacked / "ws" / "sign_flip" / "site-1" / "log.txt").read_text()
    for method, run in record["runs"]["sign_flip"].items():
        assert run["status"] == "ok", (method, run)
        assert set(run["honest"]["per_site"]) == {"site-1"}, run
        # counted from the server's log (with 2 sites no screening can tell the flipped update from the honest one:
        # the cosine check needs 3 updates, and the median of 2 norms is their mean)
        assert sorted(run["screening"]) == ["bounded", "rejected"] and min(run["screening"].values()) >= 0, run
    assert "## One malicious site of 2, and DP-SGD" in (attacked / "robust.md").read_text()

    assert main(["--out", str(private), *smoke, "--jobs", "dp", "--methods", "fedprox"]) == 0
    record = json.loads((private / "robust.json").read_text())
    assert set(record["runs"]) == {"dp"} and set(record["runs"]["dp"]) == {"fedprox"} and record["methods"] == ["fedprox"]
    run = record["runs"]["dp"]["fedprox"]
    assert run["status"] == "ok" and 0 < run["max_epsilon"] < 1e3, run
    assert set(run["all_sites"]["per_site"]) == {"site-1", "site-2"}
    assert "| FedProx |" in (private / "robust.md").read_text()
    with pytest.raises(ValueError, match="unknown or no method"):
        run_robustness(tmp_path / "none", "smoke", methods=("fedbn",))


def test_the_benchmark_report_reads_the_record_beside_its_results(tmp_path):
    from fedseg_tools.bench.benchmark_report import load_raw

    (tmp_path / "results.json").write_text(json.dumps({"run": {"preset": "quick"}, "cells": []}))
    assert "robust" not in load_raw(tmp_path)[0]
    (tmp_path / "robust.json").write_text(json.dumps({"attacker": "site-4", "runs": {}}))
    assert load_raw(tmp_path)[0]["robust"] == {"attacker": "site-4", "runs": {}}
