"""Check a site's whole dataset before any training starts.

Every case of the requested sections is opened and read: a broken file found after an hour of
federated training costs the whole federation, so it is cheaper to read everything once up front.
The first problem raises a DataValidationError naming the site, the file and the problem; things
worth knowing that do not stop training (an all-background label, an unknown descriptive key) are
returned as warnings in the summary.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from .datalist import SECTIONS, image_paths, load_datalist, unknown_keys
from .errors import DataValidationError
from .groups import spanning_groups

AFFINE_ATOL = 1e-3
# Largest image (voxels, all dimensions incl. channels) read by default: 512**3 = 134M voxels. Checked
# on the header, before any voxel is read, so a tiny file declaring a huge volume cannot exhaust memory.
MAX_VOXELS = 512**3


def validate_site_data(datalist_path: str, site: str, sections=SECTIONS, num_classes: int | None = None,
                       check_files: bool = True, max_voxels: int = MAX_VOXELS) -> dict:
    """Validate a site's datalist and every image/label file it lists; return a summary.

    sections: which datalist sections to check (absent ones are skipped; "training" must exist
      and be non-empty). num_classes: classes incl. background; defaults to the datalist's
      "num_classes". check_files=False checks only the datalist itself (no file is read).
      max_voxels: the largest image or label accepted, judged from its header.

    Raises DataValidationError on the first problem. The datalist: missing/unreadable/invalid,
    empty training list, a misspelled or unknown section ("trainig", "test"), a case without a
    label, an image or label path outside the datalist's folder (after resolving ".." and
    symlinks), the same case (image or label file) listed twice in a section or in two sections.
    The files: image or label missing, unreadable or corrupt NIfTI, a header declaring more than
    max_voxels voxels, image/label shape or affine mismatch, wrong number of dimensions or channels,
    label values outside 0..num_classes-1 or not integers, NaN/Inf in an image, image values that
    overflow the engine's float32 normalisation, every training label all background. A constant
    image is a warning.

    Returns {"site", "datalist", "num_classes", "spatial_dims", "in_channels",
             "counts": {section: n}, "warnings": [str, ...], "label_fractions": {"0": f0, "1": f1, ...},
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
    warnings = [message for _, refused, message in unknown_keys(datalist) if not refused]

    cases = [(f"{section}[{i}]", entry) for section in sections for i, entry in enumerate(datalist.get(section, []))]
    for where, entry in cases:
        # Training needs labels, validation selects models with them and testing scores the final models
        # with them: an unlabelled case there would fail only after all the training.
        if "label" not in entry:
            raise DataValidationError(site, datalist_path, f'{where} has no "label"; every case needs one '
                                      "(validation and testing cases are scored against it)")
    _check_inside_folder(site, datalist_path, cases)
    _check_no_duplicates(site, datalist_path, cases)
    warnings += _check_groups(site, datalist_path, datalist)

    checker = _SiteChecker(site, datalist_path, num_classes, datalist.get("spatial_dims"), datalist.get("in_channels"),
                           max_voxels)
    if check_files:
        for where, entry in cases:
            checker.check_case(entry, where)
        training = [where for where, _ in cases if where.startswith("training[")]
        empty_training = [where for where in checker.empty_labels if where.startswith("training[")]
        if training and len(empty_training) == len(training):
            raise DataValidationError(site, datalist_path, f"every training label ({len(training)}) is all background "
                                      "(no foreground voxel): there is nothing to learn")

    return {
        "site": site,
        "datalist": datalist_path,
        "num_classes": checker.num_classes(),
        "spatial_dims": checker.spatial_dims,
        "in_channels": checker.in_channels,
        "counts": counts,
        "warnings": warnings + checker.warnings,
        **checker.statistics(),
    }


def _check_groups(site: str, datalist_path: str, datalist: dict) -> list[str]:
    """A group (patient, video sequence) with cases in training and in testing is refused: the test score
    would include near-copies of training images. Shared with validation only: a warning (model selection
    is optimistic, the test score is not)."""
    unit = f'{datalist["split_unit"]} group' if datalist.get("split_unit") else "group"
    leaked = spanning_groups(datalist, "training", "testing")
    if leaked:
        group, (train_case, test_case) = next(iter(leaked.items()))
        raise DataValidationError(
            site, datalist_path, f"{len(leaked)} {unit}(s) have cases in training and in testing, e.g. {group!r} "
                                 f"({train_case} and {test_case}): split by whole groups (fedseg.data.convert does)")
    warnings = []
    for first, second in (("training", "validation"), ("validation", "testing")):
        shared = spanning_groups(datalist, first, second)
        if shared:
            warnings.append(f"{len(shared)} {unit}(s) have cases in {first} and in {second}, "
                            f"e.g. {next(iter(shared))!r}")
    return warnings


def _case_files(entry: dict) -> list[tuple[str, str]]:
    """[("image" | "label", path)] of one case."""
    files = [("image", p) for p in image_paths(entry)]
    return files + ([("label", entry["label"])] if entry.get("label") else [])


def _check_inside_folder(site: str, datalist_path: str, cases) -> None:
    """Every file must lie inside the datalist's folder once ".." and symlinks are resolved: a datalist
    (or a link in the data folder) must not make the site read, and train on, files from elsewhere."""
    folder = os.path.realpath(os.path.dirname(datalist_path))
    for where, entry in cases:
        for what, path in _case_files(entry):
            real = os.path.realpath(path)
            if os.path.commonpath([real, folder]) != folder:
                raise DataValidationError(
                    site, path, f"{where} {what} lies outside the datalist's folder {folder} (it resolves to {real}, "
                                "after '..' and symlinks); keep every image and label inside the datalist's folder")


def _check_no_duplicates(site: str, datalist_path: str, cases) -> None:
    """The same image file or the same label file in two cases (in one section, or in two sections such as
    training and testing) is refused: it would be trained on twice, or scored on a case it was trained on."""
    seen: dict[tuple[str, str], str] = {}
    shared: dict[tuple[str, str], list[str]] = {}  # (first case, later case) -> the files they share
    for where, entry in cases:
        for what, path in _case_files(entry):
            key = (what, os.path.realpath(path))
            if key not in seen:
                seen[key] = where
                continue
            files = shared.setdefault((seen[key], where), [])  # (where, where): one case repeats a channel file
            if f"{what} {path}" not in files:
                files.append(f"{what} {path}")
    if shared:
        messages = [f"{a} and {b} use the same {' and '.join(files)}" if a != b else f"{a} lists {files[0]} twice"
                    for (a, b), files in shared.items()]
        more = f" (and {len(messages) - 10} more)" if len(messages) > 10 else ""
        raise DataValidationError(site, datalist_path, "the same case is listed more than once: "
                                  + "; ".join(messages[:10]) + more + ". List each case once, in one section.")


class _SiteChecker:
    """Checks cases one by one; remembers what must agree across cases and accumulates statistics."""

    def __init__(self, site, datalist_path, num_classes, spatial_dims, in_channels, max_voxels=MAX_VOXELS):
        self.site = site
        self.max_voxels = max_voxels
        self.warnings: list[str] = []
        self.empty_labels: list[str] = []  # cases ("training[3]") whose label is all background
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

    def check_case(self, entry: dict, where: str = "case") -> None:
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
            self.check_intensity_range(path, values, where)
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
            self.check_label(label, images[0], first_shape, first_affine, where)

    def check_intensity_range(self, path, values: np.ndarray, where: str) -> None:
        """Refuse values the engine's float32 normalisation overflows; warn about a constant image."""
        if not values.size:
            return
        peak = float(np.abs(values).max())
        # channel-wise normalisation sums the squares of all n voxels in float32: n * max|x|^2 must stay finite
        limit = float(np.sqrt(np.finfo(np.float32).max / values.size))
        if peak > limit:
            self.fail(path, f"image has values up to {peak:.3g} in magnitude; with its {values.size} voxels the "
                            f"limit is {limit:.3g} (normalisation computes the std in float32, whose squares "
                            "would overflow to Inf and make the loss NaN): rescale the image")
        low = float(values.min())
        if float(values.max()) == low:
            self.warnings.append(f"{where}: image {path} is constant (every voxel {low:.6g}): normalisation "
                                 "turns it into zeros, the network sees no signal")

    def check_label(self, label, image, image_shape, image_affine, where="case"):
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
        if not values.any():
            self.empty_labels.append(where)
            self.warnings.append(f"{where}: label {label} is all background (no foreground voxel)")
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
        """Load a NIfTI and really read its voxels (nib.load is lazy: corrupt data shows up only here).

        The header's shape is checked against max_voxels first, so no huge array is ever allocated."""
        def corrupt(e: Exception):  # nibabel, gzip, zlib and OS errors all mean the same thing here
            self.fail(path, f"cannot read {what} as NIfTI (corrupt, truncated or not a NIfTI file): "
                            f"{type(e).__name__}: {' '.join(str(e).split())}")

        try:
            img = nib.load(path)
            shape = tuple(int(n) for n in img.shape)
        except Exception as e:
            corrupt(e)
        voxels = int(np.prod(shape, dtype=object))
        if voxels > self.max_voxels:
            self.fail(path, f"{what} header declares shape {shape} = {voxels} voxels, more than the limit of "
                            f"{self.max_voxels} (max_voxels); refused before reading it")
        try:
            data = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as e:
            corrupt(e)
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
