"""The benchmark report's leakage row: the same methods on one dataset split by video sequence (or patient) and
split by frame (fedseg.data.convert --split-by case), side by side.

A frame-level split puts views of one polyp into training and test: the difference between the two cells is how
much such a split overstates a score. The two cells have different test cases (the frame split's test set holds
frames of training sequences), so the difference is the measured overstatement, not a paired comparison.
"""

from __future__ import annotations

from fedseg_tools.bench import report_data as br


def leakage_pairs(run: dict) -> list[tuple[str, str]]:
    """[(frame-split dataset, the group-split dataset it repeats)] declared in the run's dataset records."""
    datasets = run.get("datasets") or {}
    return [(name, info["leakage_of"]) for name, info in datasets.items() if info.get("leakage_of") in datasets]


def leakage_section(run: dict, cells_by_ds: dict[str, list[dict]]) -> list[str]:
    L: list[str] = []
    for frames, groups in leakage_pairs(run):
        a, b = cells_by_ds.get(groups) or [], cells_by_ds.get(frames) or []
        keys = [k for k in br.run_keys(b) if k in br.run_keys(a)]
        rows = []
        for k in keys:
            split_by_group, split_by_frame = br.aggregate(a, k)["dice"], br.aggregate(b, k)["dice"]
            if not split_by_group or not split_by_frame:
                continue
            gain = br._mean(split_by_frame) - br._mean(split_by_group)
            rows.append([br.run_name(k, br._first_rec(b, k)), br._pm(split_by_group), br._pm(split_by_frame), f"{gain:+.3f}"])
        if rows:
            L += [
                f"### Leakage: {groups} split by video sequence vs by frame",
                "",
                f"Mean test Dice over centres, mean ± std over seeds; `{frames}` is the same data and budget with the "
                "frame-level split (its test frames share sequences with training frames). The difference is how much "
                "a frame split overstates the score.",
                "",
                br._table(["run", "split by sequence", "split by frame", "overstatement"], rows),
                "",
            ]
    return L
