"""What FedSeg's own workflows share: per-site tasks in parallel with timeouts, update screening, confined files.

Built on NVFlare's ModelController. `ignore_result_error=True` because FedSeg enforces its own minimum of
answering sites: the dynamic mode would panic the whole job as soon as one per-site task fails. What is not FLARE
glue lives in its own module: the screening of site results (fedseg.fl.screener), the results folder and its
checkpoints (fedseg.fl.checkpoints), which sites take part (fedseg.fl.site_health) and the results record
(fedseg.fl.results).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.apis.utils.fl_context_utils import add_job_audit_event
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedseg.algorithms.aggregation import TRIMMED_MEAN_MIN_SITES
from fedseg.fl.checkpoints import ResultsFolder, check_folder_name
from fedseg.fl.screener import Screener

# The server's own settings, written by the server's operator (never by a job): directories a job may resume from,
# and the ceilings on what a site's claimed step count may weigh ("max_local_steps", "max_weight_ratio").
SERVER_CONFIG_RELPATH = os.path.join("local", "fedseg_server.json")
# without the operator's own value: a site's aggregation weight is at most this many times the other sites' median
# step count, whatever the job says (a job may ask for less)
SERVER_MAX_WEIGHT_RATIO = 2.0


def confine_path(value: str, base: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> Path:
    """``value`` (relative to ``base``) resolved with symlinks and '..'; it must lie inside one of ``roots``."""
    path = Path(os.path.realpath(Path(base) / Path(value).expanduser()))
    allowed = [Path(os.path.realpath(r)) for r in roots]
    if not any(path == r or r in path.parents for r in allowed):
        raise PermissionError(
            f"{value!r} resolves to {path}, outside the job's workspace and the server's allowed directories "
            f"{[str(r) for r in allowed]}; the server's operator can allow a directory in <server workspace>/"
            f'{SERVER_CONFIG_RELPATH} as {{"resume_dirs": ["/abs/dir"]}}'
        )
    return path


def check_trimmed_mean(aggregation: str, min_clients: int) -> None:
    """A job refused at its start: "trimmed_mean" cuts at least one site per side, so a round needs 3 updates."""
    if aggregation == "trimmed_mean" and int(min_clients) < TRIMMED_MEAN_MIN_SITES:
        raise ValueError(
            f"aggregation 'trimmed_mean' drops at least one site's value per side of every coordinate: it needs "
            f"min_clients >= {TRIMMED_MEAN_MIN_SITES}, got {min_clients} (or use 'median')"
        )


def read_server_config(workspace_root: str | os.PathLike) -> dict:
    """<server workspace>/local/fedseg_server.json ({} when absent): the operator's settings, not the job's."""
    path = Path(workspace_root) / SERVER_CONFIG_RELPATH
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return config


def operator_resume_dirs(workspace_root: str | os.PathLike) -> list[str]:
    """The directories outside a job that the server operator lets jobs read checkpoints from ("resume_dirs")."""
    dirs = read_server_config(workspace_root).get("resume_dirs") or []
    if not isinstance(dirs, list) or not all(isinstance(d, str) and os.path.isabs(d) for d in dirs):
        raise ValueError(f'{SERVER_CONFIG_RELPATH}: "resume_dirs" must be a list of absolute paths, got {dirs!r}')
    return dirs


def server_plan(config: dict, plan: int | None, max_weight_ratio: float) -> tuple[int | None, float]:
    """(step plan, weight ratio) after the server operator's ceilings in ``config`` (fedseg_server.json
    "max_local_steps", "max_weight_ratio"; without the latter SERVER_MAX_WEIGHT_RATIO): a job can ask for less,
    never more."""
    steps = config.get("max_local_steps")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f'{SERVER_CONFIG_RELPATH}: "max_local_steps" must be an integer >= 1, got {steps!r}')
        plan = min(plan, steps) if plan else steps
    ceiling = config.get("max_weight_ratio", SERVER_MAX_WEIGHT_RATIO)
    if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or ceiling <= 0:
        raise ValueError(f'{SERVER_CONFIG_RELPATH}: "max_weight_ratio" must be a number > 0, got {ceiling!r}')
    ratio = float(ceiling) if max_weight_ratio <= 0 else min(float(max_weight_ratio), float(ceiling))
    return plan, ratio


def reject_renamed(component: str, renamed: dict[str, str], given: dict) -> None:
    """A job written for an earlier FedSeg may still name an argument by its old name: refused with the new one
    (FLARE builds a component from its job's keyword arguments)."""
    old = [name for name in given if name in renamed]
    if old:
        raise ValueError(
            f"{component}: "
            + "; ".join(f"argument {name!r} was renamed {renamed[name]!r}" for name in old)
            + " (rename it in the job's config_fed_server.json)"
        )


class FedSegController(ModelController):
    """NVFlare's ModelController with what every FedSeg workflow needs.

    Args:
        task_timeout: seconds a site may take for one task before its result is given up (0: no limit).
        min_clients: fewest answering sites with which a round still updates the models.
        startup_grace: extra seconds for a site that has not answered any task yet: FLARE's task clock
            starts when the task is scheduled, before a late site's job process is even up.
        max_update_ratio / clip_ratio / min_update_cosine: the screening of the sites' updates
            (fedseg.fl.screener.Screener: magnitude check, norm bounding, direction check).
    """

    # arguments of earlier FedSeg versions -> their names now: a job that still uses one is refused with the new name
    RENAMED: dict[str, str] = {}

    def __init__(
        self,
        *args,
        task_timeout: int = 0,
        min_clients: int = 1,
        startup_grace: int = 300,
        max_update_ratio: float = 10.0,
        clip_ratio: float = 2.0,
        min_update_cosine: float = -0.5,
        **kwargs,
    ):
        reject_renamed(type(self).__name__, self.RENAMED, kwargs)
        kwargs.setdefault("ignore_result_error", True)
        super().__init__(*args, **kwargs)
        if int(task_timeout) < 0 or int(startup_grace) < 0 or int(min_clients) < 1:
            raise ValueError("task_timeout and startup_grace must be >= 0 and min_clients >= 1")
        self.task_timeout = int(task_timeout)
        self.min_clients = int(min_clients)
        self.startup_grace = int(startup_grace)
        self.screener = Screener(self.reject, self.warning, max_update_ratio, clip_ratio, min_update_cosine)
        # the arguments as given (NVFlare's FedJob export reads the attributes back as the job's arguments)
        self.max_update_ratio = self.screener.max_update_ratio
        self.clip_ratio = self.screener.clip_ratio
        self.min_update_cosine = self.screener.min_update_cosine
        self.answered: set[str] = set()  # sites that have answered a task: they are up, no start-up grace
        self.last_result_at: float | None = None  # server clock when the latest task result arrived

    # ---- tasks ---------------------------------------------------------------------------------------
    def run_tasks(self, task_name: str, per_site: dict[str, FLModel], timeout: int | None = None) -> dict[str, FLModel]:
        """Send each site its own FLModel (all in parallel) and wait; returns {site: result} of those that answered.

        A site that errors, times out or disconnects is simply absent from the result, with a log line.
        """
        results: dict[str, FLModel] = {}
        heard: set[str] = set()  # sites whose result arrived, usable or not
        all_heard = threading.Event()

        def collect(result: FLModel) -> bool:
            site = result.meta["client_name"]
            # before anything formats or stores them: a bad field is a rejected result, the round goes on
            if self.screener.metadata(site, result.meta, result.metrics, f"{task_name} result"):
                results[site] = result
            heard.add(site)
            self.last_result_at = time.time()
            if heard >= set(per_site):
                all_heard.set()
            return True

        timeout = self.task_timeout if timeout is None else int(timeout)
        limits = {}
        for site, model in per_site.items():
            limits[site] = timeout + self.startup_grace if timeout and site not in self.answered else timeout
            self.send_model(task_name=task_name, data=model, targets=[site], timeout=limits[site], callback=collect)
        # back as soon as the last result is in (FedCross hands a model over here); the standing-task count (FLARE
        # clears it every task_check_period) ends the wait when a site errs, times out or disconnects instead
        while not all_heard.is_set() and self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return results
            all_heard.wait(0.05)
        self.answered.update(results)
        missing = sorted(set(per_site) - set(results))
        if missing:
            self.warning(
                f"{task_name}: no usable result from {missing} (error, timeout after "
                + ", ".join(f"{limits[s]}s" for s in missing)
                + f" or disconnect); continuing with {sorted(results)}"
            )
        return results

    def reject(self, site: str, what: str, reason: str) -> None:
        """One log line per rejected result, naming the site and the field (the round goes on without it), and
        the same as an NVFlare audit event of the job (the server's audit.log in a deployment)."""
        self.warning(f"REJECTED {what} from {site}: {reason}")
        try:
            fl_ctx = getattr(self, "fl_ctx", None)
            if fl_ctx is not None:
                add_job_audit_event(fl_ctx, ref=f"fedseg:rejected:{site}", msg=f"REJECTED {what} from {site}: {reason}")
        except Exception as e:  # noqa: BLE001 (an audit failure must not stop the round; it is said)
            self.error(f"audit event for the rejection of {site}'s {what} failed: {type(e).__name__}: {e}")

    def step_weights(self, results: dict[str, FLModel], plan: int | None, max_weight_ratio: float = 4.0) -> dict[str, float]:
        """Aggregation weights: each site's validated step count, capped by the server's plan (``plan`` steps, or
        the server operator's "max_local_steps"), or without a plan at ``max_weight_ratio`` x the median of the
        other sites' counts, never above the server's own ceiling (:func:`server_plan`). A site whose count is
        malformed is left out (logged)."""
        try:
            config = self.server_config()
        except Exception as e:  # noqa: BLE001 (no workspace, e.g. a controller driven in a test)
            self.debug(f"no server config: {e}")
            config = {}
        plan, max_weight_ratio = server_plan(config, plan, max_weight_ratio)
        return self.screener.step_weights({s: r.meta for s, r in results.items()}, plan, max_weight_ratio)

    def connected_sites(self) -> list[str]:
        """The sites FLARE knows that it has not marked as disconnected (a dead site is not sent tasks)."""
        return sorted(s for s in self.sample_clients() if self.get_client_disconnect_time(s) is None)

    # ---- experiment tracking ---------------------------------------------------------------------------
    def track(self, tag: str, value: float, step: int) -> None:
        """One server-side metric to the job's experiment tracking (TensorBoard, MLflow, ...): fires NVFlare's
        analytics event on the server, so every receiver configured there records it under the server's name.
        A receiver must listen to the local event "analytix_log_stats" (TBAnalyticsReceiver's default does;
        fedseg.fl.tracking.MLflowServerReceiver does). A value that is not finite (a round nobody scored) is
        not sent."""
        value = float(value)
        if not math.isfinite(value):
            return
        dxo = create_analytic_dxo(
            tag=tag, value=value, data_type=AnalyticsDataType.SCALAR, writer=LogWriterName.TORCH_TB, global_step=int(step)
        )
        with self.engine.new_context() as fl_ctx:
            send_analytic_dxo(self, dxo=dxo, fl_ctx=fl_ctx)

    def track_sites(self, tag: str, per_site: dict[str, float], step: int) -> None:
        """``tag/<site>`` for every site's value (e.g. each site's selector accuracy)."""
        for site, value in sorted(per_site.items()):
            self.track(f"{tag}/{site}", value, step)

    # ---- files ---------------------------------------------------------------------------------------
    def results_folder(self, name: str) -> ResultsFolder:
        """The folder ``name`` (a plain name) under the server's app dir, for checkpoints and records."""
        return ResultsFolder(Path(self.get_app_dir()) / check_folder_name(name))

    def server_config(self) -> dict:
        """<server workspace>/local/fedseg_server.json ({} when absent): the operator's settings, not the job's."""
        return read_server_config(self.engine.get_workspace().get_root_dir())

    def resume_path(self, value: str) -> Path:
        """Where a job may resume from: inside this job's run dir, or a directory the server's own
        local/fedseg_server.json lists under "resume_dirs". Raises PermissionError otherwise."""
        dirs = operator_resume_dirs(self.engine.get_workspace().get_root_dir())
        return confine_path(value, self.get_app_dir(), [self.get_run_dir(), *dirs])

    def load_resume(self, method: str, load: Callable[[Path], tuple], models: Callable[[tuple], dict], reference: dict):
        """``resume_from`` (confined by resume_path) read by ``load``; every saved model (``models`` of what was
        read: {what: params}) must fit the job's network ``reference``. Returns (path, what was read), or None
        after a panic that says why not."""
        try:
            path = self.resume_path(self.resume_from)
            saved = load(path)
            named = models(saved)
        except Exception as e:
            self.panic(f"{method}: cannot resume from {self.resume_from!r}: {type(e).__name__}: {e}")
            return None
        if not all(self.screener.accept(f"resume file {path}", params, reference, what) for what, params in named.items()):
            self.panic(f"{method}: {path} does not match the job's network; not resuming")
            return None
        return path, saved
