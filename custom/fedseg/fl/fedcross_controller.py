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

from fedseg.algorithms.aggregation import UpdateRejected, check_update
from fedseg.algorithms.lr_schedule import LR_SCHEDULES, LrSchedule
from fedseg.algorithms.packing import pack, unpack
from fedseg.algorithms.schedules import KINDS, assign, check_latin_communications, validate_explicit
from fedseg.algorithms.screening import (
    case_dice,
    check_optimizer_state,
    clip_scales,
    clip_update,
    fingerprint,
    numeric_metrics,
    read_int,
    read_score,
    read_step_count,
    read_summary,
    screen_relative,
    update_norm,
)
from fedseg.engine.config import EngineConfig
from fedseg.engine.dp import DP_METRICS
from fedseg.fl.base_controller import FedSegController, check_output_name
from fedseg.modelset import initial_members, load_members, member_key, save_members
from fedseg.report import RESULTS_FILE, format_table

HISTORY_FILE = "validation_history.json"
# engine settings that decide how a saved model set is rebuilt and run for inference
INFERENCE_KEYS = ("spatial_dims", "in_channels", "num_classes", "roi_size", "network", "sw_batch_size", "overlap", "amp")


def _finite_mean(values) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class SiteHealth:
    """Which sites FedCross leaves out: consecutive failed communications, drops and rejoins (no FLARE).

    Per communication: start() (returns the sites due back), then failed() / tasked() for each task, then
    finish() (resets the count of every site whose tasks all succeeded; returns those that recovered)."""

    def __init__(self, max_failures: int, rejoin_after: int):
        self.max_failures = int(max_failures)
        self.rejoin_after = int(rejoin_after)
        self.failures: dict[str, int] = {}  # failed communications in a row
        self.dropped_at: dict[str, int] = {}  # left-out site -> communication in which it was left out
        self._failed: set[str] = set()
        self._tasked: set[str] = set()

    @property
    def dropped(self) -> list[str]:
        return list(self.dropped_at)

    def start(self, c: int, connected: list[str]) -> list[str]:
        """Begin communication c; left-out sites whose rejoin_after communications are over and that are
        connected come back, one failure away from being left out again."""
        self._failed, self._tasked = set(), set()
        back = [s for s, at in self.dropped_at.items() if c - at > self.rejoin_after and s in connected]
        for site in back:
            del self.dropped_at[site]
            self.failures[site] = self.max_failures - 1
        return back

    def tasked(self, sites) -> None:
        self._tasked.update(sites)

    def failed(self, site: str, c: int, validation: bool = False) -> bool:
        """Count a failure of site in communication c (once per communication); True if it is left out now.
        A failure that is only a missed validation needs at least 2 in a row."""
        self._tasked.add(site)
        if site in self._failed:
            return False
        self._failed.add(site)
        self.failures[site] = self.failures.get(site, 0) + 1
        limit = max(self.max_failures, 2) if validation else self.max_failures
        if self.failures[site] >= limit and site not in self.dropped_at:
            self.dropped_at[site] = c
            return True
        return False

    def failed_now(self, site: str) -> bool:
        return site in self._failed

    def finish(self) -> list[str]:
        ok = self._tasked - self._failed
        recovered = sorted(s for s in ok if self.failures.get(s))
        for site in ok:
            self.failures[site] = 0
        return recovered

    def state(self) -> dict:
        return {"site_failures": dict(self.failures), "dropped_at": dict(self.dropped_at)}

    def restore(self, info: dict) -> None:
        """From a checkpoint's info (older checkpoints list only dropped_sites: left out at their communication)."""
        self.failures = {str(s): int(n) for s, n in (info.get("site_failures") or {}).items()}
        dropped_at = info.get("dropped_at")
        if dropped_at is None:
            dropped_at = {s: int(info.get("communication", 0)) for s in info.get("dropped_sites", [])}
        self.dropped_at = {str(s): int(c) for s, c in dropped_at.items()}


class FedCrossController(FedSegController):
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
        engine: dict | None = None,
        resume_from: str = "",
        final_section: str = "testing",
        output_dir: str = "fedcross",
        task_timeout: int = 0,
        min_clients: int = 1,
        max_update_ratio: float = 10.0,
        max_lone_update_ratio: float = 3.0,
        persistor_id: str = "persistor",
        task_check_period: float = 0.5,
        **kwargs,
    ):
        """
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
            engine: the sites' engine settings, stored with the model sets so inference can rebuild the networks.
            resume_from: server path of a last.pt to continue from (at its communication + 1): inside this job's run
                dir or a directory the server's local/fedseg_server.json lists under "resume_dirs".
            final_section: datalist section of the final per-site scores.
            output_dir: folder name under the server's app dir for last.pt, best.pt and the validation history
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
        super().__init__(
            startup_grace=startup_grace,
            task_timeout=task_timeout,
            min_clients=min_clients,
            max_update_ratio=max_update_ratio,
            persistor_id=persistor_id,
            task_check_period=task_check_period,
            **kwargs,
        )
        if schedule not in KINDS:
            raise ValueError(f"schedule must be one of {KINDS}, got {schedule!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        for name, value in (
            ("num_models", num_models),
            ("num_communications", num_communications),
            ("visit_epochs", visit_epochs),
            ("visit_steps", visit_steps),
            ("seed", seed),
            ("validate_timeout", validate_timeout),
            ("validate_every", validate_every),
            ("startup_grace", startup_grace),
        ):
            if int(value) < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if int(max_site_failures) < 1:
            raise ValueError("max_site_failures must be >= 1")
        if rejoin_after is not None and int(rejoin_after) < 0:
            raise ValueError(f"rejoin_after must be >= 0 or None, got {rejoin_after}")
        self.num_models = int(num_models)
        self.num_communications = int(num_communications)
        self.schedule = schedule
        self.explicit_schedule = explicit_schedule
        self.seed = int(seed)
        self.visit_epochs = int(visit_epochs)
        self.visit_steps = int(visit_steps)
        # the arguments as given (NVFlare's FedJob export reads the attributes back as the job's arguments).
        # `engine` holds the settings until the workflow starts, when FLARE puts its own engine there
        # (BaseModelController.start_controller): the run uses engine_settings.
        self.engine = engine
        self.lr_schedule = lr_schedule
        self.lr = lr
        self.lr_power = lr_power
        self.engine_settings = dict(engine or {})
        self.lr_plan = LrSchedule(
            kind=lr_schedule,
            base_lr=float(lr or EngineConfig.from_dict(self.engine_settings).lr),
            total_visits=max(self.num_communications, 1),
            power=float(lr_power),
        )
        self.validate_timeout = int(validate_timeout)
        self.validate_every = int(validate_every)
        self.validation_period = 1  # validate_every, or ceil(N / K) once the sites are known
        self.max_site_failures = int(max_site_failures)
        self.rejoin_after = rejoin_after
        self.retry_on_free_site = bool(retry_on_free_site)
        if optimizer_state not in ("travel", "fresh"):
            raise ValueError(f"optimizer_state must be 'travel' or 'fresh', got {optimizer_state!r}")
        self.optimizer_state = optimizer_state
        if float(max_lone_update_ratio) < 0:
            raise ValueError(f"max_lone_update_ratio must be >= 0, got {max_lone_update_ratio}")
        self.max_lone_update_ratio = float(max_lone_update_ratio)
        self.resume_from = resume_from or ""
        self.final_section = final_section
        self._output_dir = check_output_name(output_dir)  # `output_dir` is the base class's method

        # run state
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
        try:
            self._run()
        finally:  # an aborted job still leaves its last checkpoint whole
            self.writes_done()

    def _run(self) -> None:
        self.sites = self._reachable()
        if not self.sites:
            self.panic("FedCross: no sites connected")
            return
        if self.schedule == "latin":  # whole blocks, or some models miss some sites (FLARE logs it and stops the job)
            try:
                check_latin_communications(self.num_communications, len(self.sites))
            except ValueError as e:
                raise ValueError(f"FedCross job refused at its start (sites {self.sites}): {e}") from None
        self.out = self.output_dir(self._output_dir)
        self.health.rejoin_after = len(self.sites) if self.rejoin_after is None else int(self.rejoin_after)
        start = self._start_state()
        if start is None:
            return
        k = len(self.members)
        self.validation_period = self.validate_every or max(1, math.ceil(len(self.sites) / k))
        self.info(
            f"FedCross: {k} model(s) over sites {self.sites}, schedule {self.schedule!r} (seed {self.seed}), "
            f"communications {start}..{self.num_communications - 1}, visit budget "
            + (
                f"{self.visit_steps} steps"
                if self.visit_steps
                else f"{self.visit_epochs} epochs"
                if self.visit_epochs
                else "the sites' engine default"
            )
            + f", lr {self.lr_plan.kind} from {self.lr_plan.base_lr:g}; validation every {self.validation_period} "
            f"communication(s) and after the last; output {self.out}"
        )
        for c in range(start, self.num_communications):
            if self.abort_signal.triggered:
                return
            changes = self._begin_communication(c)
            active = self.active_sites()
            if len(active) < max(self.min_clients, 1):
                self.error(
                    f"FedCross: only {active} left (min_clients {self.min_clients}); stopping training at communication {c}"
                )
                break
            began = time.perf_counter()
            entry = self._train_communication(c, active)
            if self.abort_signal.triggered:
                return
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
        self.writes_done()
        self._final_test()

    def _validates(self, c: int) -> bool:
        return (c + 1) % self.validation_period == 0 or c == self.num_communications - 1

    def _handover_seconds(self, previous: float | None) -> float | None:
        """Seconds from the last result the server had before sending this communication's visits (a visit's, or
        a validation's after a validated communication) to the first visit starting at its site (None for the
        first task of the job or without a report)."""
        if previous is None or not self.visit_started:
            return None
        return round(min(self.visit_started.values()) - previous, 4)

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
        path = Path(self.resume_from)
        try:
            path = self.resume_path(self.resume_from)  # inside this job or a directory the server operator allows
            members, optimizers, info = load_members(path)
        except Exception as e:
            self.panic(f"FedCross: cannot resume from {path}: {type(e).__name__}: {e}")
            return None
        if not all(self.accept(f"resume file {path}", w, model0, f"saved model {m}") for m, w in enumerate(members)):
            self.panic(f"FedCross: {path} does not match the job's network; not resuming")
            return None
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
        best_path = path.with_name("best.pt")
        if best_path.exists():
            b_members, b_optimizers, b_info = load_members(best_path)
            self.best = {
                "communication": b_info["communication"],
                "val_dice": float(b_info["val_dice"]),
                "members": b_members,
                "optimizers": b_optimizers,
                "visits_done": b_info.get("visits_done"),
            }
            save_members(self.out / "best.pt", b_members, b_optimizers, self._info(self.best["communication"], self.best))
        else:
            self.warning(f"FedCross: no best.pt next to {path}; best-set tracking starts afresh")
        self.info(
            f"FedCross: resuming from {path} (communication {start - 1} done) at communication {start} "
            f"with {len(members)} model(s); visits so far {self.visits_done}; sites {self.sites}, left out "
            f"{self.health.dropped_at or 'none'}, failures in a row {self.health.failures or 'none'}"
        )
        if start >= self.num_communications:
            self.warning(f"FedCross: {path} already has {start} communications (num_communications {self.num_communications})")
        return start

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
        pending = {s: m for m, s in enumerate(assignment) if s is not None}
        tried: set[str] = set(pending)
        failed_now: list[str] = []
        spent: dict[str, dict] = {}  # DP-SGD sites: the privacy loss each reports having spent so far
        self.visit_started = {}
        previous_result_at = self.last_result_at
        while pending:
            self.health.tasked(pending)
            results = self.run_tasks("cross_train", {s: self._visit_task(m, c) for s, m in pending.items()})
            for site, result in results.items():
                if reported := numeric_metrics(result.metrics, DP_METRICS.__contains__):
                    spent[site] = reported
                if isinstance(started := (result.meta or {}).get("started_at"), float) and math.isfinite(started):
                    self.visit_started.setdefault(site, started)  # a measurement only: never used to decide
            too_large, scales = self._screen_visits({s: m for s, m in pending.items() if s in results}, results)
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

    def _screen_visits(self, pending: dict[str, int], results: dict[str, FLModel]) -> tuple[set[str], dict[str, float]]:
        """(sites whose returned model moved far more than the other visits of this communication and the recent
        accepted visits (fedseg.algorithms.screen_magnitudes), {site: factor} bounding the others above clip_ratio x
        that median (fedseg.algorithms.clip_scales)); malformed results are left to _apply_visit."""
        norms = {}
        for site, m in pending.items():
            try:
                weights = unpack(results[site].params)["model"]
                check_update(site, weights, self.members[m])
                norms[site] = update_norm(weights, self.members[m])
            except Exception:  # noqa: BLE001 (any malformed result: rejected with its reason in _apply_visit)
                continue
        too_large = self.screen("model update", norms, self.recent_norms)
        if len(norms) == 1 and not self.recent_norms:  # no peer at all: against the model that was sent
            (site, norm), m = next(iter(norms.items())), pending[next(iter(norms))]
            sent = self.members[m]
            reason = screen_relative(
                norm, update_norm(sent, {k: np.zeros_like(v) for k, v in sent.items()}), self.max_lone_update_ratio
            )
            if reason:
                self.reject(site, f"model {m} update (no other visit to compare with)", reason)
                too_large.add(site)
        # a visit replaces its model whole (no average dilutes it): one above clip_ratio x the median of this
        # communication's and the recent visits moves the model no further than that
        scales = clip_scales({s: n for s, n in norms.items() if s not in too_large}, self.clip_ratio, self.recent_norms)
        return too_large, scales

    def _apply_visit(
        self, site: str, m: int, result: FLModel | None, too_large: bool = False, scale: float | None = None
    ) -> str | None:
        """Replace model m with the site's result if it is usable (bounded by `scale` when given); otherwise return
        why not."""
        if result is None:
            return "no result (error, timeout or disconnect)"
        meta = result.meta or {}
        planned = self.visit_steps or None
        try:
            index = read_int(site, meta, "model_index")
            if index != m:
                self.reject(site, f"model {m}", f"result is for model {index}, expected {m}")
                return f"REJECTED update from {site}: result is for model {index}, expected {m}"
            groups = unpack(result.params)
            weights, optim = groups.get("model", {}), groups.get("optim", {})
            check_update(site, weights, self.members[m])
            check_optimizer_state(site, optim, weights, self.optimizers[m], max_new_steps=planned)
            steps, _ = read_step_count(site, meta, planned)
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

    def _count_failures(self, sites: list[str], c: int, validation: bool = False) -> None:
        for site in sites:
            if self.health.failed(site, c, validation):
                self.warning(
                    f"FedCross: site {site} failed {self.health.failures[site]} time(s) in a row (max_site_failures "
                    f"{self.max_site_failures}); leaving it out for {self.health.rejoin_after} communication(s); "
                    f"remaining {self.active_sites()}"
                )
        sites.clear()

    # ---- scoring ------------------------------------------------------------------------------------------------
    def _score(self, members: list[dict], sites: list[str], section: str, c: int | None = None) -> dict[str, dict]:
        """cross_validate of the ensemble of `members` at `sites`: {site: metrics} of those that answered."""
        packed = pack({member_key(m): w for m, w in enumerate(members)})
        meta = {"section": section, "num_models": len(members), **({"communication": c} if c is not None else {})}
        task = {s: FLModel(params=packed, params_type=ParamsType.FULL, meta=meta) for s in sites}
        results = self.run_tasks("cross_validate", task, self.validate_timeout)
        self._adopt_site_engine({s: r.metrics for s, r in results.items() if isinstance(r.metrics, dict)})
        return {s: m for s, r in sorted(results.items()) if (m := self._valid_scores(s, r.metrics, len(members))) is not None}

    def _valid_scores(self, site: str, metrics, k: int) -> dict | None:
        """A site's cross_validate metrics reduced to validated fields (None, logged, when malformed)."""
        try:
            n_cases = read_int(site, metrics, "n_cases", 0, 100000)
            out = {"n_cases": n_cases, "section": str(metrics.get("section", ""))[:20]}
            if n_cases == 0:
                return out
            members = metrics.get("members")
            if not isinstance(members, list) or len(members) != k:
                raise UpdateRejected(site, f"metrics.members: not a list of {k} summaries")
            out["ensemble"] = read_summary(site, metrics, "ensemble")
            out["members"] = [read_summary(site, {"m": x}, "m") for x in members]
            u = metrics.get("uncertainty")
            if not isinstance(u, dict):
                raise UpdateRejected(site, "metrics.uncertainty: missing or not a dict")
            unc = {key: read_score(site, u, key, 0.0, math.inf) for key in ("std_sum_wrong", "std_sum_right")}
            unc.update({key: read_int(site, u, key, 0) for key in ("n_wrong", "n_right")})
            # NaN where no voxel of that kind; auroc: of the std for finding the ensemble's wrong voxels
            for key, high in (("mean_std_wrong", math.inf), ("mean_std_right", math.inf), ("auroc", 1.0)):
                value = u.get(key)
                unc[key] = (
                    float("nan") if isinstance(value, float) and math.isnan(value) else read_score(site, u, key, 0.0, high)
                )
            for key in ("mean_std_per_case", "mean_entropy_per_case"):
                values = u.get(key, [])
                if not isinstance(values, list) or len(values) > n_cases:
                    raise UpdateRejected(site, f"metrics.uncertainty.{key}: not a list of at most {n_cases} values")
                unc[key] = [read_score(site, {key: v}, key, 0.0, math.inf) for v in values]
            out["uncertainty"] = unc
            return out
        except UpdateRejected as e:
            self.reject(site, "scores", e.reason)
            return None

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
        # a site whose visit failed in this communication is not asked to validate in it (it may be down)
        targets = [s for s in self.active_sites() if not self.health.failed_now(s)]
        self.health.tasked(targets)
        scores = self._score(self.members, targets, "validation", c)
        ens_cases, member_cases = [], [[] for _ in self.members]
        per_site = {}
        for site, metrics in sorted(scores.items()):
            if not metrics.get("n_cases"):
                continue
            ens_cases += case_dice(metrics["ensemble"])
            for m, summary in enumerate(metrics["members"]):
                member_cases[m] += case_dice(summary)
            per_site[site] = {
                "ensemble": metrics["ensemble"]["dice"],
                "members": [s["dice"] for s in metrics["members"]],
                "n_cases": metrics["n_cases"],
            }
        val_dice = float(np.mean(ens_cases)) if ens_cases else float("nan")
        missing = sorted(set(targets) - set(scores))
        if missing:
            self._count_failures(list(missing), c, validation=True)
        if math.isfinite(val_dice) and (self.best is None or val_dice > self.best["val_dice"]):
            self.best = {
                "communication": c,
                "val_dice": val_dice,
                "members": list(self.members),
                "optimizers": list(self.optimizers),
                "visits_done": list(self.visits_done),
            }
            best, info = self.best, self._info(c, self.best)
            info["history"] = list(self.history)
            self.write_later(lambda: save_members(self.out / "best.pt", best["members"], best["optimizers"], info))
        return {
            "val_dice": val_dice,
            "val_member_dice": [float(np.mean(x)) if x else float("nan") for x in member_cases],
            "val_n_cases": len(ens_cases),
            "val_per_site": per_site,
            "val_missing_sites": missing,
        }

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

        def write() -> None:
            save_members(self.out / "last.pt", members, optimizers, info)
            self.write_json(self.out / HISTORY_FILE, history)

        self.write_later(write)
        if validated:  # model 0 also through the persistor, so FL_global_model.pt exists like in every FLARE job
            self.save_model(FLModel(params=self.members[0], params_type=ParamsType.FULL, current_round=c))

    def _final_test(self) -> None:
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
        models: dict[str, dict] = {"ensemble": {}}
        models.update({f"member {m}": {} for m in range(k)})
        sums = {"std_sum_wrong": 0.0, "n_wrong": 0, "std_sum_right": 0.0, "n_right": 0}
        per_site_uncertainty, per_site_auroc = {}, {}
        keep = ("dice", "dice_std", "n_cases", "dice_per_case", "hd95")  # hd95 only when the sites compute it
        for site, metrics in sorted(scores.items()):
            if not metrics.get("n_cases"):
                continue
            u = metrics["uncertainty"]
            # per-case and voxel-level uncertainty sit next to the per-case Dice of the ensemble
            models["ensemble"][site] = (
                {key: metrics["ensemble"][key] for key in keep if key in metrics["ensemble"]}
                | {
                    key: u[key]
                    for key in (
                        "mean_std_per_case",
                        "mean_entropy_per_case",
                        "mean_std_wrong",
                        "mean_std_right",
                        "n_wrong",
                        "n_right",
                    )
                }
                | {"uncertainty_auroc": u["auroc"], "section": metrics["section"]}
            )
            for m, summary in enumerate(metrics["members"]):
                models[f"member {m}"][site] = {key: summary[key] for key in keep if key in summary}
            for key in sums:
                sums[key] += u[key]
            per_site_uncertainty[site] = {"wrong": u["mean_std_wrong"], "right": u["mean_std_right"]}
            per_site_auroc[site] = u["auroc"]
        results = {
            "method": "fedcross" if k == 1 else "fedcrossens",
            "section": self.final_section,
            "models": models,
            "extra": {
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
                "uncertainty_mean_std_wrong": sums["std_sum_wrong"] / sums["n_wrong"] if sums["n_wrong"] else float("nan"),
                "uncertainty_mean_std_right": sums["std_sum_right"] / sums["n_right"] if sums["n_right"] else float("nan"),
                "uncertainty_per_site": per_site_uncertainty,  # mean std over wrong / right voxels
                # voxel-level AUROC of the ensemble's std for finding its wrong voxels (0.5: no better than chance;
                # a single model has no spread: 0.5); the mean is over the sites where both kinds of voxel exist
                "uncertainty_auroc_per_site": per_site_auroc,
                "uncertainty_auroc_mean": _finite_mean(per_site_auroc.values()),
                "model_set": str(self.out / "best.pt"),
                "checkpoint_write_seconds": round(self.write_seconds, 3),  # on the writer thread, off the relay's path
                "history": self.history,
            },
        }
        missing = sorted(set(self.sites) - set(models["ensemble"]))
        if missing:
            self.warning(f"FedCross: no final scores from {missing}")
        self.write_json(Path(self.get_app_dir()) / RESULTS_FILE, results)
        self.info("\n" + format_table(results))
