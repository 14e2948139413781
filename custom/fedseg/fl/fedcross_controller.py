"""FedCross / FedCrossEns server workflow: K models travel among the sites, with no aggregation.

In every communication each model that trains is sent to one site (at most one model per site), all of them
train in parallel, and the weights a site returns replace that model. K = 1 is FedCross (one model relayed
round-robin); K = number of sites is FedCrossEns (every site hosts one model in every communication).
Each model carries its optimizer state and its position in its own learning-rate schedule from site to site.

Counting: one communication = one visit per model. `num_communications` is the number of visits each model
makes (when every site stays). NVFlare's cyclic workflows call a full pass over the N sites a "round",
i.e. one NVFlare round = N FedCross communications.

Every `validate_every` communications (by default ceil(N / K): as often per training step as FedAvg validates
once per round) and after the last one, the ensemble (mean of the K softmax outputs) is scored on every active
site's validation cases; the K models of the best validated communication are kept (best.pt), all K are written
every communication (last.pt), and a job can resume from last.pt (resume_from). Validation is not on the path
of a hand-over in the communications between: the next visit starts as soon as the last result is screened.
The history records per communication the seconds of training, validation and checkpoint writing, and the
hand-over latency (from the last result at the server, a visit's or a validation's, to this communication's
first visit starting at its site, by the site's clock: meaningful where the server and the sites share one, as in the
simulator). At the end the best set is
scored on every site's test cases and the common results record fedseg_results.json is written.

A site whose task fails, times out or returns an unusable update (NaN/Inf, missing keys, wrong shapes) does
not cost a model: the model keeps its last weights (or is retried at once on a site that is free in that
communication). A communication in which a site failed a task counts once against it (a missed validation
too); a communication in which all its tasks succeeded resets the count. After max_site_failures failed
communications in a row the site is left out; a missed validation alone never drops a site the first time.
A left-out site is tried again after rejoin_after communications, if it is connected (one more failure
drops it again). Sites that connect after the start join the schedule from the next communication.

The schedule (fedseg.algorithms.schedules.assign) gets the sites active in each communication. When that
list changes (a site left out, back, or new), cyclic, Latin and random schedules restart their blocks over
the new list at that communication (logged), so a Latin block again sends every model to every active site
once in the next N communications; explicit schedules keep their rows (missing sites are replaced).
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.algorithms.aggregation import UpdateRejected
from fedseg.algorithms.lr_schedule import LR_SCHEDULES, LrSchedule
from fedseg.algorithms.packing import pack
from fedseg.algorithms.schedules import KINDS, assign, check_latin_communications, validate_explicit
from fedseg.algorithms.screening import clip_update, fingerprint, update_norm
from fedseg.engine.config import EngineConfig
from fedseg.fl.base_controller import FedSegController
from fedseg.fl.checkpoints import best_beside, check_folder_name, improves, write_json
from fedseg.fl.fedcross_results import fedcross_results, validation_scores
from fedseg.fl.fedcross_screening import check_visit, read_cross_scores, screen_visits
from fedseg.fl.results import dp_spent, write_results
from fedseg.fl.site_health import SiteHealth
from fedseg.modelset import initial_members, load_members, member_key, save_members

HISTORY_FILE = "validation_history.json"
# engine settings that decide how a saved model set is rebuilt and run for inference
INFERENCE_KEYS = ("spatial_dims", "in_channels", "num_classes", "roi_size", "network", "sw_batch_size", "overlap", "amp")


def check_arguments(
    schedule: str,
    lr_schedule: str,
    counts: tuple[tuple[str, int], ...],
    max_site_failures: int,
    rejoin_after: int | None,
    optimizer_state: str,
    max_lone_update_ratio: float,
) -> None:
    """FedCrossController's arguments that cannot make a job (ValueError, naming the argument)."""
    if schedule not in KINDS:
        raise ValueError(f"schedule must be one of {KINDS}, got {schedule!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    for name, value in counts:
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if int(max_site_failures) < 1:
        raise ValueError("max_site_failures must be >= 1")
    if rejoin_after is not None and int(rejoin_after) < 0:
        raise ValueError(f"rejoin_after must be >= 0 or None, got {rejoin_after}")
    if optimizer_state not in ("travel", "fresh"):
        raise ValueError(f"optimizer_state must be 'travel' or 'fresh', got {optimizer_state!r}")
    if float(max_lone_update_ratio) < 0:
        raise ValueError(f"max_lone_update_ratio must be >= 0, got {max_lone_update_ratio}")


class FedCrossController(FedSegController):
    """FedCross / FedCrossEns: K models travel among the sites (the module's description).

    Args:
        num_models: K, the number of travelling models; 0 means one per site connected at the start
            (FedCrossEns). 1 is FedCross.
        num_communications: visits per model (one NVFlare "round" of a cyclic workflow = N communications).
        schedule: who visits whom: "cyclic" (model m at sites[(m + c) % N]), "latin" (a seeded Latin
            square per block of N communications: every model visits every site once per block; the job
            is refused at its start unless num_communications is a multiple of the N sites connected then),
            "random" (a seeded permutation per communication) or "explicit" (explicit_schedule rows).
        explicit_schedule: for "explicit": rows of K site names, row c % len(rows) used at communication c.
        seed: seeds the schedule and the initialisation of models 1..K-1 (fedseg.algorithms.schedules.member_seed:
            distinct for every (seed, model) pair; model 0 is the persistor's initial model).
        visit_epochs / visit_steps: local budget of one visit (steps win; 0/0: the sites' engine
            local_steps / local_epochs).
        lr_schedule: "constant" (default: the constant rate every other FedSeg method trains with), "poly" or
            "cosine" over each model's own visits (fedseg.algorithms.lr_schedule.lr_at); recorded in the history and
            the results record.
        lr: base learning rate (0: the engine's lr). lr_power: exponent of "poly".
        task_timeout: seconds one visit may take (0: no limit). validate_timeout: same for scoring.
        validate_every: score the ensemble on the sites' validation cases after every this many
            communications and after the last (0: ceil(N / K) for the N sites at the start, i.e. once per
            N visits, as often per training step as FedAvg validates; 1: every communication). The best set
            is chosen among the validated communications.
        startup_grace: extra seconds for a site that has not answered any task yet: FLARE counts a
            task's timeout from when it is scheduled, and a site's job process may start later than that.
        max_site_failures: communications in a row in which a site failed a task (error, timeout, rejected
            update, missed validation) after which it is left out; a success resets the count. A missed
            validation alone counts, but needs at least 2 in a row to leave a site out.
        rejoin_after: communications a left-out site sits out before it is tried again, if connected
            (None: the number of sites at the start). A retried site is left out again at its next failure.
        retry_on_free_site: a model whose visit failed is sent at once to a site idle in that communication.
        optimizer_state: "travel" (the model's Adam state goes with it from site to site, as in the authors'
            code) or "fresh" (a new Adam at every visit, as NVFlare's cyclic workflow does). "fresh" is the
            default because it measured better (README, FedCross: optimizer state).
        min_clients: fewest remaining sites with which training continues.
        engine_config: the sites' engine settings, stored with the model sets so inference can rebuild the networks.
        resume_from: server path of a last.pt to continue from (at its communication + 1): inside this job's run
            dir or a directory the server's local/fedseg_server.json lists under "resume_dirs".
        final_section: datalist section of the final per-site scores.
        results_dir: folder name under the server's app dir for last.pt, best.pt and the validation history
            (a plain name: a job cannot make the server write elsewhere).
        max_update_ratio: a visit whose update norm is above this many times the median of the other visits
            of the communication and the recent accepted ones is rejected.
        clip_ratio (FedSegController): an accepted visit whose update norm is above this many times the median of
            the communication's visits and the recent accepted ones is scaled down to it (a visit replaces its
            model whole, with no average to dilute it).
        max_lone_update_ratio: a visit with nothing to compare with (the first visit of FedCross's single
            model) is rejected when its update norm is above this many times the norm of the model that was
            sent (0: not checked). A travelling optimizer state must satisfy Adam's moment invariant
            (fedseg.algorithms.screening.adam_moment_bound) at every visit.
    """

    RENAMED = {"engine": "engine_config", "output_dir": "results_dir"}

    def __init__(
        self,
        num_models: int = 1,
        num_communications: int = 20,
        schedule: str = "cyclic",
        explicit_schedule: list | None = None,
        seed: int = 0,
        visit_epochs: int = 0,
        visit_steps: int = 0,
        lr_schedule: str = "constant",
        lr: float = 0.0,
        lr_power: float = 0.9,
        validate_timeout: int = 0,
        validate_every: int = 0,
        startup_grace: int = 300,
        max_site_failures: int = 3,
        rejoin_after: int | None = None,
        retry_on_free_site: bool = True,
        optimizer_state: str = "fresh",
        engine_config: dict | None = None,
        resume_from: str = "",
        final_section: str = "testing",
        results_dir: str = "fedcross",
        task_timeout: int = 0,
        min_clients: int = 1,
        max_update_ratio: float = 10.0,
        max_lone_update_ratio: float = 3.0,
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
        **kwargs,
    ):
        super().__init__(
            startup_grace=startup_grace,
            task_timeout=task_timeout,
            min_clients=min_clients,
            max_update_ratio=max_update_ratio,
            persistor_id=persistor_id,
            task_check_period=task_check_period,
            **kwargs,
        )
        counts = (
            ("num_models", num_models),
            ("num_communications", num_communications),
            ("visit_epochs", visit_epochs),
            ("visit_steps", visit_steps),
            ("seed", seed),
            ("validate_timeout", validate_timeout),
            ("validate_every", validate_every),
            ("startup_grace", startup_grace),
        )
        check_arguments(schedule, lr_schedule, counts, max_site_failures, rejoin_after, optimizer_state, max_lone_update_ratio)
        # the arguments as given (NVFlare's FedJob export reads the attributes back as the job's arguments)
        self.num_models = int(num_models)
        self.num_communications = int(num_communications)
        self.schedule = schedule
        self.explicit_schedule = explicit_schedule
        self.seed = int(seed)
        self.visit_epochs = int(visit_epochs)
        self.visit_steps = int(visit_steps)
        self.engine_config = engine_config
        self.lr_schedule = lr_schedule
        self.lr = lr
        self.lr_power = lr_power
        self.validate_timeout = int(validate_timeout)
        self.validate_every = int(validate_every)
        self.max_site_failures = int(max_site_failures)
        self.rejoin_after = rejoin_after
        self.retry_on_free_site = bool(retry_on_free_site)
        self.optimizer_state = optimizer_state
        self.max_lone_update_ratio = float(max_lone_update_ratio)
        self.resume_from = resume_from or ""
        self.final_section = final_section
        self.results_dir = check_folder_name(results_dir)
        self._new_run()

    def _new_run(self) -> None:
        """The run's settings and state before it starts (a resumed run restores its state from its checkpoint)."""
        # the sites' engine settings (replaced by what the sites report they run) and each model's lr plan
        self.engine_settings = dict(self.engine_config or {})
        self.lr_plan = LrSchedule(
            kind=self.lr_schedule,
            base_lr=float(self.lr or EngineConfig.from_dict(self.engine_settings).lr),
            total_visits=max(self.num_communications, 1),
            power=float(self.lr_power),
        )
        self.validation_period = 1  # validate_every, or ceil(N / K) once the sites are known
        self.sites: list[str] = []
        self.members: list[dict] = []
        self.optimizers: list[dict] = []
        self.visits_done: list[int] = []
        self.health = SiteHealth(self.max_site_failures, 0)  # rejoin_after is set when the sites are known
        self.active: list[str] = []  # the sites of the current communication
        self.schedule_sites: list[str] = []  # the site list the schedule runs over, since schedule_origin
        self.schedule_origin = 0
        self.history: list[dict] = []
        self.recent_norms: deque[float] = deque(maxlen=20)  # accepted visits' update norms (magnitude screening)
        self.best: dict | None = None  # {"communication", "val_dice", "members", "optimizers", "visits_done"}
        self.steps_total = 0
        self.visit_started: dict[str, float] = {}  # site clock when each visit of this communication began
        self.network_args: dict = {}
        self._engine_checked = False

    # ---- workflow -----------------------------------------------------------------------------------------
    def run(self) -> None:
        self.folder = self.results_folder(self.results_dir)
        try:
            start = self._setup()
            if start is None:
                return
            for c in range(start, self.num_communications):
                if self.abort_signal.triggered:
                    return
                trained = self._communication(c)
                if trained is None:  # aborted
                    return
                if not trained:
                    break
            self.folder.done()
            self._final_test()
        finally:  # an aborted job still leaves its last checkpoint whole
            self.folder.done()

    def _setup(self) -> int | None:
        """The sites, the models (fresh or resumed) and the validation period; the first communication, or None
        after a panic."""
        self.sites = self._reachable()
        if not self.sites:
            self.panic("FedCross: no sites connected")
            return None
        if self.schedule == "latin":  # whole blocks, or some models miss some sites (FLARE logs it and stops the job)
            try:
                check_latin_communications(self.num_communications, len(self.sites))
            except ValueError as e:
                raise ValueError(f"FedCross job refused at its start (sites {self.sites}): {e}") from None
        self.folder.path()
        self.health.rejoin_after = len(self.sites) if self.rejoin_after is None else int(self.rejoin_after)
        start = self._start_state()
        if start is None:
            return None
        k = len(self.members)
        self.validation_period = self.validate_every or max(1, math.ceil(len(self.sites) / k))
        budget = (
            f"{self.visit_steps} steps"
            if self.visit_steps
            else f"{self.visit_epochs} epochs"
            if self.visit_epochs
            else "the sites' engine default"
        )
        self.info(
            f"FedCross: {k} model(s) over sites {self.sites}, schedule {self.schedule!r} (seed {self.seed}), "
            f"communications {start}..{self.num_communications - 1}, visit budget {budget}, lr {self.lr_plan.kind} "
            f"from {self.lr_plan.base_lr:g}; validation every {self.validation_period} communication(s) and after the "
            f"last; output {self.folder.folder}"
        )
        return start

    def _communication(self, c: int) -> bool | None:
        """Communication c: the visits, the validation when due, the checkpoint. False when too few sites are left
        to train, None when the job was aborted during the visits."""
        changes = self._begin_communication(c)
        active = self.active_sites()
        if len(active) < max(self.min_clients, 1):
            self.error(f"FedCross: only {active} left (min_clients {self.min_clients}); stopping training at communication {c}")
            return False
        began = time.perf_counter()
        entry = self._train_communication(c, active)
        if self.abort_signal.triggered:
            return None
        trained = time.perf_counter()
        validated = self._validates(c)
        if validated:
            entry.update(self._validate_communication(c))
        recovered = self.health.finish()
        if recovered:
            self.info(f"FedCross communication {c}: {recovered} answered every task again; their failure count is reset")
        entry.update(changes)
        entry["train_s"] = round(trained - began, 3)
        entry["validate_s"] = round(time.perf_counter() - trained, 3) if validated else 0.0
        self.history.append(entry)
        if validated:
            self.track("fedcross/ensemble_val_dice", entry["val_dice"], c)  # over all validation cases
        entry["seconds"] = round(time.perf_counter() - began, 1)
        self._checkpoint(c, validated)
        self.info(
            f"FedCross communication {c} done in {entry['seconds']}s (train {entry['train_s']:.2f}s, validation "
            f"{entry['validate_s']:.2f}s, hand-over "
            + ("-" if entry["handover_s"] is None else f"{entry['handover_s']:.3f}s")
            + "): "
            + (f"validation ensemble dice {entry['val_dice']:.4f}" if validated else "not validated")
            + f" (best {self.best['val_dice'] if self.best else float('nan'):.4f} at communication "
            f"{self.best['communication'] if self.best else '-'}); dropped sites {self.dropped or 'none'}"
        )
        return True

    def _validates(self, c: int) -> bool:
        return (c + 1) % self.validation_period == 0 or c == self.num_communications - 1

    def _handover_seconds(self, previous: float | None) -> float | None:
        """Seconds from the last result the server had before sending this communication's visits (a visit's, or
        a validation's after a validated communication) to the first visit starting at its site (None for the
        first task of the job or without a report)."""
        if previous is None or not self.visit_started:
            return None
        return round(min(self.visit_started.values()) - previous, 4)

    # ---- sites --------------------------------------------------------------------------------------------------
    @property
    def dropped(self) -> list[str]:
        return self.health.dropped

    def active_sites(self) -> list[str]:
        """This communication's sites that are not left out (a site left out during it drops out at once)."""
        return [s for s in self.active if s not in self.health.dropped_at]

    def _reachable(self) -> list[str]:
        return self.connected_sites()

    def _begin_communication(self, c: int) -> dict:
        """Sites of communication c: new sites join the schedule, left-out sites due back rejoin, and the
        schedule restarts over the new list when it changed. Returns what changed (for the history)."""
        connected = self._reachable()
        joined = [s for s in connected if s not in self.sites]
        if joined:
            self.sites = [*self.sites, *joined]
            self.info(f"FedCross communication {c}: {joined} connected after the start; in the schedule from now")
        back = self.health.start(c, connected)
        if back:
            self.info(
                f"FedCross communication {c}: trying {back} again after {self.health.rejoin_after} communication(s) "
                f"left out; one more failure leaves them out again"
            )
        self.active = [s for s in self.sites if s in connected and s not in self.health.dropped_at]
        gone = [s for s in self.sites if s not in connected]
        if self.active != self.schedule_sites:
            if self.schedule_sites:
                self.info(
                    f"FedCross communication {c}: active sites {self.schedule_sites} -> {self.active}"
                    + (f" (not connected: {gone})" if gone else "")
                    + (
                        f"; the {self.schedule} schedule restarts over {len(self.active)} site(s) at this communication"
                        if self.schedule != "explicit"
                        else ""
                    )
                )
            self.schedule_sites, self.schedule_origin = list(self.active), c
        return {"joined": joined, "rejoined": back, "not_connected": gone}

    def _schedule_index(self, c: int) -> int:
        """The communication index the schedule sees: explicit rows follow c; the other kinds count from the
        communication where the current site list began."""
        return c if self.schedule == "explicit" else c - self.schedule_origin

    def _count_failures(self, sites: list[str], c: int, validation: bool = False) -> None:
        for site in sites:
            if self.health.failed(site, c, validation):
                self.warning(
                    f"FedCross: site {site} failed {self.health.failures[site]} time(s) in a row (max_site_failures "
                    f"{self.max_site_failures}); leaving it out for {self.health.rejoin_after} communication(s); "
                    f"remaining {self.active_sites()}"
                )
        sites.clear()

    # ---- start: fresh or resumed -------------------------------------------------------------------------------
    def _start_state(self) -> int | None:
        model0 = self.load_model()
        if model0 is None:
            return None
        model0 = {k: np.asarray(v) for k, v in model0.params.items()}
        persisted = getattr(self.persistor, "model", None)
        self.network_args = dict(
            getattr(persisted, "network_args", None) or EngineConfig.from_dict(self.engine_settings).network_args()
        )
        if self.schedule == "explicit":
            k = self.num_models or len(self.sites)
            self.explicit_schedule = validate_explicit(self.explicit_schedule, self.sites, k)
        if self.resume_from:
            return self._resume(model0)
        k = self.num_models or len(self.sites)
        if k > len(self.sites):
            self.warning(f"FedCross: {k} models but {len(self.sites)} sites: models take turns sitting out")
        self.members = initial_members(self.network_args, model0, k, self.seed)
        self.optimizers = [{} for _ in range(k)]
        self.visits_done = [0] * k
        return 0

    def _resume(self, model0: dict) -> int | None:
        opened = self.load_resume(
            "FedCross", load_members, lambda saved: {f"saved model {m}": w for m, w in enumerate(saved[0])}, model0
        )
        if opened is None:
            return None
        path, (members, optimizers, info) = opened
        if self.num_models and self.num_models != len(members):
            self.warning(
                f"FedCross: num_models {self.num_models} but {path} holds {len(members)}; using the saved {len(members)}"
            )
        self.members, self.optimizers = members, optimizers
        # the sites, their failure counts and the schedule's site list carry over; new sites join after them
        saved_sites = [str(s) for s in info.get("sites", [])]
        self.sites = saved_sites + [s for s in self.sites if s not in saved_sites]
        self.health.restore(info)
        self.schedule_sites = [
            str(s) for s in info.get("schedule_sites", [s for s in saved_sites if s not in self.health.dropped_at])
        ]
        self.schedule_origin = int(info.get("schedule_origin", 0))
        self.visits_done = [int(v) for v in info.get("visits_done", [0] * len(members))]
        self.history = list(info.get("history", []))
        self.steps_total = int(info.get("train_steps_total", 0))
        start = int(info["communication"]) + 1
        self._resume_best(path)
        self.info(
            f"FedCross: resuming from {path} (communication {start - 1} done) at communication {start} "
            f"with {len(members)} model(s); visits so far {self.visits_done}; sites {self.sites}, left out "
            f"{self.health.dropped_at or 'none'}, failures in a row {self.health.failures or 'none'}"
        )
        if start >= self.num_communications:
            self.warning(f"FedCross: {path} already has {start} communications (num_communications {self.num_communications})")
        return start

    def _resume_best(self, path: Path) -> None:
        """The best set saved next to the checkpoint a job resumes from: kept, and copied into this job's folder."""
        best_path = best_beside(path)
        if best_path is None:
            self.warning(f"FedCross: no best.pt next to {path}; best-set tracking starts afresh")
            return
        b_members, b_optimizers, b_info = load_members(best_path)
        self.best = {
            "communication": b_info["communication"],
            "val_dice": float(b_info["val_dice"]),
            "members": b_members,
            "optimizers": b_optimizers,
            "visits_done": b_info.get("visits_done"),
        }
        save_members(self.folder.path("best.pt"), b_members, b_optimizers, self._info(self.best["communication"], self.best))

    # ---- one communication --------------------------------------------------------------------------------------
    def _visit_task(self, m: int, c: int) -> FLModel:
        return FLModel(
            params=pack({"model": self.members[m], "optim": self.optimizers[m]}),
            params_type=ParamsType.FULL,
            current_round=c,
            total_rounds=self.num_communications,
            meta={
                "model_index": m,
                "communication": c,
                "visits_done": self.visits_done[m],
                "lr_schedule": self.lr_plan.as_meta(),
                "visit_epochs": self.visit_epochs,
                "visit_steps": self.visit_steps,
            },
        )

    def _train_communication(self, c: int, active: list[str]) -> dict:
        """Every model that trains in communication c visits its site; the communication's history entry."""
        k = len(self.members)
        assignment = assign(self.schedule, active, k, self._schedule_index(c), self.seed, self.explicit_schedule)
        visits: list[dict] = [
            {"model": m, "site": s, "status": "sat out" if s is None else "pending"} for m, s in enumerate(assignment)
        ]
        lrs = [self.lr_plan.lr(v) for v in self.visits_done]
        self.info(
            f"FedCross communication {c}/{self.num_communications - 1}: "
            + ", ".join(f"model {m} -> {s or 'sits out'}" for m, s in enumerate(assignment))
            + f" (lr {', '.join(f'{x:.2e}' for x in lrs)})"
        )
        previous_result_at = self.last_result_at
        spent = self._visit(c, {s: m for m, s in enumerate(assignment) if s is not None}, visits)
        entry = {
            "communication": c,
            "active_sites": active,
            "assignment": assignment,
            "visits": visits,
            "lr_schedule": self.lr_plan.kind,
            "lr": lrs,
            "visits_done": list(self.visits_done),
            "weights_sha1": [fingerprint(w) for w in self.members],
            "dropped_sites": list(self.dropped),
            "handover_s": self._handover_seconds(previous_result_at),
        }
        if spent:
            entry["dp"] = dict(sorted(spent.items()))
        return entry

    def _visit(self, c: int, pending: dict[str, int], visits: list[dict]) -> dict[str, dict]:
        """The visits of communication c ({site: model}, in parallel); a model whose visit failed is retried on a
        site free in this communication (retry_on_free_site). Records each visit's outcome in ``visits``;
        returns what DP-SGD sites report of their privacy loss so far."""
        tried: set[str] = set(pending)
        failed_now: list[str] = []
        spent: dict[str, dict] = {}  # DP-SGD sites: the privacy loss each reports having spent so far
        self.visit_started = {}
        while pending:
            self.health.tasked(pending)
            results = self.run_tasks("cross_train", {s: self._visit_task(m, c) for s, m in pending.items()})
            spent.update(dp_spent({s: r.metrics for s, r in results.items()}))
            for site, result in results.items():
                if isinstance(started := (result.meta or {}).get("started_at"), float) and math.isfinite(started):
                    self.visit_started.setdefault(site, started)  # a measurement only: never used to decide
            too_large, scales = screen_visits(
                self.screener,
                {s: m for s, m in pending.items() if s in results},
                results,
                self.members,
                self.recent_norms,
                self.max_lone_update_ratio,
            )
            unplaced = []
            for site, m in pending.items():
                reason = self._apply_visit(site, m, results.get(site), site in too_large, scales.get(site))
                if reason is None:
                    visits[m].update(site=site, status="trained")
                    continue
                failed_now.append(site)
                visits[m].setdefault("failed_at", []).append({"site": site, "reason": reason})
                visits[m]["status"] = "kept last weights"
                self.warning(f"FedCross communication {c}: model {m} at {site}: {reason}; model {m} keeps its last weights")
                unplaced.append(m)
            self._count_failures(failed_now, c)
            if self.abort_signal.triggered:
                break
            free = [s for s in self.active_sites() if s not in tried] if self.retry_on_free_site else []
            pending = {}
            for m, site in zip(unplaced, free):
                self.info(f"FedCross communication {c}: retrying model {m} on free site {site}")
                pending[site] = m
                tried.add(site)
        return spent

    def _apply_visit(
        self, site: str, m: int, result: FLModel | None, too_large: bool = False, scale: float | None = None
    ) -> str | None:
        """Replace model m with the site's result if it is usable (bounded by `scale` when given); otherwise return
        why not."""
        if result is None:
            return "no result (error, timeout or disconnect)"
        try:
            weights, optim, steps = check_visit(site, m, result, self.members[m], self.optimizers[m], self.visit_steps or None)
        except UpdateRejected as e:
            self.reject(site, f"model {m}", e.reason)
            return f"REJECTED update from {site}: {e.reason}"
        except (KeyError, AttributeError, TypeError) as e:
            self.reject(site, f"model {m}", f"cannot unpack: {type(e).__name__}")
            return f"REJECTED update from {site}: cannot unpack: {e}"
        if too_large:
            return f"REJECTED update from {site}: update norm too large (see the line above)"
        if scale is not None:
            norm = update_norm(weights, self.members[m])
            weights = clip_update(weights, self.members[m], scale)
            self.warning(
                f"BOUNDED model {m} update from {site}: norm {norm:.4g} above {self.clip_ratio:g}x the median of this "
                f"communication's and the recent visits; scaled by {scale:.3g}"
            )
        self.recent_norms.append(update_norm(weights, self.members[m]))
        self.members[m] = weights
        # {} when the site's privacy scope withholds it or the job wants a fresh Adam at every visit
        self.optimizers[m] = optim if self.optimizer_state == "travel" else {}
        self.visits_done[m] += 1
        self.steps_total += steps
        return None

    # ---- scoring ------------------------------------------------------------------------------------------------
    def _score(self, members: list[dict], sites: list[str], section: str, c: int | None = None) -> dict[str, dict]:
        """cross_validate of the ensemble of `members` at `sites`: {site: metrics} of those that answered."""
        packed = pack({member_key(m): w for m, w in enumerate(members)})
        meta = {"section": section, "num_models": len(members), **({"communication": c} if c is not None else {})}
        task = {s: FLModel(params=packed, params_type=ParamsType.FULL, meta=meta) for s in sites}
        results = self.run_tasks("cross_validate", task, self.validate_timeout)
        self._adopt_site_engine({s: r.metrics for s, r in results.items() if isinstance(r.metrics, dict)})
        return {
            s: m
            for s, r in sorted(results.items())
            if (m := read_cross_scores(self.screener, s, r.metrics, len(members))) is not None
        }

    def _adopt_site_engine(self, scores: dict[str, dict]) -> None:
        """The model sets must say how the sites ran the networks; warn once if the job's copy differs."""
        if self._engine_checked:
            return
        for site, metrics in sorted(scores.items()):
            reported = metrics.get("engine")
            if not reported:
                continue
            try:  # a site's report is only adopted if it is a valid engine configuration
                reported = EngineConfig.from_dict(reported).to_dict()
            except Exception as e:  # noqa: BLE001
                self.reject(site, "engine settings", f"{type(e).__name__}: {e}")
                continue
            self._engine_checked = True
            stated = EngineConfig.from_dict(self.engine_settings).to_dict()
            differ = [key for key in INFERENCE_KEYS if stated.get(key) != reported.get(key)]
            if differ:
                self.warning(
                    f"FedCross: the controller's engine settings differ from {site}'s in {differ}; "
                    f"the model sets record the sites' settings"
                )
            self.engine_settings = {key: reported[key] for key in reported}
            return

    def _validate_communication(self, c: int) -> dict:
        """The ensemble scored on the active sites' validation cases; a new best set is saved (best.pt)."""
        # a site whose visit failed in this communication is not asked to validate in it (it may be down)
        targets = [s for s in self.active_sites() if not self.health.failed_now(s)]
        self.health.tasked(targets)
        scores = self._score(self.members, targets, "validation", c)
        validation = validation_scores(scores, len(self.members))
        missing = sorted(set(targets) - set(scores))
        if missing:
            self._count_failures(list(missing), c, validation=True)
        val_dice = validation["val_dice"]
        if improves(val_dice, self.best["val_dice"] if self.best else None):
            self.best = {
                "communication": c,
                "val_dice": val_dice,
                "members": list(self.members),
                "optimizers": list(self.optimizers),
                "visits_done": list(self.visits_done),
            }
            best, info, path = self.best, self._info(c, self.best), self.folder.path("best.pt")
            info["history"] = list(self.history)
            self.folder.later(lambda: save_members(path, best["members"], best["optimizers"], info))
        return {**validation, "val_missing_sites": missing}

    # ---- files --------------------------------------------------------------------------------------------------
    def _info(self, c: int, best: dict | None = None) -> dict:
        return {
            "communication": c,
            "num_communications": self.num_communications,
            "val_dice": best["val_dice"]
            if best
            else (self.history[-1].get("val_dice", math.nan) if self.history else math.nan),
            "visits_done": (best or {}).get("visits_done") or list(self.visits_done),
            "schedule": self.schedule,
            "seed": self.seed,
            "sites": self.sites,
            "dropped_sites": list(self.dropped),
            **self.health.state(),
            "schedule_sites": self.schedule_sites,
            "schedule_origin": self.schedule_origin,
            "lr_schedule": self.lr_plan.as_meta(),
            "visit_epochs": self.visit_epochs,
            "visit_steps": self.visit_steps,
            "train_steps_total": self.steps_total,
            "engine": self.engine_settings,
            "network_args": self.network_args,
            "best_communication": self.best["communication"] if self.best else None,
            "history": self.history,
        }

    def _checkpoint(self, c: int, validated: bool) -> None:
        """last.pt and the history every communication, on the writer thread (the next visit does not wait)."""
        members, optimizers, info, history = list(self.members), list(self.optimizers), self._info(c), list(self.history)
        info["history"] = history
        last, history_file = self.folder.path("last.pt"), self.folder.path(HISTORY_FILE)

        def write() -> None:
            save_members(last, members, optimizers, info)
            write_json(history_file, history)

        self.folder.later(write)
        if validated:  # model 0 also through the persistor, so FL_global_model.pt exists like in every FLARE job
            self.save_model(FLModel(params=self.members[0], params_type=ParamsType.FULL, current_round=c))

    def _final_test(self) -> None:
        """The best set (the last models when no communication was validated) scored on every site's
        final_section cases; writes the results record fedseg_results.json."""
        if self.best is None:
            self.warning("FedCross: no validated communication; scoring the last models")
            best = {
                "communication": self.history[-1]["communication"] if self.history else None,
                "val_dice": float("nan"),
                "members": self.members,
            }
        else:
            best = self.best
        k = len(best["members"])
        sites = [s for s in self.sites if s in self._reachable()]  # left-out sites too: they may score again
        self.info(
            f"FedCross: scoring the best set (communication {best['communication']}) on '{self.final_section}' at {sites}"
        )
        scores = self._score(best["members"], sites, self.final_section)
        run = {
            "num_models": k,
            "schedule": self.schedule,
            "seed": self.seed,
            "lr_schedule": self.lr_plan.kind,  # over each model's own visits; "constant" like every other method
            "lr_base": self.lr_plan.base_lr,
            **({"lr_power": self.lr_plan.power} if self.lr_plan.kind == "poly" else {}),
            "num_communications": self.num_communications,
            "best_communication": best["communication"],
            "best_val_dice": best["val_dice"],
            "train_steps_total": self.steps_total,
            "dropped_sites": ", ".join(self.dropped) or "none",
        }
        files = {
            "model_set": str(self.folder.path("best.pt")),
            "checkpoint_write_seconds": round(self.folder.write_seconds, 3),  # on the writer thread, off the relay's path
            "history": self.history,
        }
        results = fedcross_results(scores, k, self.final_section, run, files)
        missing = sorted(set(self.sites) - set(results["models"]["ensemble"]))
        if missing:
            self.warning(f"FedCross: no final scores from {missing}")
        self.info("\n" + write_results(self.get_app_dir(), results))
