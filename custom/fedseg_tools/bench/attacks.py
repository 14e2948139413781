"""A malicious site for the robustness benchmark (fedseg_tools.bench.robust): it trains honestly, then sends a tampered
update. Benchmark tooling only: no shipped job names this class, and only the benchmark's runs allow it.

In every training task (FedAvg/FedProx/FedBN ``train``, FedSM ``fedsm_train``, FedCross ``cross_train``) the
attacker returns ``sent + factor * (trained - sent)`` for every floating weight it received and returns (every
network of a FedSM or FedCross reply), optimizer state and statistics untouched. Training first keeps the
attacker's data order and random state as an honest site's.
"""

from __future__ import annotations

import math

import numpy as np

from fedseg.algorithms.screening import OPTIM_SEP
from fedseg_tools.bench.executor import MultiMethodExecutor

TRAINING_TASKS = ("train", "fedsm_train", "cross_train")


def scaled_update(sent: dict, returned: dict, factor: float) -> dict:
    """`returned` with every floating weight that was also sent replaced by sent + factor * (returned - sent)."""
    out = dict(returned)
    for key, value in returned.items():
        array = np.asarray(value)
        if OPTIM_SEP in key or key not in sent or array.dtype.kind != "f" or np.shape(sent[key]) != array.shape:
            continue
        base = np.asarray(sent[key], dtype=np.float64)
        out[key] = (base + factor * (array.astype(np.float64) - base)).astype(array.dtype)
    return out


class AttackingExecutor(MultiMethodExecutor):
    """Every FedSeg site task; the site named `attacker` tampers with each training reply (see the module)."""

    def __init__(self, attacker: str = "", factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"factor must be a finite number, got {factor!r}")
        self.attacker = str(attacker)
        self.factor = float(factor)
        for task in TRAINING_TASKS:
            if task in self.handlers:
                self.handlers[task] = self._tampering(task, self.handlers[task])

    def _tampering(self, task: str, handler):
        def run(model, fl_ctx, abort_signal):
            result = handler(model, fl_ctx, abort_signal)
            if self.site == self.attacker and result is not None and result.params:
                result.params = scaled_update(model.params or {}, result.params, self.factor)
                self.log_info(fl_ctx, f"ATTACK by {self.site} on task {task}: update x {self.factor:g}")
            return result

        return run
