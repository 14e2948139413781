"""Fault injection for simulator tests: a SegExecutor whose site misbehaves in a chosen round.

Lives in tests/ (never in the product): a job under test swaps its executor path to this class.
faults: [{"site": "site-2", "round": 1, "mode": "raise" | "stall" | "nan" | "drop_key" | "bad_shape",
          "seconds": 20, "task": "train"}]   (round = FLModel.current_round, or the communication index)
"""

from __future__ import annotations

import time

import numpy as np

from fedseg.fl.executor import SegExecutor


class FaultySegExecutor(SegExecutor):
    def __init__(self, faults: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = list(faults or [])
        for name, handler in list(self.handlers.items()):
            self.handlers[name] = self._wrap(name, handler)

    def _fault_for(self, task: str, model) -> dict | None:
        rnd = model.current_round if model.current_round is not None else (model.meta or {}).get("communication")
        for fault in self.faults:
            same_round = rnd is not None and int(fault["round"]) == int(rnd)
            if fault["site"] == self.site and same_round and task == fault.get("task", "train"):
                return fault
        return None

    def _wrap(self, name, handler):
        def run(model, fl_ctx, abort_signal):
            fault = self._fault_for(name, model)
            if fault and fault["mode"] == "raise":
                raise RuntimeError(f"injected failure at {self.site} in round {fault['round']}")
            if fault and fault["mode"] == "stall":
                self.log_info(fl_ctx, f"injected stall of {fault.get('seconds', 20)}s at {self.site}")
                end = time.time() + float(fault.get("seconds", 20))
                while time.time() < end and not abort_signal.triggered:
                    time.sleep(0.2)
            result = handler(model, fl_ctx, abort_signal)
            if fault and fault["mode"] in ("nan", "drop_key", "bad_shape") and result.params:
                key = sorted(k for k, v in result.params.items() if np.asarray(v).dtype.kind == "f")[-1]
                if fault["mode"] == "nan":
                    result.params[key] = np.full_like(result.params[key], np.nan)
                elif fault["mode"] == "drop_key":
                    result.params.pop(key)
                else:
                    result.params[key] = np.zeros((3, 3), dtype=np.float32)
                self.log_info(fl_ctx, f"injected {fault['mode']} into {key} at {self.site}")
            return result

        return run
