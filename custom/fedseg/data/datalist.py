"""Datalists: where a site's data lives, reading them, and writing dataset folders.

A datalist is a MONAI/Decathlon-style JSON object:

    {"name": ..., "site": ..., "num_classes": C, "spatial_dims": 2|3, "in_channels": K,
     "labels": {"0": "background", "1": "target"},
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...], "testing": [...]}

Paths are relative to the datalist's folder (absolute paths are allowed too; validate_site_data
refuses any file that lies outside the datalist's folder).
"image" is one NIfTI path for a single-channel image, or a list of K paths, one
single-channel file per input channel (nnU-Net style "_0000", "_0001" files). MONAI's
LoadImaged + EnsureChannelFirstd read both forms as (K, *spatial) without extra options.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
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
# Top-level keys a datalist may have: the sections, the settings the validator reads, and the descriptive
# keys the generator and the converter write. Anything else is reported (see unknown_keys).
SETTING_KEYS = ("num_classes", "spatial_dims", "in_channels", "labels")
DESCRIPTIVE_KEYS = ("name", "site", "description", "split_unit")  # split_unit: what a case's "group" is
KNOWN_KEYS = SECTIONS + SETTING_KEYS + DESCRIPTIVE_KEYS

ENV_DATALIST = "FEDSEG_DATALIST"
ENV_DATA_ROOT = "FEDSEG_DATA"
ENV_ALLOW_JOB_DATALIST = "FEDSEG_ALLOW_JOB_DATALIST"
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
    or not a JSON object, has a misspelled or unknown section (see unknown_keys), has no (or an
    empty) "training" list, or has an entry without "image".
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

    for key, refused, hint in unknown_keys(datalist):
        if refused:
            fail(hint)
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


def unknown_keys(datalist: dict) -> list[tuple[str, bool, str]]:
    """[(key, refused, message)] for every top-level key that is not in KNOWN_KEYS.

    A key that looks like a section is refused, because its cases would be silently ignored: it is a
    close match of a section name ("trainig", "valdation", "test"), an abbreviation of one ("val"), or
    it holds a list of cases (objects with an "image"). Other unknown keys are descriptive: only noted,
    with a "did you mean" hint when they are close to a known key.
    """
    found = []
    for key, value in datalist.items():
        if key in KNOWN_KEYS:
            continue
        low = key.strip().lower()
        close = difflib.get_close_matches(low, SECTIONS, n=1, cutoff=0.6)
        if not close and len(low) >= 3:
            close = [s for s in SECTIONS if s.startswith(low)][:1]
        holds_cases = isinstance(value, list) and any(isinstance(e, dict) and "image" in e for e in value)
        if close or holds_cases:
            guess = f'did you mean "{close[0]}"? ' if close else ""
            message = (f'unknown section "{key}": {guess}Its cases would be ignored. '
                       f"The sections are {', '.join(SECTIONS)}; rename the key.")
            found.append((key, True, message))
            continue
        near = difflib.get_close_matches(low, KNOWN_KEYS, n=1, cutoff=0.75)
        guess = f' (did you mean "{near[0]}"?)' if near else ""
        found.append((key, False, f'unknown key "{key}" is ignored{guess}; known keys: {", ".join(KNOWN_KEYS)}'))
    return found


# ---------------------------------------------------------------------------------------------
# Where a site's datalist lives
# ---------------------------------------------------------------------------------------------


def resolve_site_datalist(site_name: str, job_value: str | None, workspace_root: str | None = None,
                          environ=os.environ) -> str:
    """Return the absolute path of this site's datalist (existence is not checked).

    The site decides where its data is; a job cannot point a site at other files. First source that
    gives a path wins:
      1. environment variable FEDSEG_DATALIST: the whole path. Relative paths are relative
         to the current directory.
      2. the site-local file <workspace_root>/local/fedseg_site.json, key "datalist": the
         hospital IT's own setting. Relative paths are relative to that file's folder. Skipped
         when workspace_root is None or the file is absent.
      In 1 and 2 (written by the site) "{SITE_NAME}" is replaced by site_name, then $VARS / ${VARS}
      (looked up in `environ`) and a leading ~ are expanded.
      3. job_value, the path the job configuration gives, ONLY when the site allows it
         (FEDSEG_ALLOW_JOB_DATALIST=1, or "allow_job_datalist": true in fedseg_site.json) and names
         a data root (FEDSEG_DATA, or "data_root" in fedseg_site.json). Only "{SITE_NAME}" and
         $FEDSEG_DATA / ${FEDSEG_DATA} (the data root) are expanded; any other $VAR or a leading ~ is
         refused. Relative paths are relative to the data root, and the path, with symlinks and ".."
         resolved, must lie inside the data root; the resolved path is returned.
    Raises DataValidationError naming the site, the value and what to configure when no source gives
    a path, when the job's path is not allowed or leaves the data root, or when fedseg_site.json is broken.
    """
    env_value = (environ.get(ENV_DATALIST) or "").strip()
    if env_value:
        return os.path.abspath(_expand(env_value, site_name, environ))

    config_path, config = None, {}
    if workspace_root:
        config_path = os.path.abspath(os.path.join(workspace_root, SITE_CONFIG_RELPATH))
        config = _read_site_config(config_path, site_name)
        local_value = config.get("datalist")
        if local_value is not None:
            if not isinstance(local_value, str) or not local_value.strip():
                raise DataValidationError(site_name, config_path, f'"datalist" must be a path, got {local_value!r}')
            return _absolute(_expand(local_value.strip(), site_name, environ), os.path.dirname(config_path))

    config_name = config_path or "<site workspace>/local/fedseg_site.json"
    configure = (
        "Configure the site's datalist in one of these ways (first found wins): "
        f"1) set the environment variable {ENV_DATALIST}=/path/to/datalist.json before starting the site "
        "(\"{SITE_NAME}\" in it is replaced by the site name); "
        f'2) write {config_name} containing {{"datalist": "/path/to/datalist.json"}}; '
        f"3) let jobs choose the file inside a data folder of the site: set {ENV_ALLOW_JOB_DATALIST}=1 and "
        f"{ENV_DATA_ROOT}=/data/folder, or write {{\"allow_job_datalist\": true, \"data_root\": \"/data/folder\"}} "
        f"in {config_name}."
    )
    job_value = None if job_value is None else str(job_value).strip()
    if not job_value:
        raise DataValidationError(site_name, "<no datalist>", f"no datalist is configured for this site. {configure}")

    if not _job_datalist_allowed(config, config_name, site_name, environ):
        raise DataValidationError(
            site_name, "<no datalist>",
            f"the job names the datalist {job_value!r}, but this site takes its data location only from its own "
            f"settings, and none is set. {configure}")
    root = _data_root(config, config_path, site_name, environ)
    if root is None:
        raise DataValidationError(
            site_name, config_name,
            f"jobs may choose the datalist ({ENV_ALLOW_JOB_DATALIST} or \"allow_job_datalist\"), but no data root "
            f"confines them: set {ENV_DATA_ROOT}=/data/folder or \"data_root\" in {config_name} "
            f"(the job names {job_value!r}).")
    return _confined_job_path(job_value, site_name, root)


_ALLOWED_JOB_VAR = re.compile(r"\$\{" + ENV_DATA_ROOT + r"\}|\$" + ENV_DATA_ROOT + r"(?!\w)")


def _confined_job_path(job_value: str, site_name: str, root: str) -> str:
    """The job's datalist path with {SITE_NAME} and $FEDSEG_DATA expanded, checked to lie inside root."""
    def refuse(problem: str):
        raise DataValidationError(site_name, job_value, f"refused as the job's datalist: {problem}. Name the datalist "
                                  f"in the site's own settings ({ENV_DATALIST} or \"datalist\" in "
                                  f"local/fedseg_site.json), or give a path inside the data root {root}.")

    pieces = _ALLOWED_JOB_VAR.split(job_value)
    if any("$" in piece for piece in pieces):
        refuse(f"only {{SITE_NAME}} and ${ENV_DATA_ROOT} are expanded in a job's path; other $variables are not")
    if job_value.startswith("~"):
        refuse("~ is not expanded in a job's path")
    expanded = root.join(piece.replace("{SITE_NAME}", site_name) for piece in pieces)
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, expanded))
    if os.path.commonpath([real, real_root]) != real_root:
        refuse(f"it resolves to {real} (symlinks and '..' resolved), outside the data root {real_root}")
    return real


def _job_datalist_allowed(config: dict, config_name: str, site_name: str, environ) -> bool:
    if (environ.get(ENV_ALLOW_JOB_DATALIST) or "").strip().lower() in ("1", "true", "yes"):
        return True
    allowed = config.get("allow_job_datalist", False)
    if not isinstance(allowed, bool):
        raise DataValidationError(site_name, config_name, f'"allow_job_datalist" must be true or false, got {allowed!r}')
    return allowed


def _data_root(config: dict, config_path: str | None, site_name: str, environ) -> str | None:
    """The site's data root: FEDSEG_DATA, else "data_root" in fedseg_site.json (relative to its folder)."""
    env_value = (environ.get(ENV_DATA_ROOT) or "").strip()
    if env_value:
        return os.path.abspath(_expand(env_value, site_name, environ))
    value = config.get("data_root")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataValidationError(site_name, config_path, f'"data_root" must be a folder path, got {value!r}')
    return _absolute(_expand(value.strip(), site_name, environ), os.path.dirname(config_path))


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
