"""Segment new NIfTI images with a trained FedSeg model set (and, for an ensemble, write uncertainty maps).

    python -m fedseg.infer global   --models WS/server/simulate_job/app_server/fedavg/best.pt \\
        --input DIR_OR_DATALIST.json --out OUT [--section testing] [--labels LABEL_DIR] [--job-config JOB]
    python -m fedseg.infer fedsm    --models .../app_server/fedsm/best.pt ...     (see fedseg.infer_fedsm)
    python -m fedseg.infer ensemble --models WS/server/simulate_job/app_server/fedcross/best.pt \\
        --input DIR_OR_DATALIST.json --out OUT [--section testing] [--threshold 0.5] [--labels LABEL_DIR]

Input: a folder of NIfTI images (*.nii.gz / *.nii, one single-channel image per file; --labels names a
folder with label files of the same names) or a datalist JSON (its --section list; labels are used when
the entries have them). Output per case, all with the input image's affine:
    <case>_seg.nii.gz      segmentation of the ensemble's mean softmax (argmax, or --threshold t: the most
                           probable foreground class where its mean probability > t)
    <case>_std.nii.gz      per-voxel standard deviation of the class probabilities across the K models
                           (mean over classes; for two classes the std of the foreground probability)
    <case>_entropy.nii.gz  predictive entropy of the mean softmax (nats)
and summary.json / summary.csv: per case mean uncertainty, foreground size and, where a label exists, Dice
and the mean std over wrongly vs correctly segmented voxels. The network and the sliding-window settings
come from the model set's own info record, so no job config is needed.

`global` segments with one global model: FedAvg/FedProx's (<run>/app_server/fedavg/{best,last}.pt) or FedSM's
global model. It writes <case>_seg.nii.gz (argmax) and the same summary files. A FedAvg/FedProx model set does not
record its engine settings: they come from the run's config/config_fed_client.json next to it, or --job-config
(a config_fed_client.json or a job folder) for a model set moved away from its run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.infer_fedsm import add_fedsm_parser
from fedseg.inference_io import (
    add_common_arguments,
    case_dice,
    first_path,
    is_nifti,
    list_cases,
    read_case,
    write_nifti_like,
    write_summary,
)

__all__ = ["case_dice", "first_path", "is_nifti", "list_cases", "read_case", "write_nifti_like", "write_summary"]


# ---- one global model (FedAvg / FedProx, or FedSM's global model) -----------------------------------------------
def run_global(o: argparse.Namespace) -> int:
    from fedseg.engine import SegEngine, load_numpy_state
    from fedseg.export.modelsets import GLOBAL, ExportError, read_trained_models

    try:
        trained = read_trained_models(o.models, o.job_config)
        weights = trained.network_weights(trained.check_model(GLOBAL))
    except ExportError as e:
        raise SystemExit(f"fedseg.infer global: {e}") from e
    cfg = trained.engine
    engine = SegEngine(cfg, {}, site="inference")
    net = engine.new_network()
    load_numpy_state(net, weights, site=f"global model of {o.models}")
    net.eval()
    cases = list_cases(o.input, o.section, o.labels)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    counter = "communication" if trained.kind == "fedcross" else "round"
    print(
        f"global model of {o.models} ({trained.provenance.get('method')}, {counter} {trained.info.get(counter)}); "
        f"{len(cases)} case(s) -> {out}",
        flush=True,
    )
    rows = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        item = read_case(case)
        with torch.no_grad():
            seg = engine.predict_probs(net, item["image"].unsqueeze(0)).argmax(dim=1)[0].cpu()
        source, name = first_path(case["image"]), f"{case['name']}_seg.nii.gz"
        write_nifti_like(source, seg.numpy().astype(np.uint8 if cfg.num_classes <= 255 else np.int16), out / name)
        row = {"case": case["name"], "image": source, "segmentation": name, "foreground_voxels": int((seg > 0).sum())}
        if "label" in item:
            per_class = case_dice(seg, item["label"][0].long(), cfg.num_classes)
            row["dice"] = float(np.mean(per_class))
            if len(per_class) > 1:
                row.update({f"dice_class{c + 1}": d for c, d in enumerate(per_class)})
        rows.append(row)
        print(
            f"[{i + 1}/{len(cases)}] {case['name']}"
            + (f": dice {row['dice']:.4f}" if "dice" in row else "")
            + f" ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    header = {
        "command": "global",
        "models": str(Path(o.models).resolve()),
        "method": trained.provenance.get("method"),
        counter: trained.info.get(counter),
        "engine_settings_from": trained.provenance.get("engine_settings_from"),
        "segmentation": "argmax of softmax",
        "input": str(Path(o.input).resolve()),
        "section": o.section if Path(o.input).suffix == ".json" else None,
    }
    write_summary(out, rows, header)
    print(f"wrote {len(rows)} case(s) and {out / 'summary.json'}, {out / 'summary.csv'}")
    return 0


def add_global_parser(sub) -> None:
    p = sub.add_parser(
        "global",
        help="one global model: FedAvg / FedProx (or FedSM's global model)",
        description="Segment with the global model of a FedAvg/FedProx model set (best.pt / last.pt) or of a FedSM set.",
    )
    add_common_arguments(p, "FedAvg/FedProx")
    p.add_argument(
        "--job-config",
        help="a FedAvg/FedProx set moved away from its run: the job's config_fed_client.json "
        "(or job folder) with the engine settings it was trained with",
    )
    p.set_defaults(run=run_global)


# ---- ensemble (FedCross / FedCrossEns) -------------------------------------------------------------------------
def run_ensemble(o: argparse.Namespace) -> int:
    from fedseg.engine import EngineConfig, SegEngine, SegNetwork, load_numpy_state
    from fedseg.methods.fedcross import ensemble_maps, segment
    from fedseg.modelset import load_members

    members, _, info = load_members(o.models)
    cfg = EngineConfig.from_dict(info["engine"])
    engine = SegEngine(cfg, {}, site="inference")
    nets = []
    for m, weights in enumerate(members):
        net = SegNetwork(**info["network_args"]).to(engine.device)
        load_numpy_state(net, weights, site=f"model set member {m}")
        nets.append(net)
    cases = list_cases(o.input, o.section, o.labels)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"ensemble of {len(nets)} model(s) from {o.models} (communication {info.get('communication')}); "
        f"{len(cases)} case(s) -> {out}",
        flush=True,
    )
    rows = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        item = read_case(case)
        image = item["image"].unsqueeze(0)
        with torch.no_grad():
            mean, std, entropy = ensemble_maps(torch.stack([engine.predict_probs(net, image) for net in nets]))
            seg = segment(mean, o.threshold)[0].cpu()
        std, entropy = std[0].cpu(), entropy[0].cpu()
        source = first_path(case["image"])
        name = case["name"]
        seg_dtype = np.uint8 if cfg.num_classes <= 255 else np.int16
        write_nifti_like(source, seg.numpy().astype(seg_dtype), out / f"{name}_seg.nii.gz")
        write_nifti_like(source, std.numpy().astype(np.float32), out / f"{name}_std.nii.gz")
        write_nifti_like(source, entropy.numpy().astype(np.float32), out / f"{name}_entropy.nii.gz")
        row = {
            "case": name,
            "image": source,
            "mean_std": float(std.mean()),
            "max_std": float(std.max()),
            "mean_entropy": float(entropy.mean()),
            "foreground_voxels": int((seg > 0).sum()),
        }
        if "label" in item:
            label = item["label"][0].long()
            per_class = case_dice(seg, label, cfg.num_classes)
            row["dice"] = float(np.mean(per_class))
            if len(per_class) > 1:
                row.update({f"dice_class{c + 1}": d for c, d in enumerate(per_class)})
            wrong = seg != label
            row["mean_std_wrong"] = float(std[wrong].mean()) if wrong.any() else float("nan")
            row["mean_std_right"] = float(std[~wrong].mean()) if (~wrong).any() else float("nan")
        rows.append(row)
        print(
            f"[{i + 1}/{len(cases)}] {name}: mean std {row['mean_std']:.4f}"
            + (f", dice {row['dice']:.4f}" if "dice" in row else "")
            + f" ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    header = {
        "command": "ensemble",
        "models": str(Path(o.models).resolve()),
        "num_models": len(nets),
        "communication": info.get("communication"),
        "segmentation": "argmax of mean softmax" if o.threshold is None else f"foreground mean probability > {o.threshold}",
        "input": str(Path(o.input).resolve()),
        "section": o.section if Path(o.input).suffix == ".json" else None,
    }
    write_summary(out, rows, header)
    print(f"wrote {len(rows)} case(s) and {out / 'summary.json'}, {out / 'summary.csv'}")
    return 0


def add_ensemble_parser(sub) -> None:
    p = sub.add_parser(
        "ensemble",
        help="FedCross / FedCrossEns model set: mean softmax, std and entropy maps",
        description="Segment with the K models of a FedCross/FedCrossEns model set (best.pt or last.pt).",
    )
    add_common_arguments(p, "FedCross")
    p.add_argument("--threshold", type=float, help="foreground probability threshold (default: argmax)")
    p.set_defaults(run=run_ensemble)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedseg.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_global_parser(sub)
    add_ensemble_parser(sub)
    add_fedsm_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    o = build_parser().parse_args(argv)
    return o.run(o)


if __name__ == "__main__":
    sys.exit(main())
