"""Real runs of every job folder in the plain `nvflare simulator`, and `fedseg export`: trained model sets as MONAI
bundles that `python -m monai.bundle run` executes.

The fast tests build model sets in-process with the save functions the controllers use (fedseg.modelset,
fedseg.methods.fedcross.save_members). The real runs: every job folder runs with the plain `nvflare simulator`
command, as an NVFlare user types it; the FedAvg, FedCrossEns and FedSM runs are then exported, each bundle runs in
a subprocess WITHOUT FedSeg on the Python path, and its segmentations are compared with `python -m fedseg.infer` and
its probabilities with FedSeg's engine on the same images. The FedAvg run also shows that `python -m fedseg.infer`
segments a site's test cases with the Dice the job measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CUSTOM, REPO, TINY_ENGINE, copy_job, in_parallel
from monai.transforms import Compose

from fedseg.data import load_datalist
from fedseg.engine import (
    EngineConfig,
    SegEngine,
    SegNetwork,
    load_numpy_state,
    state_to_numpy,
)
from fedseg.engine.engine import eval_transforms
from fedseg.export import ExportError, bundle_runtime, export_bundle, main
from fedseg.export.bundle import instantiate, monai_network_config
from fedseg.fl.allowlist import FEDSEG_CLASSES
from fedseg.methods.fedsm import (
    DEFAULT_SELECTOR,
    SelectorSettings,
    build_selector,
    selector_input,
)
from fedseg.modelset import load_model_set, save_members, save_model_set
from fedseg.report import load_results
from fedseg_tools.sim import run_process_tree

SMALL = {"roi_size": [32, 32], "network": {"arch": "unet", "channels": [8, 16, 32], "num_res_units": 1}}
SITES = ["site-1", "site-2", "site-3"]


def small_cfg(**changes) -> EngineConfig:
    return EngineConfig.from_dict({**SMALL, **changes})


def random_net(cfg: EngineConfig, seed: int) -> dict:
    torch.manual_seed(seed)
    return state_to_numpy(SegNetwork(**cfg.network_args()))


def fedavg_set(root: Path, cfg: EngineConfig, with_config: bool = True) -> Path:
    """<root>/app_server/fedavg/best.pt as FedAvgController writes it, the job config beside it."""
    path = root / "app_server" / "fedavg" / "best.pt"
    path.parent.mkdir(parents=True)
    save_model_set(path, {"global": random_net(cfg, 0)}, {"round": 1, "best_score": 0.5, "best_round": 2})
    if with_config:
        config = root / "app_server" / "config"
        config.mkdir()
        engine = {k: v for k, v in cfg.to_dict().items() if k in SMALL}  # as a job states it: defaults left out
        executor = {"path": "fedseg.fl.executor.SegExecutor", "args": {"engine": engine}}
        (config / "config_fed_client.json").write_text(json.dumps({"executors": [{"tasks": ["*"], "executor": executor}]}))
        (config / "config_fed_server.json").write_text(json.dumps({"workflows": [{"args": {"fedprox_mu": 0.01}}]}))
    return path


def fedcross_set(path: Path, cfg: EngineConfig, k: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_members(
        path,
        [random_net(cfg, m) for m in range(k)],
        [{}] * k,
        {"communication": 2, "engine": cfg.to_dict(), "network_args": cfg.network_args()},
    )
    return path


def fedsm_set(path: Path, cfg: EngineConfig, use_selector: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = {"global": random_net(cfg, 0), "personal": {s: random_net(cfg, i + 1) for i, s in enumerate(SITES)}}
    if use_selector:
        torch.manual_seed(9)
        selector = build_selector(cfg.spatial_dims, cfg.in_channels, SelectorSettings.from_meta(len(SITES), None))
        groups.update({"selector": state_to_numpy(selector), "selector_optim": {}})
    save_model_set(
        path,
        groups,
        {
            "method": "fedsm",
            "round": 3,
            "site_names": SITES,
            "gamma": 0.9,
            "lam": 0.7,
            "use_selector": use_selector,
            "selector": DEFAULT_SELECTOR if use_selector else None,
            "engine": cfg.to_dict(),
        },
    )
    return path


# ---- the bundle's networks are FedSeg's ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "network",
    [
        {"arch": "unet", "channels": [8, 16, 32], "num_res_units": 2, "strides": [2, 1]},
        {"arch": "segresnet", "channels": [8, 16, 32]},
        {"arch": "dynunet", "channels": [8, 16, 32], "norm": "batch"},
    ],
)
def test_bundle_network_is_the_engines_network(network):
    """The plain MONAI network the bundle config names takes FedSeg's weights (strict, "net." dropped) and
    computes the same outputs."""
    cfg = small_cfg(network=network)
    fedseg_net = SegNetwork(**cfg.network_args()).eval()
    plain = instantiate(monai_network_config(cfg.network_args())).eval()
    plain.load_state_dict({k.removeprefix("net."): v for k, v in fedseg_net.state_dict().items()}, strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), fedseg_net(x))


def test_unknown_network_setting_is_refused():
    with pytest.raises(ExportError, match="network settings \\['kernel'\\] are unknown"):
        monai_network_config({**small_cfg().network_args(), "kernel": 5})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bundle_selector_is_fedsm_selector(spatial_dims):
    """The bundle's runtime (scripts/fedseg_bundle.py) is where FedSM's selector and its input are defined: the
    selector FedSM trains loads into the runtime's class and gives the same outputs."""
    from fedseg.methods import fedsm

    assert fedsm.SelectorNet is bundle_runtime.SelectorNet and fedsm.selector_input is bundle_runtime.selector_input
    settings = SelectorSettings.from_meta(3, None)
    torch.manual_seed(0)
    fedsm_selector = build_selector(spatial_dims, 1, settings).eval()
    copy = bundle_runtime.SelectorNet(3, spatial_dims, 3, settings.channels, settings.norm).eval()
    copy.load_state_dict(fedsm_selector.state_dict(), strict=True)
    raw = torch.rand(1, 1, *([40] * spatial_dims)) * 900 + 50
    size = settings.size(spatial_dims)
    with torch.no_grad():
        assert torch.equal(copy(bundle_runtime.selector_input(raw, size)), fedsm_selector(selector_input(raw, size)))


# ---- model names, job config, output folder --------------------------------------------------------------
def test_model_names_and_errors(tmp_path):
    cfg = small_cfg()
    avg = fedavg_set(tmp_path / "avg", cfg)
    cross = fedcross_set(tmp_path / "cross" / "best.pt", cfg)
    softpull = fedsm_set(tmp_path / "softpull" / "best.pt", cfg, use_selector=False)
    with pytest.raises(ExportError, match=f"{avg}: model 'ensemble' is not in a FedAvg/FedProx model set; it has: global$"):
        export_bundle(avg, tmp_path / "b1", "ensemble")
    with pytest.raises(
        ExportError, match="model 'member:3' is not in a FedCross model set; it has: ensemble, member:0, member:1, member:2$"
    ):
        export_bundle(cross, tmp_path / "b2", "member:3")
    with pytest.raises(
        ExportError,
        match="'super' is not in a FedSM/SoftPull model set \\(a SoftPull set has no "
        "selector, hence no super model\\); it has: global, personalized:site-1",
    ):
        export_bundle(softpull, tmp_path / "b3", "super")
    with pytest.raises(ExportError, match="model 'best' is not a model name of"):
        export_bundle(cross, tmp_path / "b4", "best")
    not_a_set = tmp_path / "weights.pt"
    torch.save({"net.w": torch.zeros(1)}, not_a_set)
    with pytest.raises(ExportError, match=f"{not_a_set}: not a readable FedSeg model set"):
        export_bundle(not_a_set, tmp_path / "b5")
    with pytest.raises(ExportError, match="no such model-set file"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "b6")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("b", ".b"))]  # nothing written for a refused export
    # defaults: what each job exists for
    for models, expected in ((avg, "global"), (cross, "ensemble"), (softpull, "global")):
        out = export_bundle(models, tmp_path / f"default_{expected}_{models.parent.name}")
        assert json.loads((out / "configs" / "metadata.json").read_text())["fedseg"]["model"] == expected


def test_fedavg_set_needs_the_jobs_engine_settings(tmp_path):
    cfg = small_cfg()
    moved = fedavg_set(tmp_path / "moved", cfg, with_config=False)
    with pytest.raises(ExportError, match=f"{moved}: the model set records no engine settings .* pass --job-config"):
        export_bundle(moved, tmp_path / "b")
    app = fedavg_set(tmp_path / "job", cfg).parents[1]  # a run's app folder whose config/ has the client config
    out = export_bundle(moved, tmp_path / "b", job_config=app)
    meta = json.loads((out / "configs" / "metadata.json").read_text())["fedseg"]
    assert meta["engine"] == cfg.to_dict() and meta["engine_settings_from"].endswith("config_fed_client.json")
    # next to its run, the set finds the job config itself; the server config says it was FedProx
    meta = json.loads((export_bundle(app / "fedavg" / "best.pt", tmp_path / "c") / "configs" / "metadata.json").read_text())
    assert meta["fedseg"]["method"] == "fedprox" and meta["fedseg"]["fedprox_mu"] == 0.01
    assert meta["fedseg"]["round"] == 1 and meta["fedseg"]["best_score"] == 0.5
    with pytest.raises(ExportError, match="--job-config .*nothing: no config_fed_client.json there"):
        export_bundle(moved, tmp_path / "d", job_config=tmp_path / "nothing")


def test_output_folder_is_never_half_written(tmp_path, monkeypatch):
    cfg = small_cfg()
    models = fedcross_set(tmp_path / "set" / "best.pt", cfg)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"--out {out}: folder exists and is not empty \\(pass --overwrite"):
        export_bundle(models, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(ExportError, match="exists and is not a folder"):
        export_bundle(models, file_out, overwrite=True)

    from fedseg.export import bundle

    def broken_readme(*args):
        raise OSError("disk full")

    monkeypatch.setattr(bundle, "readme", broken_readme)  # a failure after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export_bundle(models, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the old folder untouched
    monkeypatch.undo()
    export_bundle(models, out, "member:1", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "models" / "model.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "file", "set"]  # no temporary folders left


def test_command_line(tmp_path, capsys):
    models = fedsm_set(tmp_path / "set" / "best.pt", small_cfg())
    assert main(["--models", str(models), "--out", str(tmp_path / "b"), "--model", "personalized:site-9"]) == 2
    assert "model 'personalized:site-9' is not in a FedSM/SoftPull model set" in capsys.readouterr().err
    assert main(["--models", str(models), "--out", str(tmp_path / "b")]) == 0
    assert "(fedsm, model super)" in capsys.readouterr().out
    files = sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files == [
        "configs/inference.json",
        "configs/metadata.json",
        "docs/README.md",
        "models/global.pt",
        "models/model.pt",
        *[f"models/personalized_{s}.pt" for s in SITES],
        "models/selector.pt",
        "scripts/__init__.py",
        "scripts/fedseg_bundle.py",
    ]


def test_metadata_has_monai_fields_and_provenance(tmp_path):
    import monai

    models = fedcross_set(tmp_path / "set" / "best.pt", small_cfg(num_classes=3))
    meta = json.loads((export_bundle(models, tmp_path / "b") / "configs" / "metadata.json").read_text())
    for field in (
        "schema",
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ):
        assert meta[field], field
    assert meta["monai_version"] == monai.__version__
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [32, 32]
    assert pred["num_channels"] == 3 and pred["format"] == "segmentation" and len(pred["channel_def"]) == 3
    fedseg = meta["fedseg"]
    assert fedseg["method"] == "fedcrossens" and fedseg["model"] == "ensemble" and fedseg["communication"] == 2
    assert fedseg["num_models"] == 3 and len(fedseg["model_set_sha256"]) == 64
    assert fedseg["model_set"] == str(models.resolve())


def test_3d_bundle_runs_in_process_like_the_engine(tmp_path):
    """A volume model (random weights, roi smaller than the image: several overlapping windows) run through the
    bundle's workflow with monai.bundle.run gives the engine's probabilities and the input's affine."""
    from monai.bundle import run

    cfg = small_cfg(
        spatial_dims=3,
        roi_size=[16, 16, 16],
        sw_batch_size=2,
        overlap=0.5,
        network={"arch": "unet", "channels": [4, 8], "num_res_units": 1},
    )
    models = fedcross_set(tmp_path / "set" / "best.pt", cfg, k=2)
    out = export_bundle(models, tmp_path / "bundle", "member:1")
    images = tmp_path / "images"
    images.mkdir()
    affine = np.array([[0.8, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    volume = np.random.default_rng(0).normal(300, 80, size=(30, 26, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), str(images / "vol.nii.gz"))
    run(
        config_file=str(out / "configs" / "inference.json"),
        dataset_dir=str(images),
        output_dir=str(tmp_path / "seg"),
        save_probabilities=True,
    )
    engine = SegEngine(cfg, {}, site="test")
    expected = engine.predict_probs(
        net_of(engine, load_model_set(models)[0]["members"]["m1"]), read_image(images / "vol.nii.gz")
    )[0].numpy()
    seg = nib.load(str(tmp_path / "seg" / "vol_seg.nii.gz"))
    assert seg.shape == volume.shape and np.allclose(seg.affine, affine)
    np.testing.assert_allclose(bundle_probs(tmp_path / "seg" / "vol_prob.nii.gz", volume.shape), expected, atol=1e-4)
    assert np.array_equal(np.asarray(seg.dataobj), expected.argmax(0))


# ---- real runs: every job folder in the plain `nvflare simulator` ------------------------------------------
# The command as an NVFlare user types it:
#
#     export PYTHONPATH=custom FEDSEG_DATALIST=<data>/{SITE_NAME}/datalist.json
#     python -m fedseg.fl.allowlist --simulation <fresh workspace>
#     nvflare simulator jobs/<name> -w <fresh workspace> -n 2 -t 2
#
# The set-up command writes the simulation's allow-list (fedseg.fl.allowlist); nothing else is prepared by hand. The jobs are copies of jobs/<name> with a tiny budget, the way a user edits the JSON. The FedAvg,
# FedCrossEns and FedSM runs are also the ones exported below.
NVFLARE = str(Path(sys.executable).parent / "nvflare")  # the `nvflare` of the environment FedSeg is installed in
RUN_SITES = ["site-1", "site-2"]  # 2 sites: every job still aggregates, routes or travels between sites
RUN_ENGINE = {**TINY_ENGINE, "local_epochs": 1}
BUDGET = {
    "fedavg": {"num_rounds": 2},  # the best global model is chosen from the initial and a trained one
    "fedprox": {"num_rounds": 1},
    "fedsm": {"num_rounds": 1, "selector": {"epochs": 1}},
    "softpull": {"num_rounds": 1},
    "fedcross": {"num_communications": 2, "visit_epochs": 1},  # each site trains once
    "fedcrossens": {"num_communications": 2, "visit_epochs": 1},  # one Latin block
}


def tiny_job(name: str, dest: Path) -> Path:
    server = json.loads((REPO / "jobs" / name / "app" / "config" / "config_fed_server.json").read_text())
    args = dict(BUDGET[name])
    if "engine_config" in server["workflows"][0]["args"]:  # the server's copy of the engine settings
        args["engine_config"] = {**server["workflows"][0]["args"]["engine_config"], **RUN_ENGINE}
    if "selector" in args:
        args["selector"] = {**server["workflows"][0]["args"]["selector"], **args["selector"]}
    return copy_job(name, dest, server_args=args, engine=RUN_ENGINE)


def plain_simulator(job: Path, workspace: Path, data: Path) -> tuple[int, str]:
    """The commands as typed (the set-up command, then the simulator), in process trees that are always stopped."""
    env = {**os.environ, "PYTHONPATH": str(CUSTOM), "FEDSEG_DATALIST": f"{data}/{{SITE_NAME}}/datalist.json"}
    out = workspace.parent / f"{workspace.name}.out"
    rc, left, _ = run_process_tree(
        [sys.executable, "-m", "fedseg.fl.allowlist", "--simulation", str(workspace)], env, out, timeout=120
    )
    assert rc == 0 and not left, out.read_text(errors="replace")
    n = str(len(RUN_SITES))
    rc, left, _ = run_process_tree(
        [NVFLARE, "simulator", str(job), "-w", str(workspace), "-n", n, "-t", n],
        env,
        out,
        timeout=900,
        cwd=str(workspace.parent),
    )
    assert not left, f"processes left running: {left}"
    return rc, out.read_text(errors="replace")


def error_logs(workspace: Path) -> str:
    return "\n".join(
        f"== {p}\n{p.read_text(errors='replace')}"
        for p in sorted(workspace.rglob("error_log.txt"))
        if p.read_text(errors="replace").strip()
    )


@pytest.fixture(scope="module")
def runs(tiny2d, tmp_path_factory) -> dict:
    """Every job folder run once, three side by side: {name: SimpleNamespace(job, workspace, rc, output)}."""
    tmp = tmp_path_factory.mktemp("plain_simulator")
    jobs = {name: tiny_job(name, tmp / "jobs") for name in BUDGET}
    outcomes = {}
    for batch in (("fedavg", "fedcrossens", "fedsm"), ("fedprox", "softpull", "fedcross")):
        for name in batch:
            assert not (tmp / f"ws_{name}").exists()
        outcomes.update(
            in_parallel(**{name: (lambda name=name: plain_simulator(jobs[name], tmp / f"ws_{name}", tiny2d)) for name in batch})
        )
    return {
        name: SimpleNamespace(job=jobs[name], workspace=tmp / f"ws_{name}", rc=rc, output=output)
        for name, (rc, output) in outcomes.items()
    }


def check_run(name: str, run: SimpleNamespace) -> None:
    assert run.rc == 0, run.output[-4000:]
    assert not error_logs(run.workspace), error_logs(run.workspace)[-4000:]
    assert "ComponentNotAuthorized" not in run.output and "not in allow_list" not in run.output
    resources = json.loads((run.workspace / "local" / "resources.json").read_text())
    assert set(FEDSEG_CLASSES) <= set(resources["class_allow_list"]) and "*" not in resources["class_allow_list"]
    assert not any(e.endswith(".") for e in resources["class_allow_list"])
    results = load_results(run.workspace, name)
    scored = [k for k, v in results["models"].items() if isinstance(v, dict) and sorted(v) == RUN_SITES]
    assert scored, f"{name}: no model scored at every site: {list(results['models'])}"
    for key in scored:
        for site in RUN_SITES:
            assert 0.0 <= results["models"][key][site]["dice"] <= 1.0


@pytest.mark.parametrize("name", list(BUDGET))
def test_plain_nvflare_simulator_runs_every_job_folder(name, runs):
    check_run(name, runs[name])


# ---- real runs: those model sets -> export -> monai.bundle run, against fedseg.infer -------------------------
@pytest.fixture(scope="module")
def trained(runs) -> dict:
    """The model sets of the FedAvg, FedCrossEns and FedSM runs."""
    for name in ("fedavg", "fedcrossens", "fedsm"):
        assert runs[name].rc == 0, runs[name].output[-4000:]
    app = {name: runs[name].workspace / "server" / "simulate_job" / "app_server" for name in runs}
    return {
        "fedavg": app["fedavg"] / "fedavg" / "best.pt",
        "fedcrossens": app["fedcrossens"] / "fedcross" / "best.pt",
        "fedsm": app["fedsm"] / "fedsm" / "best.pt",
    }


def run_python(args: list[str], cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def bundle_runs(trained, tiny2d, tmp_path_factory) -> dict:
    """Each model set exported and run with `python -m monai.bundle run` (cwd elsewhere, no FedSeg on the path),
    and `python -m fedseg.infer` on the same images, all in parallel."""
    tmp = tmp_path_factory.mktemp("bundles")
    images = tmp / "images"
    images.mkdir()
    for site in ("site-1", "site-2", "site-3"):
        for entry in json.loads((tiny2d / site / "datalist.json").read_text())["testing"][:2]:
            shutil.copy(tiny2d / site / entry["image"] if not Path(entry["image"]).is_absolute() else entry["image"], images)
    bundles = {name: export_bundle(models, tmp / f"bundle_{name}") for name, models in trained.items()}
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    commands = {
        name: (
            [
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                str(bundle / "configs" / "inference.json"),
                "--dataset_dir",
                str(images),
                "--output_dir",
                str(tmp / f"out_{name}"),
                "--save_probabilities",
                "True",
            ],
            None,
        )
        for name, bundle in bundles.items()
    }
    commands["infer_fedavg"] = (
        [
            "-m",
            "fedseg.infer",
            "global",
            "--models",
            str(trained["fedavg"]),
            "--input",
            str(images),
            "--out",
            str(tmp / "infer_fedavg"),
        ],
        str(CUSTOM),
    )
    commands["infer_fedcrossens"] = (
        [
            "-m",
            "fedseg.infer",
            "ensemble",
            "--models",
            str(trained["fedcrossens"]),
            "--input",
            str(images),
            "--out",
            str(tmp / "infer_fedcrossens"),
        ],
        str(CUSTOM),
    )
    commands["infer_fedsm"] = (
        [
            "-m",
            "fedseg.infer",
            "fedsm",
            "--models",
            str(trained["fedsm"]),
            "--input",
            str(images),
            "--out",
            str(tmp / "infer_fedsm"),
        ],
        str(CUSTOM),
    )
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = {name: pool.submit(run_python, args, cwd, path) for name, (args, path) in commands.items()}
        logs = {name: f.result().stdout for name, f in futures.items()}
    return {
        "images": images,
        "tmp": tmp,
        "bundles": bundles,
        "logs": logs,
        "cases": sorted(p.name[: -len(".nii.gz")] for p in images.iterdir()),
    }


def engine_for(models: Path) -> tuple[SegEngine, dict, dict]:
    from fedseg.export.modelsets import read_trained_models

    t = read_trained_models(models)
    return SegEngine(t.engine, {}, site="test"), t.groups, t.info


def read_image(path: Path) -> torch.Tensor:
    item = Compose(eval_transforms(("image",)))({"image": str(path)})
    return item["image"].as_tensor().unsqueeze(0)


def net_of(engine: SegEngine, weights: dict) -> torch.nn.Module:
    net = engine.new_network()
    load_numpy_state(net, weights)
    return net


def bundle_probs(path: Path, spatial_shape: tuple) -> np.ndarray:
    """<case>_prob.nii.gz as (classes, *spatial)."""
    array = np.asarray(nib.load(str(path)).dataobj)
    return np.moveaxis(array.reshape(*spatial_shape, -1), -1, 0)


def check_outputs(runs: dict, name: str, expected_probs: dict, infer_dir: Path | None = None) -> None:
    """Bundle outputs against FedSeg's: probabilities within 1e-4, segmentations equal, the inputs' affines."""
    out = runs["tmp"] / f"out_{name}"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{c}_{kind}.nii.gz" for c in runs["cases"] for kind in ("prob", "seg")
    )
    for case in runs["cases"]:
        source = nib.load(str(runs["images"] / f"{case}.nii.gz"))
        seg = nib.load(str(out / f"{case}_seg.nii.gz"))
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        probs = bundle_probs(out / f"{case}_prob.nii.gz", source.shape)
        np.testing.assert_allclose(probs, expected_probs[case], atol=1e-4)
        labels = np.asarray(seg.dataobj)
        assert (labels == expected_probs[case].argmax(0)).mean() == 1.0
        if infer_dir is not None:
            assert (labels == np.asarray(nib.load(str(infer_dir / f"{case}_seg.nii.gz")).dataobj)).mean() == 1.0


def test_fedavg_bundle_segments_like_fedseg(trained, bundle_runs):
    """FedAvg's global model: the bundle (plain MONAI UNet + SlidingWindowInferer) segments as
    `fedseg.infer global`, with the engine's probabilities."""
    engine, groups, _ = engine_for(trained["fedavg"])
    net = net_of(engine, groups["global"])
    expected = {
        c: engine.predict_probs(net, read_image(bundle_runs["images"] / f"{c}.nii.gz"))[0].numpy() for c in bundle_runs["cases"]
    }
    check_outputs(bundle_runs, "fedavg", expected, bundle_runs["tmp"] / "infer_fedavg")
    # the weights load into the plain MONAI network without renaming keys
    from monai.networks.nets import UNet

    bundle = bundle_runs["bundles"]["fedavg"]
    network = json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]
    assert network.pop("_target_") == "monai.networks.nets.UNet"
    plain = UNet(**network)
    plain.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    case = bundle_runs["cases"][0]
    np.testing.assert_allclose(
        engine.predict_probs(plain, read_image(bundle_runs["images"] / f"{case}.nii.gz"))[0], expected[case], atol=1e-6
    )


def _infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedseg.infer", "global", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def test_global_model_of_a_fedavg_run_segments_new_images(runs, trained, tiny2d, tmp_path):
    job, workspace = runs["fedavg"].job, runs["fedavg"].workspace
    best = trained["fedavg"]
    assert best.is_file()
    datalist = tiny2d / "site-1" / "datalist.json"

    proc = _infer("--models", str(best), "--input", str(datalist), "--out", str(tmp_path / "dl"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "dl" / "summary.json").read_text())
    cases = load_datalist(str(datalist))["testing"]
    assert summary["command"] == "global" and summary["method"] == "fedavg" and len(summary["cases"]) == len(cases)
    for case, row in zip(cases, summary["cases"]):
        source, seg = nib.load(case["image"]), nib.load(tmp_path / "dl" / row["segmentation"])
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        assert seg.get_data_dtype() == np.uint8 and set(np.unique(seg.get_fdata())) <= {0.0, 1.0}
        truth, pred = nib.load(case["label"]).get_fdata() > 0, seg.get_fdata() > 0
        assert row["dice"] == pytest.approx(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1), abs=1e-5)
    # same weights and engine settings as the job's own final test: the same per-case Dice
    job_dice = load_results(workspace, "fedavg")["models"]["global (best)"]["site-1"]["dice_per_case"]
    assert [r["dice"] for r in summary["cases"]] == pytest.approx(job_dice, abs=1e-4)

    # moved away from its run, the set has no engine settings next to it: refused by name, then --job-config works
    moved = tmp_path / "moved" / "best.pt"
    moved.parent.mkdir()
    shutil.copy(best, moved)
    refused = _infer("--models", str(moved), "--input", str(tiny2d / "site-2" / "imagesTs"), "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and str(moved) in refused.stderr and "--job-config" in refused.stderr
    folder = tmp_path / "folder"
    proc = _infer(
        "--models", str(moved), "--job-config", str(job), "--input", str(tiny2d / "site-2" / "imagesTs"), "--out", str(folder)
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    images = sorted(p.name for p in (tiny2d / "site-2" / "imagesTs").glob("*.nii.gz"))
    assert sorted(p.name for p in folder.glob("*_seg.nii.gz")) == [n.replace(".nii.gz", "_seg.nii.gz") for n in images]
    assert all("dice" not in r for r in json.loads((folder / "summary.json").read_text())["cases"])


def test_fedcrossens_bundle_segments_like_fedseg_infer(trained, bundle_runs):
    engine, groups, info = engine_for(trained["fedcrossens"])
    nets = [net_of(engine, groups["members"][f"m{m}"]) for m in range(info["num_models"])]
    assert len(nets) == len(RUN_SITES)  # one member per site
    expected = {}
    for c in bundle_runs["cases"]:
        image = read_image(bundle_runs["images"] / f"{c}.nii.gz")
        expected[c] = torch.stack([engine.predict_probs(net, image) for net in nets]).mean(0)[0].numpy()
    check_outputs(bundle_runs, "fedcrossens", expected, bundle_runs["tmp"] / "infer_fedcrossens")
    from monai.networks.nets import UNet

    bundle = bundle_runs["bundles"]["fedcrossens"]
    network = json.loads((bundle / "configs" / "inference.json").read_text())["member_def"]
    assert network.pop("_target_") == "monai.networks.nets.UNet"
    for m in range(len(RUN_SITES)):
        UNet(**network).load_state_dict(torch.load(bundle / "models" / f"member_{m}.pt", weights_only=True), strict=True)


def test_fedsm_bundle_routes_and_segments_like_fedseg_infer(trained, bundle_runs):
    engine, groups, _ = engine_for(trained["fedsm"])
    summary = json.loads((bundle_runs["tmp"] / "infer_fedsm" / "summary.json").read_text())
    chosen = {row["case"]: row["model"] for row in summary["cases"]}
    log = bundle_runs["logs"]["fedsm"]
    expected = {}
    for c in bundle_runs["cases"]:
        weights = groups["global"] if chosen[c] == "global" else groups["personal"][chosen[c]]
        expected[c] = engine.predict_probs(net_of(engine, weights), read_image(bundle_runs["images"] / f"{c}.nii.gz"))[
            0
        ].numpy()
        assert f"{c}.nii.gz -> {chosen[c]} model" in log  # the bundle's selector chose what fedseg.infer chose
    check_outputs(bundle_runs, "fedsm", expected, bundle_runs["tmp"] / "infer_fedsm")


def test_bundles_need_no_fedseg(bundle_runs):
    """The runs above had no FedSeg on the Python path; the bundles name only MONAI and their own scripts."""
    for bundle in bundle_runs["bundles"].values():
        assert "fedseg." not in (bundle / "configs" / "inference.json").read_text().replace("scripts.fedseg_bundle.", "")
        assert (bundle / "scripts" / "fedseg_bundle.py").is_file() == (bundle.name != "bundle_fedavg")
        for script in (bundle / "scripts").glob("*.py"):
            imports = [line for line in script.read_text().splitlines() if line.startswith(("import ", "from "))]
            assert not [line for line in imports if "fedseg" in line], (script, imports)
