"""Traffic, time and memory of every task at a site, measured by an NVFlare filter (used by the benchmark).

`TaskMeter` is configured as a task DATA filter and as a task RESULT filter of the site (same class; the
direction comes from the filter chain FLARE is running, or from the `direction` argument). For every task:

  in  (task data, after FLARE has received and materialised it):
      bytes_in        len(fobs.dumps(shareable)): the FOBS serialisation of the Shareable the server sent,
                      numpy arrays included. FLARE 2.9 moves large arrays through its download service
                      instead of inline, but the bytes are the same arrays plus a small header, so this is
                      the payload that crossed the network (not an estimate from the model size). If
                      serialisation fails (an object without a FOBS decomposer), the sum of the arrays'
                      nbytes is used instead and "bytes_method" says "array_nbytes".
      the process's peak-RSS counter is reset (Linux /proc/self/clear_refs "5"), so the peak read at
      "out" is the peak of THIS task, not of the process's lifetime.
  out (task result, before FLARE sends it):
      bytes_out       same measure on the result,
      seconds         wall time between the two filters (the executor's work plus FLARE's glue),
      cpu_seconds     CPU time of the site process (all its threads) over the same interval: unlike wall time,
                      hardly changed by other processes competing for the cores,
      peak_rss_bytes  peak resident memory of the site process during the task (VmHWM, or ru_maxrss where
                      the counter cannot be reset: then it is the process's lifetime peak),
      peak_gpu_bytes  on a CUDA site: peak GPU memory PyTorch allocated in the site process during the task
                      (torch.cuda.max_memory_allocated after a reset at "in"), with peak_gpu_reserved_bytes (what
                      its caching allocator held) and gpu_name; absent on a CPU site,
      steps/metrics   NUM_STEPS_CURRENT_ROUND and scalar metrics of the result (e.g. val_dice, selector_steps).

One JSON object per task is appended to <site run dir>/fedseg_meter.jsonl (in the simulator:
<workspace>/<site>/simulate_job/fedseg_meter.jsonl). The filter never changes the Shareable and never fails
the task: a measuring error is logged and recorded as "error".
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from numbers import Real
from pathlib import Path

from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

METER_FILE = "fedseg_meter.jsonl"
METER_PATH = "fedseg.fl.meter.TaskMeter"
# Every task the FedSeg site executor serves. FLARE matches filter task names exactly (no wildcards).
DEFAULT_TASKS = ("train", "validate", "submit_model", "fedsm_train", "fedsm_evaluate", "cross_train", "cross_validate")

_pending: dict[tuple[str, str], dict] = {}
_lock = threading.Lock()


# ---- memory ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since the last reset_peak_rss) in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS counter to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda():
    """torch.cuda when this process already uses CUDA, else None (the meter never imports torch or starts CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def reset_peak_gpu() -> bool:
    cuda = _cuda()
    if cuda is None:
        return False
    cuda.reset_peak_memory_stats()
    return True


def peak_gpu() -> dict:
    """{peak_gpu_bytes, peak_gpu_reserved_bytes, gpu_name} of this process's current device, {} on CPU."""
    cuda = _cuda()
    if cuda is None:
        return {}
    return {
        "peak_gpu_bytes": int(cuda.max_memory_allocated()),
        "peak_gpu_reserved_bytes": int(cuda.max_memory_reserved()),
        "gpu_name": cuda.get_device_name(cuda.current_device()),
    }


# ---- sizes -------------------------------------------------------------------------------------------------
def _array_nbytes(value) -> int:
    if hasattr(value, "nbytes") and not isinstance(value, (bytes, bytearray)):
        try:
            return int(value.nbytes)
        except (TypeError, ValueError):
            return 0
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_array_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_array_nbytes(v) for v in value)
    return 0


def serialized_size(shareable: Shareable) -> tuple[int, str, int]:
    """(bytes, method, array_bytes): FOBS-serialised size of the Shareable, or the arrays' nbytes if it cannot
    be serialised here."""
    arrays = _array_nbytes(dict(shareable))
    try:
        from nvflare.fuel.utils import fobs

        return len(fobs.dumps(shareable)), "fobs", arrays
    except Exception:  # noqa: BLE001 - measuring must never fail a task
        return arrays, "array_nbytes", arrays


def _scalars(values) -> dict:
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, Real) and not isinstance(v, bool)}


def _result_info(shareable: Shareable) -> dict:
    """NUM_STEPS_CURRENT_ROUND and scalar metrics of a result, read without touching the params."""
    from nvflare.apis.dxo import DataKind, from_shareable

    info: dict = {"rc": shareable.get_return_code()}
    try:
        dxo = from_shareable(shareable)
    except Exception:  # noqa: BLE001 - e.g. an error reply without a DXO
        return info
    meta = dxo.meta or {}
    steps = meta.get("NUM_STEPS_CURRENT_ROUND")
    if isinstance(steps, Real):
        info["steps"] = int(steps)
    metrics = dxo.data if dxo.data_kind == DataKind.METRICS else meta.get("initial_metrics")
    info["metrics"] = _scalars(metrics)
    if "model_index" in meta:
        info["model_index"] = meta["model_index"]
    return info


# ---- the filter ----------------------------------------------------------------------------------------------
class TaskMeter(Filter):
    def __init__(self, direction: str = "auto", file_name: str = METER_FILE, serialize: bool = True):
        """
        Args:
            direction: "in" (task data filter), "out" (task result filter) or "auto" (ask FLARE's filter chain).
            file_name: JSONL file in the site's run directory.
            serialize: measure the FOBS-serialised size (True) or only the arrays' nbytes (False, cheaper).
        """
        super().__init__()
        if direction not in ("auto", FilterKey.IN, FilterKey.OUT):
            raise ValueError(f"direction must be 'auto', 'in' or 'out', got {direction!r}")
        if not isinstance(file_name, str) or file_name in ("", ".", "..") or "/" in file_name or os.sep in file_name:
            raise ValueError(f"file_name must be a plain file name (written in the site's run dir), got {file_name!r}")
        self.direction = direction
        self.file_name = file_name
        self.serialize = bool(serialize)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            direction = self.direction
            if direction == "auto":
                direction = fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) or FilterKey.IN
            if direction == FilterKey.OUT:
                self._out(shareable, fl_ctx)
            else:
                self._in(shareable, fl_ctx)
        except Exception as e:  # noqa: BLE001 - never break the task for a measurement
            self.log_warning(fl_ctx, f"TaskMeter: could not measure: {type(e).__name__}: {e}")
        return shareable

    def _size(self, shareable: Shareable) -> tuple[int, str, int]:
        if self.serialize:
            return serialized_size(shareable)
        arrays = _array_nbytes(dict(shareable))
        return arrays, "array_nbytes", arrays

    @staticmethod
    def _key(fl_ctx: FLContext) -> tuple[str, str]:
        return fl_ctx.get_identity_name(), str(fl_ctx.get_prop(FLContextKey.TASK_ID) or "")

    def _in(self, shareable: Shareable, fl_ctx: FLContext) -> None:
        began = time.perf_counter()
        size, method, arrays = self._size(shareable)
        record = {
            "task_name": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "round": shareable.get_header("current_round"),
            "t_in": time.time(),
            "cpu_in": time.process_time(),
            "bytes_in": size,
            "array_bytes_in": arrays,
            "bytes_method": method,
            "rss_in_bytes": current_rss_bytes(),
            "peak_reset": reset_peak_rss(),
            "gpu_peak_reset": reset_peak_gpu(),
        }
        record["meter_seconds"] = time.perf_counter() - began
        with _lock:
            _pending[self._key(fl_ctx)] = record

    def _out(self, shareable: Shareable, fl_ctx: FLContext) -> None:
        began = time.perf_counter()
        with _lock:
            record = _pending.pop(self._key(fl_ctx), None) or {"task_name": fl_ctx.get_prop(FLContextKey.TASK_NAME)}
        now = time.time()
        size, method, arrays = self._size(shareable)
        record.update(
            {
                "site": fl_ctx.get_identity_name(),
                "task_id": self._key(fl_ctx)[1],
                "t_out": now,
                "seconds": round(now - record["t_in"], 4) if "t_in" in record else None,
                "cpu_seconds": round(time.process_time() - record["cpu_in"], 4) if "cpu_in" in record else None,
                "bytes_out": size,
                "array_bytes_out": arrays,
                "peak_rss_bytes": peak_rss_bytes(),
                "rss_out_bytes": current_rss_bytes(),
                "pid": os.getpid(),
            }
        )
        record.update(peak_gpu())
        record.update(_result_info(shareable))
        record["meter_seconds"] = round(record.get("meter_seconds", 0.0) + time.perf_counter() - began, 4)
        self._write(record, fl_ctx)

    def _write(self, record: dict, fl_ctx: FLContext) -> None:
        engine = fl_ctx.get_engine()
        run_dir = engine.get_workspace().get_run_dir(fl_ctx.get_job_id())
        path = Path(run_dir) / self.file_name
        with _lock, open(path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")


# ---- wiring --------------------------------------------------------------------------------------------------
def add_meter(client_config: dict, tasks=None, serialize: bool = True) -> dict:
    """Add TaskMeter as data and result filter for the given tasks (default: every FedSeg site task) to a
    client app config (dict, changed in place and returned).

    FLARE allows one filter chain per task and direction, so for a task that already has a chain the meter
    joins it: first in the data chain (it measures what arrived), last in the result chain (what is sent)."""
    tasks = sorted(tasks or DEFAULT_TASKS)
    for key, direction in (("task_data_filters", FilterKey.IN), ("task_result_filters", FilterKey.OUT)):
        meter = {"path": METER_PATH, "args": {"direction": direction, "serialize": serialize}}
        chains = client_config.setdefault(key, [])
        uncovered = list(tasks)
        for chain in chains:
            covered = [t for t in chain.get("tasks", []) if t in uncovered]
            if not covered:
                continue
            filters = chain.setdefault("filters", [])
            if direction == FilterKey.IN:
                filters.insert(0, dict(meter))
            else:
                filters.append(dict(meter))
            uncovered = [t for t in uncovered if t not in covered]
        if uncovered:
            chains.append({"tasks": uncovered, "filters": [meter]})
    return client_config


def read_meter(path: str | os.PathLike) -> list[dict]:
    """Records of one site's meter file (a truncated last line, e.g. from a killed run, is skipped)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
