"""A workflow's results folder under the server's app dir: checkpoints (last.pt, best.pt) and JSON records.

No FLARE here: a controller hands in the folder (a plain name under its app dir, see check_folder_name). Writes
of checkpoints can run on one background thread, in order, off the path from one task to the next (``later``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fedseg.modelset import json_default

BEST_FILE = "best.pt"  # the best-validated set, next to last.pt (a resumed job carries it over)


def check_folder_name(name: str, what: str = "results_dir") -> str:
    """A job names a folder under the server's app dir, never a path: no absolute path, no separator, no '..'."""
    if not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name or os.path.isabs(name):
        raise ValueError(f"{what} must be a plain folder name (it is created inside the job's app dir), got {name!r}")
    return name


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON at ``path``, replaced whole (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default))
    os.replace(tmp, path)


def improves(score: float | None, best: float | None) -> bool:
    """Whether a round's score makes a new best: a finite score above the best so far (None: nothing yet)."""
    return score is not None and math.isfinite(score) and (best is None or score > best)


def best_beside(path: Path) -> Path | None:
    """The best.pt saved next to a checkpoint a job resumes from (None when there is none)."""
    best = Path(path).with_name(BEST_FILE)
    return best if best.exists() else None


class ResultsFolder:
    """One workflow's folder of checkpoints and records; created when the first file is written into it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.write_seconds = 0.0  # spent by the background writer
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    def path(self, name: str = "") -> Path:
        """``folder/name`` (the folder itself without a name), with the folder created."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / name if name else self.folder

    def write_json(self, name: str, data) -> None:
        write_json(self.path(name), data)

    def later(self, write: Callable[[], None]) -> None:
        """Run a checkpoint write on one background thread, in order, off the path from one task to the next.
        The caller hands over what no one changes afterwards; a failed write is raised at the next call or at
        done()."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedseg-writer")
        for future in [f for f in self._writes if f.done()]:
            self._writes.remove(future)
            future.result()

        def timed() -> None:
            began = time.perf_counter()
            write()
            self.write_seconds += time.perf_counter() - began

        self._writes.append(self._writer.submit(timed))

    def done(self) -> None:
        """Wait for every write handed to later() (raising the first failure)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        writes, self._writes = self._writes, []
        for future in writes:
            future.result()
