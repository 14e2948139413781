"""Segment new NIfTI images with a trained FedSeg model set and write uncertainty maps.

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
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

NIFTI_SUFFIXES = (".nii.gz", ".nii")


# ---- inputs -----------------------------------------------------------------------------------------------
def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def list_cases(input_path: str | Path, section: str = "testing", labels_dir: str | Path | None = None) -> list[dict]:
    """Cases to segment: [{"name", "image" (path or list of channel paths), "label" (optional)}]."""
    from fedseg.engine.engine import case_name

    input_path = Path(input_path)
    if input_path.is_dir():
        images = sorted(p for p in input_path.iterdir() if is_nifti(p))
        if not images:
            raise FileNotFoundError(f"no NIfTI files (*.nii.gz, *.nii) in {input_path}")
        cases = []
        for image in images:
            case = {"name": case_name(image), "image": str(image)}
            if labels_dir is not None:
                label = Path(labels_dir) / image.name
                if label.exists():
                    case["label"] = str(label)
            cases.append(case)
        return cases
    if input_path.suffix == ".json":
        from fedseg.data import load_datalist

        datalist = load_datalist(str(input_path), "inference")
        entries = datalist.get(section)
        if not entries:
            present = [s for s in ("training", "validation", "testing") if datalist.get(s)]
            raise ValueError(f"{input_path} has no '{section}' cases (sections with cases: {present})")
        return [{"name": case_name(e["image"]), **{k: e[k] for k in ("image", "label") if k in e}} for e in entries]
    raise FileNotFoundError(f"{input_path} is neither a folder of NIfTI images nor a datalist .json")


def first_path(image) -> str:
    return image if isinstance(image, str) else image[0]


def read_case(case: dict) -> dict:
    """The image (and label) as the engine reads them for evaluation: channel-first, z-scored image."""
    from monai.transforms import Compose

    from fedseg.engine.engine import load_transforms

    keys = ("image", "label") if "label" in case else ("image",)
    item = Compose(load_transforms(keys))({k: case[k] for k in keys})
    return {k: (v.as_tensor() if hasattr(v, "as_tensor") else torch.as_tensor(v)) for k, v in item.items() if k in keys}


# ---- outputs ----------------------------------------------------------------------------------------------
def write_nifti_like(input_path: str | Path, array: np.ndarray, out_path: str | Path) -> Path:
    """Write `array` (the input's spatial shape) as NIfTI with the input image's affine and spatial units."""
    source = nib.load(str(input_path))
    if tuple(array.shape) != tuple(source.shape[: array.ndim]):
        raise ValueError(f"array shape {array.shape} does not match {input_path} {source.shape}")
    image = nib.Nifti1Image(np.asarray(array), source.affine)
    image.header.set_xyzt_units(*source.header.get_xyzt_units())
    image.set_sform(source.affine, code=int(source.header["sform_code"]) or 1)
    image.set_qform(source.affine, code=int(source.header["qform_code"]) or 1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(out_path))
    return out_path


def case_dice(seg: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice per foreground class of a label map against the truth, as the engine scores (empty/empty = 1)."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    pred = one_hot(seg.reshape(1, 1, *seg.shape).long(), num_classes=num_classes)
    truth = one_hot(label.reshape(1, 1, *label.shape).long(), num_classes=num_classes)
    dice = compute_dice(pred, truth, include_background=False, ignore_empty=False)[0]
    return [float(x) for x in torch.nan_to_num(dice, nan=0.0)]


def write_summary(out_dir: Path, rows: list[dict], header: dict) -> None:
    """summary.json (settings, per-case rows, means) and summary.csv (one row per case)."""
    means = {}
    for key in ("mean_std", "mean_entropy", "dice"):
        values = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        if values:
            means[key] = float(np.mean(values))
    (out_dir / "summary.json").write_text(json.dumps({**header, "means": means, "cases": rows}, indent=2) + "\n")
    columns = ["case", "mean_std", "mean_entropy", "foreground_voxels", "dice", "mean_std_wrong", "mean_std_right"]
    columns += sorted({k for r in rows for k in r if k.startswith("dice_class")})
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})


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
    print(f"ensemble of {len(nets)} model(s) from {o.models} (communication {info.get('communication')}); "
          f"{len(cases)} case(s) -> {out}", flush=True)
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
        print(f"[{i + 1}/{len(cases)}] {name}: mean std {row['mean_std']:.4f}"
              + (f", dice {row['dice']:.4f}" if "dice" in row else "") + f" ({time.perf_counter() - start:.1f}s)", flush=True)
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


def add_common_arguments(p: argparse.ArgumentParser, job: str) -> None:
    """--models/--input/--out/--section/--labels: the same for every model-set kind."""
    p.add_argument("--models", required=True, help=f"model set file written by the {job} job (best.pt / last.pt)")
    p.add_argument("--input", required=True, help="folder of NIfTI images, or a datalist .json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--section", default="testing", help="datalist section to segment (datalist input only)")
    p.add_argument("--labels", help="folder input only: label files with the images' names (for Dice)")


def add_ensemble_parser(sub) -> None:
    p = sub.add_parser("ensemble", help="FedCross / FedCrossEns model set: mean softmax, std and entropy maps",
                       description="Segment with the K models of a FedCross/FedCrossEns model set (best.pt or last.pt).")
    add_common_arguments(p, "FedCross")
    p.add_argument("--threshold", type=float, help="foreground probability threshold (default: argmax)")
    p.set_defaults(run=run_ensemble)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedseg.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_ensemble_parser(sub)
    from fedseg.infer_fedsm import add_fedsm_parser  # late: that module reuses this one's helpers

    add_fedsm_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    o = build_parser().parse_args(argv)
    return o.run(o)


if __name__ == "__main__":
    sys.exit(main())
