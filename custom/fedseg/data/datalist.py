"""Datalists: where a site's data lives, reading them, and writing dataset folders.

A datalist is a MONAI/Decathlon-style JSON object:

    {"name": ..., "site": ..., "num_classes": C, "spatial_dims": 2|3, "in_channels": K,
     "labels": {"0": "background", "1": "target"},
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...], "testing": [...]}

Paths are relative to the datalist's folder (absolute paths are allowed too).
"image" is one NIfTI path for a single-channel image, or a list of K paths, one
single-channel file per input channel (nnU-Net style "_0000", "_0001" files). MONAI's
LoadImaged + EnsureChannelFirstd read both forms as (K, *spatial) without extra options.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import DataValidationError

SECTIONS = ("training", "validation", "testing")

ENV_DATALIST = "FEDSEG_DATALIST"
SITE_CONFIG_RELPATH = os.path.join("local", "fedseg_site.json")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def image_paths(entry: dict) -> list[str]:
    """The image file(s) of a datalist entry as a list: one path per input channel."""
    image = entry["image"]
    return [image] if isinstance(image, str) else list(image)


def load_datalist(path: str, site: str = "?") -> dict:
    """Read a datalist JSON and return it with every image/label path made absolute.

    Relative paths are taken relative to the datalist's folder. Raises DataValidationError
    naming the site and the datalist when the file is missing or unreadable, is not valid JSON
    or not a JSON object, has no (or an empty) "training" list, or has an entry without "image".
    """
    path = os.path.abspath(os.path.expanduser(str(path)))

    def fail(problem: str):
        raise DataValidationError(site, path, problem)

    if not os.path.exists(path):
        fail("datalist file not found")
    if os.path.isdir(path):
        fail("is a folder; expected the site's datalist JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read datalist: {e}")
    try:
        datalist = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
    if not isinstance(datalist, dict):
        fail(f"datalist must be a JSON object, got a JSON {type(datalist).__name__}")

    if "training" not in datalist:
        fail('no "training" list: the site has no training cases')
    for section in SECTIONS:
        if section in datalist and not isinstance(datalist[section], list):
            fail(f'"{section}" must be a list of cases, got {type(datalist[section]).__name__}')
    if not datalist["training"]:
        fail('"training" list is empty: the site has no training cases')

    for key, lo, hi in (("num_classes", 2, 10_000), ("spatial_dims", 2, 3), ("in_channels", 1, 10_000)):
        if key in datalist:
            value = datalist[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                fail(f'"{key}" must be an integer in {lo}..{hi}, got {value!r}')

    base = os.path.dirname(path)
    resolved = copy.deepcopy(datalist)
    for section in SECTIONS:
        for i, entry in enumerate(resolved.get(section, [])):
            where = f"{section}[{i}]"
            if not isinstance(entry, dict):
                fail(f"{where} must be an object with an \"image\", got {type(entry).__name__}")
            if "image" not in entry:
                fail(f'{where} has no "image"')
            image = entry["image"]
            if isinstance(image, str) and image:
                entry["image"] = _absolute(image, base)
            elif isinstance(image, list) and image and all(isinstance(p, str) and p for p in image):
                entry["image"] = [_absolute(p, base) for p in image]
            else:
                fail(f'{where} "image" must be a path or a non-empty list of paths, got {image!r}')
            if "label" in entry:
                if not isinstance(entry["label"], str) or not entry["label"]:
                    fail(f'{where} "label" must be a path, got {entry["label"]!r}')
                entry["label"] = _absolute(entry["label"], base)
    return resolved


def _absolute(p: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(p)))


# ---------------------------------------------------------------------------------------------
# Where a site's datalist lives
# ---------------------------------------------------------------------------------------------


def resolve_site_datalist(site_name: str, job_value: str | None, workspace_root: str | None = None,
                          environ=os.environ) -> str:
    """Return the absolute path of this site's datalist (existence is not checked).

    Precedence, first one that gives a path wins:
      1. environment variable FEDSEG_DATALIST: the whole path. Relative paths are relative
         to the current directory.
      2. the site-local file <workspace_root>/local/fedseg_site.json, key "datalist": the
         hospital IT's own setting, which a job cannot override. Relative paths are relative
         to that file's folder. Skipped when workspace_root is None or the file is absent.
      3. job_value, the path the job configuration gives. Relative paths are relative to
         workspace_root (or the current directory when workspace_root is None).
    In every source "{SITE_NAME}" is replaced by site_name, then $VARS / ${VARS} (looked up in
    `environ`) and a leading ~ are expanded. Raises DataValidationError when no source gives a
    path, or when the site-local file exists but is broken.
    """
    env_value = (environ.get(ENV_DATALIST) or "").strip()
    if env_value:
        return os.path.abspath(_expand(env_value, site_name, environ))

    config_path = None
    if workspace_root:
        config_path = os.path.abspath(os.path.join(workspace_root, SITE_CONFIG_RELPATH))
        local_value = _read_site_config(config_path, site_name).get("datalist")
        if local_value is not None:
            if not isinstance(local_value, str) or not local_value.strip():
                raise DataValidationError(site_name, config_path, f'"datalist" must be a path, got {local_value!r}')
            return _absolute(_expand(local_value.strip(), site_name, environ), os.path.dirname(config_path))

    if job_value is not None and str(job_value).strip():
        base = workspace_root or os.getcwd()
        return _absolute(_expand(str(job_value).strip(), site_name, environ), os.path.abspath(base))

    local_hint = config_path or "<site workspace>/local/fedseg_site.json (no workspace known here)"
    raise DataValidationError(
        site_name,
        "<no datalist>",
        "no datalist is configured for this site. Configure it in one of three ways (first found wins): "
        f"1) set the environment variable {ENV_DATALIST}=/path/to/datalist.json before starting the site "
        "(\"{SITE_NAME}\" in it is replaced by the site name); "
        f'2) write {local_hint} containing {{"datalist": "/path/to/datalist.json"}}; '
        "3) give the datalist path in the job configuration.",
    )


def _read_site_config(config_path: str, site_name: str) -> dict:
    if not os.path.isfile(config_path):
        return {}
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError(site_name, config_path, f"cannot read the site configuration: {e}") from e
    except json.JSONDecodeError as e:
        raise DataValidationError(
            site_name, config_path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(config, dict):
        raise DataValidationError(site_name, config_path, "the site configuration must be a JSON object")
    return config


_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def _expand(value: str, site_name: str, environ) -> str:
    """Replace {SITE_NAME}, expand $VAR/${VAR} from `environ` (unknown ones stay as written) and ~."""
    value = value.replace("{SITE_NAME}", site_name)

    def lookup(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return environ.get(name, m.group(0))

    return os.path.expanduser(_VAR.sub(lookup, value))


# ---------------------------------------------------------------------------------------------
# Writing dataset folders (used by the generator and the converter)
# ---------------------------------------------------------------------------------------------


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_nifti(path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write one NIfTI file with the affine in both qform and sform, units in mm."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yield a fresh temporary folder next to out_dir; on success it becomes out_dir.

    On any error (or Ctrl-C) the temporary folder is removed and out_dir is untouched, so a
    half-written dataset is never left under the requested name. An existing out_dir is an
    error unless it is empty or overwrite is true.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            # Move the old folder aside first, so the name switches over in one rename.
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
