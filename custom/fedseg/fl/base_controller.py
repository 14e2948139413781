"""What FedSeg's own workflows share: per-site tasks in parallel with timeouts, update checks, model-set files.

Built on NVFlare's ModelController. `ignore_result_error=True` because FedSeg enforces its own minimum of
answering sites: the dynamic mode would panic the whole job as soon as one per-site task fails.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedseg.algorithms import UpdateRejected, check_update
from fedseg.modelset import json_default


class FedSegController(ModelController):
    def __init__(self, *args, task_timeout: int = 0, min_clients: int = 1, startup_grace: int = 300, **kwargs):
        """
        Args:
            task_timeout: seconds a site may take for one task before its result is given up (0: no limit).
            min_clients: fewest answering sites with which a round still updates the models.
            startup_grace: extra seconds for a site that has not answered any task yet: FLARE's task clock
                starts when the task is scheduled, before a late site's job process is even up.
        """
        kwargs.setdefault("ignore_result_error", True)
        super().__init__(*args, **kwargs)
        if int(task_timeout) < 0 or int(startup_grace) < 0 or int(min_clients) < 1:
            raise ValueError("task_timeout and startup_grace must be >= 0 and min_clients >= 1")
        self.task_timeout = int(task_timeout)
        self.min_clients = int(min_clients)
        self.startup_grace = int(startup_grace)
        self.answered: set[str] = set()  # sites that have answered a task: they are up, no start-up grace

    # ---- tasks ---------------------------------------------------------------------------------------
    def run_tasks(self, task_name: str, per_site: dict[str, FLModel], timeout: int | None = None) -> dict[str, FLModel]:
        """Send each site its own FLModel (all in parallel) and wait; returns {site: result} of those that answered.

        A site that errors, times out or disconnects is simply absent from the result, with a log line.
        """
        results: dict[str, FLModel] = {}

        def collect(result: FLModel) -> bool:
            results[result.meta["client_name"]] = result
            return True

        timeout = self.task_timeout if timeout is None else int(timeout)
        limits = {}
        for site, model in per_site.items():
            limits[site] = timeout + self.startup_grace if timeout and site not in self.answered else timeout
            self.send_model(task_name=task_name, data=model, targets=[site], timeout=limits[site], callback=collect)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return results
            time.sleep(0.2)
        self.answered.update(results)
        missing = sorted(set(per_site) - set(results))
        if missing:
            self.warning(
                f"{task_name}: no usable result from {missing} (error, timeout after "
                + ", ".join(f"{limits[s]}s" for s in missing)
                + f" or disconnect); continuing with {sorted(results)}"
            )
        return results

    def accept(self, site: str, params: dict, reference: dict, what: str) -> bool:
        """Whether an update may enter a model; a rejected one is logged with the site's name."""
        try:
            check_update(site, params, reference)
            return True
        except UpdateRejected as e:
            self.warning(f"REJECTED {what} {e}")
            return False

    def connected_sites(self) -> list[str]:
        return sorted(self.sample_clients())

    # ---- files ---------------------------------------------------------------------------------------
    def output_dir(self, name: str) -> Path:
        path = Path(self.get_app_dir()) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, path: Path, data) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=json_default))
        os.replace(tmp, path)
