"""Merge the raw results of benchmark runs that split one preset's seeds between them (e.g. seed 0 one afternoon,
seeds 1 and 2 the next) into one raw folder, then report from it:

    python -m fedseg_tools.bench.merge --out bench_results/merged bench_seed0/raw bench_seeds12/raw
    python -m fedseg_tools.bench --report-only --out bench_results/merged [--publish]

Only runs of the same benchmark may be merged: the settings that decide what a number means (preset, R, E,
methods, protocols, FedSM policy, ablation, optimizer variants, stock peers, LR schedule, datasets and their
engines and site counts) must be equal, and no (dataset, seed) cell may appear twice; anything else is refused
with the setting that differs. The merged run.json lists every part's command, start and finish time and machine,
so the report says exactly what was merged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run.json keys that must agree between the parts (what a number in the report means)
SAME = (
    "preset",
    "rounds",
    "epochs",
    "methods",
    "isolate",
    "fedsm_policy",
    "task_request_interval",
    "protocols",
    "fedsm_ablation",
    "optimizer_variants",
    "stock",
    "matched_steps",
    "tuning",
    "lr_schedule",
    "conclusive",
    "hd95",
)


class MergeError(ValueError):
    pass


def _datasets_key(run: dict) -> dict:
    return {
        name: {k: d.get(k) for k in ("kind", "engine", "rounds", "epochs", "sites", "note")}
        for name, d in (run.get("datasets") or {}).items()
    }


def merge_results(parts: list[tuple[str, dict]]) -> dict:
    """parts: (label, results.json content) in order. Returns {"run", "cells"} of the merged benchmark (pure)."""
    if len(parts) < 2:
        raise MergeError("give at least two raw folders to merge")
    first_label, first = parts[0]
    runs = []
    cells: list[dict] = []
    seen: dict[tuple, str] = {}
    for label, part in parts:
        run = part.get("run") or {}
        for key in SAME:
            if run.get(key) != first["run"].get(key):
                raise MergeError(
                    f"{label}: run setting {key!r} is {run.get(key)!r}, but {first_label} has "
                    f"{first['run'].get(key)!r}: these are different benchmarks"
                )
        if _datasets_key(run) != _datasets_key(first["run"]):
            raise MergeError(f"{label}: its datasets (engines, budgets, sites) differ from {first_label}'s")
        for cell in part.get("cells") or []:
            ident = (cell.get("dataset"), cell.get("seed"))
            if ident in seen:
                raise MergeError(f"{label}: cell {ident[0]} seed {ident[1]} is also in {seen[ident]}")
            seen[ident] = label
            cells.append(cell)
        runs.append(
            {
                "label": label,
                "command": run.get("command"),
                "seeds": run.get("seeds"),
                "started": run.get("started"),
                "finished": run.get("finished"),
                "seconds": run.get("seconds"),
                "cpu_seconds": run.get("cpu_seconds"),
                "machine": run.get("machine"),
            }
        )
    merged = dict(first["run"])
    merged["seeds"] = sorted({c.get("seed") for c in cells})
    merged["command"] = " + ".join(str(r["command"]) for r in runs)
    merged["merged_from"] = runs
    merged["seconds"] = sum(r["seconds"] or 0 for r in runs)
    merged["cpu_seconds"] = sum(r["cpu_seconds"] or 0 for r in runs)
    merged["started"], merged["finished"] = runs[0]["started"], runs[-1]["finished"]
    cells.sort(
        key=lambda c: (
            list(merged.get("datasets") or {}).index(c["dataset"])
            if c.get("dataset") in (merged.get("datasets") or {})
            else 99,
            c.get("seed"),
        )
    )
    return {"run": merged, "cells": cells}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("raw", nargs="+", help="raw folders (each with results.json) of the runs to merge")
    p.add_argument("--out", required=True, help="output folder; the merged raw files go to OUT/raw")
    o = p.parse_args(argv)
    from fedseg_tools.bench.benchmark_report import write_raw

    parts = []
    for folder in o.raw:
        path = Path(folder) / "results.json"
        if not path.is_file():
            print(f"fedseg_tools.bench.merge: {path}: no such file", file=sys.stderr)
            return 2
        parts.append((str(Path(folder).resolve()), json.loads(path.read_text())))
    try:
        merged = merge_results(parts)
    except MergeError as e:
        print(f"fedseg_tools.bench.merge: refused: {e}", file=sys.stderr)
        return 2
    out_raw = Path(o.out).resolve() / "raw"
    write_raw(out_raw, merged["cells"], merged["run"])
    print(f"merged {len(merged['cells'])} cells (seeds {merged['run']['seeds']}) into {out_raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
