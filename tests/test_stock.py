"""NVFlare's stock CyclicRecipe and FedAvgRecipe on FedSeg's engine (fedseg_tools.bench.stock), run for real in SimEnv."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import psutil
import pytest
from conftest import TINY_ENGINE, in_parallel

SITES = ["site-1", "site-2"]  # 2 sites: the model still travels (Cyclic) and is averaged (FedAvg)


# ---- pure logic ---------------------------------------------------------------------------------------------
def test_plan_visits_cycles_sites_in_the_given_order():
    from fedseg_tools.bench.stock import plan_visits

    assert plan_visits("nvflare_cyclic", ["b", "a"], 2) == [(0, "b"), (0, "a"), (1, "b"), (1, "a")]
    with pytest.raises(ValueError, match="rounds"):
        plan_visits("nvflare_cyclic", ["a", "b"], 0)
    with pytest.raises(ValueError, match="at least 2 distinct sites"):
        plan_visits("nvflare_fedavg", ["a"], 1)
    with pytest.raises(ValueError, match="unknown stock method"):
        plan_visits("cyclic", ["a", "b"], 1)


def test_check_steps_names_missing_and_unknown_sites():
    from fedseg_tools.bench.stock import check_steps

    assert check_steps(["a", "b"], {"a": 2, "b": 3}) == {"a": 2, "b": 3}
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        check_steps(["a", "b"], {"a": 2, "c": 3})
    with pytest.raises(ValueError, match=">= 1 step"):
        check_steps(["a", "b"], {"a": 2, "b": 0})


def test_visit_problems_report_a_skipped_site():
    from fedseg_tools.bench.stock import plan_visits, visit_problems

    plan = plan_visits("nvflare_cyclic", ["s1", "s2", "s3"], 1)
    records = [{"site": s, "task": "train", "round": 0, "t_in": i} for i, s in enumerate(["s1", "s3"])]
    problems = visit_problems("nvflare_cyclic", plan, ["s1", "s3"], records)
    assert any("received 2 training results, planned 3" in p for p in problems)
    assert any("['s1', 's3'], planned in this order: ['s1', 's2', 's3']" in p for p in problems)
    full = records[:1] + [{"site": "s2", "task": "train", "round": 0, "t_in": 0.5}] + records[1:]
    assert visit_problems("nvflare_cyclic", plan, ["s1", "s2", "s3"], full) == []
    fedavg = plan_visits("nvflare_fedavg", ["s1", "s2"], 1)
    assert visit_problems("nvflare_fedavg", fedavg, ["s2"], records[:1]) != []


# ---- real runs ------------------------------------------------------------------------------------------------
def _survivors(folder: Path) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if str(folder) in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture(scope="module")
def stock_runs(tiny2d, tmp_path_factory):
    """Both stock recipes on 2 of the tiny sites from the same seeded checkpoint, plus a run whose first site has a
    broken datalist (all three side by side: they mostly wait)."""
    from fedseg_tools.bench.jobs import save_initial_checkpoint
    from fedseg_tools.bench.stock import StockRunError, run_stock

    root = tmp_path_factory.mktemp("stock")
    init = save_initial_checkpoint(root / "init.pt", TINY_ENGINE, seed=3)
    broken = root / "broken"
    shutil.copytree(tiny2d, broken)
    (broken / "site-1" / "datalist.json").write_text("{not json")

    def failing():
        try:
            run_stock(
                "nvflare_cyclic",
                broken,
                ["site-1", "site-2"],
                TINY_ENGINE,
                init,
                1,
                {"site-1": 1, "site-2": 1},
                3,
                root / "fail",
                timeout=300,
            )
        except StockRunError as e:
            return e
        return None

    runs = in_parallel(
        cyclic=lambda: run_stock(
            "nvflare_cyclic", tiny2d, SITES, TINY_ENGINE, init, 1, dict.fromkeys(SITES, 2), 3, root / "cyclic", timeout=600
        ),
        fedavg=lambda: run_stock(
            "nvflare_fedavg", tiny2d, SITES, TINY_ENGINE, init, 2, dict.fromkeys(SITES, 1), 3, root / "fedavg", timeout=600
        ),
        failing=failing,
    )
    return {"root": root, "init": init, **runs}


def _init_scores(tiny2d, init, section="validation"):
    from fedseg.engine.config import resolve_engine
    from fedseg_tools.bench.stock import load_checkpoint_state, score_state, site_engines

    engines = site_engines(Path(tiny2d), SITES, resolve_engine({**TINY_ENGINE, "seed": 3}))
    return {s: v["dice"] for s, v in score_state(load_checkpoint_state(init), engines, section).items()}, engines


def _n_test_cases(tiny2d, site):
    return len(json.loads((Path(tiny2d) / site / "datalist.json").read_text())["testing"])


def test_stock_cyclic_visits_every_site_in_order_from_the_given_checkpoint(stock_runs, tiny2d):
    res = stock_runs["cyclic"]
    extra = res["extra"]
    assert res["method"] == "nvflare_cyclic" and res["section"] == "testing"
    assert extra["visits"] == 2 and extra["seg_steps"] == 4
    assert [(h["round"], h["site"], h["steps"]) for h in extra["history"]] == [(0, s, 2) for s in SITES]
    assert list(res["models"]) == ["global (last)"]  # the stock Cyclic keeps no best model
    assert "last" in extra["model_selection"] and f"site {SITES[-1]})" in extra["model_selection"]
    for site in SITES:
        scores = res["models"]["global (last)"][site]
        assert scores["n_cases"] == _n_test_cases(tiny2d, site) == len(scores["dice_per_case"])
        assert 0.0 <= scores["dice"] <= 1.0
    # the first site scored the model the server sent: the given initial checkpoint
    init_val, _ = _init_scores(tiny2d, stock_runs["init"])
    assert extra["history"][0]["val_dice"] == pytest.approx(init_val["site-1"], abs=1e-5)
    # the model moved on from site to site: the next site received a trained model, not the checkpoint
    assert extra["history"][1]["val_dice"] != pytest.approx(init_val["site-2"], abs=1e-5)
    assert sorted(extra["final_validation_dice"]) == SITES
    assert extra["curve"][-1] == pytest.approx([1.0, sum(extra["final_validation_dice"].values()) / len(SITES)])
    assert (
        json.loads((stock_runs["root"] / "cyclic" / "nvflare_cyclic" / "fedseg_results.json").read_text())["models"]
        == res["models"]
    )
    assert _survivors(stock_runs["root"] / "cyclic") == []


def test_stock_fedavg_rounds_best_model_and_initial_checkpoint(stock_runs, tiny2d):
    from fedseg_tools.bench.stock import load_checkpoint_state, score_state

    res = stock_runs["fedavg"]
    extra = res["extra"]
    assert extra["visits"] == 4 and extra["seg_steps"] == 4
    assert sorted((h["round"], h["site"]) for h in extra["history"]) == [(r, s) for r in (0, 1) for s in SITES]
    init_val, engines = _init_scores(tiny2d, stock_runs["init"])
    round0 = {h["site"]: h["val_dice"] for h in extra["history"] if h["round"] == 0}
    assert round0 == pytest.approx(init_val, abs=1e-5)  # every site received the given checkpoint
    round1 = {h["site"]: h["val_dice"] for h in extra["history"] if h["round"] == 1}
    assert round1 != pytest.approx(init_val, abs=1e-5)
    assert [p[0] for p in extra["curve"]] == [0.0, 0.5, 1.0]
    # the stock IntimeModelSelector's best model is the global model sent in round 1 (round 0 is never a candidate)
    assert set(res["models"]) == {"global (last)", "global (best)"} and extra["best_round"] == 1
    best_file = Path(extra["workspace"]) / "server" / "simulate_job" / "app_server" / "best_FL_global_model.pt"
    best_val = score_state(load_checkpoint_state(best_file), engines, "validation")
    assert {s: v["dice"] for s, v in best_val.items()} == pytest.approx(round1, abs=1e-5)
    for model in res["models"].values():
        assert sorted(model) == SITES and all(math.isfinite(v["dice"]) for v in model.values())
    assert _survivors(stock_runs["root"] / "fedavg") == []


def test_stock_run_with_a_failing_site_raises_and_leaves_no_process(stock_runs):
    error = stock_runs["failing"]
    assert error is not None, "a run whose site-1 cannot read its datalist must raise StockRunError"
    text = str(error)
    assert "planned 2" in text and "site-1" in text and "invalid JSON" in text
    assert _survivors(stock_runs["root"] / "fail") == []
