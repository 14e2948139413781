"""Benchmark: the budget arithmetic (pure), the TaskMeter wiring, and the smoke preset end to end (every
method in the real NVFlare simulator, raw results, report and plots)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUSTOM, REPO

from fedseg.algorithms.schedules import assign
from fedseg_tools.bench.budget import (
    BASELINES,
    FEDSM_ABLATION_LAMBDAS,
    FL_METHODS,
    METHODS,
    PAPER_DIFFERS,
    STOCK,
    Budget,
    check_equal_budget,
    plan_method,
    plan_methods,
    plan_paper,
    plan_run,
    run_specs,
    steps_per_epoch,
)
from fedseg_tools.bench.tuning import tuning_runs


# ---- budget (pure) -----------------------------------------------------------------------------------------
def test_steps_per_epoch_matches_the_engine_rule():
    assert steps_per_epoch(24, 4) == 6 and steps_per_epoch(25, 4) == 7 and steps_per_epoch(1, 8) == 1
    with pytest.raises(ValueError):
        steps_per_epoch(0, 4)


SITE_STEPS = {"site-1": 6, "site-2": 4, "site-3": 8, "site-4": 3}


@pytest.mark.parametrize("rounds,epochs", [(3, 4), (4, 2), (10, 2), (6, 4)])
def test_every_method_gets_the_same_budget(rounds, epochs):
    budget = Budget(rounds, epochs, SITE_STEPS)
    assert budget.total_steps == rounds * epochs * sum(SITE_STEPS.values())
    plans = plan_methods(METHODS, budget)
    assert check_equal_budget(plans, budget) == []
    for m, p in plans.items():
        assert p.within_budget, m
        if m != "centralized":
            assert p.seg_steps_per_site == {s: budget.site_steps(s) for s in SITE_STEPS}, m


def _steps_from_schedule(plan, budget: Budget, kind: str, k: int) -> dict[str, int]:
    """Count each site's steps by replaying FedCross's real site-visit schedule."""
    steps = dict.fromkeys(budget.sites, 0)
    for c in range(plan.communications):
        for site in assign(kind, budget.sites, k, c, seed=3):
            if site is not None:
                steps[site] += plan.visit_epochs * budget.site_steps_per_epoch[site]
    return steps


@pytest.mark.parametrize(
    "rounds,epochs,visit",
    [(3, 2, None), (4, 2, 4), (2, 3, 6), (5, 1, None), (4, 2, None), (6, 4, None), (2, 2, None), (4, 4, 2), (10, 2, None)],
)
def test_fedcross_budget_holds_on_the_real_schedule(rounds, epochs, visit):
    budget = Budget(rounds, epochs, SITE_STEPS)
    n = budget.n_sites
    cross = plan_method("fedcross", budget, fedcross_visit_epochs=visit)
    assert cross.communications * cross.visit_epochs == n * rounds * epochs  # N x the communications of FedCrossEns
    assert _steps_from_schedule(cross, budget, "cyclic", 1) == {s: budget.site_steps(s) for s in budget.sites}
    site_epochs = rounds * epochs
    if site_epochs % n or (visit and (site_epochs // visit) % n):  # no split into whole Latin blocks: refused
        with pytest.raises(ValueError, match="Latin blocks"):
            plan_method("fedcrossens", budget, fedcrossens_visit_epochs=visit)
        return
    ens = plan_method("fedcrossens", budget, fedcrossens_visit_epochs=visit)
    assert ens.num_models == n and ens.communications * ens.visit_epochs == site_epochs
    assert ens.communications % n == 0 and (visit is None or ens.visit_epochs == visit)
    assert visit is not None or ens.visit_epochs <= epochs  # by default no visit longer than FedAvg's local round
    # on the real Latin schedule every site trains exactly its budget and every member visits every site equally
    assert _steps_from_schedule(ens, budget, "latin", n) == {s: budget.site_steps(s) for s in budget.sites}
    sched = [assign("latin", budget.sites, n, c, seed=3) for c in range(ens.communications)]
    for m in range(n):
        assert sorted(row[m] for row in sched) == sorted(budget.sites * (ens.communications // n))


def test_fedsm_policies_and_extra_cost():
    budget = Budget(4, 2, SITE_STEPS)
    split = plan_method("fedsm", budget)  # default: half the epochs for each of its two networks
    assert (split.rounds, split.local_epochs, split.networks_per_site_round) == (4, 1, 2)
    assert split.seg_steps_total == budget.total_steps and "selector" in split.extra_cost
    by_rounds = plan_method("fedsm", budget, fedsm_policy="rounds")
    assert (by_rounds.rounds, by_rounds.local_epochs) == (2, 2) and by_rounds.seg_steps_total == budget.total_steps
    extra = plan_method("softpull", budget, fedsm_policy="extra")
    assert extra.seg_steps_total == 2 * budget.total_steps and not extra.within_budget
    assert "selector" not in extra.extra_cost and "second network" in extra.extra_cost
    assert check_equal_budget({"fedsm": split, "softpull": extra}, budget) == ["softpull"]


def test_budgets_that_cannot_split_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        plan_method("fedsm", Budget(3, 1, SITE_STEPS))  # E odd
    with pytest.raises(ValueError, match="does not divide"):
        plan_method("fedsm", Budget(3, 2, SITE_STEPS), fedsm_policy="rounds")  # R odd
    with pytest.raises(ValueError, match="does not divide"):
        plan_method("fedcross", Budget(3, 2, SITE_STEPS), fedcross_visit_epochs=4)
    with pytest.raises(
        ValueError, match="R=3 rounds x E=2 epochs: 6 epochs per site cannot be split into whole Latin blocks of 4"
    ):
        plan_method("fedcrossens", Budget(3, 2, SITE_STEPS))  # 4 sites
    with pytest.raises(ValueError, match="Latin blocks"):
        plan_method("fedcrossens", Budget(4, 2, SITE_STEPS), fedcrossens_visit_epochs=4)  # 2 communications at 4 sites
    with pytest.raises(ValueError):
        plan_method("scaffold", Budget(3, 2, SITE_STEPS))
    with pytest.raises(ValueError):
        Budget(0, 2, SITE_STEPS)


def test_extra_costs_are_stated():
    plans = plan_methods(METHODS, Budget(2, 2, SITE_STEPS))
    assert "ensemble" in plans["fedcrossens"].extra_cost and "validation" in plans["fedcross"].extra_cost
    assert plans["fedavg"].model_downloads_per_site == 2 and plans["fedcross"].model_downloads_per_site == 2
    assert plans["fedcrossens"].model_downloads_per_site == 4  # 2 x 2 epochs per site: 4 one-epoch visits (one Latin block)


# ---- the papers' own protocols (pure) ------------------------------------------------------------------------
@pytest.mark.parametrize("rounds,epochs", [(4, 2), (8, 2), (12, 4), (3, 2)])
def test_paper_protocol_plans_are_what_the_papers_do(rounds, epochs):
    budget = Budget(rounds, epochs, SITE_STEPS)
    b, n = budget.total_steps, budget.n_sites
    for m in ("fedsm", "softpull"):  # every network trains the full E epochs per round for R rounds: 2B
        p = plan_paper(m, budget)
        assert (p.rounds, p.local_epochs, p.networks_per_site_round) == (rounds, epochs, 2), m
        assert p.seg_steps_total == 2 * b and p.budget_multiple == 2.0 and not p.within_budget and p.protocol == "paper"
        assert p.seg_steps_per_site == {s: 2 * budget.site_steps(s) for s in budget.sites}
        equal = plan_method(m, budget)  # equal steps: half the epochs per network
        assert (equal.rounds, 2 * equal.local_epochs, equal.seg_steps_total) == (rounds, epochs, b)
    # FedCrossEns: every member gets the full schedule of a single FedCross model: N*B in all, in whole Latin blocks
    ens, cross = plan_paper("fedcrossens", budget), plan_method("fedcross", budget)
    assert (ens.communications, ens.visit_epochs) == (cross.communications, cross.visit_epochs)
    assert ens.communications % n == 0  # also where R*E cannot be split into Latin blocks of the equal-steps plan
    assert ens.num_models == n and ens.seg_steps_total == n * b and ens.budget_multiple == n and ens.protocol == "paper"
    # replayed on the real Latin schedule: every member visits every site as often as FedCross's single model does,
    # so every member trains exactly B steps (FedCross's whole budget)
    member_steps = [0] * n
    for c in range(ens.communications):
        for m, site in enumerate(assign("latin", budget.sites, n, c, seed=5)):
            member_steps[m] += ens.visit_epochs * budget.site_steps_per_epoch[site]
    assert member_steps == [b] * n
    for m in ("local", "centralized", "fedavg", "fedprox", "fedbn", "fedcross"):  # own protocol = the equal-steps plan
        paper, equal = plan_paper(m, budget).as_dict(), plan_method(m, budget).as_dict()
        assert {**paper, "protocol": "equal"} == equal, m


def test_run_specs_cover_both_protocols_the_ablation_and_the_peers():
    specs = {s.key: s for s in run_specs(METHODS, fedsm_ablation=True, optimizer_variants=("keep",), stock=STOCK)}
    assert set(METHODS) <= set(specs) and all(specs[m].protocol == "equal" for m in METHODS)
    assert {f"{m}-paper" for m in PAPER_DIFFERS} <= set(specs)
    lams = sorted(s.options["lam"] for s in specs.values() if s.group == "ablation")
    assert lams == sorted(FEDSM_ABLATION_LAMBDAS) == [0.5, 0.9, 1.0]  # with the default 0.7 (fedsm-paper): all four
    assert all(s.method == "fedsm" and s.protocol == "paper" for s in specs.values() if s.group == "ablation")
    assert specs["fedavg-opt-keep"].options == {"local_optimizer": "keep"} and "fedprox-opt-keep" in specs
    assert all(specs[m].group == "stock" for m in STOCK)
    budget = Budget(4, 2, SITE_STEPS)
    assert plan_run(specs["nvflare_cyclic"], budget).communications == plan_method("fedcross", budget).communications
    assert plan_run(specs["nvflare_fedavg"], budget).rounds == 4
    assert plan_run(specs["fedcrossens-paper"], budget).seg_steps_total == budget.n_sites * budget.total_steps
    only_paper = {s.key for s in run_specs(METHODS, protocols=("paper",))}
    assert only_paper == {
        "local",
        "centralized",
        "fedavg",
        "fedprox",
        "fedbn",
        "fedcross",
        "fedsm-paper",
        "softpull-paper",
        "fedcrossens-paper",
    }
    with pytest.raises(ValueError, match="unknown protocol"):
        run_specs(METHODS, protocols=("fast",))


# ---- meter wiring ----------------------------------------------------------------------------------------------
def test_add_meter_joins_existing_filter_chains():
    from fedseg.fl.meter import DEFAULT_TASKS, METER_PATH, add_meter

    other = {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars", "args": {"exclude_vars": ["x"]}}
    client = {"task_data_filters": [], "task_result_filters": [{"tasks": ["train"], "filters": [dict(other)]}]}
    add_meter(client)
    result_chains = client["task_result_filters"]
    assert result_chains[0]["filters"][-1]["path"] == METER_PATH  # measured after the privacy filter, as sent
    covered = [t for chain in result_chains for t in chain["tasks"]]
    assert sorted(covered) == sorted(DEFAULT_TASKS) and len(covered) == len(set(covered))  # one chain per task
    assert client["task_data_filters"][0]["filters"][0]["args"]["direction"] == "in"


def test_meter_measures_serialized_size():
    """Runs in a child process: FOBS serialisation outside a FLARE cell leaves process-wide state behind that
    broke a later in-process FLARE API login (seen in the full suite: the POC tests' login handshake)."""
    code = """
import json, numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from fedseg.fl.meter import peak_rss_bytes, reset_peak_rss, serialized_size
params = {"w": np.zeros((100, 100), np.float32), "b": np.ones(7, np.float32)}
size, method, arrays = serialized_size(FLModelUtils.to_shareable(FLModel(params=params)))
reset_peak_rss()
print(json.dumps({"size": size, "method": method, "arrays": arrays, "rss": peak_rss_bytes()}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(CUSTOM)}
    ).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["arrays"] == 40028 and m["size"] >= m["arrays"] and m["method"] in ("fobs", "array_nbytes")
    assert m["rss"] > 10 * 2**20


def test_cost_ratios_from_a_record():
    from fedseg_tools.bench.cost import ratios

    plain = {
        "fedavg_small": {"wall_seconds": 2.0, "cpu_seconds": 2.0, "process_wall_seconds": 10.0, "process_cpu_seconds": 8.0},
        "fedavg_realistic": {"wall_seconds": 20.0, "process_wall_seconds": 30.0, "process_cpu_seconds": 28.0},
        "monai": {"images_per_second": 50.0},
        "engine": {"images_per_second": 45.0},
    }
    jobs = {
        "fedavg_small_shipped": {
            "training_wall_seconds": 10.0,
            "job_wall_seconds": 60.0,
            "job_cpu_seconds": 40.0,
            "training_cpu_seconds": 3.0,
            "overhead_per_round_seconds": 2.1,
        },
        "fedavg_small_tuned": {"training_wall_seconds": 3.0, "job_wall_seconds": 40.0, "job_cpu_seconds": 30.0},
        "solo_shipped": {"executor_images_per_second": 25.0},
        "solo_lean": {"executor_images_per_second": 40.0},
    }
    r = ratios({"plain": plain, "jobs": jobs})
    assert r["fl_overhead"]["small/shipped"]["training_wall_ratio"] == 5.0
    assert r["fl_overhead"]["small/tuned"]["cpu_ratio"] == 30.0 / 8.0
    assert r["fl_overhead"]["small/shipped"]["training_cpu_ratio"] == 1.5
    assert r["fl_overhead"]["small/shipped"]["overhead_per_round_seconds"] == 2.1
    assert r["fl_overhead"]["realistic/tuned"]["training_wall_ratio"] is None  # not measured: no ratio invented
    assert r["throughput"]["lean"]["executor_vs_monai"] == 0.8 and r["throughput"]["shipped"]["engine_vs_monai"] == 0.9


def test_relay_measurement_is_reported_as_measured():
    from fedseg_tools.bench.benchmark_report.cost_section import relay_lines

    relay = {
        "fedavg_rounds": 3,
        "fedcross_communications": 12,
        "fedavg_wall_seconds": 20.0,
        "fedcross_wall_seconds": 24.0,
        "fedcross_vs_fedavg_wall": 1.2,
        "handover_seconds": {"median": 0.061, "mean": 0.07, "max": 0.15},
        "communication_seconds": {"seconds": {"mean": 1.9}, "train_s": {"mean": 1.6}, "validate_s": None},
        "validated_communications": 3,
        "fedavg_round_seconds": {"tasks": {"mean": 0.9, "max": 1.2}, "save": {"mean": 0.01, "max": 0.02}},
    }
    text = "\n".join(relay_lines(relay))
    assert "| 0.900 / 1.200 | - / - | - / - | 0.010 / 0.020 |" in text  # FedAvg's split, missing parts as "-"
    assert "| 20.0 | 24.0 | **1.20** | 0.061 / 0.070 / 0.150 | 1.90 | 1.60 | - | 3 |" in text
    assert "12 communications" in text
    assert relay_lines(None) == []  # an older record without the measurement: no section, nothing invented


@pytest.mark.slow
def test_relay_command_measures_hand_overs_of_a_real_fedcross_run(tmp_path):
    """python -m fedseg_tools.bench.cost relay on the smoke data: FedAvg and FedCross jobs at the same steps, every
    hand-over of the relay measured (2 sites, 2 rounds: 4 visits, 3 hand-overs), the record on disk; both jobs
    poll at the interval asked for."""
    from fedseg_tools.bench.cost import main

    args = ["relay", "--preset", "smoke", "--rounds", "2", "--out", str(tmp_path), "--task-request-interval", "0.05"]
    assert main(args) == 0
    record = json.loads((tmp_path / "relay.json").read_text())
    assert record["dataset"] == "synth2d" and record["fedcross_communications"] == 4
    assert record["task_request_interval"] == 0.05
    servers = sorted((tmp_path / "jobs").rglob("config_fed_server.json"))
    assert len(servers) == 2 and all(json.loads(p.read_text())["server"]["task_request_interval"] == 0.05 for p in servers)
    assert record["fedavg_wall_seconds"] > 0 and record["fedcross_wall_seconds"] > 0
    assert record["fedcross_vs_fedavg_wall"] == record["fedcross_wall_seconds"] / record["fedavg_wall_seconds"]
    hand = record["handover_seconds"]
    assert 0 <= hand["median"] <= hand["max"]  # a visit never starts before the result it follows
    history = json.loads(next(tmp_path.rglob("fedcross__s0/fedseg_results.json")).read_text())["extra"]["history"]
    assert [h["handover_s"] is None for h in history] == [True, False, False, False]
    assert record["validated_communications"] == 2  # every ceil(2 sites / 1 model) communications
    split = record["fedavg_round_seconds"]  # from FedAvg's own history: 2 rounds
    assert 0 < split["tasks_beyond_slowest_site"]["mean"] <= split["tasks"]["mean"] and split["save"]["max"] > 0


@pytest.mark.parametrize("interval", ["0", "-1", "11"])
def test_relay_refuses_a_task_request_interval_out_of_range(interval, tmp_path, capsys):
    from fedseg_tools.bench.cost import main

    with pytest.raises(SystemExit):
        main(["relay", "--out", str(tmp_path), "--task-request-interval", interval])
    assert "--task-request-interval must be in (0, 10]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_throughput_configurations_and_their_table():
    from fedseg.engine import EngineConfig
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.bench.cost import THROUGHPUT_CONFIGS, throughput_engine, throughput_lines

    realistic2d = EngineConfig.from_dict(resolve_engine(throughput_engine("realistic2d", 1)))
    assert realistic2d.roi_size == [256, 256] and realistic2d.batch_size == 16
    assert realistic2d.network["channels"] == [32, 64, 128, 256]
    realistic3d = EngineConfig.from_dict(resolve_engine(throughput_engine("realistic3d", 1)))
    assert realistic3d.spatial_dims == 3 and realistic3d.roi_size == [96, 96, 96]
    assert set(THROUGHPUT_CONFIGS) == {"bench2d", "realistic2d", "realistic3d"}
    record = {
        "configs": {
            "bench2d": {
                "monai_images_per_second": 100.0,
                "engine_images_per_second": 90.0,
                "executor_images_per_second": 80.0,
                "executor_vs_monai": 0.8,
                "engine_vs_monai": 0.9,
            },
            "realistic3d": {"error": "plain loops: TimeoutExpired: ..."},
        }
    }
    text = "\n".join(throughput_lines(record))
    assert "| bench2d | 100.0 | 90.0 | 80.0 | 0.80 | 0.90 |" in text
    assert "| realistic3d | failed: plain loops: TimeoutExpired: ... |" in text


@pytest.mark.slow
def test_throughput_command_measures_the_executor_against_plain_monai(tmp_path):
    """python -m fedseg_tools.bench.cost throughput for the benchmark's network: the plain MONAI loop and the engine in
    their own process, the executor in a one-site FedAvg job (2 rounds), all on the same site's data."""
    from fedseg_tools.bench.cost import main

    assert main(["throughput", "--configs", "bench2d", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "throughput.json").read_text())
    assert record["device"] == "cpu" and record["rounds"] == 2
    entry = record["configs"]["bench2d"]
    assert entry["job"]["returncode"] == 0 and entry["job"]["train_tasks"] == 2
    for key in ("monai_images_per_second", "engine_images_per_second", "executor_images_per_second"):
        assert entry[key] > 0, (key, entry)
    assert entry["executor_vs_monai"] == entry["executor_images_per_second"] / entry["monai_images_per_second"]
    assert entry["plain"]["monai"]["device"] == "cpu"


def test_a_method_without_a_flare_job_is_reported_missing(tmp_path, monkeypatch):
    from fedseg import jobgen
    from fedseg_tools.bench.presets import get_preset
    from fedseg_tools.bench.run import prepare_dataset, run_dataset

    monkeypatch.delitem(jobgen.JOBS, "fedcross")
    preset = get_preset("smoke")
    spec = preset.datasets["synth2d"]
    data, _ = prepare_dataset(spec, tmp_path / "data")
    (cell,) = run_dataset("synth2d", data, spec, preset, ["fedcross"], tmp_path / "ds")
    assert cell["methods"]["fedcross"]["status"] == "missing" and "JOBS" in cell["methods"]["fedcross"]["error"]
    assert cell["jobs"] == []  # nothing ran


# ---- the smoke preset end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedseg_tools.bench", "--preset", "smoke", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


@pytest.mark.slow
def test_smoke_preset_runs_every_method_end_to_end(smoke_run):
    data = json.loads((smoke_run / "raw" / "results.json").read_text())
    (cell,) = data["cells"]
    budget = cell["budget"]["total_steps"]
    paper = [f"{m}-paper" for m in PAPER_DIFFERS]
    tuned = [key for key, _, _ in tuning_runs(METHODS)]  # FedProx's mu and FedSM's lambda candidates
    assert sorted(cell["methods"]) == sorted([*METHODS, *paper, *tuned])  # both protocols, every method
    # measured at the sites: every equal-steps run trained exactly B steps; the papers' own protocols: FedSM and
    # SoftPull 2B (both networks the full E epochs per round), FedCrossEns N*B (every member a full FedCross schedule)
    expected = {
        **dict.fromkeys([*METHODS, *tuned], budget),
        "fedsm-paper": 2 * budget,
        "softpull-paper": 2 * budget,
        "fedcrossens-paper": len(cell["sites"]) * budget,
    }
    # the smoke network (MONAI "instance" norm, affine=False) has no normalization parameters: FedBN is not run
    fedbn = cell["methods"].pop("fedbn")
    assert fedbn["status"] == "skipped" and "no parameters: FedBN would be FedAvg" in fedbn["error"], fedbn
    for m, rec in cell["methods"].items():
        assert rec["status"] == "ok", (m, rec.get("error"))
        models = rec["results"]["models"]
        assert rec["headline_model"] in models, (m, list(models))
        assert sorted(models[rec["headline_model"]]) == cell["sites"], m
        assert rec["seg_steps"] == expected[m] == rec["plan"]["seg_steps_total"], (m, rec["seg_steps"], expected[m])
        assert rec["protocol"] == ("paper" if m in paper else "equal"), m
        assert rec["wall_seconds"] > 0 and rec["curve"], m
        assert all(v and v > 50 * 2**20 for v in rec["memory"].values()), (m, rec["memory"])
    # each candidate run trained with its candidate value, the main runs with the shipped defaults
    for key, method, options in tuning_runs(METHODS):
        assert cell["methods"][key]["group"] == "tuning" and cell["methods"][key]["options"] == options
        for arg, value in options.items():
            assert cell["methods"][key]["workflow_args"][arg] == value != cell["methods"][method]["workflow_args"][arg]
    # the paper runs really ran their papers' plans: R rounds x E epochs per network, N*R communications
    assert cell["methods"]["fedsm-paper"]["workflow_args"]["local_epochs"] == cell["budget"]["epochs"]
    assert cell["methods"]["fedsm"]["workflow_args"]["local_epochs"] == cell["budget"]["epochs"] // 2
    assert (
        cell["methods"]["fedcrossens-paper"]["workflow_args"]["num_communications"]
        == len(cell["sites"])
        * cell["methods"]["fedcrossens"]["workflow_args"]["num_communications"]
        * cell["methods"]["fedcrossens"]["workflow_args"]["visit_epochs"]
        // cell["budget"]["epochs"]
    )
    # one LR policy for every method; the same model-selection rule: FedAvg/FedProx score their best-validated model
    assert cell["methods"]["fedcross"]["workflow_args"]["lr_schedule"] == "constant"
    for m in ("fedavg", "fedprox"):
        assert cell["methods"][m]["headline_model"] == "global (best)"
        assert sorted(cell["methods"][m]["results"]["models"]) == ["global (best)", "global (last)"]
    assert cell["methods"]["local"]["results"]["extra"]["best_checkpoint"]
    for m in [m for m in FL_METHODS if m != "fedbn"]:
        traffic = cell["methods"][m]["traffic"]
        assert sorted(traffic) == cell["sites"]
        for site, t in traffic.items():
            assert t["bytes_in"] > 100_000 and t["bytes_out"] > 0 and t["tasks"] > 0, (m, site, t)
            assert t["bytes_method"] == ["fobs"], (m, t)
    # the default selector ("lda") takes no optimizer steps: the server fits its head from the sites' statistics
    assert cell["methods"]["fedsm"]["results"]["extra"]["selector"]["protocol"] == "lda"
    assert cell["methods"]["fedsm"]["selector_steps"] == 0
    assert "selector_accuracy" in cell["methods"]["fedsm"]["results"]["extra"]
    assert "uncertainty_per_site" in cell["methods"]["fedcrossens"]["results"]["extra"]
    assert "hd95" in next(iter(cell["methods"]["fedavg"]["results"]["models"]["global (last)"].values()))
    for m in BASELINES:
        assert cell["methods"][m]["traffic"] == {}
    with open(smoke_run / "raw" / "methods.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted([*METHODS, *paper, *tuned])


@pytest.mark.slow
def test_smoke_report_and_plots(smoke_run, tmp_path):
    md = (smoke_run / "BENCHMARKS.md").read_text()
    for name in ("Local only", "Centralized", "FedAvg", "FedProx", "FedSM", "SoftPull", "FedCross", "FedCrossEns"):
        assert f"| {name} |" in md, name
    assert "python -m fedseg_tools.bench --preset smoke" in md and "not run on a GPU" in md
    assert "too small to conclude" in md and "best-validated" in md
    # FedProx's mu and FedSM's lambda chosen on validation, every candidate shown
    assert "## Hyper-parameters chosen on validation" in md and "**FedProx on synth2d** (`fedprox_mu`, 1 seed(s))" in md
    assert "| 0.01 (default) |" in md and "| 0.7 (default) |" in md and "| 0.001 |" in md and "| 0.9 |" in md
    # both protocols side by side, with the extra compute next to the Dice and the flattened column
    assert "**Equal steps: every method trains B segmentation steps.**" in md and "**Each paper's own protocol" in md
    assert "steps used / B" in md and "flattened? (last-25% gain)" in md
    for row in (
        "| FedSM (paper protocol) | FedSM super model |",
        "| SoftPull (paper protocol) |",
        "| FedCrossEns (paper protocol) | ensemble |",
        "| FedAvg (same run) | global (best) |",
    ):
        assert row in md, row
    assert "= 2B |" in md and "FedSM personalized (own site) — oracle routing: uses the site's identity" in md
    assert "beats FedAvg by ≥ 2 Dice points under at least one protocol" in md and "centralized beats local-only" in md
    assert "Routing confusion matrix" in md and "FedCrossEns uncertainty quality" in md
    for png in ("dice_per_round.png", "site_dice_synth2d.png", "fedcrossens_uncertainty.png"):
        assert (smoke_run / png).stat().st_size > 5000, png
    # the report is generated from the raw files alone
    from fedseg_tools.bench.benchmark_report import write_report

    again = write_report(smoke_run / "raw", tmp_path)
    assert again.read_text() == md


def test_any_datalist_folder_is_a_dataset(tiny3d):
    from fedseg_tools.bench.presets import get_preset
    from fedseg_tools.bench.run import resolve_datasets

    specs = resolve_datasets(get_preset("quick"), ["tiny3d"], [str(tiny3d)])
    spec = specs["tiny3d"]
    assert spec.kind == "datalist" and spec.engine["spatial_dims"] == 3 and len(spec.engine["roi_size"]) == 3
    assert spec.engine["in_channels"] == 1 and spec.engine["num_classes"] == 2
    with pytest.raises(SystemExit, match="unknown dataset"):
        resolve_datasets(get_preset("quick"), ["nope"], [])


# ---- the data-scarce variant of the built-in data (pure data, no FLARE) -----------------------------------
def test_data_scarce_variant_keeps_validation_and_test_cases(tmp_path):
    from fedseg.data.synthetic import generate_dataset

    full = generate_dataset(tmp_path / "full", n_sites=4, spatial_dims=2, seed=0, size="tiny")
    scarce = generate_dataset(tmp_path / "scarce", n_sites=4, spatial_dims=2, seed=0, size="tiny", labelled_training=4)
    assert scarce["labelled_training"] == 4 and "labelled_training" not in full
    for a, b in zip(full["sites"], scarce["sites"]):
        assert b["counts"]["training"] == min(4, a["counts"]["training"])
        assert (b["counts"]["validation"], b["counts"]["testing"]) == (a["counts"]["validation"], a["counts"]["testing"])
        assert a["params"] == b["params"] and a["shape"] == b["shape"]  # same site shifts
        lists = [json.loads((tmp_path / v / a["datalist"]).read_text()) for v in ("full", "scarce")]
        assert lists[1]["training"] == lists[0]["training"][: b["counts"]["training"]]
        for section in ("training", "validation", "testing"):
            for case in lists[1][section]:  # the scarce variant's files are the full variant's, byte for byte
                for key in ("image", "label"):
                    assert (tmp_path / "scarce" / a["site"] / case[key]).read_bytes() == (
                        tmp_path / "full" / a["site"] / case[key]
                    ).read_bytes(), (section, case[key])
    with pytest.raises(ValueError, match="not both"):
        generate_dataset(tmp_path / "x", n_sites=2, size="tiny", cases_per_site=3, labelled_training=2)


# ---- report logic (pure: hand-made records, no FLARE) -------------------------------------------------------
def _cell(seed: int, dice: dict[str, float], sites=("a", "b"), curves: dict | None = None) -> dict:
    """A results cell as the runner writes it: every run's headline model scoring `dice` at every site."""
    methods = {}
    for key, d in dice.items():
        method = key.split("-")[0]
        model = {
            "fedsm": "FedSM super model",
            "fedcrossens": "ensemble",
            "local": "local (own site)",
            "centralized": "centralized",
            "nvflare_cyclic": "global (last)",
        }.get(method, "global (best)")
        methods[key] = {
            "method": method,
            "status": "ok",
            "protocol": "paper" if key.endswith("-paper") else "equal",
            "group": "stock" if method in STOCK else "main",
            "headline_model": model,
            "plan": {"seg_steps_total": 100, "budget_multiple": 2.0 if key.endswith("-paper") else 1.0},
            "seg_steps": 200 if key.endswith("-paper") else 100,
            "results": {"models": {model: {s: {"dice": d} for s in sites}}},
            "curve": (curves or {}).get(key, []),
        }
    return {
        "dataset": "d",
        "seed": seed,
        "sites": list(sites),
        "budget": {"rounds": 4, "epochs": 2, "total_steps": 100},
        "methods": methods,
    }


def test_flattened_uses_the_last_quarter_of_the_curve():
    from fedseg_tools.bench.benchmark_report.facts import flattened

    rising = [(i / 12, 0.05 * i) for i in range(13)]
    flat = [(i / 12, min(0.8, 0.2 * i)) for i in range(13)]
    wobbly = [(i / 12, min(0.8, 0.2 * i) + (0.04 if i % 2 else -0.04)) for i in range(13)]  # federated round-to-round wobble
    assert flattened(rising)[0] is False and flattened(rising)[1] == pytest.approx(0.15)  # 0.05 per point, 3 points
    assert flattened(flat)[0] is True and flattened(flat)[1] == pytest.approx(0.0, abs=1e-9)
    assert flattened(wobbly)[0] is True
    assert flattened([(x, y + 0.05 * i) for i, (x, y) in enumerate(wobbly)])[0] is False  # wobbling but rising
    assert flattened([(0, 0.1), (0.5, 0.5), (1, 0.9)])[0] is None  # fewer than 3 points in the last quarter: no verdict


def test_headline_answers_come_from_the_numbers():
    from fedseg_tools.bench.benchmark_report.facts import headline_facts
    from fedseg_tools.bench.benchmark_report.headline_section import headline_sentences

    runs = {
        "local": 0.70,
        "centralized": 0.80,
        "fedavg": 0.60,
        "fedsm": 0.61,
        "fedsm-paper": 0.63,
        "fedcrossens": 0.59,
        "fedcrossens-paper": 0.615,
        "fedcross": 0.65,
        "nvflare_cyclic": 0.67,
    }
    cells = [_cell(s, {k: v + 0.001 * s for k, v in runs.items()}) for s in range(3)]
    facts = headline_facts(cells)
    assert facts["fedsm"]["beats_fedavg"] is True  # +3 points under its own protocol, +1 under equal steps
    assert facts["fedcrossens"]["beats_fedavg"] is False  # -1 and +1.5 points: below 2 under both
    assert facts["centralized_vs_local"]["beats"] is True
    assert facts["fedcross_vs_stock"]["matches"] is False and facts["fedcross_vs_stock"]["diff"] == pytest.approx(-0.02)
    text = " ".join(headline_sentences("d", cells))
    assert "FedSM super model vs FedAvg" in text and "paper protocol (2B)" in text
    assert "FedCrossEns ensemble vs FedAvg" in text and "under at least one protocol: **no**" in text
    assert "matches the stock cyclic workflow (at most 1 point below): **no**" in text
    facts = headline_facts([_cell(0, {**runs, "fedcross": 0.665})])
    assert facts["fedcross_vs_stock"]["matches"] is True
    curves = {"fedavg": [(i / 8, 0.1 * i) for i in range(9)]}
    assert "NOT flattened" in " ".join(headline_sentences("d", [_cell(0, runs, curves=curves)]))


def test_fedsm_selector_and_gamma_sweep_readers():
    from fedseg_tools.bench.benchmark_report.fedsm_facts import gamma_sweep, selector_stats

    extra = {"selector_accuracy": {"a": 1.0, "b": 0.5}, "routing": {"a": {"a": 3, "global": 1}, "b": {"a": 2, "b": 2}}}
    st = selector_stats(extra, ["a", "b"])
    assert st["a"] == {"argmax_own": 1.0, "routed_own": 0.75, "routed_global": 0.25, "cases": 4}
    assert st["b"]["routed_own"] == 0.5 and st["b"]["routed_global"] == 0.0
    assert selector_stats({**extra, "routed_own": {"a": 0.5}}, ["a"])["a"]["routed_own"] == 0.5  # the site's own count wins
    # the sweep as FedSM's controller records it: the mean it wrote, or the mean over the sites without one
    recorded = {"gammas": [0.5, 1.0], "dice": {"a": [0.8, 0.7], "b": [0.6, 0.5]}, "mean": [0.71, 0.6]}
    sweep = gamma_sweep({"gamma_sweep": recorded})
    assert sorted(sweep) == [0.5, 1.0] and sweep[0.5] == {"a": 0.8, "b": 0.6, "mean": 0.71}
    assert gamma_sweep({"gamma_sweep": {**recorded, "mean": None}})[1.0] == {"a": 0.7, "b": 0.5, "mean": pytest.approx(0.6)}
    assert gamma_sweep({"gamma_sweep": {"gammas": [0.5], "dice": {}, "mean": None}}) == {}  # no site reported one
    assert gamma_sweep({}) == {}


def test_fedsm_routing_and_history_are_summed_over_seeds():
    import math

    from fedseg_tools.bench.benchmark_report.fedsm_facts import selector_history, summed_counts

    seeds = [
        {
            "routing": {"a": {"a": 3, "global": 1}},
            "selector_history": [{"round": r, "accuracy": {"a": r / 10}} for r in range(9)],
        },
        {"routing": {"a": {"a": 1, "b": None}}, "selector_history": [{"round": r, "accuracy": {"a": r / 5}} for r in range(9)]},
    ]
    assert summed_counts(seeds, "routing") == {"a": {"a": 4.0, "global": 1.0}}  # a count that is no number is left out
    assert summed_counts(seeds, "confusion") == {}  # not recorded
    history = selector_history(seeds, ["a"])
    assert [r for r, _ in history] == [0, 2, 4, 6, 8]  # first, quarter, half, three quarters, last round
    assert history[-1][1]["a"][0] == pytest.approx((0.8 + 1.6) / 2) and math.isnan(history[-1][1]["a"][1])


def test_polyp_pictures_are_downscaled_with_binary_masks(tmp_path):
    import numpy as np
    from PIL import Image

    from fedseg_tools.bench.run import downscale_pictures

    for site, size in (("A", (300, 200)), ("B", (120, 160))):
        (tmp_path / "src" / site / "images").mkdir(parents=True)
        (tmp_path / "src" / site / "masks").mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", size, (200, 30 * k, 10)).save(tmp_path / "src" / site / "images" / f"{k}.jpg")
            mask = Image.new("L", size, 0)
            mask.paste(255, (0, 0, size[0] // 2, size[1]))  # left half foreground
            mask.save(tmp_path / "src" / site / "masks" / f"{k}.jpg")
    counts = downscale_pictures(tmp_path / "src", tmp_path / "dst", 48)
    assert counts == {"A": 2, "B": 2}
    with Image.open(tmp_path / "dst" / "A" / "images" / "0.png") as im:
        assert im.size == (48, 32) and im.mode == "RGB"
    with Image.open(tmp_path / "dst" / "B" / "masks" / "1.png") as im:
        assert im.size == (36, 48)
        pixels = np.asarray(im)
        assert sorted(np.unique(pixels)) == [0, 255] and (pixels == 255).sum() == 18 * 48  # the left half, binary


def test_progress_line_reads_the_running_job(tmp_path):
    """The progress line names the run in progress and its round from the job's own files (timeline, meters)."""
    import time

    from fedseg_tools.bench.budget import Budget, plan_runs
    from fedseg_tools.bench.run import Progress

    ws = tmp_path / "ws"
    app = ws / "server" / "simulate_job" / "app_server" / "bench"
    app.mkdir(parents=True)
    now = time.time()
    (app / "timeline.json").write_text(
        json.dumps(
            [
                {"method": "fedavg__s0", "phase": "start", "time": now - 50},
                {"method": "fedavg__s0", "phase": "end", "time": now - 30},
                {"method": "fedsm__s0", "phase": "start", "time": now - 20},
            ]
        )
    )
    for site in ("site-1", "site-2"):
        (ws / site / "simulate_job").mkdir(parents=True)
        (ws / site / "simulate_job" / "fedseg_meter.jsonl").write_text(
            "\n".join(json.dumps({"task_name": "fedsm_train", "round": r, "t_in": now - 15 + r}) for r in range(3)) + "\n"
        )
    budget = Budget(4, 2, {"site-1": 2, "site-2": 2})
    specs = run_specs(["fedavg", "fedsm", "fedcross"], protocols=("equal",))
    progress = Progress(every=60)
    progress.plan("synth2d", [(s.key, 0) for s in specs], plan_runs(specs, budget))
    progress.running("synth2d", "bench_all", ws, ["site-1", "site-2"])
    line = progress.line()
    assert "synth2d seed 0: fedsm round 3/4" in line and "1/3 runs done" in line and "min left" in line  # fedavg ended
    progress.finished("synth2d", [("fedavg", 0), ("fedsm", 0)])
    assert "2/3 runs done" in progress.line()


@pytest.mark.slow
def test_sigterm_stops_the_benchmark_and_everything_it_started(tmp_path):
    """SIGTERM while a simulator job runs: the benchmark exits at once (no further job, retry or baseline is
    started) and no process of the run is left."""
    import signal
    import time

    import psutil

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedseg_tools.bench", "--preset", "smoke", "--out", str(out), "--protocols", "equal"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(out) in part for part in p.info["cmdline"] or []):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    try:
        lines = []
        for line in proc.stdout:  # wait until the shared simulator job is running
            lines.append(line)
            if "in the NVFlare simulator" in line:
                break
        time.sleep(8)
        assert proc.poll() is None, "".join(lines)
        began = time.time()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
        assert proc.returncode == 128 + signal.SIGTERM, "".join(lines) + rest
        assert time.time() - began < 60
        assert "(separate process)" not in rest and "retry" not in rest  # nothing started after the signal
        deadline = time.time() + 20
        while ours() and time.time() < deadline:
            time.sleep(1)
        assert ours() == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in ours():
            p.kill()


def test_headline_says_when_a_difference_is_seed_noise():
    from fedseg_tools.bench.benchmark_report.headline_section import headline_sentences

    noisy = [_cell(s, {"fedavg": 0.60, "fedsm": 0.60 + d}) for s, d in enumerate((0.10, -0.05, 0.01))]  # +2 points, noisy
    clear = [_cell(s, {"fedavg": 0.60, "fedsm": 0.63 + d}) for s, d in enumerate((0.001, -0.001, 0.0))]
    assert "within seed noise" in " ".join(headline_sentences("d", noisy))
    text = " ".join(headline_sentences("d", clear))
    assert "within seed noise" not in text and "standard errors over 3 seeds" in text


@pytest.mark.slow
def test_benchmark_baselines_run_in_their_own_process(tiny2d, tmp_path):
    """python -m fedseg_tools.baselines benchmark: what the benchmark runs for local-only and centralized (one seed, the
    seed's initial checkpoint, the budget of R rounds x E epochs, a learning curve of R+1 points, best-validated)."""
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench.jobs import save_initial_checkpoint

    engine = {
        "spatial_dims": 2,
        "roi_size": [32, 32],
        "batch_size": 4,
        "seed": 0,
        "network": {"arch": "unet", "channels": [8, 16], "num_res_units": 1},
    }
    init = save_initial_checkpoint(tmp_path / "init.pt", engine, 0)
    out = tmp_path / "baselines.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg_tools.baselines",
            "benchmark",
            "--data",
            str(tiny2d),
            "--engine",
            json.dumps(engine),
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--seeds",
            "0",
            "--inits",
            str(init),
            "--out",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    record = json.loads(out.read_text())
    sites = sorted(site_train_counts(tiny2d))
    assert sorted(record["budget"]["site_steps_per_epoch"]) == sites
    seed = record["seeds"]["0"]
    assert sorted(seed["local"]["results"]["models"]["local (own site)"]) == sites
    assert seed["local"]["seg_steps"] == record["budget"]["total_steps"] == seed["centralized"]["seg_steps"]
    assert len(seed["centralized"]["curve"]) == 3 and seed["centralized"]["results"]["extra"]["best_checkpoint"] in (1, 2)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg_tools.baselines",
            "benchmark",
            "--data",
            str(tiny2d),
            "--engine",
            "{}",
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--seeds",
            "0",
            "1",
            "--inits",
            str(init),
            "--out",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(CUSTOM)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "one --inits checkpoint per --seeds seed" in bad.stderr
