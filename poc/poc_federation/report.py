"""The per-site Dice table of a downloaded job (fedseg.report)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CUSTOM = Path(__file__).resolve().parents[2] / "custom"


def print_results(result_dir: str | os.PathLike, log=print) -> bool:
    """Print the per-site Dice table of a downloaded job; False when the result has none."""
    try:
        import fedseg  # noqa: F401 - an installed fedseg is used as it is
    except ImportError:
        sys.path.insert(0, str(CUSTOM))
    from fedseg.report import format_table, load_results

    try:
        log(format_table(load_results(result_dir)))
        return True
    except FileNotFoundError as e:
        log(str(e))
        return False
