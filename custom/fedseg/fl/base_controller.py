"""What FedSeg's own workflows share: per-site tasks in parallel with timeouts, update screening, confined files.

Built on NVFlare's ModelController. `ignore_result_error=True` because FedSeg enforces its own minimum of
answering sites: the dynamic mode would panic the whole job as soon as one per-site task fails.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.apis.utils.fl_context_utils import add_job_audit_event
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedseg.algorithms import UpdateRejected, check_update
from fedseg.algorithms.aggregation import TRIMMED_MEAN_MIN_SITES
from fedseg.algorithms.screening import (
    cap_step_weights,
    check_metadata,
    clip_scales,
    clip_update,
    read_step_count,
    screen_directions,
    screen_magnitudes,
    update_directions,
    update_norm,
)
from fedseg.modelset import json_default

# The server's own settings, written by the server's operator (never by a job): directories a job may resume from,
# and the ceilings on what a site's claimed step count may weigh ("max_local_steps", "max_weight_ratio").
SERVER_CONFIG_RELPATH = os.path.join("local", "fedseg_server.json")
# without the operator's own value: a site's aggregation weight is at most this many times the other sites' median
# step count, whatever the job says (a job may ask for less)
SERVER_MAX_WEIGHT_RATIO = 2.0


def check_output_name(name: str, what: str = "output_dir") -> str:
    """A job names a folder under the server's app dir, never a path: no absolute path, no separator, no '..'."""
    if not isinstance(name, str) or not name or name in (".", "..") or os.sep in name or "/" in name or os.path.isabs(name):
        raise ValueError(f"{what} must be a plain folder name (it is created inside the job's app dir), got {name!r}")
    return name


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


SITE_SECONDS = ("validate_seconds", "train_seconds", "selector_seconds")  # what sites report of a round's task


def round_seconds(results: dict, began: float, tasks_done: float, aggregated_at: float, saved_at: float) -> dict:
    """Where a round's time went (perf_counter stamps): the tasks (sent to last result in), of which each site's own
    work as it reports it (SITE_SECONDS found in its metrics: a measurement, never used to decide), what FLARE added
    beyond the slowest site, the server's screening and aggregation, and saving the global model."""
    sites = {}
    for site, result in sorted(results.items()):
        metrics = result.metrics if isinstance(result.metrics, dict) else {}
        sites[site] = {
            key: round(value, 3)
            for key in SITE_SECONDS
            if isinstance(value := metrics.get(key), float) and math.isfinite(value) and value >= 0
        }
    slowest = max((sum(v.values()) for v in sites.values()), default=0.0)
    return {
        "tasks": round(tasks_done - began, 3),
        "sites": sites,
        # what FLARE adds to the slowest site's own work: transfers, (de)serialisation, polling, building the network
        "tasks_beyond_slowest_site": round(max(tasks_done - began - slowest, 0.0), 3),
        "screen_and_aggregate": round(aggregated_at - tasks_done, 3),
        "save": round(saved_at - aggregated_at, 3),
    }


class FedSegController(ModelController):
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
        """
        Args:
            task_timeout: seconds a site may take for one task before its result is given up (0: no limit).
            min_clients: fewest answering sites with which a round still updates the models.
            startup_grace: extra seconds for a site that has not answered any task yet: FLARE's task clock
                starts when the task is scheduled, before a late site's job process is even up.
            max_update_ratio: an update whose norm is above this many times the median of the other updates
                (of the round, and recent accepted ones) is rejected (0: no magnitude check).
            clip_ratio: every accepted update that is aggregated is bounded to this many times the median norm of
                the round's accepted updates (norm bounding; 0: none), so a sign-flipped or scaled update within
                max_update_ratio moves the model no further than an honest one may.
            min_update_cosine: with 3 or more updates in a round, one whose cosine with the mean of the other
                sites' updates is below this is rejected: it would undo what the others learned (-1: no check).
        """
        kwargs.setdefault("ignore_result_error", True)
        super().__init__(*args, **kwargs)
        if int(task_timeout) < 0 or int(startup_grace) < 0 or int(min_clients) < 1:
            raise ValueError("task_timeout and startup_grace must be >= 0 and min_clients >= 1")
        self.task_timeout = int(task_timeout)
        self.min_clients = int(min_clients)
        self.startup_grace = int(startup_grace)
        if float(max_update_ratio) < 0:
            raise ValueError(f"max_update_ratio must be >= 0, got {max_update_ratio}")
        self.max_update_ratio = float(max_update_ratio)
        if float(clip_ratio) < 0:
            raise ValueError(f"clip_ratio must be >= 0, got {clip_ratio}")
        self.clip_ratio = float(clip_ratio)
        if not -1.0 <= float(min_update_cosine) <= 1.0:
            raise ValueError(f"min_update_cosine must be in [-1, 1], got {min_update_cosine}")
        self.min_update_cosine = float(min_update_cosine)
        self.answered: set[str] = set()  # sites that have answered a task: they are up, no start-up grace
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []
        self.write_seconds = 0.0  # spent by write_later's thread
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
            try:  # before anything formats or stores them: a bad field is a rejected result, the round goes on
                check_metadata(site, result.meta, "meta")
                check_metadata(site, result.metrics, "metrics")
            except UpdateRejected as e:
                self.reject(site, f"{task_name} result", e.reason)
            else:
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

    def accept(self, site: str, params: dict, reference: dict, what: str) -> bool:
        """Whether an update may enter a model; a rejected one is logged with the site's name."""
        try:
            check_update(site, params, reference)
            return True
        except UpdateRejected as e:
            self.reject(site, what, e.reason)
            return False

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

    def read(self, site: str, what: str, read_fn, *args):
        """``read_fn(site, *args)`` (a fedseg.algorithms.screening reader); None, with a log line, when it rejects."""
        try:
            return read_fn(site, *args)
        except UpdateRejected as e:
            self.reject(site, what, e.reason)
            return None

    def screen(self, what: str, norms: dict[str, float], recent: Iterable[float] = ()) -> set[str]:
        """Sites whose update is too large against the others (fedseg.algorithms.screen_magnitudes); logged."""
        rejected = screen_magnitudes(norms, recent, self.max_update_ratio)
        for site, reason in sorted(rejected.items()):
            self.reject(site, what, reason)
        return set(rejected)

    def screen_direction(self, what: str, updates: dict[str, dict], references: dict[str, dict]) -> tuple[set[str], dict]:
        """Sites whose update points against the others' (fedseg.algorithms.screen_directions), logged; and every
        site's cosine with the others' mean (for the history)."""
        cosines = update_directions(updates, references)
        rejected = screen_directions(cosines, self.min_update_cosine)
        for site, reason in rejected.items():
            self.reject(site, what, reason)
        return set(rejected), cosines

    def bound(self, what: str, updates: dict[str, dict], references: dict[str, dict]) -> tuple[dict[str, dict], dict]:
        """Norm bounding of the accepted updates ({site: params}, each against ``references[site]``, what that site
        was sent): those above ``clip_ratio`` x the round's median norm are scaled down to it (logged).
        Returns (updates, {site: factor} of the clipped ones)."""
        norms = {s: update_norm(u, references[s]) for s, u in updates.items()}
        scales = clip_scales(norms, self.clip_ratio)
        for site, scale in scales.items():
            self.warning(
                f"BOUNDED {what} from {site}: norm {norms[site]:.4g} above {self.clip_ratio:g}x the round's median; "
                f"scaled by {scale:.3g}"
            )
        return {s: clip_update(u, references[s], scales[s]) if s in scales else u for s, u in updates.items()}, scales

    def server_plan(self, plan: int | None, max_weight_ratio: float) -> tuple[int | None, float]:
        """(step plan, weight ratio) after the server operator's ceilings (fedseg_server.json "max_local_steps",
        "max_weight_ratio"; without the latter SERVER_MAX_WEIGHT_RATIO): a job can ask for less, never more."""
        try:
            config = self.server_config()
        except Exception as e:  # noqa: BLE001 (no workspace, e.g. a controller driven in a test)
            self.debug(f"no server config: {e}")
            config = {}
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

    def step_weights(self, results: dict[str, FLModel], plan: int | None, max_weight_ratio: float = 4.0) -> dict[str, float]:
        """Aggregation weights: each site's validated step count, capped by the server's plan (``plan`` steps, or
        the server operator's "max_local_steps"), or without a plan at ``max_weight_ratio`` x the median of the
        other sites' counts, never above the server's own ceiling (:meth:`server_plan`). A site whose count is
        malformed is left out (logged)."""
        plan, max_weight_ratio = self.server_plan(plan, max_weight_ratio)
        steps = {}
        for site, result in sorted(results.items()):
            value = self.read(site, "step count", read_step_count, result.meta, plan)
            if value is not None:
                steps[site], over_plan = value
                if over_plan:
                    self.warning(f"{site} reported more steps than the {plan} planned; its weight is capped at {plan}")
        if plan is not None:
            return {s: float(v) for s, v in steps.items()}
        weights, capped = cap_step_weights(steps, max_weight_ratio)
        for site, cap in capped.items():
            self.warning(
                f"{site} reported {steps[site]} steps, above {max_weight_ratio:g}x the other sites' median; "
                f"its weight is capped at {cap:g}"
            )
        return weights

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
    def output_dir(self, name: str) -> Path:
        path = Path(self.get_app_dir()) / check_output_name(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_later(self, write: Callable[[], None]) -> None:
        """Run a checkpoint write on one background thread, in order, off the path from one task to the next.
        The caller hands over what no one changes afterwards; a failed write is raised at the next call or at
        writes_done()."""
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

    def writes_done(self) -> None:
        """Wait for every write handed to write_later (raising the first failure)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        writes, self._writes = self._writes, []
        for future in writes:
            future.result()

    def write_json(self, path: Path, data) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=json_default))
        os.replace(tmp, path)

    def server_config(self) -> dict:
        """<server workspace>/local/fedseg_server.json ({} when absent): the operator's settings, not the job's."""
        return read_server_config(self.engine.get_workspace().get_root_dir())

    def resume_path(self, value: str) -> Path:
        """Where a job may resume from: inside this job's run dir, or a directory the server's own
        local/fedseg_server.json lists under "resume_dirs". Raises PermissionError otherwise."""
        dirs = operator_resume_dirs(self.engine.get_workspace().get_root_dir())
        return confine_path(value, self.get_app_dir(), [self.get_run_dir(), *dirs])
