"""Check a site's whole dataset before any training starts.

Every case of the requested sections is opened and read: a broken file found after an hour of
federated training costs the whole federation, so it is cheaper to read everything once up front.
The first problem raises a DataValidationError naming the site, the file and the problem.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from .datalist import SECTIONS, image_paths, load_datalist
from .errors import DataValidationError

AFFINE_ATOL = 1e-3
# Sections whose cases must carry a label (testing cases may be unlabelled).
LABELLED_SECTIONS = ("training", "validation")


def validate_site_data(datalist_path: str, site: str, sections=SECTIONS, num_classes: int | None = None,
                       check_files: bool = True) -> dict:
    """Validate a site's datalist and every image/label file it lists; return a summary.

    sections: which datalist sections to check (absent ones are skipped; "training" must exist
      and be non-empty). num_classes: classes incl. background; defaults to the datalist's
      "num_classes". check_files=False checks only the datalist itself (no file access).

    Raises DataValidationError on the first problem: datalist missing/unreadable/invalid,
    empty training list, image or label missing, unreadable or corrupt NIfTI, image/label shape
    or affine mismatch, wrong number of dimensions or channels, label values outside
    0..num_classes-1 or not integers, NaN/Inf in an image.

    Returns {"site", "datalist", "num_classes", "spatial_dims", "in_channels",
             "counts": {section: n}, "label_fractions": {"0": f0, "1": f1, ...},
             "spacing": mean voxel spacing, "shape_min", "shape_max",
             "intensity": {"mean", "std"}}  (fractions/statistics over the checked files).
    """
    datalist = load_datalist(datalist_path, site)
    datalist_path = os.path.abspath(os.path.expanduser(str(datalist_path)))
    if num_classes is None:
        num_classes = datalist.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise DataValidationError(site, datalist_path, f"num_classes must be an integer >= 2, got {num_classes!r}")

    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown datalist sections {unknown}; known: {SECTIONS}")
    counts = {s: len(datalist.get(s, [])) for s in sections}

    checker = _SiteChecker(site, datalist_path, num_classes, datalist.get("spatial_dims"), datalist.get("in_channels"))
    for section in sections:
        for i, entry in enumerate(datalist.get(section, [])):
            if section in LABELLED_SECTIONS and "label" not in entry:
                raise DataValidationError(site, datalist_path, f'{section}[{i}] has no "label"')
            if check_files:
                checker.check_case(entry)

    return {
        "site": site,
        "datalist": datalist_path,
        "num_classes": checker.num_classes(),
        "spatial_dims": checker.spatial_dims,
        "in_channels": checker.in_channels,
        "counts": counts,
        **checker.statistics(),
    }


class _SiteChecker:
    """Checks cases one by one; remembers what must agree across cases and accumulates statistics."""

    def __init__(self, site, datalist_path, num_classes, spatial_dims, in_channels):
        self.site = site
        self.datalist_path = datalist_path
        self.declared_classes = num_classes
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.class_voxels = np.zeros(0, dtype=np.int64)
        self.spacings = []
        self.shapes = []
        self.intensity_sum = 0.0
        self.intensity_sq = 0.0
        self.intensity_n = 0

    def fail(self, file, problem):
        raise DataValidationError(self.site, file, problem)

    def check_case(self, entry: dict) -> None:
        images = image_paths(entry)
        label = entry.get("label")
        for path in images + ([label] if label else []):
            if not os.path.isfile(path):
                what = "label" if path == label else "image"
                self.fail(path, f"{what} file not found" if not os.path.exists(path) else f"{what} path is not a file")

        first_shape = first_affine = None
        channels = 0
        for path in images:
            data, affine = self.read(path, "image")
            shape, n = self.spatial_shape_and_channels(path, data)
            if first_shape is None:
                first_shape, first_affine = shape, affine
            elif shape != first_shape:
                self.fail(path, f"image channel has shape {shape}, but the case's first channel "
                                f"{images[0]} has shape {first_shape}; all channels of a case must match")
            elif not np.allclose(affine, first_affine, atol=AFFINE_ATOL):
                self.fail(path, f"image channel affine differs from the case's first channel {images[0]}: "
                                f"{_fmt_affine(affine)} vs {_fmt_affine(first_affine)}")
            channels += n
            if np.issubdtype(data.dtype, np.floating):
                bad = int(np.count_nonzero(~np.isfinite(data)))
                if bad:
                    self.fail(path, f"image has {bad} NaN/Inf voxel(s) out of {data.size}")
            values = data.astype(np.float64, copy=False)
            self.intensity_sum += float(values.sum())
            self.intensity_sq += float(np.square(values).sum())
            self.intensity_n += values.size

        if self.in_channels is None:
            self.in_channels = channels
        elif channels != self.in_channels:
            self.fail(images[0], f"case has {channels} input channel(s), expected {self.in_channels} "
                                 "(the datalist's \"in_channels\" or the site's first case)")
        self.spacings.append(np.sqrt((first_affine[:3, : len(first_shape)] ** 2).sum(axis=0)))
        self.shapes.append(first_shape)

        if label:
            self.check_label(label, images[0], first_shape, first_affine)

    def check_label(self, label, image, image_shape, image_affine):
        data, affine = self.read(label, "label")
        shape = data.shape
        if len(shape) == self.spatial_dims + 1 and self.spatial_dims == 3 and shape[-1] == 1:
            shape = shape[:-1]  # (H, W, D, 1) is read by MONAI as one channel; accept it
        if tuple(shape) != tuple(image_shape):
            self.fail(label, f"label shape {tuple(shape)} does not match image shape {tuple(image_shape)} ({image})")
        if not np.allclose(affine, image_affine, atol=AFFINE_ATOL):
            diff = float(np.abs(affine - image_affine).max())
            self.fail(label, f"label affine does not match image affine ({image}); largest difference {diff:.4g} "
                             f"> {AFFINE_ATOL}: label {_fmt_affine(affine)} vs image {_fmt_affine(image_affine)}")
        if np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all():
                self.fail(label, f"label has {int(np.count_nonzero(~np.isfinite(data)))} NaN/Inf voxel(s)")
            rounded = np.round(data)
            if not np.array_equal(rounded, data):
                examples = np.unique(data[rounded != data])[:5]
                self.fail(label, f"label has non-integer values (e.g. {_fmt_values(examples)}); "
                                 "labels must be integer class indices")
            data = rounded
        values = np.unique(data)
        too_low = values[values < 0]
        if too_low.size:
            self.fail(label, f"label has negative values {_fmt_values(too_low)}")
        if self.declared_classes is not None:
            outside = values[values >= self.declared_classes]
            if outside.size:
                self.fail(label, f"label values {_fmt_values(outside)} are outside 0..{self.declared_classes - 1} "
                                 f"(num_classes={self.declared_classes})")
        elif values.size and values.max() > 1000:
            self.fail(label, f"label values go up to {_fmt_values(values[-1:])}; this looks like an intensity "
                             "image, not a class map")
        counts = np.bincount(data.astype(np.int64, copy=False).ravel())
        if counts.size > self.class_voxels.size:
            counts[: self.class_voxels.size] += self.class_voxels
            self.class_voxels = counts
        else:
            self.class_voxels[: counts.size] += counts

    def read(self, path, what):
        """Load a NIfTI and really read its voxels (nib.load is lazy: corrupt data shows up only here)."""
        try:
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as e:  # nibabel, gzip, zlib and OS errors all mean the same thing here
            self.fail(path, f"cannot read {what} as NIfTI (corrupt, truncated or not a NIfTI file): "
                            f"{type(e).__name__}: {' '.join(str(e).split())}")
        if data.dtype.kind not in "biuf":
            self.fail(path, f"{what} has unsupported voxel type {data.dtype}")
        return data, affine

    def spatial_shape_and_channels(self, path, data):
        """(spatial shape, channels) of one image file, as MONAI's LoadImage + EnsureChannelFirst read it."""
        shape = tuple(data.shape)
        if self.spatial_dims is None:
            if len(shape) not in (2, 3):
                self.fail(path, f"image has shape {shape}; expected a 2-D (H, W) or 3-D (H, W, D) image")
            self.spatial_dims = len(shape)
        sd = self.spatial_dims
        if len(shape) == sd:
            return shape, 1
        if sd == 3 and len(shape) == 4:
            return shape[:3], shape[3]  # channels-last 4-D volume
        hint = ('store 2-D images as (H, W), and several channels as one (H, W) file each, listed as '
                '"image": [c0, c1, ...]' if sd == 2 else "expected (H, W, D) or (H, W, D, channels)")
        self.fail(path, f"image has shape {shape}, which is not a {sd}-D image as the datalist says; {hint}")

    def num_classes(self):
        if self.declared_classes is not None:
            return self.declared_classes
        return max(int(self.class_voxels.size), 2) if self.class_voxels.size else None

    def statistics(self) -> dict:
        total = int(self.class_voxels.sum())
        n_classes = self.num_classes() or self.class_voxels.size
        fractions = {str(c): (float(self.class_voxels[c]) / total if total and c < self.class_voxels.size else 0.0)
                     for c in range(n_classes)}
        stats = {"label_fractions": fractions if total else {}}
        if self.shapes:
            shapes = np.array(self.shapes)
            mean = self.intensity_sum / self.intensity_n
            stats.update(
                spacing=[round(float(s), 4) for s in np.mean(self.spacings, axis=0)],
                shape_min=[int(s) for s in shapes.min(axis=0)],
                shape_max=[int(s) for s in shapes.max(axis=0)],
                intensity={"mean": mean, "std": float(np.sqrt(max(self.intensity_sq / self.intensity_n - mean**2, 0.0)))},
            )
        return stats


def _fmt_values(values) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in list(values)[:10]]
    more = f" and {len(values) - 10} more" if len(values) > 10 else ""
    return f"{shown}{more}"


def _fmt_affine(affine) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=3, suppress_small=True, separator=",").replace("\n", "")
