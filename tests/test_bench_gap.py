"""Fairness and gap-closed reporting of the benchmark: the worst-site Dice, the matched-step baselines of the paper
protocols (budget, runner, report) and the share of the centralized - FedAvg gap each method closes."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CUSTOM, REPO

from fedseg.report import format_table, worst_site
from fedseg_tools.bench.budget import METHODS, Budget, matched_key, paper_multiples, plan_method, plan_run, run_specs
from fedseg_tools.bench.gap import closed_per_seed, format_closed, gap_closed, gap_within_noise, mean_se

SITE_STEPS = {"a": 3, "b": 2, "c": 5, "d": 1}


# ---- worst site ---------------------------------------------------------------------------------------------
def test_worst_site_is_the_minimum_over_sites():
    assert worst_site({"a": {"dice": 0.8}, "b": {"dice": 0.55}, "c": {"dice": 0.9}}) == 0.55
    assert worst_site({"a": 0.7, "b": 0.4}) == 0.4  # {site: dice} as the benchmark's aggregates hold it
    assert worst_site({"a": {"dice": 0.7}, "b": {}, "c": {"dice": float("nan")}, "d": None}) == 0.7  # no Dice: left out
    assert math.isnan(worst_site({})) and math.isnan(worst_site({"a": {"dice": None}}))
    table = format_table(
        {
            "models": {
                "m": {"a": {"dice": 0.8, "dice_std": 0.1, "n_cases": 4}, "b": {"dice": 0.5, "dice_std": 0.2, "n_cases": 4}}
            }
        }
    )
    header, _, row = table.splitlines()[1:4]
    assert [c.strip() for c in header.split("|")[-3:-1]] == ["mean over sites", "worst site"]
    assert [c.strip() for c in row.split("|")[-3:-1]] == ["0.650", "0.500"]


# ---- gap closed (pure) -------------------------------------------------------------------------------------
def test_gap_closed_is_the_share_per_seed_with_its_standard_error():
    fedavg = {0: 0.60, 1: 0.62, 2: 0.58}
    central = {0: 0.80, 1: 0.82, 2: 0.78}  # gap 0.2 in every seed
    method = {0: 0.70, 1: 0.70, 2: 0.70}  # shares 0.5, 0.4, 0.6
    assert closed_per_seed(method, fedavg, central) == pytest.approx({0: 0.5, 1: 0.4, 2: 0.6})
    s = gap_closed(method, fedavg, central)
    assert s["gap"] == pytest.approx(0.2) and s["gap_se"] == pytest.approx(0.0, abs=1e-12) and not s["within_noise"]
    assert s["closed"] == pytest.approx(0.5) and s["closed_se"] == pytest.approx(0.1 / math.sqrt(3)) and s["seeds"] == 3
    assert format_closed(s) == "50% ± 6%"
    # seeds missing in one of the three are left out; the gap is paired over the seeds FedAvg and centralized share
    s = gap_closed({0: 0.70, 1: 0.70}, {**fedavg, 3: 0.5}, central)
    assert s["seeds"] == 2 and s["gap_seeds"] == 3
    assert mean_se([1.0, 3.0]) == pytest.approx((2.0, 1.0, 2)) and math.isnan(mean_se([1.0])[1])


def test_a_gap_within_noise_gives_no_share():
    assert gap_within_noise([0.2])  # one seed: no error estimate
    assert gap_within_noise([0.0, 0.0, 0.0])  # no gap
    assert gap_within_noise([0.05, -0.03, 0.01])  # |mean| 0.01 < 2 SE
    assert not gap_within_noise([0.10, 0.12, 0.11])
    s = gap_closed({0: 0.7, 1: 0.7, 2: 0.7}, {0: 0.6, 1: 0.6, 2: 0.6}, {0: 0.65, 1: 0.57, 2: 0.61})
    assert s["within_noise"] and math.isnan(s["closed"]) and format_closed(s) == "gap within noise"
    assert gap_closed({0: 0.7}, {0: 0.6}, {0: 0.8})["within_noise"]  # one seed


# ---- matched-step baselines: budget and presets ------------------------------------------------------------
def test_matched_step_baselines_train_the_paper_runs_steps():
    assert paper_multiples(METHODS, 4) == [2, 4] and paper_multiples(METHODS, 2) == [2]  # N = 2: 2B == N*B, one set
    assert paper_multiples(["fedavg", "fedcross"], 4) == [] and paper_multiples(["fedsm"], None) == [2]
    with pytest.raises(ValueError, match="number of sites"):
        paper_multiples(["fedcrossens"], None)
    specs = {s.key: s for s in run_specs(METHODS, matched_steps=True, n_sites=4)}
    matched = {k for k, s in specs.items() if s.group == "matched"}
    assert matched == {matched_key(m, f) for m in ("fedavg", "local", "centralized") for f in (2, 4)}
    assert {"fedavg-2B", "local-4B", "centralized-4B"} <= matched
    assert all(specs[k].protocol == "paper" and specs[k].rounds_factor == int(k[-2]) for k in matched)
    two_sites = {s.key for s in run_specs(METHODS, matched_steps=True, n_sites=2) if s.group == "matched"}
    assert two_sites == {"fedavg-2B", "local-2B", "centralized-2B"}
    assert not any(s.group == "matched" for s in run_specs(METHODS, n_sites=4))  # off unless asked
    assert not any(s.group == "matched" for s in run_specs(METHODS, ("equal",), matched_steps=True, n_sites=4))
    paper_only = {s.key for s in run_specs(METHODS, ("paper",), matched_steps=True, n_sites=4)}
    assert {"fedavg-4B", "centralized-2B"} <= paper_only and "fedsm" not in paper_only

    budget = Budget(4, 2, SITE_STEPS)
    b = budget.total_steps
    for key, f in (("fedavg-2B", 2), ("fedavg-4B", 4), ("local-4B", 4), ("centralized-2B", 2)):
        plan = plan_run(specs[key], budget)
        assert plan.seg_steps_total == f * b and plan.budget_multiple == f, key
        assert plan.rounds == 4 * f and plan.local_epochs == 2, key  # more rounds, the same E
        assert not plan.within_budget and "matched steps" in plan.extra_cost and plan.protocol == "paper"
    assert plan_run(specs["local-4B"], budget).seg_steps_per_site == {s: 4 * budget.site_steps(s) for s in SITE_STEPS}
    assert plan_run(specs["fedavg"], budget).as_dict() == plan_method("fedavg", budget).as_dict()  # equal runs unchanged
    # the FL runner's job: FedAvg's workflow trains R*f rounds
    from fedseg_tools.bench.jobs import method_workflows

    engine = {"spatial_dims": 2, "roi_size": [32, 32], "batch_size": 4, "local_epochs": 2}
    flows, _ = method_workflows("fedavg", plan_run(specs["fedavg-4B"], budget), engine, 0, 0.1)
    assert flows[0]["args"]["num_rounds"] == 16


def test_presets_run_matched_steps_where_they_conclude():
    from fedseg_tools.bench.presets import get_preset
    from fedseg_tools.bench.run import build_parser

    assert get_preset("standard").matched_steps and get_preset("full").matched_steps
    assert not get_preset("smoke").matched_steps
    assert build_parser().parse_args(["--no-matched-steps"]).no_matched_steps


def test_the_runner_trains_matched_baselines_with_more_rounds(tmp_path, monkeypatch):
    """run_dataset: local-only / centralized at f*B in a baseline process of R*f rounds each, recorded under their
    own keys; FedAvg at f*B planned with R*f rounds (here reported missing: no FLARE job runs in this test)."""
    from fedseg import jobgen
    from fedseg_tools.bench import run as run_mod
    from fedseg_tools.bench.presets import get_preset

    for job in ("fedavg", "fedsm"):
        monkeypatch.delitem(jobgen.JOBS, job)
    calls = []

    def fake_baselines(data_dir, engine, preset, inits, seeds, methods, ds_dir, plans, rounds=None, epochs=None):
        calls.append((list(methods), rounds, epochs, ds_dir.name))
        return {
            s: {m: {"method": m, "status": "ok", "plan": plans[m].as_dict(), "rounds": rounds} for m in methods} for s in seeds
        }

    monkeypatch.setattr(run_mod, "run_baselines", fake_baselines)
    preset = get_preset("smoke")
    preset.matched_steps = True
    spec = preset.datasets["synth2d"]
    data, _ = run_mod.prepare_dataset(spec, tmp_path / "data")
    (cell,) = run_mod.run_dataset("synth2d", data, spec, preset, ["local", "centralized", "fedavg", "fedsm"], tmp_path / "ds")
    r, e = preset.rounds, preset.epochs
    assert calls == [(["local", "centralized"], r, e, "ds"), (["local", "centralized"], 2 * r, e, "steps-2B")]  # N = 2
    methods = cell["methods"]
    assert {"local-2B", "centralized-2B", "fedavg-2B"} <= set(methods) and "local-4B" not in methods
    assert methods["local-2B"]["group"] == "matched" and methods["local-2B"]["rounds"] == 2 * r
    assert methods["centralized-2B"]["plan"]["seg_steps_total"] == 2 * cell["budget"]["total_steps"]
    assert methods["fedavg-2B"]["status"] == "missing" and methods["fedavg-2B"]["plan"]["rounds"] == 2 * r
    assert cell["runs"]["fedavg-2B"]["rounds_factor"] == 2


# ---- the report ----------------------------------------------------------------------------------------------
HEADLINE = {"fedsm": "FedSM super model", "fedcrossens": "ensemble", "local": "local (own site)", "centralized": "centralized"}


def _rec(key: str, per_site: dict, multiple: int = 1) -> dict:
    method = key.split("-")[0]
    group = "matched" if key.endswith("B") else "main"
    model = HEADLINE.get(method, "global (best)")
    return {
        "method": method,
        "status": "ok",
        "protocol": "paper" if multiple > 1 else "equal",
        "group": group,
        "headline_model": model,
        "plan": {
            "seg_steps_total": 100 * multiple,
            "budget_multiple": float(multiple),
            "rounds": 4 * multiple if group == "matched" else 4,
            "local_epochs": 2,
            "protocol": "paper" if multiple > 1 else "equal",
        },
        "seg_steps": 100 * multiple,
        "results": {"models": {model: {s: {"dice": d} for s, d in per_site.items()}}},
        "curve": [],
    }


def _cells(with_matched: bool = True) -> list[dict]:
    """3 seeds, 2 sites; site b is the weak one. Gap 0.2 at B, 2B and 4B; FedSM paper closes 50%, 40%, 60%."""
    cells = []
    for seed in range(3):
        runs = {
            "fedavg": ({"a": 0.70, "b": 0.50}, 1),  # mean 0.60
            "centralized": ({"a": 0.85, "b": 0.75}, 1),  # mean 0.80
            "local": ({"a": 0.80, "b": 0.60}, 1),  # 0.70: 50%
            "fedsm": ({"a": 0.75, "b": 0.55}, 1),  # 0.65: 25%
            "fedsm-paper": ({"a": 0.80, "b": 0.60 + (0.0, -0.02, 0.02)[seed] * 2}, 2),  # 0.70 + (0, -0.02, 0.02)
            "fedcrossens": ({"a": 0.72, "b": 0.48}, 1),  # 0.60: 0%
            "fedcrossens-paper": ({"a": 0.90, "b": 0.60}, 4),  # 0.75
        }
        if with_matched:
            runs.update(
                {
                    "fedavg-2B": ({"a": 0.70, "b": 0.50}, 2),
                    "centralized-2B": ({"a": 0.90, "b": 0.70}, 2),
                    "local-2B": ({"a": 0.90, "b": 0.60}, 2),  # 0.75: 75%
                    "fedavg-4B": ({"a": 0.70, "b": 0.50}, 4),
                    "centralized-4B": ({"a": 0.90, "b": 0.70}, 4),  # FedCrossEns paper 0.75: 75%
                }
            )
        cells.append(
            {
                "dataset": "d",
                "seed": seed,
                "sites": ["a", "b"],
                "budget": {"rounds": 4, "epochs": 2, "total_steps": 100},
                "methods": {k: _rec(k, ps, f) for k, (ps, f) in runs.items()},
            }
        )
    return cells


def _markdown(cells) -> str:
    from fedseg_tools.bench.benchmark_report import markdown
    from fedseg_tools.bench.benchmark_report.facts import by_dataset

    run = {"protocols": ["equal", "paper"], "seeds": [0, 1, 2], "preset": "standard", "conclusive": True}
    return markdown(run, cells, None, by_dataset(cells), {}, "")


def test_report_shows_matched_baselines_worst_site_and_gap_closed():
    from fedseg_tools.bench.benchmark_report.facts import headline_facts
    from fedseg_tools.bench.gap_report import gap_rows
    from fedseg_tools.bench.report_data import aggregate, protocol_rows

    cells = _cells()
    assert aggregate(cells, "fedavg")["worst"] == [0.5, 0.5, 0.5]  # per seed: the minimum over sites
    paper = [k for k, _ in protocol_rows(cells, "paper")]
    assert paper[-5:] == ["fedavg-2B", "local-2B", "centralized-2B", "fedavg-4B", "centralized-4B"]
    rows = {r["key"]: r for r in gap_rows(cells)}
    assert set(rows) == {"local", "fedsm", "fedcrossens", "fedsm-paper", "fedcrossens-paper", "local-2B"}
    assert rows["fedsm"]["summary"]["closed"] == pytest.approx(0.25) and rows["local"]["summary"]["closed"] == pytest.approx(
        0.5
    )
    assert rows["fedsm-paper"]["baselines"] == ("fedavg-2B", "centralized-2B")
    assert rows["fedsm-paper"]["summary"]["per_seed"] == pytest.approx({0: 0.5, 1: 0.4, 2: 0.6})
    assert rows["fedcrossens-paper"]["baselines"] == ("fedavg-4B", "centralized-4B")
    assert rows["fedcrossens-paper"]["summary"]["closed"] == pytest.approx(0.75)
    assert rows["local-2B"]["summary"]["closed"] == pytest.approx(0.75)
    assert [r["key"] for r in headline_facts(cells)["gap_closed"]] == list(rows)

    md = _markdown(cells)
    assert "| FedAvg, 2B steps (matched) | global (best) |" in md and "| Centralized, 4B steps (matched) |" in md
    assert "No matched-step baselines in this run" not in md and "no matched-step baselines" not in md
    # worst site next to the mean over sites: protocol tables and the headline table
    assert "| mean over sites | worst site | steps used / B |" in md and "| d | d worst site |" in md
    assert "| FedAvg | global (best) | 0.700 ± 0.000 | 0.500 ± 0.000 | **0.600 ± 0.000** | 0.500 ± 0.000 |" in md
    assert (
        "| FedSM (paper protocol) | FedSM super model | 0.800 ± 0.000 | 0.600 ± 0.040 | **0.700 ± 0.020** | 0.600 ± 0.040 |"
        in md
    )
    assert "| FedSM (paper protocol) | 0.700 ± 0.020 (2B) | 0.600 ± 0.040 |" in md  # the headline table
    assert "| FedAvg, 4B steps (matched) | global (best) | 0.700 | 0.500 | 0.600 ± 0.000 | 0.500 ± 0.000 |" in md  # every model
    assert "| Local only, 2B steps (matched) | paper | R·f = 8 rounds × 2 epochs" in md  # the budget table
    # the gap-closed section comes before the protocol tables of the dataset, and in the headline
    section = md.split("## d\n", 1)[1]
    assert section.index("**Gap closed on d**") < section.index("**Equal steps")
    assert (
        "| FedSM (paper protocol) | paper protocol | 2B | FedAvg, 2B steps (matched) / Centralized, 2B steps (matched) |" in md
    )
    assert "| +20.0 ± 0.0 points (3 seeds) | 50% ± 6% |" in md
    headline = md.split("## Headline", 1)[1].split("## d\n", 1)[0]
    assert "Share of the centralized − FedAvg gap closed" in headline
    assert "equal steps (B; centralized − FedAvg +20.0 ± 0.0 points (3 seeds)): Local only 50% ± 0%, FedSM 25% ± 0%" in headline
    assert "paper protocol (2B; centralized − FedAvg +20.0 ± 0.0 points (3 seeds)): FedSM (paper protocol) 50% ± 6%" in headline
    assert (
        "paper protocol (4B; centralized − FedAvg +20.0 ± 0.0 points (3 seeds)): FedCrossEns (paper protocol) 75% ± 0%"
        in headline
    )


def test_report_without_matched_runs_says_so():
    from fedseg_tools.bench.gap_report import gap_rows

    cells = _cells(with_matched=False)
    rows = {r["key"]: r for r in gap_rows(cells)}
    assert rows["fedsm-paper"]["summary"] is None and rows["fedsm"]["summary"]["closed"] == pytest.approx(0.25)
    md = _markdown(cells)
    assert "No matched-step baselines in this run" in md
    assert "| FedSM (paper protocol) | paper protocol | 2B | - (not run) | - | no matched-step baselines in this run |" in md
    assert "paper protocol (2B): no matched-step baselines in this run" in md
    # a gap within noise: no share
    noisy = _cells(with_matched=False)
    for c, d in zip(noisy, (0.05, -0.03, 0.01)):
        c["methods"]["centralized"] = _rec("centralized", {"a": 0.70 + d, "b": 0.50 + d})
    assert "equal steps (B; centralized − FedAvg +1.0 ± 2.3 points (3 seeds)): gap within noise" in _markdown(noisy)


@pytest.mark.slow
def test_report_only_renders_the_published_raw_results(tmp_path):
    """The committed raw results have no matched-step runs: the report still renders, and says so."""
    out = tmp_path / "out"
    shutil.copytree(REPO / "docs" / "benchmarks" / "raw", out / "raw")
    proc = subprocess.run(
        [sys.executable, "-m", "fedseg_tools.bench", "--report-only", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    md = (out / "BENCHMARKS.md").read_text()
    assert "No matched-step baselines in this run" in md and "**Gap closed on synth2d**" in md
    assert "| mean over sites | worst site |" in md and "Share of the centralized − FedAvg gap closed" in md


@pytest.mark.slow
def test_publishing_replaces_the_previous_report_and_keeps_the_other_measurements(tmp_path):
    """--publish writes BENCHMARKS.md and docs/benchmarks/: the previous report's raw files and plots are replaced,
    a note or a measurement kept beside them (a pilot table, the robustness run) is not deleted."""
    from fedseg_tools.bench.benchmark_report import publish

    out, repo = tmp_path / "out", tmp_path / "repo"
    shutil.copytree(REPO / "docs" / "benchmarks" / "raw", out / "raw")
    (out / "raw" / "cost.json").unlink(missing_ok=True)
    kept = repo / "docs" / "benchmarks"
    (kept / "raw").mkdir(parents=True)
    (kept / "pilot_table.md").write_text("a pilot")
    (kept / "raw" / "pilot.json").write_text("{}")
    (kept / "raw" / "cost.json").write_text('{"from": "the previous run"}')
    (kept / "old_plot.png").write_bytes(b"png")
    written = publish(out, repo)
    assert (kept / "pilot_table.md").read_text() == "a pilot" and (kept / "raw" / "pilot.json").exists()
    assert not (kept / "raw" / "cost.json").exists() and not (kept / "old_plot.png").exists()
    assert (kept / "raw" / "results.json").read_bytes() == (out / "raw" / "results.json").read_bytes()
    assert (repo / "BENCHMARKS.md") in written and "## Raw data" in (repo / "BENCHMARKS.md").read_text()


def test_the_headline_holds_a_paper_protocol_run_against_fedavg_at_the_same_steps():
    """A 2B run is compared with FedAvg at 2B when that run exists, and the sentence says so; without it, FedAvg at B."""
    from fedseg_tools.bench.benchmark_report.facts import headline_facts
    from fedseg_tools.bench.benchmark_report.headline_section import headline_sentences

    cells = _cells(with_matched=True)
    facts = headline_facts(cells)
    assert facts["fedsm"]["reference"] == {"equal": "fedavg", "paper": "fedavg-2B"}
    assert facts["fedcrossens"]["reference"] == {"equal": "fedavg", "paper": "fedavg-4B"}
    text = " ".join(headline_sentences("d", cells))
    assert "(FedAvg at the same 2B steps)" in text
    plain = _cells(with_matched=False)
    assert all(ref == "fedavg" for ref in headline_facts(plain)["fedsm"]["reference"].values())
    assert "FedAvg at the same" not in " ".join(headline_sentences("d", plain))
