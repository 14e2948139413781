"""Merging benchmark runs that split a preset's seeds, and the GPU variant's table (pure functions + the report)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from fedseg_tools.bench.gpu import gpu_rows
from fedseg_tools.bench.merge import MergeError, merge_results

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_RAW = REPO / "docs" / "benchmarks" / "raw"


def _part(seeds, **run_changes):
    run = {
        "preset": "standard",
        "rounds": 24,
        "epochs": 2,
        "methods": ["fedavg"],
        "protocols": ["equal"],
        "lr_schedule": "constant",
        "seeds": seeds,
        "command": f"bench --seeds {seeds}",
        "seconds": 100.0,
        "cpu_seconds": 150.0,
        "started": f"s{seeds[0]}",
        "finished": f"f{seeds[0]}",
        "datasets": {
            "a": {"kind": "synthetic", "engine": {"batch_size": 4}, "rounds": 24, "epochs": 2},
            "b": {"kind": "polyp", "engine": {"batch_size": 4}, "rounds": 24, "epochs": 2},
        },
    }
    run.update(run_changes)
    cells = [{"dataset": ds, "seed": s, "methods": {}} for s in seeds for ds in ("b", "a")]
    return {"run": run, "cells": cells}


def test_merge_unions_seeds_and_keeps_every_part():
    merged = merge_results([("p0", _part([0])), ("p12", _part([1, 2]))])
    run = merged["run"]
    assert run["seeds"] == [0, 1, 2]
    assert [(c["dataset"], c["seed"]) for c in merged["cells"]] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert [p["label"] for p in run["merged_from"]] == ["p0", "p12"]
    assert run["seconds"] == 200.0 and run["started"] == "s0" and run["finished"] == "f1"
    assert "bench --seeds [0]" in run["command"] and "bench --seeds [1, 2]" in run["command"]


@pytest.mark.parametrize(
    "change", [{"rounds": 20}, {"protocols": ["equal", "paper"]}, {"lr_schedule": "poly"}, {"methods": ["fedavg", "fedsm"]}]
)
def test_merge_refuses_a_different_benchmark(change):
    key = next(iter(change))
    with pytest.raises(MergeError, match=f"'{key}'"):
        merge_results([("p0", _part([0])), ("p12", _part([1, 2], **change))])


def test_merge_refuses_different_datasets_and_duplicate_cells():
    other = _part([1])
    other["run"]["datasets"]["a"]["engine"] = {"batch_size": 8}
    with pytest.raises(MergeError, match="datasets"):
        merge_results([("p0", _part([0])), ("p1", other)])
    with pytest.raises(MergeError, match="seed 0 is also in p0"):
        merge_results([("p0", _part([0])), ("again", _part([0, 1]))])
    with pytest.raises(MergeError, match="at least two"):
        merge_results([("p0", _part([0]))])


def _gpu_cell():
    site = lambda a, b: {"site-1": a, "site-2": b}  # noqa: E731
    rec = lambda wall, steps, secs, gpu: {  # noqa: E731
        "status": "ok",
        "wall_seconds": wall,
        "seg_steps": sum(steps.values()),
        "site_seg_steps": steps,
        "site_train_task_seconds": secs,
        "gpu_memory": gpu,
    }
    return {
        "cells": [
            {
                "dataset": "synth2d",
                "budget": {"batch_size": 4},
                "methods": {
                    "fedavg": rec(40.0, site(10, 20), site(2.0, 4.0), site(2**20, 3 * 2**20)),
                    "fedcross": rec(100.0, site(15, 15), site(1.0, 0.0), site(5 * 2**20, 5 * 2**20)),
                    "fedsm": {"status": "missing"},
                },
            }
        ]
    }


def test_gpu_rows_ratios_and_rates():
    rows = {r["method"]: r for r in gpu_rows(_gpu_cell())}
    assert set(rows) == {"fedavg", "fedcross"}  # a missing run is left out, not reported as zero
    assert rows["fedavg"]["x_fedavg"] == 1.0 and rows["fedcross"]["x_fedavg"] == 2.5
    assert rows["fedavg"]["train_images_per_second"] == {"site-1": 20.0, "site-2": 20.0}
    assert rows["fedcross"]["train_images_per_second"] == {"site-1": 60.0}  # no training seconds: no rate
    failed = {"cells": [{"dataset": "synth2d", "error": "boom", "methods": {}}]}
    with pytest.raises(RuntimeError, match="boom"):
        gpu_rows(failed)


@pytest.mark.skipif(not (PUBLISHED_RAW / "results.json").exists(), reason="no published benchmark raw results")
def test_report_shows_merged_parts_and_the_gpu_table(tmp_path):
    from fedseg_tools.bench.benchmark_report import write_report

    raw = tmp_path / "raw"
    raw.mkdir()
    published = json.loads((PUBLISHED_RAW / "results.json").read_text())
    second = copy.deepcopy(published)
    for cell in second["cells"]:
        cell["seed"] = cell["seed"] + 100  # seeds the published run does not have
    second["run"]["command"] = "the second part"
    merged = merge_results([("first", published), ("second", second)])
    (raw / "results.json").write_text(json.dumps(merged))
    if (PUBLISHED_RAW / "cost.json").exists():
        shutil.copy2(PUBLISHED_RAW / "cost.json", raw / "cost.json")
    gpu = {"command": "python -m fedseg_tools.bench.gpu --out X", "machine": {"gpu": "Test GPU"}, "rows": gpu_rows(_gpu_cell())}
    (raw / "gpu.json").write_text(json.dumps(gpu))
    md = write_report(raw, tmp_path / "out").read_text()
    assert "Merged part" in md and "the second part" in md
    gpu_part = md[md.index("## GPU") :]
    assert "Test GPU" in gpu_part and "| fedcross | synth2d | 100.0 | 2.50 | 5 MiB | 60 |" in gpu_part
    assert "not run on a GPU" not in md
