"""Leave-one-centre-out in the benchmark (fedseg_tools.bench.unseen, unseen_report): the pure parts, and one smoke run on
3 tiny sites with one held out, whose deployable models are scored on the unseen centre."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CUSTOM, REPO

from fedseg_tools.bench.presets import DatasetSpec, get_preset
from fedseg_tools.bench.unseen import (
    add_loco_datasets,
    dataset_centres,
    federation_dir,
    holdout_preset,
    loco_specs,
    routed_case_dice,
    routing_counts,
    seen_global_share,
    seen_mean,
)
from fedseg_tools.bench.unseen_report import unseen_section


# ---- pure ------------------------------------------------------------------------------------------------
def test_super_model_takes_each_case_from_the_model_it_was_routed_to():
    case_dice = {"global": np.array([0.1, 0.2, 0.3]), "a": np.array([0.5, 0.6, 0.7])}
    chosen = ["a", "global", "a"]
    assert routed_case_dice(case_dice, chosen).tolist() == [0.5, 0.2, 0.7]
    counts = routing_counts(chosen, ["a", "b"])
    assert counts == {"a": 2, "b": 0, "global": 1} and sum(counts.values()) == len(chosen)


def test_seen_numbers_come_from_the_runs_own_evaluation():
    rec = {
        "headline_model": "FedSM super model",
        "results": {
            "models": {
                "FedSM super model": {"a": {"dice": 0.4}, "b": {"dice": 0.6}},
                "FedSM global": {"a": {"dice": 0.2}, "b": {"dice": float("nan")}},
            },
            "extra": {"routing": {"a": {"a": 3, "b": 0, "global": 1}, "b": {"a": 0, "b": 2, "global": 2}}},
        },
    }
    assert seen_mean(rec) == pytest.approx(0.5) and seen_mean(rec, "FedSM global") == pytest.approx(0.2)
    assert seen_global_share(rec) == pytest.approx(3 / 8)
    assert math.isnan(seen_global_share({})) and math.isnan(seen_mean({}))


def test_loco_cells_are_the_same_data_without_one_centre():
    polyp = DatasetSpec("polyp", "polyp", {}, source="/nowhere", options={"sites": ["A", "B", "C"], "seed": 0})
    synth = DatasetSpec("s", "synthetic", {}, options={"n_sites": 3})
    assert dataset_centres(synth) == ["site-1", "site-2", "site-3"]
    specs = loco_specs(polyp)
    assert sorted(specs) == ["polyp_loco_A", "polyp_loco_B", "polyp_loco_C"]
    b = specs["polyp_loco_B"]
    assert b.holdout == "B" and b.options == polyp.options and b.source == polyp.source and not b.ablation
    # the preset flag: every polyp dataset, one cell per centre; --holdout: the named centres of any dataset
    assert sorted(add_loco_datasets({"polyp": polyp, "s": synth}, True, None)) == sorted(specs)
    assert sorted(add_loco_datasets({"polyp": polyp, "s": synth}, False, ["site-2"])) == ["s_loco_site-2"]
    assert add_loco_datasets({"polyp": polyp, "s": synth}, False, None) == {}
    with pytest.raises(SystemExit, match="no dataset has such a centre"):
        add_loco_datasets({"s": synth}, False, ["Z"])
    assert get_preset("standard").loco and not get_preset("quick").loco and not get_preset("smoke").loco
    p = holdout_preset(get_preset("standard"))
    assert not (p.fedsm_ablation or p.optimizer_measure or p.matched_steps or p.stock or p.tuning)


def test_federation_folder_links_only_the_other_centres(tmp_path):
    for site in ("a", "b", "c"):
        (tmp_path / "data" / site / "imagesTr").mkdir(parents=True)
        (tmp_path / "data" / site / "datalist.json").write_text("{}")
        (tmp_path / "data" / site / "imagesTr" / "x.nii.gz").write_bytes(b"x")
    fed = federation_dir(tmp_path / "data", "b", tmp_path / "fed")
    assert sorted(p.name for p in fed.iterdir()) == ["a", "c"]
    src, dst = tmp_path / "data" / "a" / "imagesTr" / "x.nii.gz", fed / "a" / "imagesTr" / "x.nii.gz"
    assert dst.is_file() and not dst.is_symlink() and dst.stat().st_ino == src.stat().st_ino  # a hard link
    with pytest.raises(FileNotFoundError, match="no centre 'z'"):
        federation_dir(tmp_path / "data", "z", tmp_path / "fed2")


def _cell(seed: int, dice: float, share: float) -> dict:
    return {
        "dataset": "d_loco_c",
        "seed": seed,
        "sites": ["a", "b"],
        "methods": {"fedsm": {"method": "fedsm", "protocol": "equal", "group": "main", "status": "ok"}},
        "unseen": {
            "centre": "c",
            "seen_sites": ["a", "b"],
            "n_cases": 4,
            "runs": {
                "fedsm": {
                    "method": "fedsm",
                    "dice": dice,
                    "seen_dice": 0.8,
                    "global_share": share,
                    "seen_global_share": 0.0,
                    "global": {"dice": 0.3},
                    "seen_global_dice": 0.7,
                }
            },
        },
    }


def test_unseen_section_has_one_table_per_held_out_centre():
    text = "\n".join(unseen_section({"d_loco_c": [_cell(0, 0.4, 0.5), _cell(1, 0.6, 1.0)], "d": [{"seed": 0}]}))
    assert "## Unseen centre (leave-one-centre-out)" in text and "### Unseen centre c (`d_loco_c`: trained on a, b)" in text
    assert "| FedSM: super model | 0.500 ± 0.141 | 0.800 ± 0.000 | 0.75 / 0.00 | - |" in text
    assert "| FedSM: global model alone | 0.300 ± 0.000 | 0.700 ± 0.000 | - | - |" in text
    assert unseen_section({"d": [{"seed": 0, "methods": {}}]}) == []


# ---- end to end: the smoke preset on 3 tiny sites, site-3 held out ---------------------------------------------
@pytest.mark.slow
def test_smoke_run_scores_every_deployable_model_on_the_unseen_centre(tiny2d, tmp_path):
    out = tmp_path / "out"
    methods = ["fedavg", "fedsm", "fedcrossens", "local", "centralized"]
    cmd = [sys.executable, "-m", "fedseg_tools.bench", "--preset", "smoke", "--out", str(out), "--data-dir", str(tiny2d)]
    cmd += ["--holdout", "site-3", "--datasets", "tiny2d_loco_site-3", "--protocols", "equal", "--methods", *methods]
    env = {**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (cell,) = json.loads((out / "raw" / "results.json").read_text())["cells"]
    assert cell["holdout"] == "site-3" and cell["sites"] == ["site-1", "site-2"]
    ws = out / "runs" / "tiny2d_loco_site-3" / "ws" / "bench_all"
    assert (ws / "site-1").is_dir() and not (ws / "site-3").exists()  # the held-out centre never joined
    n_test = len(json.loads((tiny2d / "site-3" / "datalist.json").read_text())["testing"])
    runs = cell["unseen"]["runs"]
    assert sorted(runs) == sorted(methods)
    for key, run in runs.items():
        assert "error" not in run, (key, run)
        assert math.isfinite(run["dice"]) and 0 <= run["dice"] <= 1 and math.isfinite(run["seen_dice"]), (key, run)
        assert run["n_cases"] == n_test, key
    fedsm = runs["fedsm"]
    assert sorted(fedsm["routing"]) == ["global", "site-1", "site-2"] and sum(fedsm["routing"].values()) == n_test
    assert 0 <= fedsm["global_share"] <= 1 and math.isfinite(fedsm["global"]["dice"])
    ens = runs["fedcrossens"]
    assert ens["members"] == 2 and math.isfinite(ens["uncertainty"]["unseen"]) and math.isfinite(ens["uncertainty"]["seen"])
    assert sorted(runs["local"]["per_model"]) == ["site-1", "site-2"]
    assert runs["local"]["best_dice"] == max(r["dice"] for r in runs["local"]["per_model"].values())
    md = (out / "BENCHMARKS.md").read_text()
    assert "## Unseen centre (leave-one-centre-out)" in md and "### Unseen centre site-3" in md
