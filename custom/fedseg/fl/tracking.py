"""MLflow experiment tracking on the server that records the server's own metrics as well as the sites'.

NVFlare 2.9's MLflowReceiver opens one MLflow run per client when the job starts and keys its buffers by
client name, so a record from any other origin, the server's own included, fails in `save` (a KeyError that
AnalyticsReceiver logs as "Receiver save method failed"); by default it also listens only to events forwarded
from sites ("fed.analytix_log_stats"). FedSeg's controllers send their per-round metrics from the server
(FedSegController.track fires the local "analytix_log_stats"), so this receiver listens to both events and
opens a run for an origin the first time it sends something. Every run carries the tag "site" (its origin).

With no tracking_uri the store is NVFlare's default: a SQLite file <job result dir>/mlflow.db (in the
simulator <workspace>/server/simulate_job/mlflow.db), so no MLflow server is needed; read it with
``mlflow ui --backend-store-uri sqlite:///<path>/mlflow.db`` or MlflowClient(tracking_uri=...).
"""

from __future__ import annotations

import os

# mlflow starts a usage-telemetry client when it is first imported, which sends to the internet; a site has
# no such egress and must not try. An operator who wants telemetry sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from urllib.parse import unquote, urlsplit

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, TrackConst
from nvflare.apis.fl_constant import ProcessType
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

DEFAULT_EXPERIMENT = "FLARE FL Experiment"  # NVFlare's MLflowReceiver default
SITE_TAG = "site"  # run tag: whose metrics the run holds (a site's name or the server's)
# where the server's (local/fedseg_server.json) or a site's (local/fedseg_site.json) operator allows stores outside jobs
TRACKING_DIRS_KEY = "tracking_dirs"


def store_path(uri: str) -> tuple[str, str]:
    """(kind, path) of a local MLflow store URI: "sqlite" for sqlite:///<path> (sqlite:////abs/x.db is absolute),
    "file" for file:///<path> or a plain path. Any other scheme (http, https, databricks, postgresql, ...) or a
    host is refused: a job's tracking store never makes the process contact anything."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"tracking_uri must be a non-empty string, got {uri!r}")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "sqlite" and uri.lower().startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        if path:
            return "sqlite", path
    elif scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        return "file", unquote(parts.path)
    elif scheme == "" and not parts.netloc:
        return "file", uri
    raise ValueError(
        f"tracking_uri {uri!r} refused: only a local SQLite (sqlite:///<path>) or file store inside the job's "
        "folder (or a folder the operator lists under "
        f'"{TRACKING_DIRS_KEY}") is allowed; no tracking server, no other scheme'
    )


class MLflowServerReceiver(MLflowReceiver):
    def __init__(
        self,
        tracking_uri: str | None = None,
        kw_args: dict | None = None,
        artifact_location: str | None = None,
        events: list[str] | None = None,
        buffer_flush_time: float = 1,
    ):
        """Arguments as NVFlare's MLflowReceiver; ``events`` defaults to the server's own analytics events and
        those forwarded from the sites."""
        if events is None:
            events = [ANALYTIC_EVENT_TYPE, f"fed.{ANALYTIC_EVENT_TYPE}"]
        if tracking_uri is not None:
            store_path(tracking_uri)  # a scheme that reaches out is refused before the job starts
        super().__init__(
            tracking_uri=tracking_uri,
            kw_args=kw_args,
            artifact_location=artifact_location,
            events=events,
            buffer_flush_time=buffer_flush_time,
        )

    def _operator_dirs(self, fl_ctx) -> list[str]:
        """The folders outside jobs the operator of this process (the server's or the site's) allows for stores."""
        from fedseg.fl.base_controller import SERVER_CONFIG_RELPATH, read_server_config

        root = fl_ctx.get_engine().get_workspace().get_root_dir()
        if fl_ctx.get_process_type() in (ProcessType.SERVER_JOB, ProcessType.SERVER_PARENT):
            config, where = read_server_config(root), SERVER_CONFIG_RELPATH
        else:
            from fedseg.data.datalist import SITE_CONFIG_RELPATH, _read_site_config

            where = SITE_CONFIG_RELPATH
            config = _read_site_config(os.path.join(root, where), fl_ctx.get_identity_name())
        dirs = config.get(TRACKING_DIRS_KEY) or []
        if not isinstance(dirs, list) or not all(isinstance(d, str) and os.path.isabs(d) for d in dirs):
            raise ValueError(f'{where}: "{TRACKING_DIRS_KEY}" must be a list of absolute paths, got {dirs!r}')
        return dirs

    def _job_dirs(self, fl_ctx) -> list[str]:
        workspace = fl_ctx.get_engine().get_workspace()
        job_id = fl_ctx.get_job_id()
        return [workspace.get_run_dir(job_id), workspace.get_result_root(job_id)]

    def _get_tracking_uri(self, fl_ctx):
        """The job's store, confined to the job's folder (run dir, result dir) or an operator's tracking_dirs."""
        if not self.tracking_uri:
            return super()._get_tracking_uri(fl_ctx)
        from fedseg.fl.base_controller import confine_path

        kind, path = store_path(self.tracking_uri)
        roots = [*self._job_dirs(fl_ctx), *self._operator_dirs(fl_ctx)]
        try:
            resolved = confine_path(path, roots[0], roots)
        except PermissionError:
            raise PermissionError(
                f"tracking_uri {self.tracking_uri!r} refused: it resolves to {os.path.realpath(os.path.join(roots[0], path))}"
                f", outside the job's folder {roots[0]}; the store must lie inside the job's folder or a folder the "
                f'operator lists under "{TRACKING_DIRS_KEY}" in its local fedseg_server.json / fedseg_site.json'
            ) from None
        return f"sqlite:///{resolved}" if kind == "sqlite" else str(resolved)

    def _get_artifact_location(self, relative_path, fl_ctx):
        """Artifacts stay under the job's run dir (NVFlare joins the run dir with the job's value: an absolute
        path would escape it)."""
        from fedseg.fl.base_controller import confine_path

        run_dir = self._job_dirs(fl_ctx)[0]
        try:
            return str(confine_path(relative_path or ".", run_dir, [run_dir, *self._operator_dirs(fl_ctx)]))
        except PermissionError:
            raise PermissionError(
                f"artifact_location {relative_path!r} refused: outside the job's run dir {run_dir} and the "
                f'operator\'s "{TRACKING_DIRS_KEY}"'
            ) from None

    def _mlflow_setup(self, art_full_path, experiment_name, experiment_tags, site_names, fl_ctx):
        super()._mlflow_setup(art_full_path, experiment_name, experiment_tags, site_names, fl_ctx)
        for site in site_names:
            self.mlflow_clients[site].set_tag(self.run_ids[site], SITE_TAG, site)

    def save(self, fl_ctx, shareable, record_origin: str):
        if record_origin not in self.run_ids:
            self._open_run(record_origin, fl_ctx)
        super().save(fl_ctx, shareable, record_origin)

    def _open_run(self, origin: str, fl_ctx) -> None:
        """A run for an origin the start of the job did not know (the server itself, a site that joined late)."""
        experiment_name = self.kw_args.get(TrackConst.EXPERIMENT_NAME, DEFAULT_EXPERIMENT)
        experiment_tags = self.kw_args.get(TrackConst.EXPERIMENT_TAGS) or {}
        self._mlflow_setup(
            self._get_artifact_location(self.artifact_location, fl_ctx), experiment_name, experiment_tags, [origin], fl_ctx
        )
        self._init_buffer([origin])
