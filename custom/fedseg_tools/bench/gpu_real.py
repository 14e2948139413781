"""The full preset's real cell on one GPU: the three polyp centres at 128 px, every case, split by video sequence.

    python -m fedseg_tools.bench.gpu_real prepare --out gpu_polyp            # here: pictures at 128 px to take along
    python -m fedseg_tools.bench.gpu_real run --pictures gpu_polyp --out OUT  # on the GPU machine (AMP on)
    python -m fedseg_tools.bench.gpu_real run --pictures gpu_polyp --out OUT --dry-run   # on a CPU: the same script, tiny

`prepare` downscales ../shared/data/polyp to 128 px on the long side (images as JPEG quality 95, masks as lossless
PNG, each centre's sequence.csv copied) so that the pictures fit in what travels to a GPU machine (~15 MB).
`run` converts them exactly as the full preset does (fedseg.data.convert, split by video sequence, seed 0) and
runs the full preset's polyp cell with seed 0 under equal steps: local-only, centralized, FedAvg, FedBN, FedSM,
FedCross and FedCrossEns, the three sites sharing GPU 0, AMP on, then prints the per-method table and writes
OUT/raw (results.json, BENCHMARKS.md). R defaults to 6 rounds x E=2 so that the whole run fits in 10 minutes
of one H100: an estimate from the CPU run's step counts, not a measurement; the report says what R was used.
`--dry-run` runs the same code on 8 cases per centre, R=3, on whatever device there is, to check the script.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

GPU_REAL_METHODS = ["local", "centralized", "fedavg", "fedbn", "fedsm", "fedcross", "fedcrossens"]
DEFAULT_ROUNDS = 6


def prepare(out: Path, source: Path | None = None) -> dict:
    """Pictures of every polyp centre at the full preset's size, with their sequence files."""
    from fedseg_tools.bench.presets import SHARED_POLYP, get_preset
    from fedseg_tools.bench.run import downscale_pictures

    spec = get_preset("full").datasets["polyp"]
    shutil.rmtree(out, ignore_errors=True)
    return downscale_pictures(Path(source or SHARED_POLYP), out, int(spec.options["image_size"]), image_format="jpg")


def real_preset(pictures: Path, rounds: int, dry_run: bool):
    """The full preset cut to its polyp cell, seed 0, equal steps, the methods above; pictures already downscaled."""
    from fedseg_tools.bench.presets import get_preset

    preset = get_preset("full")
    spec = preset.datasets["polyp"]
    spec.source = str(Path(pictures).resolve())
    spec.options = {k: v for k, v in spec.options.items() if k != "image_size"}  # prepare did the downscaling
    spec.engine = {**spec.engine, "amp": True}
    if dry_run:
        spec.options["max_cases"] = 8
    preset.name = "full-gpu-real"
    preset.datasets = {"polyp": spec}
    preset.seeds = [0]
    preset.rounds, preset.epochs = (3, 2) if dry_run else (rounds, 2)  # FedCrossEns: R x E a multiple of 3 sites
    preset.methods = list(GPU_REAL_METHODS)
    preset.protocols = ["equal"]
    preset.fedsm_ablation = preset.optimizer_measure = preset.matched_steps = preset.loco = False
    preset.stock = []
    preset.isolate = False
    preset.cost = None
    preset.timeout = 540.0
    preset.progress_every = 30.0
    preset.description = (
        f"the full preset's polyp cell on one GPU: 3 centres, 128 px, seed 0, equal steps, R={preset.rounds} x E=2, AMP"
        + (" (dry run: 8 cases per centre)" if dry_run else "")
    )
    return preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench.gpu_real", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="downscale the polyp centres to take them to a GPU machine")
    prep.add_argument("--out", required=True)
    prep.add_argument("--source", default=None, help="polyp folder (default: ../shared/data/polyp)")
    run = sub.add_parser("run", help="run the cell (on a GPU; --dry-run anywhere)")
    run.add_argument("--pictures", required=True, help="the folder `prepare` wrote")
    run.add_argument("--out", required=True)
    run.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    run.add_argument("--dry-run", action="store_true", help="8 cases per centre, R=3: checks the script on any device")
    argv = list(sys.argv[1:] if argv is None else argv)
    o = p.parse_args(argv)
    if o.step == "prepare":
        counts = prepare(Path(o.out), Path(o.source) if o.source else None)
        print(f"pictures at 128 px in {o.out}: {counts}")
        return 0
    import torch

    if not torch.cuda.is_available() and not o.dry_run:
        print("fedseg_tools.bench.gpu_real: no CUDA device here; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    from fedseg_tools.bench.benchmark_report import write_report
    from fedseg_tools.bench.run import resolve_datasets, run_benchmark

    preset = real_preset(Path(o.pictures), o.rounds, o.dry_run)
    command = "python -m fedseg_tools.bench.gpu_real " + " ".join(shlex.quote(a) for a in argv)
    out = Path(o.out).resolve()
    run_benchmark(preset, out, resolve_datasets(preset, None, None), command, cost=False)
    report = write_report(out / "raw", out)
    print(report.read_text().split("## polyp", 1)[-1][:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
