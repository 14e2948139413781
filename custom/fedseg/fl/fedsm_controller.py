"""FedSM's server workflow (Xu et al., CVPR 2022) on NVFlare 2.9's ModelController.

The server keeps the whole model set: the global model g, one personalized model p_i per site, the model
selector s and the selector's Adam moments. Every round all sites train in parallel and each receives only
{g, ITS OWN p_i, s, Adam moments}. Then:
    g, s, moments <- FedAvg weighted by local steps          (fedseg.algorithms.weighted_average)
    p_i <- lam * w_i + (1 - lam)/(N - 1) * sum_{j!=i} w_j    (fedseg.algorithms.softpull, N = sites that answered)
A site that fails, times out or returns a bad update (NaN/Inf, missing keys, wrong shapes) is left out of
the round and keeps its personalized model. The set is checkpointed every round (last.pt), the best set by
validation score is kept (best.pt: the set that was SENT in the round whose received-model scores were
best), and a job can resume from either. With use_selector=False this is SoftPull alone (jobs/softpull).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.algorithms import softpull, weighted_average
from fedseg.algorithms.packing import pack, unpack
from fedseg.engine.config import EngineConfig
from fedseg.engine.engine import optimizer_state_to_numpy, state_to_numpy
from fedseg.fl.base_controller import FedSegController
from fedseg.fl.fedsm_tasks import PERSONAL_PREFIX
from fedseg.methods.fedsm import DEFAULT_SELECTOR, SelectorSettings, build_selector
from fedseg.modelset import load_model_set, save_model_set
from fedseg.report import format_table

OUTPUT_DIR = "fedsm"


class FedSMController(FedSegController):
    def __init__(
        self,
        num_rounds: int = 10,
        lam: float = 0.7,
        gamma: float = 0.9,
        use_selector: bool = True,
        selector: dict | None = None,
        engine: dict | None = None,
        local_epochs: int | None = None,
        local_steps: int | None = None,
        min_clients: int = 1,
        task_timeout: int = 0,
        eval_timeout: int = 0,
        startup_grace: int = 300,
        max_failed_rounds: int = 3,
        resume_from: str | None = None,
        start_round: int | None = None,
        seed: int = 0,
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
    ):
        """
        Args:
            num_rounds: FL rounds; in each, every site trains g, p_i (and s) once.
            lam: SoftPull weight of a site's own model (1: purely local, 1/N: plain average).
            gamma: selector confidence above which the super model uses a personalized model.
            use_selector: False gives SoftPull personalization without the selector.
            selector: selector settings (input_size, channels, lr, epochs, batch_size).
            engine: the sites' engine settings (recorded in the checkpoints for inference).
            local_epochs / local_steps: local budget per round for each segmentation model (None: the site's).
            min_clients: fewest valid answers with which a round updates the models.
            task_timeout / eval_timeout: seconds per training / evaluation task (0: no limit).
            startup_grace: extra seconds for a site's first task (its job process may start late).
            max_failed_rounds: consecutive rounds below min_clients before the job stops.
            resume_from: absolute server path of a saved model set (last.pt or best.pt) to continue from.
            start_round: round to continue at (default: the saved round + 1).
            task_check_period: seconds between FLARE's checks of the standing tasks.
        """
        super().__init__(persistor_id=persistor_id, task_timeout=task_timeout, min_clients=min_clients,
                         startup_grace=startup_grace, task_check_period=task_check_period)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.num_rounds = int(num_rounds)
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.use_selector = bool(use_selector)
        self.selector_cfg = {**DEFAULT_SELECTOR, **(selector or {})}
        self.engine_cfg = EngineConfig.from_dict(engine).to_dict()
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.eval_timeout = int(eval_timeout)
        self.max_failed_rounds = int(max_failed_rounds)
        self.resume_from = resume_from
        self.start_round = start_round
        self.seed = int(seed)

    # ---- model set -------------------------------------------------------------------------------------
    def _initial_set(self, sites: list[str]) -> tuple[dict, int]:
        if self.resume_from:
            groups, info = load_model_set(self.resume_from)
            saved_sites = info["site_names"]
            if saved_sites != sites:
                self.warning(f"resuming with sites {sites}; the saved set was trained with {saved_sites}")
            start = self.start_round if self.start_round is not None else int(info["round"]) + 1
            self.info(f"resuming from {self.resume_from} (saved round {info['round']}) at round {start}")
            for site in sites:
                groups["personal"].setdefault(site, copy.deepcopy(groups["global"]))
            return groups, start
        global_params = self.load_model().params
        groups = {"global": global_params, "personal": {s: copy.deepcopy(global_params) for s in sites}}
        if self.use_selector:
            groups["selector"], groups["selector_optim"] = self._initial_selector(len(sites))
        return groups, int(self.start_round or 0)

    def _initial_selector(self, num_sites: int) -> tuple[dict, dict]:
        torch.manual_seed(self.seed)
        settings = SelectorSettings.from_meta(num_sites, self.selector_cfg)
        selector = build_selector(self.engine_cfg["spatial_dims"], self.engine_cfg["in_channels"], settings)
        # Adam moments start as zeros so that every site, from round 0 on, sends the same key set
        optimizer = torch.optim.Adam(selector.parameters(), lr=self.selector_cfg["lr"])
        for p in selector.parameters():
            optimizer.state[p].update(
                {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            )
        return state_to_numpy(selector), optimizer_state_to_numpy(optimizer, selector)

    def _save(self, name: str, groups: dict, rnd: int, sites: list[str], extra: dict | None = None) -> Path:
        path = self.output_dir(OUTPUT_DIR) / name
        info = {"method": "fedsm", "round": rnd, "site_names": sites, "lam": self.lam, "gamma": self.gamma,
                "use_selector": self.use_selector, "selector": self.selector_cfg, "engine": self.engine_cfg, **(extra or {})}
        save_model_set(path, groups, info)
        return path

    def _task_meta(self, sites: list[str]) -> dict:
        return {"site_names": sites, "gamma": self.gamma, "selector": self.selector_cfg if self.use_selector else None,
                "local_epochs": self.local_epochs, "local_steps": self.local_steps}

    def _groups_for(self, groups: dict, site: str) -> dict:
        out = {"global": groups["global"], "personal": groups["personal"][site]}
        if self.use_selector:
            out["selector"], out["selector_optim"] = groups["selector"], groups["selector_optim"]
        return out

    # ---- one round -------------------------------------------------------------------------------------
    def _valid_update(self, site: str, result: FLModel, sent: dict) -> dict | None:
        """The site's unpacked update if every part passes the checks, else None (logged with the site)."""
        try:
            update = unpack(result.params)
        except (KeyError, AttributeError, TypeError) as e:
            self.warning(f"REJECTED update from {site}: cannot unpack: {e}")
            return None
        for group, reference in sent.items():
            if group not in update:
                self.warning(f"REJECTED update from {site}: the '{group}' model is missing")
                return None
            if not self.accept(site, update[group], reference, f"{group} model"):
                return None
        return update

    def _aggregate(self, groups: dict, updates: dict[str, dict], weights: dict[str, float]) -> None:
        groups["global"] = weighted_average({s: u["global"] for s, u in updates.items()}, weights)
        if self.use_selector:
            groups["selector"] = weighted_average({s: u["selector"] for s, u in updates.items()}, weights)
            groups["selector_optim"] = weighted_average({s: u["selector_optim"] for s, u in updates.items()}, weights)
        mixed = softpull({s: u["personal"] for s, u in updates.items()}, self.lam)
        groups["personal"].update(mixed)  # sites that did not answer keep their personalized model

    @staticmethod
    def _round_score(results: dict[str, FLModel], key: str) -> float | None:
        values = [r.metrics[key] for r in results.values() if r.metrics and key in r.metrics]
        return float(np.mean(values)) if values else None

    # ---- workflow --------------------------------------------------------------------------------------
    def run(self):
        sites = self.connected_sites()
        self.info(f"FedSM: sites {sites} (selector class = index in this list), lam={self.lam}, gamma={self.gamma}, "
                  f"selector={'on' if self.use_selector else 'off (SoftPull only)'}")
        groups, start = self._initial_set(sites)
        score_key = "val_super_dice" if self.use_selector else "val_personalized_dice"
        best_score, failed_rounds, history = -1.0, 0, []
        for rnd in range(start, self.num_rounds):
            if self.abort_signal.triggered:
                return
            self.info(f"---- FedSM round {rnd + 1}/{self.num_rounds} ----")
            active = self.connected_sites()
            sent = {s: self._groups_for(groups, s) for s in sites if s in active}
            tasks = {
                s: FLModel(params=pack(g), params_type=ParamsType.FULL, current_round=rnd, total_rounds=self.num_rounds,
                           meta=self._task_meta(sites))
                for s, g in sent.items()
            }
            results = self.run_tasks("fedsm_train", tasks)
            updates = {s: u for s, r in results.items() if (u := self._valid_update(s, r, sent[s])) is not None}
            weights = {s: float(results[s].meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND, 1) or 1) for s in updates}
            record = {"round": rnd, "answered": sorted(results), "accepted": sorted(updates),
                      "metrics": {s: results[s].metrics for s in sorted(results)}}
            if len(updates) < self.min_clients:
                failed_rounds += 1
                self.error(f"round {rnd}: only {len(updates)} valid updates ({sorted(updates)}), fewer than "
                           f"min_clients={self.min_clients}: models unchanged ({failed_rounds}/{self.max_failed_rounds})")
                history.append(record)
                if failed_rounds >= self.max_failed_rounds:
                    self.panic(f"FedSM stopped: {failed_rounds} consecutive rounds below min_clients")
                    return
                continue
            failed_rounds = 0
            # the metrics sites report were measured on the set SENT this round: that set is the candidate best
            score = self._round_score({s: results[s] for s in updates}, score_key)
            sent_set = copy.deepcopy(groups)
            self._aggregate(groups, updates, weights)
            record.update({"score": score, "left_out": sorted(set(sent) - set(updates))})
            history.append(record)
            if score is not None and score > best_score:
                best_score = score
                self._save("best.pt", sent_set, rnd - 1, sites, {"val_score": score, "score_key": score_key})
                self.info(f"round {rnd}: new best model set ({score_key}={score:.4f}, the set trained up to round {rnd - 1})")
            self._save("last.pt", groups, rnd, sites)
            self.save_model(FLModel(params=groups["global"], params_type=ParamsType.FULL, current_round=rnd))
            self.write_json(self.output_dir(OUTPUT_DIR) / "history.json", history)
            self.info(f"round {rnd}: aggregated {sorted(updates)}" + (f", {score_key} of the received set {score:.4f}" if score is not None else ""))
        self._final_evaluation(groups, sites)

    def _final_evaluation(self, groups: dict, sites: list[str]) -> None:
        """Scores the final set on every site's test cases and writes fedsm_evaluation.json + fedseg_results.json."""
        evaluation_groups = {"global": groups["global"], **{f"{PERSONAL_PREFIX}{s}": p for s, p in groups["personal"].items()}}
        if self.use_selector:
            evaluation_groups["selector"] = groups["selector"]
        meta = {**self._task_meta(sites), "section": "testing", "use_selector": self.use_selector}
        active = [s for s in sites if s in self.connected_sites()]
        tasks = {s: FLModel(params=pack(evaluation_groups), params_type=ParamsType.FULL, meta=meta) for s in active}
        results = self.run_tasks("fedsm_evaluate", tasks, timeout=self.eval_timeout)
        per_site = {s: r.metrics for s, r in sorted(results.items())}
        out_dir = self.output_dir(OUTPUT_DIR)
        self.write_json(out_dir / "fedsm_evaluation.json", per_site)
        names = {"super": "FedSM super model", "global": "FedSM global", "personalized": "FedSM personalized (own site)"}
        if not self.use_selector:
            names = {"global": "SoftPull global", "personalized": "SoftPull personalized (own site)"}
        models = {label: {s: m[key] for s, m in per_site.items() if key in m} for key, label in names.items()}
        extra = {"lam": self.lam, "gamma": self.gamma, "rounds": self.num_rounds}
        if self.use_selector:
            acc = {s: m.get("selector_accuracy") for s, m in per_site.items()}
            extra.update({"selector_accuracy": acc, "selector_accuracy_mean": float(np.mean(list(acc.values()))) if acc else None,
                          "routing": {s: m.get("routing") for s, m in per_site.items()}})
        results_record = {"method": "fedsm" if self.use_selector else "softpull", "section": "testing", "models": models, "extra": extra}
        self.write_json(Path(self.get_app_dir()) / "fedseg_results.json", results_record)
        self.info("\n" + format_table(results_record))
