"""A malicious site for the security tests: a SegExecutor that trains honestly, then tampers with its result.

Test-only (never in the product): a copied job swaps its executor path to this class.
attacks: [{"site": "site-3", "round": 1, "task": "train", "attack": "<name>"}] where round is the task's
current_round or, for FedCross, its communication (cross_validate tasks count their own calls from 0).

Every attack runs the honest task first, so the site's data iterator and RNG advance exactly as an honest
site's would: a run with the attack and a run with "drop" (train, then fail) must give the honest sites the
same models when the server rejects the attack.
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey

from fedseg.fl.executor import FedCrossExecutor, FedSMExecutor

STEPS = FLMetaKey.NUM_STEPS_CURRENT_ROUND


def _scale_update(sent: dict, returned: dict, factor: float) -> dict:
    """sent + factor * (returned - sent) for every floating weight (optimizer state untouched)."""
    out = dict(returned)
    for key, value in returned.items():
        if "::" in key or key not in sent or np.asarray(value).dtype.kind != "f":
            continue
        base = np.asarray(sent[key], dtype=np.float64)
        out[key] = (base + factor * (np.asarray(value, dtype=np.float64) - base)).astype(np.asarray(value).dtype)
    return out


def tamper(attack: str, model, result):
    """The tampered result (a new or modified FLModel)."""
    if attack == "drop":
        raise RuntimeError("injected failure after training (the reference run of an attack the server rejects)")
    if attack == "honest":
        return result
    if attack == "steps_nan":
        result.meta[STEPS] = float("nan")
    elif attack == "steps_negative":
        result.meta[STEPS] = -50
    elif attack == "steps_string":
        result.meta[STEPS] = "12; DROP TABLE rounds"
    elif attack == "steps_huge":
        result.meta[STEPS] = 10**12
    elif attack == "model_index":
        result.meta["model_index"] = 1.5
    elif attack == "metrics_missing":
        result.metrics = None
    elif attack == "metrics_garbage":
        result.metrics = {
            "val_dice": "excellent",
            "val_super_dice": float("nan"),
            "val_personalized_dice": 7.0,
            "ensemble": "x",
            "members": 3,
            "n_cases": -1,
        }
    elif attack == "scale_1000":
        result.params = _scale_update(model.params or {}, result.params, 1000.0)
    elif attack == "adam_negative":
        keys = [k for k in result.params if k.endswith("::exp_avg_sq")]
        assert keys, "no Adam second moments in this result"
        for key in keys:
            result.params[key] = -np.abs(np.asarray(result.params[key])) - 1.0
    elif attack == "int_tensor":  # one weight as int64 values of 2**31 (not a float: must not be cast or averaged)
        key = next(k for k, v in result.params.items() if "::" not in k and np.asarray(v).dtype.kind == "f")
        result.params[key] = np.full(np.shape(result.params[key]), 2**31, np.int64)
    elif attack == "adam_poison":  # first moments no gradients can give (the next Adam steps would explode)
        keys = [k for k in result.params if k.endswith("::exp_avg")]
        assert keys, "no Adam first moments in this result"
        for key in keys:
            result.params[key] = np.full_like(np.asarray(result.params[key]), 1e4)
            result.params[key + "_sq"] = np.zeros_like(np.asarray(result.params[key + "_sq"]))
    elif attack == "stats_inflated":  # selector feature statistics whose scatter would swamp the pooled covariance
        key = "selector_stats/scatter"
        assert key in result.params, "no selector statistics in this result"
        result.params[key] = np.asarray(result.params[key]) * np.float32(1e4)
    elif attack == "stats_asymmetric":  # a "scatter" no set of features can give
        key = "selector_stats/scatter"
        assert key in result.params, "no selector statistics in this result"
        scatter = np.asarray(result.params[key])
        result.params[key] = scatter + np.triu(np.full_like(scatter, np.abs(scatter).max() + 1.0), 1)
    elif attack == "metrics_deep":  # nested far deeper than any metric (as deep as FLARE's own encoder still sends)
        deep = 0.5
        for _ in range(300):
            deep = {"x": deep}
        result.metrics = {**(result.metrics or {}), "deep": deep}
    elif attack == "metrics_wide":  # more keys than a site may send
        result.metrics = {**(result.metrics or {}), **{f"k{i}": 1.0 for i in range(30000)}}
    elif attack == "metrics_extra_keys":  # a few numbers the method does not define (kept out of the history)
        result.metrics = {**(result.metrics or {}), **{f"junk_{i}": float(i) for i in range(50)}}
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return result


class MaliciousSegExecutor(FedSMExecutor, FedCrossExecutor):
    """Serves every FedSeg site task (any job's executor path can be swapped to it)."""

    def __init__(self, attacks: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.attacks = list(attacks or [])
        self.calls: dict[str, int] = {}
        for name, handler in list(self.handlers.items()):
            self.handlers[name] = self._wrap(name, handler)

    def _attack_for(self, task: str, model) -> str | None:
        meta = model.meta or {}
        rnd = meta.get("communication", model.current_round)
        if task == "cross_validate":
            rnd = self.calls.get(task, 0)
        self.calls[task] = self.calls.get(task, 0) + 1
        for a in self.attacks:
            if a["site"] == self.site and a.get("task", "train") == task and rnd is not None and int(a["round"]) == int(rnd):
                return a["attack"]
        return None

    def _wrap(self, name, handler):
        def run(model, fl_ctx, abort_signal):
            attack = self._attack_for(name, model)
            result = handler(model, fl_ctx, abort_signal)
            if attack:
                self.log_info(fl_ctx, f"ATTACK {attack} by {self.site} on task {name}")
                result = tamper(attack, model, result)
            return result

        return run
