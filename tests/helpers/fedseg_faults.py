"""Fault injection for simulator tests: a SegExecutor whose site misbehaves in chosen rounds.

Lives in tests/ (never in the product): a job under test swaps its executor path to this class.
faults: [{"site": "site-2", "round": 1 (or "rounds": [1, 2]), "task": "train" (or "*": every task of the round),
          "mode": "raise" | "stall" | "slow" | "nan" | "nan_optim" | "drop_key" | "bad_shape", "seconds": 20,
          "marker": "/abs/file"}]
  round = FLModel.current_round, or meta["communication"] (FedCross's cross_validate tasks carry it)
  raise: the task fails; stall: sleep `seconds` first (a task timeout then gives up on the site);
  slow: write `marker` (so a test knows the task is running), then sleep `seconds`, then train as usual;
  nan / drop_key / bad_shape: corrupt the last float array of the result; nan_optim: NaN into the first
  optimizer-state array ("optim/..." keys of a FedCross result).
start_gate: {"site": "site-3", "file": "/abs/release", "seconds": 600}: the site's job process is late: its
  START_RUN set-up waits until `file` exists (at most `seconds`), so it asks for no task until then.
"""

from __future__ import annotations

import os
import time

import numpy as np
from nvflare.apis.event_type import EventType

from fedseg.fl.executor import FedCrossExecutor, FedSMExecutor


def _sleep(seconds: float, abort_signal=None) -> None:
    end = time.time() + seconds
    while time.time() < end and not (abort_signal is not None and abort_signal.triggered):
        time.sleep(0.2)


class FaultySegExecutor(FedSMExecutor, FedCrossExecutor):
    """Serves every FedSeg site task (any job's executor path can be swapped to it)."""

    def __init__(self, faults: list[dict] | None = None, start_gate: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = list(faults or [])
        self.start_gate = dict(start_gate or {})
        for name, handler in list(self.handlers.items()):
            self.handlers[name] = self._wrap(name, handler)

    def handle_event(self, event_type: str, fl_ctx):
        gate = self.start_gate
        if event_type == EventType.START_RUN and gate.get("site") == fl_ctx.get_identity_name():
            self.log_info(fl_ctx, f"injected late start: waiting for {gate['file']}")
            end = time.time() + float(gate.get("seconds", 600))
            while not os.path.exists(gate["file"]) and time.time() < end:
                time.sleep(0.2)
            self.log_info(fl_ctx, "injected late start: released")
        super().handle_event(event_type, fl_ctx)

    def _fault_for(self, task: str, model) -> dict | None:
        rnd = model.current_round if model.current_round is not None else (model.meta or {}).get("communication")
        if rnd is None:
            return None
        for fault in self.faults:
            rounds = fault.get("rounds", [fault.get("round")])
            if fault["site"] == self.site and int(rnd) in rounds and fault.get("task", "train") in ("*", task):
                return fault
        return None

    def _wrap(self, name, handler):
        def run(model, fl_ctx, abort_signal):
            fault = self._fault_for(name, model)
            mode = fault["mode"] if fault else None
            if mode == "raise":
                raise RuntimeError(f"injected failure at {self.site} in round {model.current_round}")
            if mode == "slow":
                with open(fault["marker"], "w") as f:
                    f.write(f"{self.site} {name} round {model.current_round} pid {os.getpid()}\n")
            if mode in ("stall", "slow"):
                self.log_info(fl_ctx, f"injected {mode} of {fault.get('seconds', 20)}s at {self.site}")
                _sleep(float(fault.get("seconds", 20)), abort_signal)
            result = handler(model, fl_ctx, abort_signal)
            if mode in ("nan", "drop_key", "bad_shape", "nan_optim") and result.params:
                if mode == "nan_optim":
                    key = sorted(k for k, v in result.params.items() if k.startswith("optim/") and np.asarray(v).ndim)[0]
                else:
                    key = sorted(k for k, v in result.params.items() if np.asarray(v).dtype.kind == "f")[-1]
                if mode in ("nan", "nan_optim"):
                    result.params[key] = np.full_like(result.params[key], np.nan)
                elif mode == "drop_key":
                    result.params.pop(key)
                else:
                    result.params[key] = np.zeros((3, 3), dtype=np.float32)
                self.log_info(fl_ctx, f"injected {mode} into {key} at {self.site}")
            return result

        return run
