"""Benchmark presets: which datasets, seeds, budget and cost measurements a run uses.

  smoke  the test suite's end-to-end check: 2 tiny 2-D sites, 1 seed, R=1 round x E=2 epochs, no cost phase
  quick  2 CPU cores, minutes: built-in 2-D and 3-D data (4 sites, "small"), the real polyp data
         (Kvasir-SEG + CVC-ClinicDB, 60 cases per site) when ../shared/data/polyp exists; 3 seeds;
         R=3 x E=2; every method and seed of a dataset runs in ONE simulator job, one after another (the
         simulator's start-up costs ~20-30 s of CPU per job), all datasets at the same time; 3-D with
         24^3 patches and a 3-level UNet; cost phase at small (1 epoch) and realistic (8 epochs) work per round.
  full   a GPU machine: "medium" built-in data, all polyp cases, R=20 x E=2, 3 seeds, one simulator job
         per method (nothing shared between methods), cost phase at 1 and 20 epochs per round.

Everything can be overridden on the command line (--datasets, --data-dir, --seeds, --methods, --rounds,
--epochs, --parallel, --isolate).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.bench.budget import METHODS

REPO = Path(__file__).resolve().parents[3]
SHARED_POLYP = REPO.parent / "shared" / "data" / "polyp"

ENGINE_2D = {"spatial_dims": 2, "in_channels": 1, "roi_size": [64, 64], "batch_size": 4,
             "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1}}
ENGINE_3D = {"spatial_dims": 3, "in_channels": 1, "roi_size": [32, 32, 32], "batch_size": 2, "sw_batch_size": 2,
             "network": {"arch": "unet", "channels": [8, 16, 32, 64], "num_res_units": 1}}
# quick preset on 2 CPU cores: smaller 3-D patches and a 3-level network (3-D is most of the quick run's CPU time)
ENGINE_3D_QUICK = {**ENGINE_3D, "roi_size": [24, 24, 24], "network": {"arch": "unet", "channels": [8, 16, 32], "num_res_units": 1}}
ENGINE_POLYP = {"spatial_dims": 2, "in_channels": 3, "roi_size": [96, 96], "batch_size": 4,
                "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1}}


@dataclass
class DatasetSpec:
    """kind: "synthetic" (fedseg.data.synthetic), "polyp"/"folder" (fedseg.data.convert of a folder of
    pictures) or "datalist" (a ready folder of <site>/datalist.json, used as it is)."""

    name: str
    kind: str
    engine: dict
    source: str = ""  # folder for polyp/folder/datalist
    options: dict = field(default_factory=dict)  # generator / converter arguments
    required: bool = True  # False: skipped with a note when the source folder is missing


@dataclass
class CostSpec:
    dataset: str = "synth2d"  # the dataset whose FedAvg job is timed against the plain loop
    rounds: int = 3
    small_epochs: int = 1
    realistic_epochs: int = 8
    throughput_site: str = ""  # site for the executor-throughput job ("" = the one with most training cases)
    throughput_rounds: int = 3


@dataclass
class Preset:
    name: str
    datasets: dict
    seeds: list
    rounds: int
    epochs: int
    methods: list = field(default_factory=lambda: list(METHODS))
    isolate: bool = False  # one simulator job per method (True) or one per (dataset, seed) (False)
    parallel: int = 1  # (dataset, seed) cells run at the same time
    hd95: bool = True
    cost: CostSpec | None = None
    fedsm_policy: str = "epochs"
    task_request_interval: float = 0.1  # server -> site polling period in the bench's jobs (FLARE default 2 s)
    timeout: float = 3600.0  # seconds per simulator job
    description: str = ""

    def copy(self) -> "Preset":
        return copy.deepcopy(self)


def _synth(name: str, dims: int, size: str, sites: int = 4, engine: dict | None = None) -> DatasetSpec:
    engine = engine or (ENGINE_2D if dims == 2 else ENGINE_3D)
    return DatasetSpec(name, "synthetic", copy.deepcopy(engine), options={"n_sites": sites, "spatial_dims": dims, "size": size, "seed": 0})


def _polyp(max_cases: int | None, roi: int = 96) -> DatasetSpec:
    engine = copy.deepcopy(ENGINE_POLYP)
    engine["roi_size"] = [roi, roi]
    return DatasetSpec("polyp", "polyp", engine, source=str(SHARED_POLYP), options={"max_cases": max_cases, "seed": 0},
                       required=False)


PRESETS = {
    "smoke": Preset(
        name="smoke",
        datasets={"synth2d": DatasetSpec("synth2d", "synthetic", {**copy.deepcopy(ENGINE_2D), "roi_size": [32, 32]},
                                         options={"n_sites": 2, "spatial_dims": 2, "size": "tiny", "seed": 0})},
        seeds=[0], rounds=1, epochs=2, cost=None, timeout=600.0,
        description="end-to-end check of the whole pipeline (tests/test_bench.py); numbers mean nothing",
    ),
    "quick": Preset(
        name="quick",
        datasets={"synth2d": _synth("synth2d", 2, "small"), "synth3d": _synth("synth3d", 3, "small", engine=ENGINE_3D_QUICK),
                  "polyp": _polyp(60, 64)},
        seeds=[0, 1, 2], rounds=3, epochs=2, parallel=3, cost=CostSpec(), timeout=1800.0,
        description="2 CPU cores in minutes: small data and budget, every method, 3 seeds",
    ),
    "full": Preset(
        name="full",
        datasets={"synth2d": _synth("synth2d", 2, "medium"), "synth3d": _synth("synth3d", 3, "medium"), "polyp": _polyp(None, 128)},
        seeds=[0, 1, 2], rounds=20, epochs=2, isolate=True, parallel=1,
        cost=CostSpec(rounds=5, small_epochs=1, realistic_epochs=20), timeout=6 * 3600.0,
        description="a GPU machine: medium data, 20 rounds, one simulator job per method",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].copy()


def datalist_dataset(path: str, engine: dict | None = None) -> DatasetSpec:
    """A user's dataset in the datalist layout (<dir>/<site>/datalist.json); engine settings are read from
    the datalists (spatial_dims, in_channels, num_classes) unless given."""
    import json

    root = Path(path).expanduser().resolve()
    lists = sorted(root.glob("*/datalist.json"))
    if not lists:
        raise FileNotFoundError(f"no <site>/datalist.json under {root}")
    first = json.loads(lists[0].read_text())
    dims = int(first.get("spatial_dims", 2))
    base = copy.deepcopy(ENGINE_2D if dims == 2 else ENGINE_3D)
    base["in_channels"] = int(first.get("in_channels", 1))
    base["num_classes"] = int(first.get("num_classes", 2))
    base.update(engine or {})
    return DatasetSpec(root.name, "datalist", base, source=str(root))
