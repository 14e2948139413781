"""A site's log names a case by its datalist index ("training[3] label"), not by its file, unless the site's privacy
scope lets case names leave the site (fedseg.fl.privacy.LayerPrivacyFilter with share_case_names=true).

File names of medical images often carry patient identifiers ("pat-0003-MRN9999_seg.nii.gz"), and a site's log can
travel (support bundles, log streaming, a job's download). The site executor passes every message it logs, and the
traceback of a failed task, through CaseRedactor: each image or label path of the site's datalist (absolute, as
written, or its bare file name) becomes its index, and any other path of an image file becomes "<case file>".
"""

from __future__ import annotations

import json
import os
import re

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from fedseg.data.datalist import SECTIONS, image_paths

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_IMAGE_FILE = re.compile(
    r"[^\s'\"(),;:=\[\]{}]*(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + r")(?![A-Za-z0-9])", re.IGNORECASE
)
UNKNOWN_CASE = "<case file>"


def case_references(datalist_path: str | None) -> dict[str, str]:
    """{path or file name: "section[i] image|label"} for every case of the datalist (best effort: {} when the
    datalist cannot be read). Each path appears as written, absolute and resolved; a file name shared by several
    cases is left to the generic rule."""
    if not datalist_path:
        return {}
    try:
        with open(datalist_path, encoding="utf-8") as f:
            datalist = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(datalist, dict):
        return {}
    base = os.path.dirname(os.path.abspath(datalist_path))
    refs: dict[str, str] = {}
    names: dict[str, set[str]] = {}
    for section in SECTIONS:
        entries = datalist.get(section)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            files = []
            try:
                images = image_paths(entry)
            except (KeyError, TypeError):
                images = []
            files += [(p, "image" if len(images) == 1 else f"image channel {c}") for c, p in enumerate(images)]
            files.append((entry.get("label"), "label"))
            for path, what in files:
                if not isinstance(path, str) or not path:
                    continue
                ref = f"{section}[{i}] {what}"
                absolute = os.path.normpath(os.path.join(base, path))
                for form in (path, absolute, os.path.realpath(absolute)):
                    refs.setdefault(form, ref)
                names.setdefault(os.path.basename(path), set()).add(ref)
    for name, owners in names.items():
        if len(owners) == 1 and name:
            refs.setdefault(name, next(iter(owners)))
    return refs


class CaseRedactor:
    """text -> text with case files named by their datalist index (identity when names may be logged)."""

    def __init__(self, datalist_path: str | None = None, allow_names: bool = False):
        self.allow_names = bool(allow_names)
        refs = {} if self.allow_names else case_references(datalist_path)
        self._forms = sorted(refs, key=len, reverse=True)  # longest first: a path before its own file name
        self._refs = refs
        self._pattern = re.compile("|".join(re.escape(f) for f in self._forms)) if self._forms else None

    def __call__(self, text) -> str:
        text = str(text)
        if self.allow_names:
            return text
        if self._pattern is not None:
            text = self._pattern.sub(lambda m: self._refs[m.group(0)], text)
        return _IMAGE_FILE.sub(UNKNOWN_CASE, text)


def case_names_allowed(fl_ctx: FLContext) -> bool:
    """True only when the privacy scope this job runs under at this site has a LayerPrivacyFilter with
    share_case_names=true (a job's own filters do not count: the scope is the site's)."""
    try:
        from nvflare.private.privacy_manager import PrivacyService

        from fedseg.fl.privacy import LayerPrivacyFilter

        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        scope = PrivacyService.get_scope(meta.get("scope") or None)
        if scope is None:
            return False
        filters = [f for chain in scope.task_result_filters.values() for f in chain]
        return any(isinstance(f, LayerPrivacyFilter) and f.share_case_names is True for f in filters)
    except Exception:  # noqa: BLE001 - unknown: names stay out of the log
        return False
