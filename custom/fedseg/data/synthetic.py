"""FedSeg's built-in dataset: synthetic multi-site segmentation data, generated locally (no downloads).

Each case is a textured background with one or more deformed ellipse/ellipsoid targets that are
brighter or darker than their surroundings; label 1 is the target, and with num_classes=3 label 2
is an inner core. The task is easy enough for a small UNet to learn on a CPU in minutes, but the
sites differ the way hospitals do: intensity scale and offset, contrast, gamma, noise, smooth
bias field, voxel spacing, image size / field of view, target size, shape and position,
foreground fraction and number of cases. Sites 1-4 follow four deliberately different
archetypes (jittered by the seed); further sites mix parameters within the archetypes' ranges.

    python -m fedseg.data.synthetic --out DIR [--sites 4] [--dims 2|3] [--seed 0] [--classes 2]
                                    [--size tiny|small|medium] [--cases N,N,N,N] [--labelled N] [--channels 1]

writes DIR/site-k/{imagesTr,labelsTr,imagesTs,labelsTs}/*.nii.gz, DIR/site-k/datalist.json and
DIR/dataset.json (every site's generating parameters and measured statistics). The same seed gives
byte-identical files.

Data-scarce variant (--labelled N, ``labelled_training=N``): each site keeps only the first N of its size
preset's training cases (as most hospitals label only a handful), while its validation and testing cases
and every site parameter stay exactly those of the full variant (same files, same names, same bytes). The
two variants differ ONLY in the number of labelled training cases, so they can be compared directly.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from .datalist import atomic_output_dir, save_nifti, write_json

DATASET_NAME = "fedseg-synthetic"

# Base edge length in voxels for 2-D and 3-D images; each site scales it by its size_factor.
BASE_SIZE = {
    "tiny": {2: 32, 3: 24},
    "small": {2: 64, 3: 32},
    "medium": {2: 128, 3: 64},
    "large": {2: 256, 3: 96},  # clinical patch sizes, few cases: for throughput measurements (fedseg_tools.bench.cost)
}
# Sites' spacings are given for this edge length; other sizes rescale the spacing so that the
# field of view in mm (and so the target's share of the image) stays the same: sizes change
# resolution, not anatomy.
REFERENCE_SIZE = 64
# (training, validation, testing) cases of the four archetype sites.
CASE_COUNTS = {
    "tiny": [(6, 2, 3), (5, 2, 3), (7, 2, 3), (4, 2, 3)],
    "small": [(24, 6, 8), (16, 4, 8), (32, 8, 8), (12, 4, 8)],
    "medium": [(48, 12, 16), (32, 8, 16), (64, 16, 16), (24, 8, 16)],
    "large": [(8, 2, 2), (6, 2, 2), (10, 2, 2), (6, 2, 2)],
}
# 3-D targets fill a much smaller fraction of a volume than 2-D ones of an image; enlarge them.
RADIUS_FACTOR_3D = 1.5
# Relative contrast of each extra input channel (a second "sequence" with different contrast).
CHANNEL_CONTRAST = (1.0, -0.6, 0.8, -0.4)

# The four site archetypes. Intensities before gamma/scale/offset are on a 0..1 scale;
# lengths are in mm (spacing_ref: in-plane spacing at REFERENCE_SIZE voxels; slice_ratio: slice
# spacing / in-plane spacing); "spread"/"shift" are fractions of the field of view.
ARCHETYPES = [
    dict(description="clean scanner: high contrast, low noise, centred round targets",
         size_factor=1.0, aspect=1.0, spacing_ref=1.0, slice_ratio=1.0,
         background=0.35, texture=0.04, contrast=0.45, gamma=1.0, bias=0.05, noise=0.02,
         scale=1.0, offset=0.0,
         radius_mm=10.0, radius_sd=0.15, elongation=1.3, deform=0.08,
         spread=0.12, shift=0.0, max_targets=1, extra_target_p=0.0, distractors=0),
    dict(description="dark, low-contrast, noisy images; large elongated targets, off-centre",
         size_factor=1.125, aspect=1.0, spacing_ref=0.85, slice_ratio=1.5,
         background=0.3, texture=0.06, contrast=0.2, gamma=1.0, bias=0.1, noise=0.05,
         scale=0.3, offset=0.02,
         radius_mm=13.0, radius_sd=0.2, elongation=2.0, deform=0.15,
         spread=0.15, shift=-0.08, max_targets=1, extra_target_p=0.0, distractors=1),
    dict(description="strong bias field and gamma, MR-like units, dark irregular targets, wider FOV",
         size_factor=1.25, aspect=0.9, spacing_ref=0.75, slice_ratio=1.25,
         background=0.5, texture=0.05, contrast=-0.28, gamma=0.6, bias=0.45, noise=0.03,
         scale=800.0, offset=150.0,
         radius_mm=8.0, radius_sd=0.25, elongation=1.6, deform=0.3,
         spread=0.25, shift=0.05, max_targets=2, extra_target_p=0.5, distractors=1),
    dict(description="low resolution, CT-like units, small scattered targets (low foreground)",
         size_factor=0.875, aspect=1.0, spacing_ref=1.35, slice_ratio=1.5,
         background=0.4, texture=0.05, contrast=0.35, gamma=1.5, bias=0.1, noise=0.04,
         scale=200.0, offset=-100.0,
         radius_mm=5.0, radius_sd=0.2, elongation=1.2, deform=0.1,
         spread=0.3, shift=0.0, max_targets=3, extra_target_p=0.6, distractors=2),
]
# Parameters that take a small seeded jitter for the archetype sites (kept positive/sign-stable).
JITTERED = ("spacing_ref", "background", "texture", "contrast", "gamma", "bias", "noise", "radius_mm", "deform")
JITTER = 0.1


# ---------------------------------------------------------------------------------------------
# Site parameters
# ---------------------------------------------------------------------------------------------


def site_parameters(n_sites: int, spatial_dims: int, seed: int, size: str, cases_per_site=None,
                    labelled_training=None) -> list[dict]:
    """Every site's generating parameters, deterministic in (seed, site).

    labelled_training: the data-scarce variant: at most this many training cases per site (an int for all
    sites or one per site), the first ones of the full variant; validation/testing unchanged. Each site's
    "case_start" gives the case number each section starts at (so validation and testing cases are the
    full variant's files)."""
    if cases_per_site is not None and labelled_training is not None:
        raise ValueError("give cases_per_site or labelled_training, not both")
    if size not in BASE_SIZE:
        raise ValueError(f"size must be one of {sorted(BASE_SIZE)}, got {size!r}")
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    training_counts = _training_counts(cases_per_site, n_sites)
    labelled = _training_counts(labelled_training, n_sites)
    sites = []
    for k in range(n_sites):
        rng = np.random.default_rng([seed, k, 0, 0])
        if k < len(ARCHETYPES):
            params = dict(ARCHETYPES[k])
            for key in JITTERED:
                params[key] = params[key] * (1.0 + JITTER * rng.uniform(-1.0, 1.0))
            n_train, n_val, n_test = CASE_COUNTS[size][k]
        else:
            params = _mixed_parameters(rng)
            lo, hi = np.min(CASE_COUNTS[size], axis=0), np.max(CASE_COUNTS[size], axis=0)
            n_train, n_val, n_test = (int(rng.integers(a, b + 1)) for a, b in zip(lo, hi))
        if training_counts is not None:
            n_train = training_counts[k]
            n_val, n_test = max(1, round(n_train / 4)), max(1, round(n_train / 3))
        full_train = n_train
        if labelled is not None:
            n_train = min(n_train, labelled[k])

        base = BASE_SIZE[size][spatial_dims]
        shape = [_round_to(base * params["size_factor"], 4)] * spatial_dims
        shape[1] = _round_to(shape[0] * params["aspect"], 4)
        in_plane = params["spacing_ref"] * REFERENCE_SIZE / base
        spacing = [in_plane] * 2 + [in_plane * params["slice_ratio"]]  # 2-D: slice thickness
        params = {key: _round_sig(v) for key, v in params.items()}
        params.update(
            site=f"site-{k + 1}",
            shape=shape,
            spacing_mm=[_round_sig(s) for s in spacing[:spatial_dims]],
            slice_mm=_round_sig(spacing[2]),
            origin_mm=[round(float(v), 1) for v in rng.uniform(-30.0, 30.0, size=3)],
            counts={"training": n_train, "validation": n_val, "testing": n_test},
            case_start={"training": 0, "validation": full_train, "testing": full_train + n_val},
        )
        sites.append(params)
    return sites


def _mixed_parameters(rng: np.random.Generator) -> dict:
    """A site beyond the four archetypes: each parameter drawn within the archetypes' range."""
    params = {"description": "mixed: parameters drawn within the archetype sites' ranges"}
    for key, value in ARCHETYPES[0].items():
        if key == "description":
            continue
        values = [a[key] for a in ARCHETYPES]
        if key == "contrast":  # magnitude within range, darker than background one time in four
            magnitude = rng.uniform(min(map(abs, values)), max(map(abs, values)))
            params[key] = magnitude * (-1.0 if rng.random() < 0.25 else 1.0)
        elif isinstance(value, int) and not isinstance(value, bool):
            params[key] = int(rng.integers(min(values), max(values) + 1))
        else:
            params[key] = float(rng.uniform(min(values), max(values)))
    return params


def _training_counts(cases_per_site, n_sites):
    if cases_per_site is None:
        return None
    if isinstance(cases_per_site, int):
        counts = [cases_per_site] * n_sites
    else:
        counts = [int(c) for c in cases_per_site]
    if len(counts) != n_sites:
        raise ValueError(f"cases_per_site has {len(counts)} values for {n_sites} sites")
    if min(counts) < 1:
        raise ValueError(f"every site needs at least one training case, got {counts}")
    return counts


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def _round_sig(v, digits=3):
    if isinstance(v, float) and v != 0.0:
        return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))
    return v


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def make_case(params: dict, rng: np.random.Generator, num_classes: int = 2, in_channels: int = 1):
    """One synthetic case of a site: (list of float32 channel images, uint8 label), spatial shape params["shape"]."""
    shape = tuple(params["shape"])
    dims = len(shape)
    spacing = np.asarray(params["spacing_mm"], dtype=np.float64)
    extent = np.asarray(shape) * spacing
    coords = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"))

    radius_factor = RADIUS_FACTOR_3D if dims == 3 else 1.0
    n_targets = 1
    while n_targets < params["max_targets"] and rng.random() < params["extra_target_p"]:
        n_targets += 1
    targets = [_random_ellipsoid(params, rng, extent, radius_factor) for _ in range(n_targets)]
    distractors = [_random_ellipsoid(params, rng, extent, 0.5 * radius_factor) for _ in range(params["distractors"])]

    # One smooth deformation field per case makes every blob irregular in its own way.
    mean_radius_vox = params["radius_mm"] * radius_factor / float(spacing.mean())
    deformation = _smooth_field(rng, shape, sigma=max(1.0, 0.5 * mean_radius_vox))

    # Class k (k >= 1) is the region inside radius threshold core[k-1] of a target: 1, then nested cores.
    thresholds = [1.0] + [1.0 - 0.5 * (k - 1) / max(1, num_classes - 2) for k in range(2, num_classes)]
    label = np.zeros(shape, dtype=np.uint8)
    for center, axes, rotation in targets:
        r = _ellipsoid_radius(coords, center, axes, rotation) + params["deform"] * deformation
        for k, t in enumerate(thresholds, start=1):
            label[r < t] = np.maximum(label[r < t], k)
    distractor_mask = np.zeros(shape, dtype=bool)
    for center, axes, rotation in distractors:
        distractor_mask |= _ellipsoid_radius(coords, center, axes, rotation) + 0.5 * params["deform"] * deformation < 1.0
    distractor_mask &= label == 0  # a distractor never covers a target

    # Tissue texture at two scales, shared by all channels (same anatomy), unit std each.
    texture = 0.6 * _smooth_field(rng, shape, sigma=3.0 / spacing) + 0.4 * _smooth_field(rng, shape, sigma=8.0 / spacing)
    # Low-frequency multiplicative bias field in [-1, 1].
    bias = _smooth_field(rng, shape, sigma=np.asarray(shape) / 3.0)
    bias /= max(float(np.abs(bias).max()), 1e-6)

    channels = []
    for c in range(in_channels):
        contrast = params["contrast"] * CHANNEL_CONTRAST[c % len(CHANNEL_CONTRAST)]
        anatomy = np.full(shape, params["background"], dtype=np.float64)
        anatomy += contrast * (label >= 1)
        for k in range(2, num_classes):  # each nested core half as much again
            anatomy += 0.5 * contrast * (label >= k)
        anatomy -= 0.5 * contrast * distractor_mask
        anatomy = ndimage.gaussian_filter(anatomy, sigma=0.6)  # partial volume at edges
        anatomy += params["texture"] * texture
        image = np.clip(anatomy, 0.0, None) ** params["gamma"]
        image *= np.exp(params["bias"] * bias)
        image += params["noise"] * rng.standard_normal(shape)
        channels.append((image * params["scale"] + params["offset"]).astype(np.float32))
    return channels, label


def _random_ellipsoid(params, rng, extent, radius_factor):
    """(center mm, semi-axes mm, rotation matrix) of one target, kept inside the field of view."""
    dims = len(extent)
    radius = params["radius_mm"] * radius_factor * float(np.exp(params["radius_sd"] * rng.standard_normal()))
    elongation = rng.uniform(1.0, params["elongation"])
    axes = np.full(dims, radius)
    axes[0] *= math.sqrt(elongation)
    axes[1] /= math.sqrt(elongation)
    center = extent * (0.5 + params["shift"] + params["spread"] * rng.uniform(-1.0, 1.0, size=dims))
    margin = np.minimum(axes.max() * 1.2, extent / 2)
    center = np.clip(center, margin, extent - margin)
    if dims == 2:
        angle = rng.uniform(0.0, math.pi)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    else:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        rotation = q * np.sign(np.diag(r))
    return center, axes, rotation


def _ellipsoid_radius(coords, center, axes, rotation):
    """Normalised ellipsoid radius at every voxel: < 1 inside."""
    offset = coords - center.reshape((-1,) + (1,) * (coords.ndim - 1))
    local = np.tensordot(rotation.T, offset, axes=1)
    return np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(len(axes))))


def _smooth_field(rng, shape, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def generate_dataset(out_dir, n_sites: int = 4, spatial_dims: int = 2, seed: int = 0, num_classes: int = 2,
                     size: str = "small", cases_per_site=None, in_channels: int = 1, overwrite: bool = False,
                     labelled_training=None) -> dict:
    """Generate the synthetic multi-site dataset into out_dir; return the summary also written to dataset.json.

    cases_per_site: training cases per site (an int for all sites, or one per site); validation
      then gets max(1, round(n/4)) and testing max(1, round(n/3)). Default: the size preset's
      per-site counts. labelled_training: the data-scarce variant (see the module docstring): at most
      this many training cases per site, validation/testing as in the full variant (an int or one per
      site). in_channels: 1 (default) or more "sequences" with different contrast,
      written as one file per channel. Output is written to a temporary folder next to out_dir
      and renamed at the end; an existing out_dir is an error unless overwrite is true.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not 2 <= num_classes <= 6:
        raise ValueError(f"num_classes must be in 2..6, got {num_classes}")
    if not 1 <= in_channels <= len(CHANNEL_CONTRAST):
        raise ValueError(f"in_channels must be in 1..{len(CHANNEL_CONTRAST)}, got {in_channels}")
    sites = site_parameters(n_sites, spatial_dims, seed, size, cases_per_site, labelled_training)
    labels = {"0": "background", "1": "target"}
    for k in range(2, num_classes):
        labels[str(k)] = "core" if num_classes == 3 else f"core-{k - 1}"

    summary = {
        "name": DATASET_NAME,
        "generator": "fedseg.data.synthetic",
        "seed": seed,
        "spatial_dims": spatial_dims,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "size": size,
        "labels": labels,
        "sites": [],
    }
    if labelled_training is not None:
        summary["labelled_training"] = labelled_training
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        for k, params in enumerate(sites):
            site_summary = _write_site(tmp, k, params, seed, spatial_dims, num_classes, in_channels, labels)
            summary["sites"].append(site_summary)
        write_json(tmp / "dataset.json", summary)
    return summary


def _write_site(root: Path, k: int, params: dict, seed, spatial_dims, num_classes, in_channels, labels) -> dict:
    site = params["site"]
    site_dir = root / site
    affine = np.diag(params["spacing_mm"] + ([] if spatial_dims == 3 else [params["slice_mm"]]) + [1.0])
    affine[:3, 3] = params["origin_mm"]
    datalist = {"name": DATASET_NAME, "site": site, "description": params["description"],
                "num_classes": num_classes, "spatial_dims": spatial_dims, "in_channels": in_channels,
                "labels": labels, "training": [], "validation": [], "testing": []}
    class_voxels = np.zeros(num_classes, dtype=np.int64)
    moments = np.zeros(3)  # n, sum, sum of squares of the first channel
    for section in ("training", "validation", "testing"):
        case = params["case_start"][section]
        tag = "Ts" if section == "testing" else "Tr"
        (site_dir / f"images{tag}").mkdir(parents=True, exist_ok=True)
        (site_dir / f"labels{tag}").mkdir(parents=True, exist_ok=True)
        for _ in range(params["counts"][section]):
            rng = np.random.default_rng([seed, k, 1, case])
            channels, label = make_case(params, rng, num_classes, in_channels)
            stem = f"{site}_{case:03d}"
            names = ([f"images{tag}/{stem}.nii.gz"] if in_channels == 1
                     else [f"images{tag}/{stem}_{c:04d}.nii.gz" for c in range(in_channels)])
            for name, image in zip(names, channels):
                save_nifti(site_dir / name, image, affine)
            save_nifti(site_dir / f"labels{tag}/{stem}.nii.gz", label, affine)
            datalist[section].append({"image": names[0] if in_channels == 1 else names,
                                      "label": f"labels{tag}/{stem}.nii.gz"})
            class_voxels += np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
            image = channels[0].astype(np.float64)
            moments += (image.size, image.sum(), np.square(image).sum())
            case += 1
    write_json(site_dir / "datalist.json", datalist)

    mean = moments[1] / moments[0]
    return {
        "site": site,
        "datalist": f"{site}/datalist.json",
        "counts": dict(params["counts"]),
        "shape": params["shape"],
        "spacing_mm": params["spacing_mm"],
        "params": {key: v for key, v in params.items() if key not in ("site", "counts", "shape", "spacing_mm", "case_start")},
        "measured": {
            "foreground_fraction": round(float(class_voxels[1:].sum() / class_voxels.sum()), 4),
            "intensity_mean": _round_sig(float(mean), 4),
            "intensity_std": _round_sig(float(math.sqrt(max(moments[2] / moments[0] - mean**2, 0.0))), 4),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedseg.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2-D images or 3-D volumes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=2, help="classes incl. background: 2, or 3 for target + core")
    parser.add_argument("--size", choices=sorted(BASE_SIZE), default="small")
    parser.add_argument("--cases", default=None, help="training cases per site: N, or N,N,... one per site")
    parser.add_argument("--labelled", type=int, default=None,
                        help="data-scarce variant: keep only the first N training cases per site (validation/testing unchanged)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    cases = None
    if args.cases:
        cases = [int(c) for c in args.cases.split(",")]
        cases = cases[0] if len(cases) == 1 else cases
    summary = generate_dataset(args.out, n_sites=args.sites, spatial_dims=args.dims, seed=args.seed,
                               num_classes=args.classes, size=args.size, cases_per_site=cases,
                               in_channels=args.channels, overwrite=args.overwrite, labelled_training=args.labelled)
    print(f"wrote {summary['name']} to {Path(args.out).absolute()}")
    for s in summary["sites"]:
        c, m = s["counts"], s["measured"]
        print(f"  {s['site']}: {c['training']}/{c['validation']}/{c['testing']} cases, shape {s['shape']}, "
              f"spacing {s['spacing_mm']} mm, foreground {m['foreground_fraction']:.1%}, "
              f"intensity {m['intensity_mean']:.4g}±{m['intensity_std']:.4g}  ({s['params']['description']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
