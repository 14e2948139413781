"""The benchmark's real-data pieces: the frame-split leakage row, the pilot's arithmetic, group files that travel
with downscaled pictures, and per-dataset method lists."""

from __future__ import annotations

import math

import pytest
from test_bench_gap import _rec

from fedseg_tools.bench.pilot import mean_se, summarise, tail_gain


def _cell(dataset: str, seed: int, dice: dict[str, dict[str, float]]) -> dict:
    return {
        "dataset": dataset,
        "seed": seed,
        "sites": ["a", "b"],
        "budget": {"rounds": 4, "epochs": 2, "total_steps": 100},
        "methods": {k: _rec(k, ps) for k, ps in dice.items()},
    }


def test_leakage_section_compares_the_frame_split_with_the_sequence_split():
    from fedseg_tools.bench.benchmark_report import markdown
    from fedseg_tools.bench.benchmark_report.facts import by_dataset

    cells = [_cell("polyp", s, {"fedavg": {"a": 0.50, "b": 0.40 + 0.02 * s}}) for s in range(2)]
    cells += [_cell("polyp_frames", s, {"fedavg": {"a": 0.70, "b": 0.60 + 0.02 * s}}) for s in range(2)]
    run = {
        "protocols": ["equal"],
        "seeds": [0, 1],
        "preset": "standard",
        "conclusive": True,
        "datasets": {"polyp": {"leakage_of": ""}, "polyp_frames": {"leakage_of": "polyp"}},
    }
    text = markdown(run, cells, None, by_dataset(cells), {}, "")
    section = text.split("### Leakage: polyp split by video sequence vs by frame")[1].split("##")[0]
    row = next(line for line in section.splitlines() if line.startswith("| FedAvg"))
    assert "0.455 ± 0.007" in row and "0.655 ± 0.007" in row and "+0.200" in row
    run["datasets"]["polyp_frames"]["leakage_of"] = ""  # no declared pair: no section
    assert "### Leakage" not in markdown(run, cells, None, by_dataset(cells), {}, "")


def test_pilot_gap_standard_error_and_curve_tail():
    assert mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    assert math.isnan(mean_se([0.5])[1])
    assert tail_gain([(0.0, 0.1), (0.5, 0.5), (0.75, 0.6), (1.0, 0.62)]) == pytest.approx(0.02)

    def record(local: dict, central: dict) -> dict:
        def method(name, model, per_site):
            models = {model: {s: {"dice": d} for s, d in per_site.items()}}
            return {"results": {"models": models}, "curve": [(0.0, 0.1), (0.75, 0.5), (1.0, 0.5)], "cpu_seconds": 1.0}

        return {"local": method("local", "local (own site)", local), "centralized": method("c", "centralized", central)}

    seeds = {str(s): record({"a": 0.5, "b": 0.3}, {"a": 0.6 + 0.01 * s, "b": 0.5}) for s in range(3)}
    row = summarise({"image_size": 64, "max_cases": 0, "rounds": 4, "epochs": 1, "total_steps": 10}, seeds)
    assert row["gap"] == pytest.approx(0.155) and row["conclusive"] and row["local_worst"][0] == pytest.approx(0.3)
    assert row["local_tail_gain"] == pytest.approx(0.0) and row["cpu_seconds"] == 6.0


def test_downscaled_pictures_keep_their_group_file(tmp_path):
    from PIL import Image

    from fedseg_tools.bench.run import downscale_pictures

    for kind in ("images", "masks"):
        (tmp_path / "src" / "A" / kind).mkdir(parents=True)
        Image.new("L" if kind == "masks" else "RGB", (40, 20)).save(tmp_path / "src" / "A" / kind / "1.png")
    (tmp_path / "src" / "A" / "sequence.csv").write_text("stem,video_sequence\n1,7\n")
    downscale_pictures(tmp_path / "src", tmp_path / "dst", 16)
    assert (tmp_path / "dst" / "A" / "sequence.csv").read_text() == "stem,video_sequence\n1,7\n"


def test_a_dataset_can_run_a_subset_of_the_methods_without_peers():
    from fedseg_tools.bench.presets import DatasetSpec, get_preset
    from fedseg_tools.bench.run import cell_specs

    preset = get_preset("standard")
    full = DatasetSpec("d", "synthetic", {}, ablation=False)
    only = DatasetSpec("d", "synthetic", {}, ablation=False, methods=["fedavg"])
    assert any(s.group == "stock" for s in cell_specs(preset, full, list(preset.methods), 3))
    assert [s.key for s in cell_specs(preset, only, ["fedavg"], 3)] == ["fedavg"]


@pytest.mark.slow
def test_selector_study_trains_the_federated_and_the_central_selector(tiny2d, tmp_path):
    """The in-process FedSM selector protocol against the same network trained centrally, on 3 tiny sites."""
    import json

    from fedseg_tools.bench.selector_study import main

    out = tmp_path / "study.json"
    engine = json.dumps({"spatial_dims": 2, "in_channels": 1, "roi_size": [32, 32], "batch_size": 4})
    epoch = '{"protocol": "epoch", "epochs": 2}'
    args = ["--data", str(tiny2d), "--engine", engine, "--rounds", "2", "--out", str(out), "--selector", "{}", epoch]
    assert main(args) == 0
    result = json.loads(out.read_text())
    lda, trained = result["rows"]
    # the default ("lda") takes no steps; its upper bound is the network trained centrally with the reference
    # protocol's steps (4 epochs per round); the "epoch" protocol: 2 Adam steps per round, the same centrally
    assert (lda["steps"], lda["central_steps"]) == (0, 8) and (trained["steps"], trained["central_steps"]) == (4, 4)
    for row in (lda, trained):
        assert sorted(row["federated"]["accuracy"]) == sorted(result["sites"]) == ["site-1", "site-2", "site-3"]
        for kind in ("federated", "central"):
            assert all(0.0 <= v <= 1.0 for v in row[kind]["accuracy"].values())
            assert all(r <= a for r, a in zip(row[kind]["routed_own"].values(), row[kind]["accuracy"].values()))
    text = out.with_suffix(".md").read_text()
    assert "| defaults | 2 | 1 |" in text and '| {"protocol": "epoch", "epochs": 2} | 2 | 1 |' in text and "site-3" in text


def test_gpu_real_cell_is_the_full_presets_polyp_cell_cut_to_fit(tmp_path):
    from PIL import Image

    from fedseg_tools.bench.gpu_real import GPU_REAL_METHODS, prepare, real_preset
    from fedseg_tools.bench.presets import get_preset

    src = tmp_path / "src" / "C"
    for kind in ("images", "masks"):
        (src / kind).mkdir(parents=True)
        Image.new("L" if kind == "masks" else "RGB", (300, 150)).save(src / kind / "1.png")
    (src / "sequence.csv").write_text("stem,video_sequence\n1,3\n")
    assert prepare(tmp_path / "pics", tmp_path / "src") == {"C": 1}
    with Image.open(tmp_path / "pics" / "C" / "images" / "1.jpg") as im:
        assert im.size == (128, 64)  # the full preset's 128 px on the long side
    assert (tmp_path / "pics" / "C" / "masks" / "1.png").exists() and (tmp_path / "pics" / "C" / "sequence.csv").exists()

    full = get_preset("full").datasets["polyp"]
    preset = real_preset(tmp_path / "pics", 6, dry_run=False)
    spec = preset.datasets["polyp"]
    assert spec.engine == {**full.engine, "amp": True} and spec.options["split_by"] == "group"
    assert "image_size" not in spec.options and spec.options["max_cases"] is None
    assert (preset.rounds, preset.epochs, preset.seeds, preset.protocols) == (6, 2, [0], ["equal"])
    assert preset.methods == GPU_REAL_METHODS and not (preset.loco or preset.matched_steps or preset.stock)
    dry = real_preset(tmp_path / "pics", 6, dry_run=True)
    assert dry.datasets["polyp"].options["max_cases"] == 8 and (dry.rounds * dry.epochs) % 3 == 0


def test_selector_status_is_recorded_or_judged_from_the_routing():
    from fedseg_tools.bench.benchmark_report.fedsm_facts import selector_status_of

    sites = ["a", "b"]
    assert selector_status_of({"selector_status": {"status": "unused"}}, sites) == "unused"
    routing = {"a": {"a": 1, "b": 0, "global": 9}, "b": {"a": 0, "b": 0, "global": 10}}
    assert selector_status_of({"selector_accuracy": {"a": 0.9, "b": 0.8}, "routing": routing}, sites) == "unused"
    assert selector_status_of({"selector_accuracy": {"a": 1.0, "b": 0.0}, "routing": routing}, sites) == "collapsed"
    assert selector_status_of({}, sites) == "-"
