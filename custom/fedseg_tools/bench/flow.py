"""Server workflows the benchmark puts around each method's own workflow in a bench job.

A bench job runs, in one NVFlare simulator run:
    BenchWarmup                      build every site's data caches once (so no method pays for them)
    BenchMark(start, m1)             time stamp, reset the server's peak-RSS counter
    <m1's own workflow(s)>           e.g. NVFlare's FedAvg, FedSegController subclasses ...
    BenchGlobalEval(m1)              FedAvg/FedProx/FedBN only: score the final global model on every site's test cases
    BenchMark(end, m1)               time stamp, server peak RSS, move m1's output files to bench/m1/
    BenchMark(start, m2) ...

Everything goes to <server app dir>/bench/: timeline.json and one folder per method with its
fedseg_results.json and method outputs (fedsm/, fedcross/ ...).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.fl.base_controller import FedSegController
from fedseg.fl.meter import current_rss_bytes, peak_rss_bytes, reset_peak_rss

BENCH_DIR = "bench"
TIMELINE = "timeline.json"
RESULTS_FILE = "fedseg_results.json"


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class BenchMark(Controller):
    """A time stamp in the bench timeline; at a method's end, moves its outputs to bench/<method>/."""

    def __init__(self, method: str, phase: str, move: list | None = None):
        super().__init__()
        if phase not in ("start", "end"):
            raise ValueError(f"phase must be 'start' or 'end', got {phase!r}")
        self.method = method
        self.phase = phase
        self.move = list(move or [])

    def start_controller(self, fl_ctx: FLContext):
        pass

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result: Shareable, fl_ctx: FLContext):
        pass

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))
        bench = app_dir / BENCH_DIR
        bench.mkdir(parents=True, exist_ok=True)
        entry = {
            "method": self.method,
            "phase": self.phase,
            "time": time.time(),
            "cpu": time.process_time(),
            "rss_bytes": current_rss_bytes(),
        }
        if self.phase == "start":
            entry["peak_reset"] = reset_peak_rss()
        else:
            entry["peak_rss_bytes"] = peak_rss_bytes()
            target = bench / self.method
            target.mkdir(parents=True, exist_ok=True)
            moved = []
            for name in [RESULTS_FILE, *self.move]:
                src = app_dir / name
                if src.exists():
                    dst = target / name
                    if dst.exists():
                        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
                    shutil.move(str(src), str(dst))
                    moved.append(name)
            entry["moved"] = moved
        path = bench / TIMELINE
        timeline = json.loads(path.read_text()) if path.exists() else []
        timeline.append(entry)
        _write_json(path, timeline)
        self.log_info(fl_ctx, f"bench: {self.phase} of {self.method}")


def _first_optimizer_use() -> None:
    """The first torch optimizer of a process imports and initialises a lot (seconds); do it here, not in
    whichever method's controller happens to build the first one (FedSM's selector moments)."""
    import torch

    p = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([p])
    p.sum().backward()
    optimizer.step()


class BenchWarmup(FedSegController):
    """Makes every site build its cached training set and take its first optimizer step before the first
    method, so the first method's time does not include them (seconds per site; the evaluation sets are
    small and are cached by whichever method scores first). The one training step is thrown away."""

    def __init__(self, persistor_id: str = "persistor", task_timeout: int = 3600):
        super().__init__(persistor_id=persistor_id, task_timeout=task_timeout, min_clients=1)

    def run(self):
        model = self.load_model()
        if model is None:
            return
        sites = self.connected_sites()
        began = time.time()
        _first_optimizer_use()
        from fedseg.algorithms.lr_schedule import LrSchedule
        from fedseg.algorithms.packing import pack

        packed = pack({"model": model.params, "optim": {}})
        meta = {
            "model_index": 0,
            "communication": 0,
            "visits_done": 0,
            "visit_epochs": 0,
            "visit_steps": 1,
            "lr_schedule": LrSchedule(kind="constant", base_lr=1e-12, total_visits=1).as_meta(),
        }
        done = self.run_tasks(
            "cross_train",
            {s: FLModel(params=packed, params_type=ParamsType.FULL, current_round=0, meta=dict(meta)) for s in sites},
        )
        self.info(f"bench warm-up done in {time.time() - began:.1f}s at {sorted(done)}")


class BenchGlobalEval(FedSegController):
    """Scores saved global models on every site's test cases and writes the common results record
    fedseg_results.json for `method`.

    models: {label: file} in the order to score; a file is a FedSeg model set under the server's app dir
    (e.g. "fedavg/best.pt", FedAvgController's best-validated model) or, with no "/", a model the persistor
    knows by that name. A missing file is recorded in extra["missing_models"] (and skipped).
    validation_model: the label of the model also scored on the validation cases, the last point of the
    learning curve (the final model; "" = the first found). keep_local "norm" (FedBN): each site scores the model
    with its own normalization layers, i.e. its personalized model."""

    def __init__(
        self,
        method: str,
        persistor_id: str,
        model_file: str = "",
        label: str = "global (last)",
        models: dict | None = None,
        validation_model: str = "",
        section: str = "testing",
        task_timeout: int = 3600,
        keep_local: str = "none",
    ):
        super().__init__(persistor_id=persistor_id, task_timeout=task_timeout, min_clients=1)
        self.method = method
        self.keep_local = keep_local
        self.models = dict(models or {label: model_file})
        self.section = section
        self.validation_model = validation_model

    def _load(self, file: str):
        if "/" in file:
            from fedseg.modelset import load_model_set

            path = Path(self.get_app_dir()) / file
            if not path.exists():
                return None
            groups, _ = load_model_set(path)
            return groups["global"]
        learnable = self.persistor.get_model(file, self.fl_ctx) if self.persistor else None
        return None if learnable is None else learnable["weights"]

    def _score(self, weights, label: str, section: str) -> dict:
        sites = self.connected_sites()
        meta = {"section": section, "model_name": label}
        if self.keep_local != "none":
            meta["keep_local"] = self.keep_local
        return self.run_tasks(
            "validate", {s: FLModel(params=weights, params_type=ParamsType.FULL, meta=dict(meta)) for s in sites}
        )

    def run(self):
        keep = ("dice", "dice_std", "n_cases", "dice_per_case", "hd95")
        models, missing, final_val, first = {}, [], {}, None
        for label, file in self.models.items():
            weights = self._load(file)
            if weights is None:
                self.error(f"bench eval: no model {file!r} for {label!r}")
                missing.append(label)
                continue
            results = self._score(weights, label, self.section)
            models[label] = {s: {k: r.metrics[k] for k in keep if k in (r.metrics or {})} for s, r in sorted(results.items())}
            if first is None and (not self.validation_model or label == self.validation_model):
                # the sites score the model they RECEIVE in each round, so the training tasks never see the final one
                first = label
                val = self._score(weights, label, "validation")
                final_val = {s: (r.metrics or {}).get("dice") for s, r in sorted(val.items())}
        record = {
            "method": self.method,
            "section": self.section,
            "models": models,
            "extra": {
                "model_files": self.models,
                "missing_models": missing,
                "final_validation_model": first,
                "final_validation_dice": final_val,
            },
        }
        _write_json(Path(self.get_app_dir()) / RESULTS_FILE, record)
