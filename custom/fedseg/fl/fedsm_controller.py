"""FedSM's server workflow (Xu et al., CVPR 2022) on NVFlare 2.9's ModelController.

The server keeps the whole model set: the global model g, one personalized model p_i per site, the model
selector s (and, with the reference's selector protocol, its Adam moments). Every round all sites train in
parallel and each receives only {g, ITS OWN p_i, s (, Adam moments)}. Then:
    g <- FedAvg weighted by local steps                      (fedseg.algorithms.weighted_average)
    s <- its head fitted to the sites' feature statistics    ("lda", default; fedseg.algorithms.selector_head)
      or s, moments <- FedAvg like g                         ("epoch" / "batch": the sites train it)
    p_i <- lam * w_i + (1 - lam)/(N - 1) * sum_{j!=i} w_j    (fedseg.algorithms.softpull, N = sites that answered)
A site that fails, times out or returns a bad update (NaN/Inf, missing keys, wrong shapes) is left out of
the round and keeps its personalized model. The set is checkpointed every round (last.pt), the best set by
validation score is kept (best.pt: the set that was SENT in the round whose received-model scores were
best), and a job can resume from either. With use_selector=False this is SoftPull alone (jobs/softpull).
history.json records per round who answered and was accepted, every site's metrics and, with the selector,
"selector": its accuracy, routed-to-own fraction and routing confusion row per site (fedseg.fl.fedsm_screening.selector_round).

Sites come and go: the selector's classes are fixed when the job starts (the `sites` argument, else the sites
connected at the start; on resume, the saved set's list). Every round uses every class site connected at
that moment, so a site that was down for some rounds, or came up late, takes part again from the next round.
A connected site that is no selector class (e.g. a new site when resuming) trains the global model and gets
its own personalized model, but the selector never learns or routes to it. A resumed job continues the
history, the best score and best.pt of the run it resumes.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.algorithms import AGGREGATIONS, aggregate, softpull, weighted_average
from fedseg.algorithms.packing import pack
from fedseg.algorithms.routing import GAMMA_POLICIES
from fedseg.algorithms.screening import numeric_metrics, robust_score
from fedseg.algorithms.selector_head import fit_lda_head
from fedseg.engine.config import EngineConfig
from fedseg.engine.engine import optimizer_state_to_numpy, state_to_numpy
from fedseg.fl.base_controller import FedSegController, check_trimmed_mean
from fedseg.fl.checkpoints import best_beside, improves
from fedseg.fl.executor import PERSONAL_PREFIX
from fedseg.fl.fedsm_results import fedsm_results, gamma_on_validation, selector_extra, train_metric_key
from fedseg.fl.fedsm_screening import bound_updates, screen_updates, selector_round, valid_evaluation, valid_update
from fedseg.fl.results import round_seconds, write_results
from fedseg.fl.site_health import FailedRounds, plan_round
from fedseg.methods.fedsm import DEFAULT_SELECTOR, GAMMA_SWEEP, SELECTOR_INPUT, SelectorSettings, build_selector
from fedseg.modelset import load_model_set, save_model_set

RESULTS_DIR = "fedsm"  # the folder under the server's app dir for last.pt, best.pt and the records


def check_arguments(
    lam: float,
    gamma: float,
    gamma_policy: str,
    final_model: str,
    aggregation: str,
    min_clients: int,
    sites: list[str] | None,
) -> None:
    """FedSMController's arguments that cannot make a job (ValueError, naming the argument)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if final_model not in ("best", "last"):
        raise ValueError(f"final_model must be 'best' or 'last', got {final_model!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if gamma_policy not in GAMMA_POLICIES:
        raise ValueError(f"gamma_policy must be one of {GAMMA_POLICIES}, got {gamma_policy!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    check_trimmed_mean(aggregation, min_clients)
    if sites is not None and (not sites or len(set(sites)) != len(sites) or not all(isinstance(s, str) and s for s in sites)):
        raise ValueError(f"sites must be a non-empty list of distinct site names, got {sites!r}")


class FedSMController(FedSegController):
    """FedSM (or SoftPull alone, use_selector=False) with FedSeg's screening, checkpoints and resume.

    Args:
        num_rounds: FL rounds; in each, every site trains g, p_i (and s) once.
        lam: SoftPull weight of a site's own model (1: purely local, 1/N: plain average).
        gamma: selector confidence above which the super model uses a personalized model: the fixed value
            (gamma_policy "fixed", the paper's 0.9), and the one the sites' per-round validation uses.
        gamma_policy: "validation": the final super model's gamma is the one of GAMMA_SWEEP with the best mean
            super-model Dice over the sites' VALIDATION cases (ties: the larger gamma), chosen before the
            test cases are scored and reported; "fixed": `gamma` as given.
        use_selector: False gives SoftPull personalization without the selector.
        selector: selector settings (input_size, channels, lr, epochs, batch_size).
        engine_config: the sites' engine settings (recorded in the checkpoints for inference).
        local_epochs / local_steps: local budget per round for each segmentation model (None: the site's).
        min_clients: fewest valid answers with which a round updates the models.
        task_timeout / eval_timeout: seconds per training / evaluation task (0: no limit).
        startup_grace: extra seconds for a site's first task (its job process may start late).
        max_failed_rounds: consecutive rounds below min_clients before the job stops.
        aggregation: the global model's aggregation: "mean" (weighted by steps), "median" or "trimmed_mean".
        max_update_ratio: updates with a norm above this many times the median of the others are rejected
            (the selector's Adam moments too, measured against what was sent).
        clip_ratio: accepted updates of the global, personalized and selector models above this many times
            the round's median norm are scaled down to it (0: no bounding).
        min_update_cosine: with 3 or more updates, one whose cosine with the other sites' mean direction is
            below this is rejected (-1: no direction check).
        max_weight_ratio: without local_steps, a site's weight is capped at this many times the median step
            count of the other sites of the round (never above the server's own ceiling).
        sites: the expected site names, in selector-class order (None: the sites connected at the start).
            A listed site that is not connected yet joins from the first round it is connected.
        resume_from: server path of a saved model set (last.pt or best.pt) to continue from, inside this job's
            run dir or a directory the server's local/fedseg_server.json lists under "resume_dirs"; its
            history, best score and best.pt (next to it) carry over, and its site list stays the
            selector's classes.
        start_round: round to continue at (default: the saved round + 1).
        final_model: the set the final per-site test scores are for: "best" (best.pt, the best-validated set,
            as for every FedSeg method) or "last".
        task_check_period: seconds between FLARE's checks of the standing tasks.
    """

    RENAMED = {"engine": "engine_config"}

    def __init__(
        self,
        num_rounds: int = 10,
        lam: float = 0.7,
        gamma: float = 0.9,
        gamma_policy: str = "validation",
        use_selector: bool = True,
        selector: dict | None = None,
        engine_config: dict | None = None,
        local_epochs: int | None = None,
        local_steps: int | None = None,
        min_clients: int = 1,
        task_timeout: int = 0,
        eval_timeout: int = 0,
        startup_grace: int = 300,
        max_failed_rounds: int = 3,
        aggregation: str = "mean",
        max_update_ratio: float = 10.0,
        clip_ratio: float = 2.0,
        min_update_cosine: float = -0.5,
        max_weight_ratio: float = 4.0,
        sites: list[str] | None = None,
        resume_from: str | None = None,
        start_round: int | None = None,
        seed: int = 0,
        final_model: str = "best",
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
        **kwargs,
    ):
        super().__init__(
            persistor_id=persistor_id,
            task_timeout=task_timeout,
            min_clients=min_clients,
            max_update_ratio=max_update_ratio,
            clip_ratio=clip_ratio,
            min_update_cosine=min_update_cosine,
            startup_grace=startup_grace,
            task_check_period=task_check_period,
            **kwargs,
        )
        check_arguments(lam, gamma, gamma_policy, final_model, aggregation, min_clients, sites)
        self.final_model = final_model
        self.gamma_policy = gamma_policy
        self.num_rounds = int(num_rounds)
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.use_selector = bool(use_selector)
        # the arguments as given (NVFlare's FedJob export reads the attributes back as the job's arguments);
        # the run uses engine_settings and selector_cfg (with the defaults)
        self.selector = selector
        self.engine_config = engine_config
        self.selector_cfg = {**DEFAULT_SELECTOR, **(selector or {})}
        # "lda": the selector's features stay as seeded and the server fits its head from the sites' statistics
        self.lda = self.use_selector and self.selector_cfg["protocol"] == "lda"
        self.selector_stats: dict[str, dict] = {}  # with "lda": each class site's latest accepted statistics
        self.engine_settings = EngineConfig.from_dict(engine_config).to_dict()
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.eval_timeout = int(eval_timeout)
        self.max_failed_rounds = int(max_failed_rounds)
        self.aggregation = aggregation
        self.max_weight_ratio = float(max_weight_ratio)
        self.sites = sites
        self.expected_sites = list(sites) if sites else None
        self.resume_from = resume_from
        self.start_round = start_round
        self.seed = int(seed)
        # run state
        self.classes: list[str] = []  # the selector's classes = model set "site_names"
        self.history: list[dict] = []
        self.best_score = -1.0  # the best round score so far (the set behind it is best.pt)
        self._outsiders_told: set[str] = set()
        self._missing: list[str] = []

    # ---- workflow --------------------------------------------------------------------------------------
    def run(self):
        self.folder = self.results_folder(RESULTS_DIR)
        self.failed = FailedRounds(self.max_failed_rounds)
        connected = self.connected_sites()
        groups, start = self._initial_set(connected)
        if not self.classes:
            self.panic("FedSM: no sites connected and no `sites` listed")
            return
        self.info(
            f"FedSM: selector classes {self.classes} (class = index in this list), connected {connected}, "
            f"lam={self.lam}, gamma={self.gamma}, selector={'on' if self.use_selector else 'off (SoftPull only)'}"
        )
        for rnd in range(start, self.num_rounds):
            if self.abort_signal.triggered:
                return
            if not self._round(rnd, groups):
                self.panic(f"FedSM stopped: {self.failed.count} consecutive rounds below min_clients")
                return
        self._final_evaluation(self._final_set(groups))

    # ---- model set -------------------------------------------------------------------------------------
    def _initial_set(self, connected: list[str]) -> tuple[dict, int]:
        """The model set to start from and the first round; sets the selector classes (and, when resuming,
        the history and best score of the saved run)."""
        if self.resume_from:
            # confined: inside this job or a directory the server operator allows (fedseg_server.json)
            return self._resume(self.resume_path(self.resume_from), connected)
        self.classes = self.expected_sites or list(connected)
        global_params = self.load_model().params
        groups = {"global": global_params, "personal": {s: copy.deepcopy(global_params) for s in self.classes}}
        if self.use_selector:
            groups["selector"], optim = self._initial_selector(len(self.classes))
            if not self.lda:  # the "lda" protocol takes no optimizer steps: no Adam state to share
                groups["selector_optim"] = optim
        return groups, int(self.start_round or 0)

    def _resume(self, path: Path, connected: list[str]) -> tuple[dict, int]:
        groups, info = load_model_set(path)
        self.classes = list(info["site_names"])
        if self.expected_sites and self.expected_sites != self.classes:
            self.warning(f"sites {self.expected_sites} ignored: the saved set's selector classes are {self.classes}")
        start = self.start_round if self.start_round is not None else int(info["round"]) + 1
        # the rounds after the saved one are trained again: their records are dropped
        self.history = [r for r in info.get("history", []) if int(r["round"]) < start]
        self.best_score = float(info.get("best_score", info.get("val_score", -1.0)))
        best_path = best_beside(path)
        if best_path is not None:
            best_groups, best_info = load_model_set(best_path)
            self.best_score = max(self.best_score, float(best_info.get("val_score", -1.0)))
            self._save(
                "best.pt",
                best_groups,
                int(best_info["round"]),
                self.classes,
                {k: v for k, v in best_info.items() if k in ("val_score", "score_key", "history", "best_score")},
            )
        elif "best_score" in info:
            self.warning(
                f"no best.pt next to {path}: the best score {self.best_score:.4f} carries over, best.pt is "
                f"written when a later set beats it"
            )
        else:
            self.warning(f"{path} records no best score: best-set tracking starts afresh")
        self.info(
            f"resuming from {path} (saved round {info['round']}, best score {self.best_score:.4f}, "
            f"{len(self.history)} rounds of history) at round {start}; selector classes {self.classes}"
        )
        return groups, start

    def _initial_selector(self, num_sites: int) -> tuple[dict, dict]:
        torch.manual_seed(self.seed)
        settings = SelectorSettings.from_meta(num_sites, self.selector_cfg)
        selector = build_selector(self.engine_settings["spatial_dims"], self.engine_settings["in_channels"], settings)
        # Adam moments start as zeros so that every site, from round 0 on, sends the same key set
        optimizer = torch.optim.Adam(selector.parameters(), lr=self.selector_cfg["lr"])
        for p in selector.parameters():
            optimizer.state[p].update(
                {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            )
        return state_to_numpy(selector), optimizer_state_to_numpy(optimizer, selector)

    def _save(self, name: str, groups: dict, rnd: int, sites: list[str], extra: dict | None = None) -> Path:
        path = self.folder.path(name)
        info = {
            "method": "fedsm",
            "round": rnd,
            "site_names": sites,
            "lam": self.lam,
            "gamma": self.gamma,
            "use_selector": self.use_selector,
            "selector": self.selector_cfg,
            "engine": self.engine_settings,
            "selector_input": SELECTOR_INPUT if self.use_selector else None,
            "history": self.history,
            "best_score": self.best_score,
            **(extra or {}),
        }
        save_model_set(path, groups, info)
        return path

    def _checkpoint(self, groups: dict, rnd: int) -> None:
        """last.pt (with the history and best score, so a resumed job continues them) and history.json."""
        self._save("last.pt", groups, rnd, self.classes)
        self.folder.write_json("history.json", self.history)

    def _final_set(self, last: dict) -> dict:
        """The set the final scores are for: the best-validated one (best.pt, the rule every FedSeg method
        follows) or the last one (final_model="last"; also when no round was scored)."""
        best = self.folder.path("best.pt")
        if self.final_model == "last" or not best.exists():
            self.info(
                f"final evaluation of the last model set ({'no best.pt' if self.final_model == 'best' else 'final_model=last'})"
            )
            return last
        groups, info = load_model_set(best)
        self.info(
            f"final evaluation of the best model set (best.pt: trained up to round {info['round']}, "
            f"{info.get('score_key')}={info.get('val_score')})"
        )
        groups["personal"] = {**last["personal"], **groups["personal"]}  # a site that joined later: its last model
        return groups

    # ---- what each site gets -------------------------------------------------------------------------------
    def _task_meta(self, sites: list[str]) -> dict:
        return {
            "site_names": sites,
            "gamma": self.gamma,
            "selector": self.selector_cfg if self.use_selector else None,
            "local_epochs": self.local_epochs,
            "local_steps": self.local_steps,
        }

    def _names_for(self, site: str) -> list[str]:
        """The site list a site's task carries: the selector classes, plus the site itself when it is none
        (it then gets no selector, and trains and is scored without one)."""
        return self.classes if site in self.classes else [*self.classes, site]

    def _groups_for(self, groups: dict, site: str) -> dict:
        out = {"global": groups["global"], "personal": groups["personal"].setdefault(site, copy.deepcopy(groups["global"]))}
        if self.use_selector and site in self.classes:
            out["selector"] = groups["selector"]
            if not self.lda:  # the "lda" protocol takes no optimizer steps
                out["selector_optim"] = groups["selector_optim"]
        return out

    def _round_sites(self, rnd: int) -> list[str]:
        """The sites of this round: every connected class site, then connected sites that are no class."""
        connected = self.connected_sites()
        members, outsiders, missing = plan_round(self.classes, connected)
        for site in outsiders:
            if site not in self._outsiders_told:
                self._outsiders_told.add(site)
                self.info(
                    f"site {site} is not one of the selector's classes {self.classes}: it trains the global model "
                    f"and gets its own personalized model from round {rnd}, but the selector never routes to it"
                )
        if missing != self._missing:
            back = [s for s in self._missing if s not in missing]
            if back:
                self.info(f"round {rnd}: {back} connected again, taking part from this round")
            if missing:
                self.warning(f"round {rnd}: {missing} not connected; no task for them this round")
            self._missing = missing
        return members + outsiders

    # ---- one round -------------------------------------------------------------------------------------
    def _round(self, rnd: int, groups: dict) -> bool:
        """Train, screen and aggregate one round (``groups``, the model set, in place) and write its checkpoint;
        False when the job must stop."""
        self.info(f"---- FedSM round {rnd + 1}/{self.num_rounds} ----")
        sent = {s: self._groups_for(groups, s) for s in self._round_sites(rnd)}
        tasks = {
            s: FLModel(
                params=pack(g),
                params_type=ParamsType.FULL,
                current_round=rnd,
                total_rounds=self.num_rounds,
                meta=self._task_meta(self._names_for(s)),
            )
            for s, g in sent.items()
        }
        began = time.perf_counter()
        # in site order, not arrival order: the aggregations then sum in the same order in every run
        results = dict(sorted(self.run_tasks("fedsm_train", tasks).items()))
        tasks_done = time.perf_counter()
        updates, weights = self._screen(results, sent)
        record = {
            "round": rnd,
            "answered": sorted(results),
            "accepted": sorted(updates),
            "metrics": {
                s: numeric_metrics(results[s].metrics, lambda k: train_metric_key(k, self.classes)) for s in sorted(results)
            },
        }
        if self.use_selector:
            record["selector"] = selector_round(self.screener, rnd, {s: results[s].metrics for s in updates}, self.classes)
        self._track_selector(rnd, record.get("selector"))
        if len(updates) < self.min_clients:
            stop = self.failed.failed()
            self.error(
                f"round {rnd}: only {len(updates)} valid updates ({sorted(updates)}), fewer than "
                f"min_clients={self.min_clients}: models unchanged ({self.failed.count}/{self.failed.limit})"
            )
            now = time.perf_counter()
            record["seconds"] = round_seconds(results, began, tasks_done, now, now)
            self.history.append(record)
            self._checkpoint(groups, rnd)
            return not stop
        self.failed.succeeded()
        score = robust_score(self.screener.scores({s: results[s].metrics for s in updates}, self.score_key).values())
        record.update({"score": score, "left_out": sorted(set(sent) - set(updates))})
        self._update(rnd, record, groups, updates, weights)
        aggregated_at = time.perf_counter()
        self.save_model(FLModel(params=groups["global"], params_type=ParamsType.FULL, current_round=rnd))
        # before last.pt, which holds the history a resumed job continues (the save timed is the persistor's)
        record["seconds"] = round_seconds(results, began, tasks_done, aggregated_at, time.perf_counter())
        self._checkpoint(groups, rnd)
        self.info(
            f"round {rnd}: aggregated {sorted(updates)}"
            + (f", {self.score_key} of the received set {score:.4f}" if score is not None else "")
        )
        return True

    @property
    def score_key(self) -> str:
        """What the sites report for the set they received, the round's score (the median over the sites)."""
        return "val_super_dice" if self.use_selector else "val_personalized_dice"

    def _screen(self, results: dict[str, FLModel], sent: dict[str, dict]) -> tuple[dict[str, dict], dict[str, float]]:
        """(the accepted updates, bounded; their step weights): every part checked, magnitudes and the global
        model's direction against the other sites', step counts."""
        updates = {
            s: u for s, r in results.items() if (u := valid_update(self.screener, s, r.params, sent[s], self.lda)) is not None
        }
        updates = screen_updates(self.screener, updates, sent)
        weights = self.step_weights({s: results[s] for s in updates}, self.local_steps, self.max_weight_ratio)
        return bound_updates(self.screener, {s: u for s, u in updates.items() if s in weights}, sent), weights

    def _update(self, rnd: int, record: dict, groups: dict, updates: dict, weights: dict) -> None:
        """Aggregate the updates into ``groups``; the set SENT this round, on which the sites measured the score
        they report (the round's record), is the candidate best (best.pt)."""
        score = record["score"]
        sent_set = copy.deepcopy(groups)
        self._aggregate(groups, updates, weights)
        if score is not None:
            self.track(f"fedsm/{self.score_key}", score, rnd)  # median over the sites, of the set sent this round
        self.history.append(record)
        if improves(score, self.best_score):
            self.best_score = score
            self._save("best.pt", sent_set, rnd - 1, self.classes, {"val_score": score, "score_key": self.score_key})
            self.info(f"round {rnd}: new best model set ({self.score_key}={score:.4f}, the set trained up to round {rnd - 1})")

    def _aggregate(self, groups: dict, updates: dict[str, dict], weights: dict[str, float]) -> None:
        """global: aggregated over every site; selector and its Adam state: over the sites that trained it (the
        selector's classes; a privacy scope may withhold the moments); personalized models: SoftPull."""
        groups["global"] = aggregate({s: u["global"] for s, u in updates.items()}, weights, self.aggregation)
        if self.lda:
            self.selector_stats.update({s: u["selector_stats"] for s, u in updates.items() if "selector_stats" in u})
            groups["selector"] = self._fit_selector_head(groups["selector"])
        elif self.use_selector:
            with_selector = {s: updates[s]["selector"] for s in sorted(updates) if "selector" in updates[s]}
            if with_selector:
                groups["selector"] = weighted_average(with_selector, weights)
            with_optim = {s: updates[s]["selector_optim"] for s in with_selector if updates[s].get("selector_optim")}
            if with_optim:
                groups["selector_optim"] = weighted_average(with_optim, weights)
        mixed = softpull({s: u["personal"] for s, u in updates.items()}, self.lam)
        groups["personal"].update(mixed)  # sites that did not answer keep their personalized model

    def _fit_selector_head(self, selector: dict) -> dict:
        """The "lda" protocol: the selector with its head fitted to the latest statistics of every class site
        (fedseg.algorithms.selector_head; a class without statistics yet is never the argmax)."""
        stats = [self.selector_stats.get(site) for site in self.classes]
        try:
            weights, biases = fit_lda_head(stats, float(self.selector_cfg["shrinkage"]))
        except ValueError as e:
            self.warning(f"selector head not fitted: {e}")
            return selector
        missing = [site for site, st in zip(self.classes, stats) if st is None or float(st["count"][0]) < 2]
        if missing:
            self.warning(f"selector head fitted without statistics from {missing}: the selector never routes to them")
        head = selector["head.weight"]
        return {
            **selector,
            "head.weight": weights.astype(head.dtype),
            "head.bias": biases.astype(selector["head.bias"].dtype),
        }

    def _track_selector(self, rnd: int, selector: dict | None) -> None:
        """The selector's accuracy per site and its mean over the sites, to the job's experiment tracking."""
        accuracy = (selector or {}).get("accuracy") or {}
        self.track_sites("fedsm/selector_accuracy", accuracy, rnd)
        if accuracy:
            self.track("fedsm/selector_accuracy_mean", sum(accuracy.values()) / len(accuracy), rnd)

    # ---- final evaluation ------------------------------------------------------------------------------
    def _evaluate(self, groups: dict, section: str, gamma: float) -> dict[str, dict]:
        """The set ``groups`` scored on every connected site's ``section`` cases (a site that is no selector
        class scores the global and its personalized model only): {site: validated scores}."""
        sites = self.classes
        without_selector = {"global": groups["global"], **{f"{PERSONAL_PREFIX}{s}": p for s, p in groups["personal"].items()}}
        with_selector = {**without_selector, "selector": groups["selector"]} if self.use_selector else without_selector
        meta = {"gamma": gamma, "section": section, "use_selector": self.use_selector, "gammas": list(GAMMA_SWEEP)}
        tasks = {
            s: FLModel(
                params=pack(with_selector if s in sites else without_selector),
                params_type=ParamsType.FULL,
                meta={**self._task_meta(self._names_for(s)), **meta},
            )
            for s in self._round_sites(self.num_rounds)
        }
        results = self.run_tasks("fedsm_evaluate", tasks, timeout=self.eval_timeout)
        return {
            s: m
            for s, r in sorted(results.items())
            if (m := valid_evaluation(self.screener, s, r.metrics, sites, self.use_selector)) is not None
        }

    def _final_evaluation(self, groups: dict) -> None:
        """Scores the final set on every connected site's test cases and writes fedsm_evaluation.json and the
        results record fedseg_results.json (fedseg.fl.fedsm_results: with the selector, its accuracy, routing,
        gamma sweep, learned and oracle super model, and the selector's history)."""
        gamma, validation = self.gamma, None
        if self.use_selector and self.gamma_policy == "validation":
            gamma, validation = self._gamma_on_validation(self._evaluate(groups, "validation", self.gamma))
        per_site = self._evaluate(groups, "testing", gamma)
        self.folder.write_json("fedsm_evaluation.json", per_site)
        extra = {"lam": self.lam, "gamma": gamma, "gamma_policy": self.gamma_policy, "rounds": self.num_rounds}
        selector = None
        if self.use_selector:
            selector = {
                "gamma_validation": validation,
                **selector_extra(per_site, gamma, self.classes, self.selector_cfg, self.history),
            }
            self._say_selector_health(selector["selector_status"])
        record = fedsm_results(per_site, self.use_selector, extra, selector)
        self.info("\n" + write_results(self.get_app_dir(), record))

    def _gamma_on_validation(self, per_site: dict[str, dict]) -> tuple[float, dict | None]:
        """(gamma, its record) chosen from the sites' validation sweeps; the fixed gamma when no site has one."""
        chosen = gamma_on_validation(per_site, self.classes)
        if chosen is None:
            self.warning(f"no site reported a validation gamma sweep: the fixed gamma {self.gamma} is used")
            return self.gamma, None
        gamma, means, record = chosen
        self.info(
            f"gamma chosen on the sites' validation cases: {gamma} (mean super-model Dice per gamma "
            + ", ".join(f"{g}: {m:.4f}" for g, m in zip(GAMMA_SWEEP, means))
            + ")"
        )
        return gamma, record

    def _say_selector_health(self, health: dict) -> None:
        """A selector that did not learn, or a super model that is the global one, is said in the log, loudly."""
        if health["status"] == "learned":
            self.info(f"selector: learned (routed to the global model: {health['global_share']:.0%} of the test cases)")
            return
        self.warning(f"SELECTOR {health['status'].upper()}: " + "; ".join(health["reasons"]))
