"""Convert a folder of real images and masks, one sub-folder per site, into FedSeg's datalist layout.

    python -m fedseg.data.convert --src ../shared/data/polyp --out DIR [--sites Kvasir-SEG CVC-ClinicDB]
        [--split 0.7 0.1 0.2] [--seed 0] [--threshold 127 | --label-map '{"255": 1}'] [--max-cases N]
        [--grayscale] [--pair-by auto|stem|order] [--groups CSV] [--split-by group|case] [--overwrite]

Two input layouts are recognised per site:
  flat:       <src>/<site>/images/<name>.(png|jpg|jpeg|tif|bmp|nii|nii.gz), mask <src>/<site>/masks/<name>.*
              -> split into training/validation/testing by the seeded `split` fractions.
  train/test: <src>/<site>/{train,test}/{image,mask}/...   (e.g. the prostate-slices collection)
              -> the given test set is kept; validation is taken from train by the split fractions.
Image/mask folder names default to images/masks and also accept image(s)/mask(s)/label(s).

Split unit. Frames of one video sequence (or slices of one patient) are near-duplicates, so a site's split
is made by GROUP when it has a group file (`--groups CSV`, or sequence.csv / groups.csv in the site's
folder; fedseg.data.groups says the format): whole groups go to training, validation or testing, seeded,
and every datalist case records its "group" (a site without a group file: each image is its own group).
`--split-by case` reproduces the old frame-level split (groups ignored and not recorded) and says so in
the site's warnings, with the number of test cases whose group also has training cases: use it only to
measure that leakage.

Output: <out>/<site>/{imagesTr,labelsTr,imagesTs,labelsTs}/<name>.nii.gz, <out>/<site>/datalist.json and
<out>/dataset.json. Pictures become 2-D NIfTI of shape (H, W) (array rows, columns) with a 1 mm identity
affine; colour pictures become 3 channel files <name>_0000/_0001/_0002 (R, G, B) listed together as the
case's "image" (1 channel with grayscale=True). Masks are binarised at > mask_threshold (JPEG masks have
grey edges) or mapped with label_map. NIfTI inputs keep their affine; NIfTI masks are taken as class maps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from .datalist import atomic_output_dir, save_nifti, write_json
from .errors import DataValidationError
from .groups import find_group_file, groups_of, read_group_file, split_by_group

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
IMAGE_DIR_NAMES = ("images", "image", "imgs")
MASK_DIR_NAMES = ("masks", "mask", "labels", "label")
GIVEN_SPLITS = {"train": "training", "test": "testing"}
# Pillow modes read as raw numbers (16/32-bit grey, float, palette indices) instead of converting to 8-bit grey.
RAW_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
GREY_MODES = RAW_GREY_MODES + ("1", "L", "LA", "La")
SPLIT_UNITS = ("group", "case")


def convert_folder_dataset(src_root, out_dir, sites=None, image_dir="images", mask_dir="masks", split=(0.7, 0.1, 0.2),
                           seed=0, mask_threshold=127, label_map=None, grayscale=False, max_cases=None,
                           pair_by="auto", overwrite=False, groups=None, split_by="group") -> dict:
    """Convert <src_root>/<site>/... into one datalist per site; return the summary written to out_dir/dataset.json.

    sites: site folder names (default: every sub-folder with an image folder or train/test folders).
    split: (training, validation, testing) fractions. seed: seeds the shuffle of each site (deterministic).
    mask_threshold: mask > threshold is foreground (ignored when label_map is given).
    label_map: {mask value: class}; unlisted values become background.
    grayscale: write colour pictures as 1 channel instead of 3. max_cases: a seeded random subset of at
    most this many cases per site. pair_by: "stem" pairs image and mask by file name without extension;
    "order" by sorted order; "auto" by name, or by order in a folder where no name matches and the
    counts agree. groups: a group CSV for every site (default: each site's own sequence.csv/groups.csv).
    split_by: "group" (whole groups per section) or "case" (frame-level, groups ignored: leaks).
    Raises DataValidationError (site, file, problem) for a missing mask, an unreadable image or mask, a mask
    whose size differs from its image, or a case without a group; nothing is left at out_dir then.
    """
    src_root = Path(src_root).expanduser().absolute()
    fractions = _normalised_split(split)
    if pair_by not in ("auto", "stem", "order"):
        raise ValueError(f'pair_by must be "auto", "stem" or "order", got {pair_by!r}')
    if label_map is not None:
        label_map = {float(k): int(v) for k, v in label_map.items()}
        if not label_map or min(label_map.values()) < 0:
            raise ValueError(f"label_map must map mask values to classes >= 0, got {label_map}")
    if max_cases is not None and max_cases < 1:
        raise ValueError(f"max_cases must be >= 1, got {max_cases}")
    if split_by not in SPLIT_UNITS:
        raise ValueError(f"split_by must be one of {SPLIT_UNITS}, got {split_by!r}")
    groups = Path(groups).expanduser().absolute() if groups else None

    plans = [_plan_site(src_root, site, image_dir, mask_dir, fractions, seed, max_cases, pair_by, groups, split_by)
             for site in _site_names(src_root, sites, image_dir)]
    in_channels = 1 if grayscale else _dataset_channels(plans)

    summary = {
        "name": src_root.name,
        "converter": "fedseg.data.convert",
        "source": str(src_root),
        "seed": seed,
        "split": list(fractions),
        "mask_threshold": None if label_map else mask_threshold,
        "label_map": None if label_map is None else {_fmt_number(k): v for k, v in label_map.items()},
        "grayscale": grayscale,
        "max_cases": max_cases,
        "split_by": split_by,
        "spatial_dims": None,
        "in_channels": in_channels,
        "num_classes": None,
        "labels": None,
        "sites": [],
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = _Writer(tmp, in_channels, mask_threshold, label_map)
        datalists = [writer.write_site(plan) for plan in plans]
        num_classes = writer.num_classes()
        labels = {"0": "background"}
        labels.update({str(c): ("foreground" if num_classes == 2 else f"class-{c}") for c in range(1, num_classes)})
        summary.update(spatial_dims=writer.spatial_dims, num_classes=num_classes, labels=labels)
        for plan, datalist in zip(plans, datalists):
            site = plan["site"]
            write_json(tmp / site / "datalist.json", {
                "name": src_root.name, "site": site, "split_unit": plan["split_unit"], "num_classes": num_classes,
                "spatial_dims": writer.spatial_dims, "in_channels": in_channels, "labels": labels, **datalist})
            voxels = writer.class_voxels[site]
            foreground = float(voxels[1:].sum() / max(voxels.sum(), 1))
            warnings = list(plan["warnings"])
            if foreground > 0.5:
                warnings.append(f"foreground covers {foreground:.0%} of the images: are the masks inverted "
                                "(target = 0)? Then use label_map {\"0\": 1}")
            summary["sites"].append({
                "site": site,
                "datalist": f"{site}/datalist.json",
                "layout": plan["layout"],
                "pairing": plan["pairing"],
                "split_unit": plan["split_unit"],
                "group_file": plan["group_file"],
                "counts": {s: len(datalist[s]) for s in datalist},
                "groups": plan["group_counts"],
                "foreground_fraction": round(foreground, 4),
                "warnings": warnings,
            })
        write_json(tmp / "dataset.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Planning: which files, paired how, in which section
# ---------------------------------------------------------------------------------------------


def _normalised_split(split):
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0:
        raise ValueError(f"split must be three fractions (training > 0, validation, testing), got {split}")
    total = sum(fractions)
    return tuple(f / total for f in fractions)


def _site_names(src_root: Path, sites, image_dir) -> list[str]:
    if not src_root.is_dir():
        raise DataValidationError("?", str(src_root), "source folder not found")
    if sites:
        return list(sites)
    found = sorted(p.name for p in src_root.iterdir()
                   if p.is_dir() and not p.name.startswith(".")
                   and (_find_dir(p, image_dir, IMAGE_DIR_NAMES) or (p / "train").is_dir()))
    if not found:
        raise DataValidationError("?", str(src_root), "no site folders found: expected <site>/images + <site>/masks "
                                                      "or <site>/train/{image,mask} + <site>/test/{image,mask}")
    return found


def _find_dir(parent: Path, preferred: str, fallbacks) -> Path | None:
    for name in dict.fromkeys((preferred,) + tuple(fallbacks)):
        if (parent / name).is_dir():
            return parent / name
    return None


def _plan_site(src_root, site, image_dir, mask_dir, fractions, seed, max_cases, pair_by, groups_csv, split_by) -> dict:
    """Pair and split one site's files: {"site", "layout", "pairing", "split_unit", "group_file", "warnings",
    "group_counts", "cases": [(section, name, image, mask, group)]}."""
    site_dir = src_root / site
    if not site_dir.is_dir():
        raise DataValidationError(site, str(site_dir), "site folder not found")
    rng = np.random.default_rng([seed, zlib.crc32(site.encode("utf-8"))])

    def pairs_in(folder: Path):
        images = _find_dir(folder, image_dir, IMAGE_DIR_NAMES)
        masks = _find_dir(folder, mask_dir, MASK_DIR_NAMES)
        if images is None:
            raise DataValidationError(site, str(folder), f"no image folder ({image_dir}/ or one of {IMAGE_DIR_NAMES})")
        if masks is None:
            raise DataValidationError(site, str(folder), f"no mask folder ({mask_dir}/ or one of {MASK_DIR_NAMES})")
        return _pair(site, images, masks, pair_by)

    group_file = groups_csv or find_group_file(site_dir)
    mapping, unit = read_group_file(group_file, site) if group_file else ({}, "case")

    def with_groups(cases, given=""):  # [(name, image, mask, group)]: the file's group, or the image itself
        if not mapping:
            return [(name, image, mask, f"{given}{name}") for name, image, mask in cases]
        found = groups_of(site, group_file, [_stem(image) for _, image, _ in cases], mapping)
        return [(*case, group) for case, group in zip(cases, found)]

    def split(cases, fr):  # {section: cases}: whole groups, or single cases (also where each case is its own group)
        if split_by == "group" and mapping:
            index = split_by_group([c[3] for c in cases], fr, rng)
            return {s: [cases[i] for i in index[s]] for s in index}
        _, n_val, n_test = _split_sizes(len(cases), fr)
        return {"training": cases[n_val + n_test:], "validation": cases[:n_val], "testing": cases[n_val: n_val + n_test]}

    if (site_dir / "train").is_dir() and (site_dir / "test").is_dir():
        layout = "train/test"
        train, train_pairing = pairs_in(site_dir / "train")
        test, test_pairing = pairs_in(site_dir / "test")
        pairing = train_pairing if train_pairing == test_pairing else f"train: {train_pairing}, test: {test_pairing}"
        train, test = with_groups(_shuffled(train, rng), "train/"), with_groups(_shuffled(test, rng), "test/")
        if max_cases is not None and len(train) + len(test) > max_cases:
            n_test = min(len(test), int(math.floor(max_cases * len(test) / (len(train) + len(test)) + 0.5)))
            n_test = min(n_test, max_cases - 1) if train else n_test
            train, test = train[: max_cases - n_test], test[:n_test]
        # Validation comes out of the given training set, in the split's training:validation ratio.
        sections = {**split(train, (fractions[0], fractions[1], 0.0)), "testing": test}
    else:
        layout = "flat"
        cases, pairing = pairs_in(site_dir)
        sections = split(with_groups(_shuffled(cases, rng)[:max_cases]), fractions)
    if not sections["training"]:
        raise DataValidationError(site, str(site_dir), "no image/mask pairs for training")
    warnings = []
    if split_by == "case" and mapping:
        trained = {c[3] for c in sections["training"]}
        leaked = sum(c[3] in trained for c in sections["testing"])
        warnings.append(f"split by case although {group_file.name} groups the cases by {unit}: {leaked} of "
                        f"{len(sections['testing'])} test cases share a {unit} with training cases (leakage)")
    record = split_by == "group"
    planned = [(section, name, image, mask, group if record else None)
               for section, cases in sections.items() for name, image, mask, group in cases]
    return {"site": site, "layout": layout, "pairing": pairing, "cases": planned, "warnings": warnings,
            "split_unit": unit if split_by == "group" else "case",
            "group_file": str(group_file) if group_file else None,
            "group_counts": {s: len({c[3] for c in cases}) for s, cases in sections.items()} if record else None}


def _shuffled(cases, rng):
    return [cases[i] for i in rng.permutation(len(cases))]


def _split_sizes(n: int, fractions) -> tuple[int, int, int]:
    """(training, validation, testing) counts; training keeps at least one case."""
    n_val = int(math.floor(n * fractions[1] + 0.5))
    n_test = int(math.floor(n * fractions[2] + 0.5))
    while n - n_val - n_test < 1 and n_val + n_test > 0:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _listing(site, folder: Path) -> dict:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(PICTURE_SUFFIXES + NIFTI_SUFFIXES):
            stem = _stem(p)
            if stem in files:
                raise DataValidationError(site, str(p), f"two files share the name {stem!r} ({files[stem].name})")
            files[stem] = p
    return files


def _pair(site, image_folder: Path, mask_folder: Path, pair_by: str):
    """[(output name, image, mask)] sorted by name, and how the pairing was made ("stem" or "order")."""
    images, masks = _listing(site, image_folder), _listing(site, mask_folder)
    if not images:
        raise DataValidationError(site, str(image_folder), "no images found (.png .jpg .jpeg .tif .bmp .nii .nii.gz)")
    by_order = pair_by == "order" or (
        pair_by == "auto" and not set(images) & set(masks) and len(images) == len(masks))
    if by_order:
        if len(images) != len(masks):
            raise DataValidationError(site, str(mask_folder), f"{len(masks)} masks for {len(images)} images "
                                                              f"in {image_folder}; pairing by order needs equal counts")
        pairs = [(stem, images[stem], masks[m]) for stem, m in zip(sorted(images), sorted(masks))]
    else:
        pairs = []
        for stem in sorted(images):
            if stem not in masks:
                raise DataValidationError(site, str(images[stem]), f"no mask named {stem}.* in {mask_folder}")
            pairs.append((stem, images[stem], masks[stem]))
    names = [_safe_name(stem) for stem, _, _ in pairs]
    if len(set(names)) != len(names):
        raise DataValidationError(site, str(image_folder), "file names collide after replacing unusual characters")
    return [(name, image, mask) for name, (_, image, mask) in zip(names, pairs)], ("order" if by_order else "stem")


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _dataset_channels(plans) -> int:
    """3 when any picture is in colour (grey ones are then replicated), else 1; NIfTI images count as grey."""
    for plan in plans:
        for _, _, image, _, _ in plan["cases"]:
            if _is_nifti(image):
                continue
            try:
                with Image.open(image) as im:  # reads the header only
                    mode = im.mode
            except Exception as e:
                raise DataValidationError(plan["site"], str(image), f"cannot read image: {type(e).__name__}: {' '.join(str(e).split())}") from e
            if mode not in GREY_MODES:
                return 3
    return 1


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _Writer:
    """Writes cases as NIfTI and keeps what must agree across the dataset (dimensions, classes)."""

    def __init__(self, root: Path, in_channels: int, mask_threshold, label_map):
        self.root = root
        self.in_channels = in_channels
        self.mask_threshold = mask_threshold
        self.label_map = label_map
        self.spatial_dims = None
        self.max_label = 1
        self.class_voxels = {}

    def num_classes(self) -> int:
        if self.label_map is not None:
            return max(2, max(self.label_map.values()) + 1)
        return max(2, self.max_label + 1)

    def write_site(self, plan: dict) -> dict:
        site = plan["site"]
        datalist = {"training": [], "validation": [], "testing": []}
        self.class_voxels[site] = np.zeros(2, dtype=np.int64)
        for section, name, image_path, mask_path, group in plan["cases"]:
            tag = "Ts" if section == "testing" else "Tr"
            channels, affine = self.read_image(site, image_path)
            label = self.read_mask(site, mask_path, channels[0].shape, image_path, affine)
            dims = channels[0].ndim
            if self.spatial_dims is None:
                self.spatial_dims = dims
            elif dims != self.spatial_dims:
                raise DataValidationError(site, str(image_path), f"image is {dims}-D but earlier images are "
                                                                 f"{self.spatial_dims}-D; a dataset must be all 2-D or all 3-D")
            for sub in (f"images{tag}", f"labels{tag}"):
                (self.root / site / sub).mkdir(parents=True, exist_ok=True)
            names = ([f"images{tag}/{name}.nii.gz"] if len(channels) == 1
                     else [f"images{tag}/{name}_{c:04d}.nii.gz" for c in range(len(channels))])
            for file, data in zip(names, channels):
                save_nifti(self.root / site / file, data, affine)
            save_nifti(self.root / site / f"labels{tag}/{name}.nii.gz", label, affine)
            entry = {"image": names[0] if len(names) == 1 else names, "label": f"labels{tag}/{name}.nii.gz"}
            if group is not None:
                entry["group"] = group
            datalist[section].append(entry)
            counts = np.bincount(label.ravel().astype(np.int64))
            voxels = self.class_voxels[site]
            if counts.size > voxels.size:
                counts[: voxels.size] += voxels
                self.class_voxels[site] = counts
            else:
                voxels[: counts.size] += counts
        return datalist

    def read_image(self, site, path: Path):
        """(list of per-channel arrays, affine)."""
        try:
            if _is_nifti(path):
                img = nib.load(path)
                data = np.asanyarray(img.dataobj)
                return self.nifti_channels(site, path, data), np.asarray(img.affine, dtype=np.float64)
            with Image.open(path) as im:
                im.load()
                if self.in_channels == 1:
                    data = np.asarray(im) if im.mode in RAW_GREY_MODES else np.asarray(im.convert("L"))
                    channels = [data]
                elif im.mode in RAW_GREY_MODES:  # 16-bit grey in a colour dataset: replicate, keep the range
                    channels = [np.asarray(im)] * 3
                else:
                    rgb = np.asarray(im.convert("RGB"))
                    channels = [np.ascontiguousarray(rgb[..., c]) for c in range(3)]
            return channels, np.eye(4)
        except DataValidationError:
            raise
        except Exception as e:
            raise DataValidationError(site, str(path), f"cannot read image: {type(e).__name__}: {' '.join(str(e).split())}") from e

    def nifti_channels(self, site, path, data):
        # Trailing singleton axes ((H, W, 1), (H, W, D, 1)) carry no information; MONAI would misread (H, W, 1).
        while data.ndim > 2 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim in (2, 3):
            channels = [data]
        elif data.ndim == 4:
            channels = [np.ascontiguousarray(data[..., c]) for c in range(data.shape[-1])]
        else:
            raise DataValidationError(site, str(path), f"image has shape {data.shape}; expected 2-D or 3-D")
        if len(channels) == 1 and self.in_channels > 1:
            channels = channels * self.in_channels
        if len(channels) != self.in_channels:
            raise DataValidationError(site, str(path), f"image has {len(channels)} channels, "
                                                       f"the dataset has {self.in_channels}")
        return channels

    def read_mask(self, site, path: Path, shape, image_path, image_affine):
        try:
            if _is_nifti(path):
                img = nib.load(path)
                mask = np.asanyarray(img.dataobj)
                while mask.ndim > len(shape) and mask.shape[-1] == 1:
                    mask = mask[..., 0]
                if not np.allclose(img.affine, image_affine, atol=1e-3):
                    raise DataValidationError(site, str(path), f"mask affine differs from its image's ({image_path})")
            else:
                with Image.open(path) as im:
                    im.load()
                    # Palette masks hold class indices; others are read as grey levels.
                    mask = np.asarray(im) if im.mode in RAW_GREY_MODES + ("P",) else np.asarray(im.convert("L"))
        except DataValidationError:
            raise
        except Exception as e:
            raise DataValidationError(site, str(path), f"cannot read mask: {type(e).__name__}: {' '.join(str(e).split())}") from e
        if mask.shape != tuple(shape):
            raise DataValidationError(site, str(path), f"mask size {mask.shape} differs from image size "
                                                       f"{tuple(shape)} ({image_path})")

        if self.label_map is not None:
            label = np.zeros(mask.shape, dtype=np.uint8 if max(self.label_map.values()) < 256 else np.uint16)
            for value, cls in self.label_map.items():
                label[mask == value] = cls
        elif _is_nifti(path):  # already a class map
            if not np.array_equal(mask, np.round(mask)) or (mask.size and mask.min() < 0):
                raise DataValidationError(site, str(path), "NIfTI mask must hold integer class indices >= 0 "
                                                           "(or pass label_map)")
            label = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)
        else:
            foreground = mask > self.mask_threshold
            if not foreground.any() and mask.max(initial=0) > 0 and not path.name.lower().endswith(LOSSY_SUFFIXES):
                raise DataValidationError(site, str(path), f"mask values go up to {_fmt_number(mask.max())}, all at or "
                                                           f"below the threshold {self.mask_threshold}: the label would "
                                                           "be empty; use a lower threshold or a label map")
            label = foreground.astype(np.uint8)
        self.max_label = max(self.max_label, int(label.max(initial=0)))
        return label


def _fmt_number(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedseg.data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="folder with one sub-folder per site")
    parser.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--sites", nargs="+", default=None, help="site folder names (default: all)")
    parser.add_argument("--image-dir", default="images")
    parser.add_argument("--mask-dir", default="masks")
    parser.add_argument("--split", nargs=3, type=float, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--seed", type=int, default=0)
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--threshold", type=float, default=127, help="mask > threshold is foreground (default 127)")
    mask.add_argument("--label-map", default=None, help='JSON {mask value: class}, e.g. \'{"255": 1}\'')
    parser.add_argument("--max-cases", type=int, default=None, help="at most N cases per site (seeded random subset)")
    parser.add_argument("--grayscale", action="store_true", help="write colour images as 1 channel")
    parser.add_argument("--pair-by", choices=("auto", "stem", "order"), default="auto")
    parser.add_argument("--groups", default=None, help="group CSV (stem,group; optional site column) for every site "
                                                       "(default: each site's sequence.csv / groups.csv)")
    parser.add_argument("--split-by", choices=SPLIT_UNITS, default="group",
                        help="group: whole groups per section (default); case: frame-level split, leaks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    label_map = json.loads(args.label_map) if args.label_map else None
    try:
        summary = convert_folder_dataset(args.src, args.out, sites=args.sites, image_dir=args.image_dir,
                                         mask_dir=args.mask_dir, split=args.split, seed=args.seed,
                                         mask_threshold=args.threshold, label_map=label_map,
                                         grayscale=args.grayscale, max_cases=args.max_cases,
                                         pair_by=args.pair_by, overwrite=args.overwrite, groups=args.groups,
                                         split_by=args.split_by)
    except (DataValidationError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['name']} ({summary['spatial_dims']}-D, {summary['in_channels']} channel(s), "
          f"{summary['num_classes']} classes) to {os.path.abspath(args.out)}")
    for s in summary["sites"]:
        c = s["counts"]
        g = s["groups"]
        by = f", {g['training']}/{g['validation']}/{g['testing']} {s['split_unit']} groups" if g else ", split by case"
        print(f"  {s['site']}: {c['training']}/{c['validation']}/{c['testing']} cases{by} ({s['layout']}, paired by "
              f"{s['pairing']}), foreground {s['foreground_fraction']:.1%}")
        for warning in s["warnings"]:
            print(f"    warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
