"""Split by the unit a clinician sees once (patient, study, video sequence), never by image or frame.

Frames of one colonoscopy video, or slices of one patient's scan, are near-duplicates: a split that puts
some of them into training and others into testing scores a model on what it was trained on. A group file
maps every case to its group, and the split assigns whole groups to one section.

Group file: a CSV with a header row. The case column is the first of "stem", "image", "name", "case"
(the image file name without extension); the group column is the first of "group", "video_sequence",
"sequence", "patient", "patient_id", "subject", "study". A "site" column, when present, restricts a row to
that site (one file for a whole dataset). Pure functions, no I/O beyond reading that file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import DataValidationError

GROUP_FILE_NAMES = ("sequence.csv", "groups.csv")  # looked for in a site's folder, next to images/
CASE_COLUMNS = ("stem", "image", "name", "case")
GROUP_COLUMNS = ("group", "video_sequence", "sequence", "patient", "patient_id", "subject", "study")
MAX_GROUP_FILE_BYTES = 64 * 1024 * 1024


def find_group_file(site_dir: Path) -> Path | None:
    """The site's own group file (sequence.csv or groups.csv in its folder), if any."""
    for name in GROUP_FILE_NAMES:
        if (site_dir / name).is_file():
            return site_dir / name
    return None


def _column(header: list[str], names, site: str, path: Path, what: str) -> int:
    low = [h.strip().lower() for h in header]
    for name in names:
        if name in low:
            return low.index(name)
    raise DataValidationError(site, str(path), f"no {what} column: the header {header} has none of {list(names)}")


def read_group_file(path: Path, site: str) -> tuple[dict[str, str], str]:
    """({case stem: group}, the group column's name) for one site from a group CSV.

    Raises DataValidationError (site, file, problem) for an unreadable or oversized file, a missing column,
    an empty cell, or a case listed twice with different groups.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_GROUP_FILE_BYTES:
            raise DataValidationError(site, str(path), f"group file is larger than {MAX_GROUP_FILE_BYTES} bytes")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataValidationError(site, str(path), f"cannot read group file: {type(e).__name__}: {e}") from e
    if len(rows) < 2:
        raise DataValidationError(site, str(path), "group file needs a header row and at least one case")
    header, body = rows[0], rows[1:]
    case_col = _column(header, CASE_COLUMNS, site, path, "case")
    group_col = _column(header, GROUP_COLUMNS, site, path, "group")
    low = [h.strip().lower() for h in header]
    site_col = low.index("site") if "site" in low else None
    groups: dict[str, str] = {}
    for line, row in enumerate(body, start=2):
        if site_col is not None and (len(row) <= site_col or row[site_col].strip() != site):
            continue
        if len(row) <= max(case_col, group_col) or not row[case_col].strip() or not row[group_col].strip():
            raise DataValidationError(site, str(path), f"line {line}: empty case or group cell ({row})")
        stem, group = row[case_col].strip(), row[group_col].strip()
        if groups.get(stem, group) != group:
            raise DataValidationError(site, str(path), f"line {line}: case {stem!r} is in group {groups[stem]!r} "
                                                       f"and in group {group!r}")
        groups[stem] = group
    if not groups:
        raise DataValidationError(site, str(path), f"no row for site {site!r}")
    return groups, header[group_col].strip()


def groups_of(site: str, path: Path, stems: list[str], groups: dict[str, str]) -> list[str]:
    """The group of each case; a case the file does not list is refused (it could sit in any section)."""
    missing = [s for s in stems if s not in groups]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataValidationError(site, str(path), f"{len(missing)} case(s) have no group: {shown}")
    return [groups[s] for s in stems]


def split_by_group(case_groups: list[str], fractions, rng: np.random.Generator) -> dict[str, list[int]]:
    """{"training", "validation", "testing": [case indices]} with every group in exactly one section.

    Groups are taken in a seeded random order; testing, then validation, receives whole groups until its
    share of CASES is the closest it can get to its fraction (one group at least when the fraction is
    above zero and a group can be spared); training keeps the rest and at least one group.
    """
    order: list[str] = []
    members: dict[str, list[int]] = {}
    for i, g in enumerate(case_groups):
        if g not in members:
            order.append(g)
            members[g] = []
        members[g].append(i)
    order = [order[i] for i in rng.permutation(len(order))]
    n = len(case_groups)
    sections: dict[str, list[int]] = {"training": [], "validation": [], "testing": []}
    remaining = list(order)
    for section, fraction in (("testing", fractions[2]), ("validation", fractions[1])):
        target = n * fraction
        taken = 0
        while remaining and len(remaining) > 1 and fraction > 0:
            size = len(members[remaining[0]])
            # Take the next group while that brings the section closer to its share (always the first one).
            if taken and abs(taken + size - target) >= abs(taken - target):
                break
            sections[section] += members[remaining.pop(0)]
            taken += size
            if taken >= target:
                break
    for g in remaining:
        sections["training"] += members[g]
    return {s: sorted(idx) for s, idx in sections.items()}


def spanning_groups(sections: dict[str, list[dict]], first: str, second: str) -> dict[str, tuple[str, str]]:
    """{group: (a case of `first`, a case of `second`)} for every group with cases in both sections."""
    seen: dict[str, str] = {}
    for entry in sections.get(first, []):
        if "group" in entry:
            seen.setdefault(str(entry["group"]), _case_label(entry))
    found = {}
    for entry in sections.get(second, []):
        g = str(entry.get("group", ""))
        if "group" in entry and g in seen and g not in found:
            found[g] = (seen[g], _case_label(entry))
    return found


def _case_label(entry: dict) -> str:
    image = entry.get("image")
    path = image if isinstance(image, str) else (image[0] if image else "?")
    return Path(str(path)).name


def group_counts(entries: list[dict]) -> int:
    return len({str(e["group"]) for e in entries if "group" in e})
