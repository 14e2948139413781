"""Inputs and outputs of `python -m fedseg.infer`, shared by every model-set kind: the cases to segment (a folder of
NIfTI images or a datalist), reading a case as the engine does, writing results on the input image's grid
(MONAI SaveImage), Dice against a label, and the summary files."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import NibabelWriter
from monai.transforms import SaveImage

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
class SourceAffineNibabelWriter(NibabelWriter):
    """MONAI's NibabelWriter with the affine taken as it is when nothing is resampled. The stock writer runs its
    resampling step even then, and that step fails on a 2-D image whose NIfTI affine is 4x4 (every 2-D NIfTI)."""

    def set_metadata(self, meta_dict: dict | None, resample: bool = True, **options) -> None:
        if resample:
            super().set_metadata(meta_dict, resample=resample, **options)
            return
        self.affine = (meta_dict or {}).get("affine")


def write_nifti_like(input_path: str | Path, array: np.ndarray, out_path: str | Path) -> Path:
    """Write `array` (the input's spatial shape, its dtype kept) as NIfTI on the input image's grid (its affine,
    hence spacing, orientation and origin, and its spatial units), through MONAI's SaveImage."""
    source = nib.load(str(input_path))
    array = np.asarray(array)
    if tuple(array.shape) != tuple(source.shape[: array.ndim]):
        raise ValueError(f"array shape {array.shape} does not match {input_path} {source.shape}")
    out_path = Path(out_path)
    if not out_path.name.endswith(".nii.gz"):
        raise ValueError(f"{out_path}: output names end in .nii.gz")
    header = nib.Nifti1Header()  # a given header's dtype wins over the data's in nibabel: set both
    header.set_data_dtype(array.dtype)
    header.set_xyzt_units(*source.header.get_xyzt_units())  # viewers read the unit (mm) from here
    save = SaveImage(
        output_dir=out_path.parent,
        output_ext=".nii.gz",
        output_dtype=array.dtype,
        resample=False,
        separate_folder=False,
        print_log=False,
        writer=SourceAffineNibabelWriter,
        channel_dim=None,
    )
    save.set_options(write_kwargs={"header": header})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "affine": source.affine,
        "original_affine": source.affine,
        "spatial_shape": array.shape,
        "filename_or_obj": str(input_path),
    }
    save(array, meta, filename=str(out_path)[: -len(".nii.gz")])
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


# ---- command line ------------------------------------------------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser, job: str) -> None:
    """--models/--input/--out/--section/--labels: the same for every model-set kind."""
    p.add_argument("--models", required=True, help=f"model set file written by the {job} job (best.pt / last.pt)")
    p.add_argument("--input", required=True, help="folder of NIfTI images, or a datalist .json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--section", default="testing", help="datalist section to segment (datalist input only)")
    p.add_argument("--labels", help="folder input only: label files with the images' names (for Dice)")
