"""FedSeg's FedAvg / FedProx server workflow on NVFlare 2.9's ModelController.

NVFlare's own FedAvg waits for every sampled site with no timeout and averages whatever comes back. FedSeg's
keeps FedAvg's math (the global model is the step-weighted mean of the sites' weights; FedProx = the same
plus the proximal term mu at the sites) and adds what a federation of hospitals needs:

* per-site tasks with a timeout (one stalled site cannot hang the job) and ``min_clients``: a round with
  fewer valid updates leaves the model unchanged; ``max_failed_rounds`` such rounds in a row stop the job;
* every result screened before it touches the model (fedseg.algorithms: keys, shapes, NaN/Inf, step count
  capped by the server's plan, reported scores in [0, 1], update norm against the round's other updates);
* optional robust aggregation ("median" / "trimmed_mean") instead of the weighted mean;
* FedBN (``keep_local="norm"``): every normalization layer's parameters (and running statistics) stay at the
  sites, which train and evaluate with their own (fedseg.fl.executor.SegExecutor); only the other keys are
  aggregated. The global model's normalization entries, what a site without its own gets (an unseen site, the
  persistor's FL_global_model), are the step-weighted mean of the sites' (fedseg.algorithms.aggregate_shared);
* with DP-SGD at the sites (engine setting "dp"), each site's privacy loss so far (``dp_epsilon`` at ``dp_delta``,
  as the site reports it with every training result) is kept per round in the history under "dp";
* the best global model chosen by the MEDIAN of the sites' validation Dice of the model they received, so
  one site's claim cannot choose it; best and last written every round, with the history, so a killed
  server resumes from ``last.pt`` losing at most one round (``resume_from``).

The final models go through the job's persistor (FL_global_model.pt, best_FL_global_model.pt), so FLARE's
cross-site evaluation workflow after this one scores them as usual.
"""

from __future__ import annotations

import copy
import time
from collections import deque

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fl_model_utils import make_model_learnable

from fedseg.algorithms import AGGREGATIONS, aggregate, aggregate_shared
from fedseg.algorithms.screening import robust_score, update_norm
from fedseg.engine.config import LOCAL_OPTIMIZER
from fedseg.fl.base_controller import FedSegController, check_trimmed_mean
from fedseg.fl.checkpoints import best_beside, check_folder_name, improves
from fedseg.fl.results import dp_spent, round_seconds
from fedseg.fl.site_health import FailedRounds
from fedseg.modelset import load_model_set, save_model_set

SCORE_KEY = "val_dice"  # what SegExecutor's train task reports for the model it received
KEEP_LOCAL = ("none", "norm")  # "norm": FedBN, the normalization layers stay at the sites


class FedAvgController(FedSegController):
    """FedAvg / FedProx / FedBN with FedSeg's screening, checkpoints and resume.

    Args:
        num_rounds: FL rounds.
        fedprox_mu: FedProx's proximal weight, sent to the sites (0: plain FedAvg).
        local_epochs / local_steps: local budget per round (None: the sites' engine setting; steps win).
        max_local_steps: the most steps a site may train per round (sent to the sites) and so the largest
            aggregation weight it can claim (0: no fixed plan; local_steps, when set, is the plan).
        max_weight_ratio: without a plan, a site's weight is capped at this many times the median step
            count of the other sites of the round, never above the server's own ceiling (2, or the server
            operator's "max_weight_ratio" in local/fedseg_server.json; 0: that ceiling).
        aggregation: "mean" (FedAvg, weighted by steps), "median" or "trimmed_mean" (coordinate-wise,
            unweighted; robust to a minority of bad updates).
        trim_fraction: share of the largest and of the smallest values dropped per coordinate ("trimmed_mean";
            at least one per side, so it needs min_clients >= 3).
        max_update_ratio: updates with a norm above this many times the median of the others are rejected.
        clip_ratio: accepted updates above this many times the round's median norm are scaled down to it.
        min_update_cosine: with 3 or more updates, one whose cosine with the other sites' mean direction is
            below this is rejected (-1: no direction check).
        local_optimizer: "fresh" (a new Adam at every site every round) or "keep" (each site keeps its own Adam
            moments from round to round; they never leave the site).
        keep_local: "none" (FedAvg) or "norm" (FedBN: the normalization layers' parameters and statistics, found
            by module type in the persistor's network, stay at each site; the job refuses a network with none).
        min_clients: fewest valid updates with which a round changes the global model.
        task_timeout: seconds per training task (0: no limit). startup_grace: extra for a site's first task.
        max_failed_rounds: consecutive rounds below min_clients before the job stops.
        resume_from: a last.pt of an earlier run (inside this job's run dir or a directory the server's
            local/fedseg_server.json lists under "resume_dirs") to continue from, at its round + 1.
        results_dir: folder under the server's app dir for last.pt, best.pt and history.json (a plain name).
    """

    RENAMED = {"output_dir": "results_dir"}

    def __init__(
        self,
        num_rounds: int = 10,
        fedprox_mu: float = 0.0,
        local_epochs: int | None = None,
        local_steps: int | None = None,
        max_local_steps: int = 0,
        max_weight_ratio: float = 4.0,
        aggregation: str = "mean",
        trim_fraction: float = 0.2,
        max_update_ratio: float = 10.0,
        clip_ratio: float = 2.0,
        min_update_cosine: float = -0.5,
        local_optimizer: str = "fresh",
        keep_local: str = "none",
        min_clients: int = 1,
        task_timeout: int = 0,
        startup_grace: int = 300,
        max_failed_rounds: int = 3,
        resume_from: str = "",
        results_dir: str = "fedavg",
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
        **kwargs,
    ):
        super().__init__(
            persistor_id=persistor_id,
            task_timeout=task_timeout,
            min_clients=min_clients,
            startup_grace=startup_grace,
            max_update_ratio=max_update_ratio,
            clip_ratio=clip_ratio,
            min_update_cosine=min_update_cosine,
            task_check_period=task_check_period,
            **kwargs,
        )
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        check_trimmed_mean(aggregation, min_clients)
        for name, value in (
            ("num_rounds", num_rounds),
            ("max_local_steps", max_local_steps),
            ("max_failed_rounds", max_failed_rounds),
        ):
            if int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if float(fedprox_mu) < 0 or float(max_weight_ratio) < 0:
            raise ValueError("fedprox_mu and max_weight_ratio must be >= 0")
        self.num_rounds = int(num_rounds)
        self.fedprox_mu = float(fedprox_mu)
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.max_local_steps = int(max_local_steps)
        self.max_weight_ratio = float(max_weight_ratio)
        self.aggregation = aggregation
        if local_optimizer not in LOCAL_OPTIMIZER:
            raise ValueError(f"local_optimizer must be one of {LOCAL_OPTIMIZER}, got {local_optimizer!r}")
        self.local_optimizer = local_optimizer
        if keep_local not in KEEP_LOCAL:
            raise ValueError(f"keep_local must be one of {KEEP_LOCAL}, got {keep_local!r}")
        self.keep_local = keep_local
        self.trim_fraction = float(trim_fraction)
        self.max_failed_rounds = max(int(max_failed_rounds), 1)
        self.resume_from = resume_from or ""
        self.results_dir = check_folder_name(results_dir)

    # ---- workflow -----------------------------------------------------------------------------------------
    def run(self):
        if not self._start():
            return
        for rnd in range(self.first_round, self.num_rounds):
            if self.abort_signal.triggered:
                return
            if not self._round(rnd):
                self.panic(f"FedAvg stopped: {self.failed.count} consecutive rounds below min_clients")
                return

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _save(self, name: str, params: dict, info: dict) -> None:
        save_model_set(self.folder.path(name), {"global": params}, info)

    def _publish_best(self, params: dict) -> None:
        """best_FL_global_model.pt through the persistor (what FLARE's cross-site evaluation reads)."""
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(params, {}), private=True, sticky=True)
        self.event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE)

    def _start(self) -> bool:
        """The run's state, fresh or from resume_from: global params, first round, {history, best_score, best_round},
        the keys the sites keep; False after a panic."""
        self.folder = self.results_folder(self.results_dir)
        self.state = {"history": [], "best_score": None, "best_round": None}
        self.failed = FailedRounds(self.max_failed_rounds)
        self.recent_norms: deque[float] = deque(maxlen=20)  # accepted updates' norms (magnitude screening)
        initial = self.load_model()
        if initial is None:
            return False
        self.global_params, self.first_round = dict(initial.params), 0
        if self.resume_from and not self._resume(initial.params):
            return False
        self.local_keys = self._local_keys(self.global_params)
        return self.local_keys is not None

    def _resume(self, reference: dict) -> bool:
        opened = self.load_resume("FedAvg", load_model_set, lambda saved: {"saved global model": saved[0]["global"]}, reference)
        if opened is None:
            return False
        path, (groups, info) = opened
        self.global_params = groups["global"]
        self.state.update({k: info.get(k, self.state[k]) for k in self.state})
        best = best_beside(path)
        if best is not None and self.state["best_score"] is not None:
            best_groups, _ = load_model_set(best)
            self._save("best.pt", best_groups["global"], {k: info.get(k) for k in ("best_score", "best_round")})
            self._publish_best(best_groups["global"])
        self.first_round = int(info["round"]) + 1
        self.info(
            f"FedAvg: resuming from {path} (round {info['round']} done, best {self.state['best_score']} at round "
            f"{self.state['best_round']}) at round {self.first_round}"
        )
        return True

    def _local_keys(self, params: dict) -> list[str] | None:
        """The keys the sites keep (FedBN: the normalization entries of the job's network); None after a panic."""
        if self.keep_local == "none":
            return []
        from fedseg.engine.networks import network_norm_keys

        network = getattr(self.persistor, "network", None)
        if not isinstance(network, dict):
            self.panic("FedBN (keep_local='norm') needs FedSeg's SegModelPersistor: it states the job's network")
            return None
        keys = network_norm_keys(network)
        if not keys:
            self.panic(
                f"FedBN refused (keep_local='norm'): the job's network (engine network norm "
                f"{network.get('norm', 'instance')!r}) has no normalization parameters, so FedBN would be FedAvg; set the "
                "engine's network norm to 'instance_affine' or 'batch'"
            )
            return None
        unknown = sorted(set(keys) - set(params))
        if unknown:
            self.panic(f"FedBN: normalization keys {unknown[:3]} are not in the job's model")
            return None
        self.info(
            f"FedBN: {len(keys)} normalization entries stay at the sites; the other {len(params) - len(keys)} are averaged"
        )
        return keys

    # ---- one round ----------------------------------------------------------------------------------------
    def _task_meta(self) -> dict:
        meta = {"local_epochs": self.local_epochs, "local_steps": self.local_steps, "local_optimizer": self.local_optimizer}
        if self.max_local_steps:
            meta["max_steps"] = self.max_local_steps
        if self.fedprox_mu:
            meta[AlgorithmConstants.FEDPROX_MU] = self.fedprox_mu
        if self.keep_local != "none":
            meta["keep_local"] = self.keep_local
        return meta

    def _round(self, rnd: int) -> bool:
        """Train, screen, score and aggregate one round, then write its checkpoint; False when the job must stop."""
        sites = self.connected_sites()
        self.info(f"---- FedAvg round {rnd + 1}/{self.num_rounds}: sites {sites} ----")
        task = FLModel(
            params=self.global_params,
            params_type=ParamsType.FULL,
            current_round=rnd,
            total_rounds=self.num_rounds,
            meta=self._task_meta(),
        )
        began = time.perf_counter()
        results = self.run_tasks("train", {s: copy.copy(task) for s in sites})
        tasks_done = time.perf_counter()
        checked, weights, norms, cosines, accepted = self._screen(results)
        scores = self.screener.scores({s: r.metrics for s, r in results.items()}, SCORE_KEY)
        score = robust_score(scores.values())
        record = {
            "round": rnd,
            "sites": sites,
            "answered": sorted(results),
            "accepted": accepted,
            "weights": {s: weights[s] for s in accepted},
            "val_dice": scores,
            "score": score,
            "update_norms": norms,
            "update_cosines": cosines,
        }
        self._record_privacy(record, results, rnd)
        self.state["history"].append(record)
        self._keep_best(rnd, score, scores)
        stop = self._update(rnd, record, checked, weights, accepted, score)
        aggregated_at = time.perf_counter()
        self.save_model(FLModel(params=self.global_params, params_type=ParamsType.FULL, current_round=rnd))
        # before last.pt, which holds the history a resumed job continues (the save timed is the persistor's)
        record["seconds"] = round_seconds(results, began, tasks_done, aggregated_at, time.perf_counter())
        self._save("last.pt", self.global_params, {"round": rnd, **self.state})
        self.folder.write_json("history.json", self.state["history"])
        return not stop

    def _shared(self) -> dict:
        """The global model's aggregated entries (FedBN's normalization entries stay the sites' own)."""
        stay = set(self.local_keys)
        return {k: v for k, v in self.global_params.items() if k not in stay}

    def _screen(self, results: dict[str, FLModel]) -> tuple[dict, dict, dict, dict, list[str]]:
        """(results whose update fits the model, their step weights, update norms and cosines, the accepted
        sites): shape checks, step counts, magnitude against the round's and recent updates, direction."""
        reference = self.global_params
        checked = {s: r for s, r in sorted(results.items()) if self.screener.accept(s, r.params, reference, "update")}
        weights = self.step_weights(checked, self.local_steps or self.max_local_steps or None, self.max_weight_ratio)
        norms = {s: update_norm(checked[s].params, reference) for s in weights}
        too_large = self.screener.magnitudes("update", norms, self.recent_norms)
        passed = [s for s in weights if s not in too_large]
        opposed, cosines = self.screener.directions(
            "update", {s: checked[s].params for s in passed}, dict.fromkeys(passed, self._shared())
        )
        return checked, weights, norms, cosines, sorted(s for s in passed if s not in opposed)

    def _record_privacy(self, record: dict, results: dict[str, FLModel], rnd: int) -> None:
        """DP-SGD sites: the privacy loss each one reports having spent so far, into the round's record."""
        spent = dp_spent({s: r.metrics for s, r in results.items()})
        if spent:
            record["dp"] = spent
            self.track_sites("fedavg/dp_epsilon", {s: m["dp_epsilon"] for s, m in spent.items() if "dp_epsilon" in m}, rnd)
            self.info(
                f"round {rnd}: DP-SGD privacy spent so far (site-reported) "
                + ", ".join(f"{s} epsilon {m.get('dp_epsilon', float('nan')):.4g}" for s, m in spent.items())
            )

    def _keep_best(self, rnd: int, score: float | None, scores: dict[str, float]) -> None:
        """The sites scored the global model they RECEIVED this round: it is the candidate best (best.pt)."""
        if score is not None:  # the sites' Dice of the global model they received this round: median, each
            self.track(f"fedavg/global_{SCORE_KEY}", score, rnd)
            self.track_sites(f"fedavg/global_{SCORE_KEY}", scores, rnd)
        if improves(score, self.state["best_score"]):
            self.state["best_score"], self.state["best_round"] = score, rnd
            self._save("best.pt", self.global_params, {"round": rnd - 1, "best_score": score, "best_round": rnd})
            self._publish_best(self.global_params)
            self.info(f"round {rnd}: new best global model (median {SCORE_KEY} {score:.4f})")

    def _update(self, rnd: int, record: dict, checked: dict, weights: dict, accepted: list[str], score) -> bool:
        """Aggregate the accepted updates into the global model, or leave it unchanged with fewer than min_clients;
        True when that was one failed round too many."""
        if len(accepted) < self.min_clients:
            stop = self.failed.failed()
            self.error(
                f"round {rnd}: {len(accepted)} valid update(s) {accepted}, fewer than min_clients="
                f"{self.min_clients}: global model unchanged ({self.failed.count}/{self.failed.limit})"
            )
            return stop
        self.failed.succeeded()
        self.recent_norms.extend(record["update_norms"][s] for s in accepted)
        shared = self._shared()
        updates, record["clipped"] = self.screener.bound(
            "update", {s: checked[s].params for s in accepted}, dict.fromkeys(accepted, shared)
        )
        if self.local_keys:
            self.global_params = aggregate_shared(updates, weights, self.local_keys, self.aggregation, self.trim_fraction)
        else:
            self.global_params = aggregate(updates, weights, self.aggregation, self.trim_fraction)
        self.info(
            f"round {rnd}: aggregated {accepted} ({self.aggregation})"
            + (f"; median {SCORE_KEY} of the received model {score:.4f}" if score is not None else "")
        )
        return False
