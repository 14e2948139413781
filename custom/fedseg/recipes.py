"""FedSeg's methods as NVFlare 2.9 Recipes: one typed object per job, run with SimEnv, PocEnv or ProdEnv.

    from fedseg.recipes import FedSMRecipe
    from nvflare.recipe import SimEnv

    recipe = FedSMRecipe(num_rounds=10, min_clients=3, engine={"local_epochs": 2})
    run = recipe.execute(SimEnv(num_clients=3, num_threads=3))   # the sites read $FEDSEG_DATA/<site>/datalist.json

Every recipe is a FedJob of FedSeg's own components (the site executor of its method, the method's controller,
the seeded persistor, experiment tracking), checked when it is built: a bad setting fails here with the argument
named, not at the sites. The jobs in jobs/ are these recipes exported (`python -m fedseg.jobgen --out jobs`).

Code: the recipes carry no code (FedJob.set_app_packages(["fedseg"])): the fedseg package is installed at the
server and every site, and their class allow-list names FedSeg's classes exactly (fedseg.fl.allowlist), so a
real site needs no BYOC right. For SimEnv the recipe writes that allow-list into the simulation workspace it
creates (<workspace_root>/<name>/local/resources.json), as a site administrator would for a real site.
"""

from __future__ import annotations

import os
from typing import Any

from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import ExecEnv, Recipe

from fedseg.algorithms.schedules import check_latin_communications, plan_latin
from fedseg.engine.config import DEFAULT_ENGINE, EngineConfig, resolve_engine
from fedseg.fl.executor import DEFAULT_DATALIST, FedCrossExecutor, FedSMExecutor, SegExecutor
from fedseg.fl.persistor import SegModelPersistor

# FedBNRecipe's network norm unless the engine names one: instance norm with a learned weight and bias per channel
# (the default "instance" has no normalization parameters, and FedBN keeps exactly those at the sites)
FEDBN_NORM = "instance_affine"

# How long a site waits before asking the server for its next task. FLARE's default (2 s) added ~2 s of idle
# time per round per site in the benchmark's FL-overhead measurement, and it is the hand-over latency of a
# FedCross relay (the next site is idle, polling); 0.2 s keeps that latency at ~0.1 s on average for a poll of a
# few hundred bytes five times a second per site.
TASK_REQUEST_INTERVAL = 0.2
TRACKING = ("tensorboard", "mlflow", None)
AGGREGATIONS = ("mean", "median", "trimmed_mean")
SCHEDULES = ("cyclic", "latin", "random", "explicit")
LR_SCHEDULES = ("constant", "poly", "cosine")
DEFAULT_ROUNDS = 10
DEFAULT_SITES = 4  # the built-in data's sites: the FedCross defaults are planned for them
METER_TASKS = ("train", "validate", "submit_model", "fedsm_train", "fedsm_evaluate", "cross_train", "cross_validate")

# FedCross defaults match the FedAvg jobs' budget (10 rounds x 2 local epochs = 20 epochs at every site) at
# DEFAULT_SITES sites. FedCross (K = 1, one site trains per communication): 20 communications x 4-epoch visits
# (cyclic: 5 per site). FedCrossEns (K = N, "latin"): every site trains one model per communication, and a Latin
# schedule needs whole blocks of N communications, so the 20 epochs per site are split by plan_latin:
# 20 communications x 1-epoch visits (2-epoch visits would give 10 communications, not a multiple of 4).
_ENS_COMMUNICATIONS, _ENS_VISIT_EPOCHS = plan_latin(
    DEFAULT_ROUNDS * DEFAULT_ENGINE["local_epochs"], DEFAULT_SITES, DEFAULT_ENGINE["local_epochs"]
)
FEDCROSS_DEFAULTS = {
    "fedcross": {"num_models": 1, "schedule": "cyclic", "communications": 20, "visit_epochs": 4},
    "fedcrossens": {
        "num_models": 0,
        "schedule": "latin",
        "communications": _ENS_COMMUNICATIONS,
        "visit_epochs": _ENS_VISIT_EPOCHS,
    },
}


class RecipeError(ValueError):
    """A recipe argument that cannot make a job (the message names the recipe and the argument)."""


def _int(recipe: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{recipe}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(recipe: str, name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RecipeError(f"{recipe}: {name} must be a number {bounds}, got {value!r}")
    return float(value)


def _choice(recipe: str, name: str, value, choices) -> Any:
    if value not in choices:
        raise RecipeError(f"{recipe}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def _engine(recipe: str, engine: dict | None) -> dict:
    if engine is not None and not isinstance(engine, dict):
        raise RecipeError(f"{recipe}: engine must be a dict of engine settings, got {type(engine).__name__}")
    try:
        return resolve_engine(engine or {})
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{recipe}: engine: {e}") from None


def tracking_receiver(tracking: str | None):
    """The server's experiment-tracking receiver: TensorBoard (tb_events/ in the server's job dir), MLflow (a
    local store in the server's job dir, no MLflow server) or none. Both receive the sites' training curves
    (forwarded "fed.analytix_log_stats") and the server's own per-round metrics ("analytix_log_stats")."""
    if tracking == "tensorboard":
        from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

        return TBAnalyticsReceiver()
    if tracking == "mlflow":
        from fedseg.fl.tracking import MLflowServerReceiver

        return MLflowServerReceiver()
    return None


class FedSegRecipe(Recipe):
    """The FedJob every FedSeg recipe shares: one app for the server and all sites (deploy_map @ALL, so any site
    names work), the seeded SegModelPersistor built from the engine's network, the method's workflow(s), the
    method's site executor on every task, experiment tracking and, optionally, the TaskMeter at the sites."""

    def __init__(
        self,
        *,
        name: str,
        min_clients: int,
        engine: dict,
        workflows: list,
        executor: SegExecutor,
        tracking: str | None,
        meter: bool,
        cross_site_eval: bool = False,
    ):
        recipe = type(self).__name__
        _int(recipe, "min_clients", min_clients, 1)
        _choice(recipe, "tracking", tracking, TRACKING)
        self.engine = engine
        self.min_clients = min_clients
        self.tracking = tracking
        job = FedJob(name=name, min_clients=min_clients)
        job.set_app_packages(["fedseg"])  # installed at every site: the job carries no code (no BYOC)
        network = EngineConfig.from_dict(engine).network_args()
        job.to_server(SegModelPersistor(network=network), id="persistor")
        receiver = tracking_receiver(tracking)
        if receiver is not None:
            job.to_server(receiver, id="tb_receiver" if tracking == "tensorboard" else f"{tracking}_receiver")
        if cross_site_eval:
            job.to_server(PTFileModelLocator(pt_persistor_id="persistor"), id="model_locator")
            job.to_server(ValidationJsonGenerator(), id="json_generator")
        for workflow_id, workflow in workflows:
            job.to_server(workflow, id=workflow_id)
        if cross_site_eval:
            job.to_server(
                CrossSiteModelEval(model_locator_id="model_locator", submit_model_timeout=600, validation_timeout=3600),
                id="cross_site_eval",
            )
        job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
        job.to_clients(executor, tasks=["*"])
        if tracking is not None:
            job.to_clients(TBWriter(), id="tb_writer")  # the sites' curves, sent to the server's receiver
            job.to_clients(
                ConvertToFedEvent(events_to_convert=["analytix_log_stats"], fed_event_prefix="fed."), id="event_to_fed"
            )
        super().__init__(job)
        if meter:
            from fedseg.fl.meter import TaskMeter

            self.add_client_input_filter(TaskMeter(direction="in"), tasks=list(METER_TASKS))
            self.add_client_output_filter(TaskMeter(direction="out"), tasks=list(METER_TASKS))

    def process_env(self, env: ExecEnv):
        """SimEnv: write FedSeg's exact-class allow-list into the simulation workspace this run creates (its
        local/resources.json, which the simulator copies to every simulated site), as a site administrator does
        at a real site with `python -m fedseg.fl.allowlist`. PocEnv / ProdEnv sites keep their own policy."""
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):
            from fedseg.fl.allowlist import allow_fedseg

            allow_fedseg(os.path.join(env.workspace_root, self.name, "local", "resources.json"))


def _site_executor(cls, recipe: str, engine: dict, datalist: str, tracking: str | None, hd95: bool):
    if not isinstance(datalist, str) or not datalist:
        raise RecipeError(f"{recipe}: datalist must be a path template such as {DEFAULT_DATALIST!r}, got {datalist!r}")
    executor = cls(datalist=datalist, engine=engine, tb_writer_id="tb_writer" if tracking else "", hd95=hd95)
    executor._always_serialize_args = ("datalist", "engine")  # a job states where its data is and what it trains
    return executor


class FedAvgRecipe(FedSegRecipe):
    KEEP_LOCAL = "none"  # what the sites keep of their own (FedAvgController keep_local; FedBNRecipe: "norm")
    RESULTS_DIR = "fedavg"  # the controller's results_dir, its folder under the server's app dir

    def __init__(
        self,
        *,
        name: str = "fedavg",
        num_rounds: int = DEFAULT_ROUNDS,
        min_clients: int = 2,
        engine: dict | None = None,
        datalist: str = DEFAULT_DATALIST,
        fedprox_mu: float = 0.0,
        aggregation: str = "mean",
        max_local_steps: int = 0,
        task_timeout: int = 3600,
        cross_site_eval: bool = True,
        tracking: str | None = "tensorboard",
        meter: bool = False,
        hd95: bool = False,
    ):
        """FedAvg (FedProx when fedprox_mu > 0) on FedSeg's site executor and FedAvgController.

        Args:
            num_rounds: FL rounds. min_clients: sites needed to start the job and to update the global model.
            engine: engine settings merged over fedseg.engine.config.DEFAULT_ENGINE (network, roi_size,
                batch_size, lr, local_epochs, ...). datalist: where a site's datalist is ("{SITE_NAME}",
                $FEDSEG_DATA expanded; the site's own FEDSEG_DATALIST / local/fedseg_site.json come first).
            fedprox_mu: FedProx's proximal weight (0: FedAvg). aggregation: "mean" (weighted by steps), "median"
                or "trimmed_mean". max_local_steps: most steps a site trains per round (0: no plan).
            task_timeout: seconds per site task (0: no limit). cross_site_eval: FLARE's cross-site evaluation
                after training. tracking: "tensorboard", "mlflow" or None. meter: the sites' TaskMeter (bytes,
                time, memory per task). hd95: also report HD95 in evaluations (slower).
        """
        from fedseg.fl.fedavg_controller import FedAvgController

        recipe = type(self).__name__
        engine = _engine(recipe, engine)
        controller = FedAvgController(
            num_rounds=_int(recipe, "num_rounds", num_rounds, 1),
            fedprox_mu=_number(recipe, "fedprox_mu", fedprox_mu, 0.0),
            aggregation=_choice(recipe, "aggregation", aggregation, AGGREGATIONS),
            min_clients=_int(recipe, "min_clients", min_clients, 1),
            task_timeout=_int(recipe, "task_timeout", task_timeout, 0),
            max_local_steps=_int(recipe, "max_local_steps", max_local_steps, 0),
            keep_local=self.KEEP_LOCAL,
            results_dir=self.RESULTS_DIR,
        )
        controller._always_serialize_args = (
            "num_rounds",
            "fedprox_mu",
            "aggregation",
            "min_clients",
            "task_timeout",
            "max_local_steps",
        ) + (("keep_local", "results_dir") if self.KEEP_LOCAL != "none" else ())
        executor = _site_executor(SegExecutor, recipe, engine, datalist, tracking, hd95)
        super().__init__(
            name=name,
            min_clients=min_clients,
            engine=engine,
            workflows=[(self.RESULTS_DIR, controller)],
            executor=executor,
            tracking=tracking,
            meter=meter,
            cross_site_eval=cross_site_eval,
        )


class FedProxRecipe(FedAvgRecipe):
    def __init__(self, *, name: str = "fedprox", fedprox_mu: float = 0.01, **kwargs):
        """FedAvgRecipe with FedProx's proximal term (fedprox_mu > 0)."""
        if isinstance(fedprox_mu, (int, float)) and not isinstance(fedprox_mu, bool) and fedprox_mu <= 0:
            raise RecipeError(f"FedProxRecipe: fedprox_mu must be > 0 (0 is FedAvgRecipe), got {fedprox_mu!r}")
        super().__init__(name=name, fedprox_mu=fedprox_mu, **kwargs)


class FedBNRecipe(FedAvgRecipe):
    KEEP_LOCAL = "norm"
    RESULTS_DIR = "fedbn"

    def __init__(self, *, name: str = "fedbn", engine: dict | None = None, **kwargs):
        """FedBN (Li et al., ICLR 2021): FedAvg in which every normalization layer's parameters and running
        statistics stay at the sites; each site trains and is scored with its own. The global model's normalization
        entries (what an unseen site gets) are the step-weighted mean of the sites'.

        Args:
            engine: as FedAvgRecipe, but the network's norm defaults to "instance_affine" (FEDBN_NORM). A network
                with no normalization parameters (e.g. norm "instance") is refused. Compare with FedAvg on the
                same network: FedAvgRecipe(engine={"network": {"norm": "instance_affine"}}).
            The others as FedAvgRecipe (fedprox_mu > 0 gives FedBN with FedProx's proximal term).
        """
        recipe = type(self).__name__
        engine = fedbn_engine(recipe, engine)
        super().__init__(name=name, engine=engine, **kwargs)


def fedbn_engine(recipe: str, engine: dict | None) -> dict:
    """The engine settings of a FedBN job: FEDBN_NORM unless the network names a norm; refused (RecipeError) when
    the network then has no normalization parameters."""
    from fedseg.engine.networks import network_norm_keys

    if engine is None or isinstance(engine, dict):  # anything else: _engine names the error
        engine = dict(engine or {})
        network = engine.get("network", {})
        if isinstance(network, dict):
            engine["network"] = {"norm": FEDBN_NORM, **network}
    resolved = _engine(recipe, engine)
    if not network_norm_keys(EngineConfig.from_dict(resolved).network_args()):
        raise RecipeError(
            f"{recipe}: engine: network norm {resolved['network'].get('norm')!r} gives the network no normalization "
            "parameters, so FedBN would be FedAvg; use 'instance_affine' or 'batch'"
        )
    return engine


class FedSMRecipe(FedSegRecipe):
    def __init__(
        self,
        *,
        name: str | None = None,
        num_rounds: int = DEFAULT_ROUNDS,
        min_clients: int = 2,
        engine: dict | None = None,
        datalist: str = DEFAULT_DATALIST,
        lam: float = 0.7,
        gamma: float = 0.9,
        gamma_policy: str = "validation",
        softpull_only: bool = False,
        selector: dict | None = None,
        final_model: str = "best",
        task_timeout: int = 3600,
        tracking: str | None = "tensorboard",
        meter: bool = False,
        hd95: bool = False,
    ):
        """FedSM (global, personalized and selector models; the super model routes each case) or, with
        softpull_only, SoftPull personalization alone (no selector).

        Args:
            lam: SoftPull weight of a site's own model, in [0, 1]. gamma: selector confidence above which the super
                model uses a personalized model, in [0, 1]. gamma_policy: "validation" (the final super model's gamma
                is chosen from the sweep on the sites' validation cases and reported) or "fixed" (gamma as given, the
                paper's 0.9). selector: selector settings over
                fedseg.methods.fedsm.DEFAULT_SELECTOR. final_model: "best" or "last" set for the final test scores.
            The others as FedAvgRecipe; min_clients sites start the job, a round needs one valid answer.
        """
        from fedseg.algorithms.routing import GAMMA_POLICIES
        from fedseg.fl.fedsm_controller import FedSMController
        from fedseg.methods.fedsm import DEFAULT_SELECTOR

        recipe = type(self).__name__
        engine = _engine(recipe, engine)
        if not isinstance(softpull_only, bool):
            raise RecipeError(f"{recipe}: softpull_only must be true or false, got {softpull_only!r}")
        if selector is not None and (softpull_only or not isinstance(selector, dict)):
            raise RecipeError(f"{recipe}: selector must be a dict of selector settings, and only without softpull_only")
        unknown = sorted(set(selector or {}) - set(DEFAULT_SELECTOR))
        if unknown:
            raise RecipeError(f"{recipe}: unknown selector setting(s) {unknown}; known: {sorted(DEFAULT_SELECTOR)}")
        task_timeout = _int(recipe, "task_timeout", task_timeout, 0)
        controller = FedSMController(
            num_rounds=_int(recipe, "num_rounds", num_rounds, 1),
            lam=_number(recipe, "lam", lam, 0.0, 1.0),
            gamma=_number(recipe, "gamma", gamma, 0.0, 1.0),
            gamma_policy=_choice(recipe, "gamma_policy", gamma_policy, GAMMA_POLICIES),
            use_selector=not softpull_only,
            selector=None if softpull_only else {**DEFAULT_SELECTOR, **(selector or {})},
            min_clients=1,
            task_timeout=task_timeout,
            eval_timeout=task_timeout,
            engine_config=engine,
            final_model=_choice(recipe, "final_model", final_model, ("best", "last")),
        )
        controller._always_serialize_args = (
            "num_rounds",
            "lam",
            "gamma",
            "gamma_policy",
            "use_selector",
            "min_clients",
            "task_timeout",
            "eval_timeout",
            "engine_config",
            "final_model",
        )
        executor = _site_executor(FedSMExecutor, recipe, engine, datalist, tracking, hd95)
        super().__init__(
            name=name or ("softpull" if softpull_only else "fedsm"),
            min_clients=min_clients,
            engine=engine,
            workflows=[("fedsm", controller)],
            executor=executor,
            tracking=tracking,
            meter=meter,
        )


class FedCrossRecipe(FedSegRecipe):
    def __init__(
        self,
        *,
        name: str | None = None,
        num_models: int = 1,
        sites: int | None = None,
        num_communications: int | None = None,
        schedule: str | None = None,
        visit_epochs: int | None = None,
        visit_steps: int = 0,
        lr_schedule: str = "constant",
        validate_every: int = 0,
        seed: int = 0,
        min_clients: int = 2,
        engine: dict | None = None,
        datalist: str = DEFAULT_DATALIST,
        task_timeout: int = 3600,
        tracking: str | None = "tensorboard",
        meter: bool = False,
        hd95: bool = False,
    ):
        """FedCross (num_models=1: one travelling model, one site trains per communication) or FedCrossEns
        (num_models = the number of sites, or 0 for "one per site connected at the start": every site trains one
        model per communication, and the ensemble of the models is the result).

        Args:
            sites: the number of sites the job is planned for: a "latin" schedule's num_communications must be a
                multiple of it (checked here; the server checks again against the sites connected at the start).
            num_communications / schedule / visit_epochs: default to FEDCROSS_DEFAULTS of FedCross or FedCrossEns
                (cyclic 20 x 4 epochs; latin 20 x 1 epoch). schedule: "cyclic", "latin", "random" or "explicit".
            visit_steps: steps per visit (wins over visit_epochs when > 0). lr_schedule: "constant", "poly" or
                "cosine" over each model's visits. seed: seeds the schedule and the models' initialisation.
            validate_every: score the ensemble every this many communications and after the last (0: every
                ceil(sites / models), as often per training step as FedAvg validates).
            The others as FedAvgRecipe.
        """
        from fedseg.fl.fedcross_controller import FedCrossController

        recipe = type(self).__name__
        engine = _engine(recipe, engine)
        num_models = _int(recipe, "num_models", num_models, 0)
        if sites is not None:
            _int(recipe, "sites", sites, 1)
            if num_models > sites:
                raise RecipeError(f"{recipe}: num_models {num_models} is more than the {sites} sites")
        ensemble = num_models == 0 or (num_models > 1 and num_models == sites)
        if num_models > 1 and not ensemble:
            raise RecipeError(
                f"{recipe}: num_models must be 1 (FedCross), 0 or the number of sites (FedCrossEns); got "
                f"{num_models}" + ("" if sites else " without sites")
            )
        defaults = FEDCROSS_DEFAULTS["fedcrossens" if ensemble else "fedcross"]
        communications = defaults["communications"] if num_communications is None else num_communications
        communications = _int(recipe, "num_communications", communications, 1)
        schedule = _choice(recipe, "schedule", defaults["schedule"] if schedule is None else schedule, SCHEDULES)
        if schedule == "latin" and sites is not None:
            try:
                check_latin_communications(communications, sites)
            except ValueError as e:
                raise RecipeError(f"{recipe}: {e}") from None
        visit_epochs = _int(recipe, "visit_epochs", defaults["visit_epochs"] if visit_epochs is None else visit_epochs, 0)
        task_timeout = _int(recipe, "task_timeout", task_timeout, 0)
        controller = FedCrossController(
            num_models=num_models,
            num_communications=communications,
            schedule=schedule,
            seed=_int(recipe, "seed", seed, 0),
            visit_epochs=visit_epochs,
            visit_steps=_int(recipe, "visit_steps", visit_steps, 0),
            lr_schedule=_choice(recipe, "lr_schedule", lr_schedule, LR_SCHEDULES),
            task_timeout=task_timeout,
            validate_timeout=task_timeout,
            validate_every=_int(recipe, "validate_every", validate_every, 0),
            startup_grace=300,
            max_site_failures=3,
            retry_on_free_site=True,
            optimizer_state="fresh",
            min_clients=1,
            engine_config=engine,
        )
        controller._always_serialize_args = (
            "num_models",
            "num_communications",
            "schedule",
            "seed",
            "visit_epochs",
            "visit_steps",
            "lr_schedule",
            "task_timeout",
            "validate_timeout",
            "validate_every",
            "startup_grace",
            "max_site_failures",
            "retry_on_free_site",
            "optimizer_state",
            "min_clients",
            "engine_config",
        )
        executor = _site_executor(FedCrossExecutor, recipe, engine, datalist, tracking, hd95)
        super().__init__(
            name=name or ("fedcrossens" if ensemble else "fedcross"),
            min_clients=min_clients,
            engine=engine,
            workflows=[("fedcross", controller)],
            executor=executor,
            tracking=tracking,
            meter=meter,
        )


RECIPES = {
    "fedavg": FedAvgRecipe,
    "fedprox": FedProxRecipe,
    "fedbn": FedBNRecipe,
    "fedsm": FedSMRecipe,
    "fedcross": FedCrossRecipe,
}
