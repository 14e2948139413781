"""Write a trained FedSeg model as a MONAI bundle.

    python -m fedseg.export --models RUN/app_server/fedcross/best.pt --out BUNDLE [--model ensemble] [--overwrite]

The bundle (MONAI's layout) segments a folder of NIfTI images with MONAI alone:

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --dataset_dir IMAGES [--output_dir OUT]

    configs/metadata.json   MONAI bundle metadata (versions, network_data_format) plus "fedseg": the job, method,
                            round and model-set file it came from
    configs/inference.json  LoadImage -> channel first -> z-score (FedSeg's engine) -> sliding-window inference
                            with the job's roi_size, sw_batch_size and overlap -> softmax -> argmax -> SaveImage
    models/model.pt         the weights the inference config loads; for one network a plain MONAI state dict
                            (monai.networks.nets.UNet(**args).load_state_dict(torch.load(...)) works as is)
    models/<part>.pt        ensemble: member_<i>.pt; super model: global.pt, personalized_<site>.pt, selector.pt
    scripts/fedseg_bundle.py  ensemble and super model only: the small module that combines the networks
    docs/README.md
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import sys
import uuid
from pathlib import Path

import torch

from fedseg.engine.config import EngineConfig
from fedseg.engine.networks import build_segmentation_network
from fedseg.export.modelsets import (
    ENSEMBLE,
    SUPER,
    ExportError,
    TrainedModels,
    plain_monai_weights,
    read_trained_models,
)

RUNTIME_MODULE = "fedseg_bundle"  # scripts/fedseg_bundle.py in the bundle
RUNTIME_SOURCE = Path(__file__).with_name("bundle_runtime.py")
BUNDLE_VERSION = "0.1.0"
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


# ---- the network as a MONAI config ---------------------------------------------------------------------------
def monai_network_config(network_args: dict) -> dict:
    """The plain monai.networks.nets network that fedseg.engine.networks.build_segmentation_network builds from
    the same arguments, as a bundle config component (same module tree, so the same state-dict keys)."""
    known = set(inspect.signature(build_segmentation_network).parameters)
    unknown = sorted(set(network_args) - known)
    if unknown:
        raise ExportError(f"network settings {unknown} are unknown to this FedSeg version (known: {sorted(known)})")
    args = {name: p.default for name, p in inspect.signature(build_segmentation_network).parameters.items()}
    args.update(network_args)
    arch = str(args["arch"]).lower()
    channels = [int(c) for c in args["channels"]]
    strides = [int(s) for s in args["strides"]] if args["strides"] is not None else [2] * (len(channels) - 1)
    common = {
        "spatial_dims": int(args["spatial_dims"]),
        "in_channels": int(args["in_channels"]),
        "out_channels": int(args["out_channels"]),
    }
    dropout = float(args["dropout"])
    if arch == "unet":
        return {
            "_target_": "monai.networks.nets.UNet",
            **common,
            "channels": channels,
            "strides": strides,
            "num_res_units": int(args["num_res_units"]),
            "norm": args["norm"],
            "dropout": dropout,
        }
    if arch == "segresnet":
        return {
            "_target_": "monai.networks.nets.SegResNet",
            **common,
            "init_filters": channels[0],
            "blocks_down": [1] + [2] * (len(channels) - 1),
            "blocks_up": [1] * (len(channels) - 1),
            "norm": args["norm"],
            "dropout_prob": dropout or None,
        }
    if arch == "dynunet":
        return {
            "_target_": "monai.networks.nets.DynUNet",
            **common,
            "kernel_size": [3] * len(channels),
            "strides": [1] + strides,
            "upsample_kernel_size": strides,
            "filters": channels,
            "norm_name": args["norm"],
            "dropout": dropout or None,
            "res_block": int(args["num_res_units"]) > 0,
        }
    raise ExportError(f"network arch {arch!r} has no MONAI bundle export (unet, segresnet, dynunet)")


def instantiate(component: dict) -> torch.nn.Module:
    """Build a config component the way `monai.bundle run` does."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"net": component})
    return parser.get_parsed_content("net")


# ---- configs ---------------------------------------------------------------------------------------------------
def _sliding_window(cfg: EngineConfig) -> dict:
    return {"roi_size": [int(r) for r in cfg.roi_size], "sw_batch_size": int(cfg.sw_batch_size), "overlap": float(cfg.overlap)}


def inference_config(model: str, trained: TrainedModels, network: dict, bundle_root: Path) -> dict:
    """configs/inference.json for one network (plain MONAI), the ensemble or the FedSM super model."""
    cfg = trained.engine
    seg_dtype = "$np.uint8" if cfg.num_classes <= 255 else "$np.int16"
    preprocessing = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
    ]
    config: dict = {
        "imports": ["$import glob", "$import os"],
        # where the bundle was written; pass --bundle_root DIR after moving it
        "bundle_root": str(bundle_root),
        "dataset_dir": "$os.getcwd()",
        "output_dir": "$@bundle_root + '/eval'",
        "save_probabilities": False,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # FedSeg's engine uses mixed precision on a GPU when its "amp" setting is on, never on the CPU
        "amp": f"${bool(cfg.amp)} and torch.cuda.is_available()",
        "datalist": "$[{'image': f} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
        "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))]",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
    }
    to_float = {"_target_": "EnsureTyped", "keys": "pred", "dtype": "$torch.float32"}
    if model == ENSEMBLE:
        config["member_def"] = network
        config["network_def"] = {
            "_target_": f"scripts.{RUNTIME_MODULE}.MeanSoftmaxEnsemble",
            "member": "@member_def",
            "num_members": trained.num_members(),
            **_sliding_window(cfg),
        }
        config["inferer"] = {"_target_": "SimpleInferer"}
        config["prepare_batch"] = "$monai.engines.default_prepare_batch"
        head = [to_float]
    elif model == SUPER:
        selector = trained.selector_settings()
        preprocessing.insert(2, {"_target_": "CopyItemsd", "keys": "image", "names": "image_raw"})
        config["segmenter_def"] = network
        config["gamma"] = float(trained.info["gamma"])
        config["network_def"] = {
            "_target_": f"scripts.{RUNTIME_MODULE}.FedSMSuperModel",
            "segmenter": "@segmenter_def",
            "site_names": trained.site_names(),
            "gamma": "@gamma",
            "spatial_dims": cfg.spatial_dims,
            "in_channels": cfg.in_channels,
            "selector_channels": [int(c) for c in selector.channels],
            "selector_norm": selector.norm,
            "selector_input_size": selector.size(cfg.spatial_dims),
            **_sliding_window(cfg),
        }
        config["inferer"] = {"_target_": "SimpleInferer"}
        config["prepare_batch"] = {"_target_": "monai.engines.PrepareBatchExtraInput", "extra_keys": ["image_raw"]}
        head = [to_float]
    else:
        config["network_def"] = network
        config["inferer"] = {"_target_": "SlidingWindowInferer", **_sliding_window(cfg), "mode": "gaussian"}
        config["prepare_batch"] = "$monai.engines.default_prepare_batch"
        head = [to_float, {"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    save = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_ext": ".nii.gz",
        "resample": False,
        "separate_folder": False,
        "print_log": True,
    }
    config.update(
        {
            "network": "$@network_def.to(@device)",
            "preprocessing": {"_target_": "Compose", "transforms": preprocessing},
            "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": 0,
            },
            "postprocessing_head": head,
            "save_probabilities_transform": {**save, "output_postfix": "prob", "output_dtype": "$np.float32"},
            "argmax": {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            "save_segmentation": {**save, "output_postfix": "seg", "output_dtype": seg_dtype},
            "postprocessing": {
                "_target_": "Compose",
                "transforms": "$@postprocessing_head + ([@save_probabilities_transform] if @save_probabilities else [])"
                " + [@argmax, @save_segmentation]",
            },
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "load_path": "@ckpt_path",
                    "load_dict": {"model": "@network"},
                    "strict": True,
                    "map_location": "@device",
                },
                {"_target_": "StatsHandler", "iteration_log": False},
            ],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "prepare_batch": "@prepare_batch",
                "postprocessing": "@postprocessing",
                "val_handlers": "@handlers",
                "amp": "@amp",
            },
            "check_inputs": "$None if @datalist else (_ for _ in ()).throw(FileNotFoundError("
            "'no NIfTI files (*.nii.gz, *.nii) in ' + os.path.abspath(@dataset_dir) "
            "+ ' (pass --dataset_dir FOLDER)'))",
            "run": ["$@check_inputs", "$@evaluator.run()"],
        }
    )
    return config


def class_names(num_classes: int) -> dict:
    return {str(c): ("background" if c == 0 else f"class {c}") for c in range(num_classes)}


def metadata(model: str, trained: TrainedModels, network: dict) -> dict:
    """configs/metadata.json: MONAI's bundle metadata fields, plus where the model came from ("fedseg")."""
    import monai
    import nibabel
    import numpy

    cfg = trained.engine
    method = trained.provenance.get("method", trained.kind)
    what = {
        ENSEMBLE: f"the mean softmax of the {trained.num_members()} FedCross member networks",
        SUPER: "FedSM's super model: a site selector routes each image to that site's personalized network when "
        f"its confidence exceeds gamma={trained.info.get('gamma')}, else to the global network",
    }
    described = what.get(model, f"the {model} network ({network['_target_'].rsplit('.', 1)[-1]})")
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by FedSeg from {trained.path.name} ({method}, model {model})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"FedSeg {method} {model}",
        "task": f"{cfg.spatial_dims}-D segmentation into {cfg.num_classes} classes (background included)",
        "description": (
            f"A segmentation model trained with FedSeg ({method}, NVIDIA FLARE + MONAI): {described}. "
            "Each image is z-scored per channel and segmented with sliding windows of roi_size; the "
            "output is the argmax of the class probabilities, saved as NIfTI with the input's affine."
        ),
        "authors": "FedSeg export",
        "copyright": "Copyright (c) the federation that trained the model",
        "data_type": "nifti",
        "image_classes": f"{cfg.in_channels} channel(s), intensities z-scored per channel",
        "label_classes": json.dumps(class_names(cfg.num_classes)),
        "pred_classes": json.dumps(class_names(cfg.num_classes)),
        "intended_use": "Research. Validate on your own data before any clinical use.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any",
                    "num_channels": cfg.in_channels,
                    "spatial_shape": [int(r) for r in cfg.roi_size],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(c): f"channel {c}" for c in range(cfg.in_channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": cfg.num_classes,
                    "spatial_shape": [int(r) for r in cfg.roi_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": class_names(cfg.num_classes),
                }
            },
        },
        "fedseg": {
            **trained.provenance,
            "model": model,
            "engine": cfg.to_dict(),
            "network_args": cfg.network_args(),
            "exported_with": {"python": platform.python_version(), "monai": monai.__version__, "torch": torch.__version__},
        },
    }


def readme(model: str, trained: TrainedModels, bundle_root: Path, files: list[str]) -> str:
    p = trained.provenance
    counter = "communication" if trained.kind == "fedcross" else "round"
    lines = [
        f"# FedSeg {p.get('method', trained.kind)}: {model}",
        "",
        f"Exported by `fedseg export` from `{p['model_set']}` ({counter} {p.get(counter)}"
        + (f", job `{p['job']}`" if p.get("job") else "")
        + "). Provenance: `configs/metadata.json` (`fedseg`).",
        "",
        "## Segment a folder of NIfTI images",
        "",
        "```bash",
        f"python -m monai.bundle run --config_file {bundle_root}/configs/inference.json \\",
        "    --dataset_dir IMAGES [--output_dir OUT] [--save_probabilities True]"
        + (" [--gamma 0.9]" if model == SUPER else ""),
        "```",
        "",
        (
            "Every `*.nii.gz` / `*.nii` of IMAGES (one single-channel image per file) gives `OUT/<case>_seg.nii.gz`, the "
            "segmentation with the input's affine (opens in 3D Slicer on top of the image); `--save_probabilities True` "
            "adds `<case>_prob.nii.gz` (class probabilities). OUT defaults to `eval/` in the bundle. After moving the "
            "bundle, add `--bundle_root NEW_PATH` (it locates `models/`)."
        ),
        "",
        (
            "Preprocessing and inference are FedSeg's: per-channel z-score, sliding windows of "
            f"{list(trained.engine.roi_size)} (overlap {trained.engine.overlap}, gaussian blending), softmax, argmax."
        ),
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in files],
        "",
    ]
    if model in (ENSEMBLE, SUPER):
        lines += [
            (
                "`scripts/fedseg_bundle.py` (torch and MONAI only) combines the networks; `monai.bundle run` puts "
                "the bundle folder on the Python path, so FedSeg need not be installed."
            ),
            "",
        ]
    else:
        net = json.loads(json.dumps(monai_network_config(trained.engine.network_args())))
        target = net.pop("_target_")
        lines += [
            "The weights are a plain MONAI state dict:",
            "",
            "```python",
            "import torch",
            f"from {target.rsplit('.', 1)[0]} import {target.rsplit('.', 1)[1]}",
            f"net = {target.rsplit('.', 1)[1]}(**{net!r})",
            "net.load_state_dict(torch.load('models/model.pt', weights_only=True))",
            "```",
            "",
        ]
    return "\n".join(lines)


# ---- weights ---------------------------------------------------------------------------------------------------
def bundle_weights(model: str, trained: TrainedModels) -> tuple[dict, dict[str, dict]]:
    """(model.pt state dict of the inference config's network, {extra file name: plain state dict})."""
    if model == ENSEMBLE:
        members = [
            plain_monai_weights(trained.network_weights(f"member:{m}"), f"{trained.path} member {m}")
            for m in range(trained.num_members())
        ]
        combined = {f"members.{m}.{k}": v for m, w in enumerate(members) for k, v in w.items()}
        return combined, {f"member_{m}.pt": w for m, w in enumerate(members)}
    if model == SUPER:
        import numpy as np

        global_weights = plain_monai_weights(trained.groups["global"], f"{trained.path} global model")
        personal = {
            s: plain_monai_weights(trained.groups["personal"][s], f"{trained.path} personalized model of {s}")
            for s in trained.site_names()
        }
        selector = {k: torch.as_tensor(np.array(v)) for k, v in trained.groups["selector"].items()}
        combined = {
            **{f"global_model.{k}": v for k, v in global_weights.items()},
            **{f"personalized.{s}.{k}": v for s, w in personal.items() for k, v in w.items()},
            **{f"selector.{k}": v for k, v in selector.items()},
        }
        extra = {
            "global.pt": global_weights,
            **{f"personalized_{s}.pt": w for s, w in personal.items()},
            "selector.pt": selector,
        }
        return combined, extra
    return plain_monai_weights(trained.network_weights(model), f"{trained.path} {model} model"), {}


def check_loads(model: str, trained: TrainedModels, network: dict, config: dict, weights: dict) -> None:
    """The bundle's network, built from its config, takes model.pt with strict=True (else the export fails)."""
    from fedseg.export import bundle_runtime

    built = instantiate(network)
    if model == ENSEMBLE:
        args = {k: v for k, v in config["network_def"].items() if k not in ("_target_", "member")}
        built = bundle_runtime.MeanSoftmaxEnsemble(member=built, **args)
    elif model == SUPER:
        args = {k: v for k, v in config["network_def"].items() if k not in ("_target_", "segmenter", "gamma")}
        built = bundle_runtime.FedSMSuperModel(segmenter=built, gamma=config["gamma"], **args)
    try:
        built.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ExportError(
            f"{trained.path}: the {model} weights do not fit the bundle's network {network['_target_']}: {e}"
        ) from e


# ---- writing ---------------------------------------------------------------------------------------------------
def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def export_bundle(
    models: str | Path, out: str | Path, model: str | None = None, job_config: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write `model` of the model set `models` as a MONAI bundle at `out` (built in a temporary folder next to
    it and renamed at the end, so `out` is never half-written). Returns the bundle folder."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    trained = read_trained_models(models, job_config)
    model = trained.check_model(model or trained.default_model())
    network = monai_network_config(trained.engine.network_args())
    config = inference_config(model, trained, network, out)
    weights, extra = bundle_weights(model, trained)
    check_loads(model, trained, network, config, weights)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True)
        write_json(tmp / "configs" / "inference.json", config)
        write_json(tmp / "configs" / "metadata.json", metadata(model, trained, network))
        torch.save(weights, tmp / "models" / "model.pt")
        for name, state in extra.items():
            torch.save(state, tmp / "models" / name)
        if model in (ENSEMBLE, SUPER):
            (tmp / "scripts").mkdir()
            (tmp / "scripts" / "__init__.py").write_text('"""Code of this FedSeg bundle (see fedseg_bundle.py)."""\n')
            shutil.copyfile(RUNTIME_SOURCE, tmp / "scripts" / f"{RUNTIME_MODULE}.py")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + ["docs/README.md"]
        (tmp / "docs" / "README.md").write_text(readme(model, trained, out, sorted(files)))
        check_output(out, overwrite)  # again: another process may have written there meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- command line ----------------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m fedseg.export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="model-set file a job wrote (<run>/app_server/<method>/best.pt or last.pt)")
    p.add_argument("--out", required=True, help="bundle folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument(
        "--model",
        help="global | member:<i> | ensemble | personalized:<site> | super (default: ensemble for "
        "FedCross, super for FedSM, global for FedAvg/FedProx and SoftPull)",
    )
    p.add_argument(
        "--job-config",
        help="FedAvg/FedProx set moved away from its run: the job's config_fed_client.json "
        "(or job folder) with the engine settings it was trained with",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    return p


def main(argv: list[str] | None = None) -> int:
    o = build_parser().parse_args(argv)
    try:
        out = export_bundle(o.models, o.out, o.model, o.job_config, o.overwrite)
    except ExportError as e:
        print(f"fedseg export: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "configs" / "metadata.json").read_text())["fedseg"]
    print(
        f"wrote MONAI bundle {out} ({meta['method']}, model {meta['model']}); segment a folder of NIfTI images with:\n"
        f"  python -m monai.bundle run --config_file {out}/configs/inference.json --dataset_dir IMAGES "
        f"--output_dir OUT"
    )
    return 0
