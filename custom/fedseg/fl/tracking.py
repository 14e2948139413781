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

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, TrackConst
from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver

DEFAULT_EXPERIMENT = "FLARE FL Experiment"  # NVFlare's MLflowReceiver default
SITE_TAG = "site"  # run tag: whose metrics the run holds (a site's name or the server's)


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
        super().__init__(
            tracking_uri=tracking_uri,
            kw_args=kw_args,
            artifact_location=artifact_location,
            events=events,
            buffer_flush_time=buffer_flush_time,
        )

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
