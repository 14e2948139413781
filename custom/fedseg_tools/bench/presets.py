"""Benchmark presets: which datasets, seeds, budget, runs and cost measurements a run uses.

Every preset runs every method under both protocols (fedseg_tools.bench.budget: "equal" steps B for all, and each
paper's own protocol: FedSM/SoftPull 2B, FedCrossEns N*B) and reports them side by side.

  smoke     the test suite's end-to-end check: 2 tiny 2-D sites, 1 seed, R=2 rounds x E=2 epochs, no cost
            phase; numbers mean nothing
  quick     2 CPU cores, minutes: built-in 2-D and 3-D data (4 sites, "small"), the real polyp data (2 centres,
            60 cases each) when ../shared/data/polyp exists; 3 seeds; R=4 x E=2; every method and seed of a
            dataset in ONE simulator job, all datasets at the same time; 3-D with 24^3 patches and a 3-level
            UNet; cost phase. TOO SMALL TO CONCLUDE: the curves are still rising at its end.
  standard  2 CPU cores, at most ~100 minutes, outside CI (`make bench-standard`): runs to convergence.
            Chosen to fit: 2-D only, 64 px images, UNet 16-32-64-128 (1 residual unit), batch 4, Adam 1e-3,
            constant LR for every method.
              synth2d         built-in data, size "small" (4 sites, 24/16/32/12 training cases, 6/4/8/4
                              validation, 8 test each; images 56-80 px, 64 px patches)
              synth2d_scarce  the same sites, validation and test cases, but only the first 6 labelled
                              training cases per site (fedseg.data.synthetic labelled_training=6)
              polyp           Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB (3 centres), every case, split by video
                              sequence (70/10/20 % of the cases, whole sequences; Kvasir-SEG by image),
                              pictures downscaled to 64 px on their long side, R=12 x E=2, UNet with
                              affine instance norm for every method (FedBN needs normalization parameters);
                              the settings come from the pilot (docs/benchmarks/pilot_polyp.md); skipped
                              when ../shared/data/polyp is absent
              polyp_frames    the same centres split by FRAME (fedseg.data.convert --split-by case), FedAvg
                              only: the leakage row (frame split vs sequence split)
            3 seeds, R=24 rounds x E=2 epochs (E=4 on synth2d_scarce, whose sites have 2 steps per epoch),
            every method in both protocols, the FedSM ablation on the built-in data (SoftPull lambda 0.5/0.9/1.0
            at the paper budget; lambda 0.7 at half (equal steps) and full (paper) budget; learned routing vs
            the oracle "personalized (own site)" row) and FedAvg/FedProx with the other local-optimizer setting,
            FedProx's mu (0.001, 0.1) and FedSM's lambda (0.5, 0.9) next to their defaults, chosen per seed on
            validation Dice (fedseg_tools.bench.tuning; --no-tuning leaves them out), NVFlare's stock CyclicRecipe/FedAvgRecipe peers (fedseg_tools.bench.stock), the
            matched-step baselines (FedAvg, local-only, centralized at 2B and N*B: R*2 and R*N rounds of E epochs,
            fedseg_tools.bench.budget), the leave-one-centre-out cells polyp_loco_<centre> (one per polyp centre: the polyp
            cell's main runs trained without that centre and scored on it, fedseg_tools.bench.unseen; --no-loco leaves
            them out); a progress line every minute. Time: the built-in cells took ~80 minutes for 3 seeds on 2 idle
            cores in the committed run (9632 CPU-seconds, R=24, without matched-step baselines); the three-centre
            polyp cell with every case has not been timed whole: one seed of its local-only plus centralized
            baselines took 433 s and one FL method at equal steps ~3.5 min on 2 idle cores (the pilot,
            docs/benchmarks/pilot_polyp.md, chose its size); run it in parts (--datasets, --seeds) merged with
            fedseg_tools.bench.merge. On synth2d
            FedAvg/FedProx still gain ~2-3 Dice points over the last quarter at R=24 (the report's "flattened?"
            column says so).
  full      a GPU machine: "medium" built-in data, the three polyp centres (every case, split by video sequence,
            downscaled to 128 px, affine instance norm), R=20 x E=2, 3 seeds, one simulator
            job per method, matched-step baselines, cost phase at 1 and 20 epochs per round.

Everything can be overridden on the command line (--datasets, --data-dir, --seeds, --methods, --rounds,
--epochs, --parallel, --isolate, --protocols, --no-ablation, --no-matched-steps, --no-loco, --holdout).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from fedseg_tools.bench.budget import METHODS, PROTOCOLS, STOCK

REPO = Path(__file__).resolve().parents[3]
SHARED_POLYP = REPO.parent / "shared" / "data" / "polyp"

ENGINE_2D = {
    "spatial_dims": 2,
    "in_channels": 1,
    "roi_size": [64, 64],
    "batch_size": 4,
    "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1},
}
ENGINE_3D = {
    "spatial_dims": 3,
    "in_channels": 1,
    "roi_size": [32, 32, 32],
    "batch_size": 2,
    "sw_batch_size": 2,
    "network": {"arch": "unet", "channels": [8, 16, 32, 64], "num_res_units": 1},
}
# quick preset on 2 CPU cores: smaller 3-D patches and a 3-level network (3-D is most of the quick run's CPU time)
ENGINE_3D_QUICK = {
    **ENGINE_3D,
    "roi_size": [24, 24, 24],
    "network": {"arch": "unet", "channels": [8, 16, 32], "num_res_units": 1},
}
ENGINE_POLYP = {
    "spatial_dims": 2,
    "in_channels": 3,
    "roi_size": [96, 96],
    "batch_size": 4,
    "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1},
}


@dataclass
class DatasetSpec:
    """kind: "synthetic" (fedseg.data.synthetic), "polyp"/"folder" (fedseg.data.convert of a folder of
    pictures) or "datalist" (a ready folder of <site>/datalist.json, used as it is)."""

    name: str
    kind: str
    engine: dict
    source: str = ""  # folder for polyp/folder/datalist
    options: dict = field(default_factory=dict)  # generator / converter arguments (polyp: image_size downscales)
    required: bool = True  # False: skipped with a note when the source folder is missing
    rounds: int | None = None  # R / E of this dataset's budget (None: the preset's)
    epochs: int | None = None
    ablation: bool = True  # the preset's FedSM ablation and optimizer-state runs run on this dataset
    description: str = ""
    methods: list | None = None  # only these of the preset's methods, and no stock peers (None: all of them)
    leakage_of: str = ""  # this cell repeats that dataset with the frame-level split: the report compares the two
    holdout: str = ""  # leave-one-centre-out: this centre's data is converted but kept out of the federation


def cell_engine(spec: DatasetSpec, epochs: int, seed: int) -> dict:
    """The engine settings of one (dataset, seed) cell: the dataset's engine with the budget's epochs and the seed."""
    return {**spec.engine, "local_epochs": int(epochs), "seed": int(seed)}


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
    protocols: list = field(default_factory=lambda: list(PROTOCOLS))
    fedsm_ablation: bool = False  # FedSM with SoftPull lambda 0.5 / 0.9 / 1.0 at the paper budget
    optimizer_measure: bool = False  # FedAvg/FedProx again with the other local_optimizer setting (item 3)
    stock: list = field(default_factory=list)  # NVFlare's stock peers (fedseg_tools.bench.stock), e.g. ["nvflare_cyclic"]
    matched_steps: bool = False  # FedAvg / local-only / centralized again at the paper runs' 2B and N*B steps
    lr_schedule: str = "constant"  # FedCross/FedCrossEns LR policy: the constant rate every other method trains with
    progress_every: float = 60.0  # seconds between progress lines
    conclusive: bool = True  # False: the report says the numbers are too small to conclude anything
    loco: bool = False  # leave-one-centre-out cells (fedseg_tools.bench.unseen): one per centre of every polyp dataset
    tuning: bool = False  # FedProx's mu and FedSM's lambda chosen on validation (fedseg_tools.bench.tuning)

    def copy(self) -> Preset:
        return copy.deepcopy(self)


def _synth(name: str, dims: int, size: str, sites: int = 4, engine: dict | None = None, **kw) -> DatasetSpec:
    engine = engine or (ENGINE_2D if dims == 2 else ENGINE_3D)
    return DatasetSpec(
        name,
        "synthetic",
        copy.deepcopy(engine),
        options={"n_sites": sites, "spatial_dims": dims, "size": size, "seed": 0},
        **kw,
    )


def _polyp(
    max_cases: int | None,
    roi: int = 96,
    image_size: int | None = None,
    name: str = "polyp",
    norm: str | None = None,
    split_by: str = "group",
    **kw,
) -> DatasetSpec:
    """The polyp centres converted by fedseg.data.convert: split by video sequence (split_by "case": by frame, which
    leaks), at most max_cases per centre, pictures downscaled to image_size; norm: the network's normalization."""
    engine = copy.deepcopy(ENGINE_POLYP)
    engine["roi_size"] = [roi, roi]
    if norm:
        engine["network"]["norm"] = norm
    options = {"max_cases": max_cases, "seed": 0, "split_by": split_by}
    if image_size:
        options["image_size"] = image_size
    return DatasetSpec(name, "polyp", engine, source=str(SHARED_POLYP), options=options, required=False, **kw)


# The standard preset's real cell: the three polyp centres split by video sequence, every case, 64 px, R=12 x E=2,
# chosen by the pilot (docs/benchmarks/pilot_polyp.md). Every method runs on a network whose instance norm has
# parameters (FedBN keeps them local; the others train the same network). The frame-split twin measures leakage.
POLYP3 = dict(max_cases=None, roi=64, image_size=64, norm="instance_affine", rounds=12, epochs=2, ablation=False)


PRESETS = {
    "smoke": Preset(
        name="smoke",
        datasets={
            "synth2d": DatasetSpec(
                "synth2d",
                "synthetic",
                {**copy.deepcopy(ENGINE_2D), "roi_size": [32, 32]},
                options={"n_sites": 2, "spatial_dims": 2, "size": "tiny", "seed": 0},
            )
        },
        seeds=[0],
        rounds=2,
        epochs=2,
        cost=None,
        timeout=600.0,
        conclusive=False,
        tuning=True,
        description="end-to-end check of the whole pipeline (tests/test_bench.py); numbers mean nothing",
    ),
    "quick": Preset(
        name="quick",
        datasets={
            "synth2d": _synth("synth2d", 2, "small"),
            "synth3d": _synth("synth3d", 3, "small", engine=ENGINE_3D_QUICK),
            "polyp": _polyp(60, 64),
        },
        seeds=[0, 1, 2],
        rounds=4,
        epochs=2,
        parallel=3,
        cost=CostSpec(),
        timeout=1800.0,
        conclusive=False,
        description="2 CPU cores in minutes: small data and budget, every method, 3 seeds; too small to conclude",
    ),
    "standard": Preset(
        name="standard",
        datasets={
            "synth2d": _synth("synth2d", 2, "small", description="built-in 2-D data, 4 sites, size small"),
            "synth2d_scarce": DatasetSpec(
                "synth2d_scarce",
                "synthetic",
                copy.deepcopy(ENGINE_2D),
                epochs=4,
                options={"n_sites": 4, "spatial_dims": 2, "size": "small", "seed": 0, "labelled_training": 6},
                description="data-scarce variant: 6 labelled training cases per site, same validation/test cases",
            ),
            "polyp": _polyp(
                **POLYP3, description="Kvasir-SEG, CVC-ClinicDB, CVC-ColonDB, split by video sequence, every case, 64 px"
            ),
            "polyp_frames": _polyp(
                **POLYP3,
                name="polyp_frames",
                split_by="case",
                methods=["fedavg"],
                leakage_of="polyp",
                description="the polyp cell split by frame (leaks views of one polyp into the test set): FedAvg only",
            ),
        },
        seeds=[0, 1, 2],
        rounds=24,
        epochs=2,
        parallel=3,
        cost=None,
        timeout=4 * 3600.0,
        fedsm_ablation=True,
        optimizer_measure=True,
        stock=list(STOCK),
        matched_steps=True,
        loco=True,
        tuning=True,
        description="2 CPU cores, <= ~100 minutes, to convergence: 64 px 2-D data (synth2d, its data-scarce variant, "
        "polyp), 3 seeds, R=24, both protocols, the FedSM ablation",
    ),
    "full": Preset(
        name="full",
        datasets={
            "synth2d": _synth("synth2d", 2, "medium"),
            "synth3d": _synth("synth3d", 3, "medium"),
            "polyp": _polyp(
                None, 128, image_size=128, norm="instance_affine", description="the three polyp centres, every case, 128 px"
            ),
        },
        seeds=[0, 1, 2],
        rounds=20,
        epochs=2,
        isolate=True,
        parallel=1,
        fedsm_ablation=True,
        optimizer_measure=True,
        stock=list(STOCK),
        matched_steps=True,
        tuning=True,
        cost=CostSpec(rounds=5, small_epochs=1, realistic_epochs=20),
        timeout=6 * 3600.0,
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
