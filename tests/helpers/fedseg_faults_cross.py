"""Fault injection for the FedCross simulator tests: a SegExecutor whose site misbehaves in one communication.

Test-only: a copied job swaps its executor path to this class (conftest.set_executor_path).
faults: [{"site": "site-2", "communication": 1, "mode": "raise" | "stall" | "nan_weights", "seconds": 20}]
applied to the site's cross_train task of that communication. (NaN optimizer state, site kills, late starts
and multi-round outages: fedseg_faults.FaultySegExecutor, used by tests/test_faults.py.)
"""

from __future__ import annotations

import time

import numpy as np

from fedseg.fl.executor import FedCrossExecutor


class CrossFaultExecutor(FedCrossExecutor):
    def __init__(self, faults: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.faults = list(faults or [])
        train = self.handlers["cross_train"]
        self.handlers["cross_train"] = lambda model, fl_ctx, abort: self._faulty_train(train, model, fl_ctx, abort)

    def _fault(self, communication: int) -> dict | None:
        for fault in self.faults:
            if fault["site"] == self.site and int(fault["communication"]) == communication:
                return fault
        return None

    def _faulty_train(self, train, model, fl_ctx, abort_signal):
        fault = self._fault(int((model.meta or {})["communication"]))
        mode = fault["mode"] if fault else None
        if mode == "raise":
            raise RuntimeError(f"injected failure at {self.site} in communication {fault['communication']}")
        if mode == "stall":
            seconds = float(fault.get("seconds", 20))
            self.log_info(fl_ctx, f"injected stall of {seconds:.0f}s at {self.site}")
            end = time.time() + seconds
            while time.time() < end and not abort_signal.triggered:
                time.sleep(0.2)
        result = train(model, fl_ctx, abort_signal)
        if mode == "nan_weights":
            key = sorted(k for k in result.params if k.startswith("model/") and np.asarray(result.params[k]).ndim)[0]
            result.params[key] = np.full_like(result.params[key], np.nan)
            self.log_info(fl_ctx, f"injected NaN into {key} at {self.site}")
        return result
