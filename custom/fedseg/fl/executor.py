"""The FedSeg site executors: thin FLARE glue around the MONAI engine, one class per method.

SegExecutor (FedAvg / FedProx jobs) sets up the site's engine and serves the tasks every method shares:
  train            FedAvg / FedProx local training (FedProx when the server sends fedprox_mu in meta; FedBN when it
                   sends keep_local "norm": the site trains and evaluates with its own normalization layers)
  validate         score the received model on a datalist section (testing by default: cross-site evaluation)
  submit_model     return this site's last locally trained model (cross-site evaluation)
FedSMExecutor (FedSM / SoftPull jobs) adds
  fedsm_train      train global, personalized and selector models (fedseg.methods.fedsm)
  fedsm_evaluate   score global / personalized / super model and the selector
FedCrossExecutor (FedCross / FedCrossEns jobs) adds
  cross_train      train one travelling model with its optimizer state (fedseg.methods.fedcross)
  cross_validate   score K models and their ensemble

A class lists its tasks in TASKS (task name -> method name); `handlers` maps every task of the class and its
bases to its bound method, so a subclass (e.g. a test's fault injector) can wrap them in one place.
Every constructor argument is kept under its own name (NVFlare's FedJob export writes the attributes back as
the job's arguments); the site's runtime engine is `seg_engine`.

The site finds its data by its own name (see fedseg.data.resolve_site_datalist) and validates every file
before any training; a bad dataset stops the job with a message naming the site, the file and the problem.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.apis.utils.fl_context_utils import add_job_audit_event, generate_log_message
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.security.logging import secure_format_traceback

from fedseg.algorithms.lr_schedule import LrSchedule
from fedseg.algorithms.packing import pack, unpack
from fedseg.data import DataValidationError, load_datalist, resolve_site_datalist, validate_site_data
from fedseg.engine import (
    EngineConfig,
    SegEngine,
    load_numpy_state,
    load_optimizer_state,
    optimizer_state_to_numpy,
    state_to_numpy,
)
from fedseg.engine.config import LOCAL_OPTIMIZER
from fedseg.engine.dp import PrivacyBudgetExceeded
from fedseg.engine.networks import norm_state_keys
from fedseg.fl.case_names import CaseRedactor, case_names_allowed
from fedseg.fl.privacy import check_scorable_section
from fedseg.fl.site_limits import (
    DEFAULT_LIMITS,
    TaskRefused,
    check_site_dp,
    check_task_limits,
    read_site_limits,
    read_site_max_epsilon,
    read_site_requires_dp,
)
from fedseg.methods.fedcross import cross_visit, score_ensemble
from fedseg.methods.fedsm import SelectorSettings, fedsm_local_round, new_selector, score_super_model
from fedseg.modelset import load_model_set, member_key, save_model_set

DEFAULT_DATALIST = "$FEDSEG_DATA/{SITE_NAME}/datalist.json"
# metrics a DP-SGD site keeps to itself: training losses are means over its training cases, computed without noise
DP_WITHHELD_SUFFIX = "_loss"
PERSONAL_PREFIX = "personal:"  # FedSM: "personal:<site>" groups of the model set sent to fedsm_evaluate
KEEP_LOCAL = ("none", "norm")  # what a site keeps of its own across rounds (task meta "keep_local"; "norm": FedBN)
FEDBN_DIR = "fedbn"  # in the job's app dir at the site: its own normalization, and its personalized models
LOCAL_NORM_FILE = "local_norm.pt"
SERVER_MODEL_PREFIX = "SRV_"  # FLARE's cross-site evaluation names the server's models SRV_<file>


def with_own(params: dict, own: dict) -> dict:
    """The received model with the site's own entries (FedBN: its normalization) in place of the received ones."""
    unknown = sorted(set(own) - set(params))
    if unknown:
        raise KeyError(f"own entries {unknown[:3]} are not in the received model")
    return {k: own.get(k, v) for k, v in params.items()}


def planned_number(meta: dict, key: str, kind: type, low: float):
    """A budget value the server sent (None when absent); anything but a finite number >= low is an error."""
    value = meta.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
        or (kind is int and float(value) != int(value))
    ):
        raise ValueError(f"task meta {key!r} must be a {kind.__name__} >= {low}, got {value!r}")
    return kind(value)


class SegExecutor(Executor):
    TASKS = {"train": "train", "validate": "validate", "submit_model": "submit_model"}

    def __init__(
        self,
        datalist: str = DEFAULT_DATALIST,
        engine: dict | None = None,
        validate_before_train: bool = True,
        eval_section: str = "testing",
        tb_writer_id: str = "tb_writer",
        method_args: dict | None = None,
        hd95: bool = False,
    ):
        """
        Args:
            datalist: where this site's datalist JSON is, as the job states it. Used only where the site allows it
                (FEDSEG_ALLOW_JOB_DATALIST=1 or "allow_job_datalist" in local/fedseg_site.json) and only inside the
                site's data root; "{SITE_NAME}" and $FEDSEG_DATA are expanded. The site's own FEDSEG_DATALIST and
                local/fedseg_site.json come first (fedseg.data.resolve_site_datalist).
            engine: EngineConfig settings (network, roi_size, batch_size, lr, local_epochs, ...).
            validate_before_train: score the received global model on the validation cases before training;
                FLARE's IntimeModelSelector uses that score ("val_dice") to keep the best global model.
            eval_section: datalist section scored by the "validate" task (cross-site evaluation).
            tb_writer_id: id of an NVFlare TBWriter component; training curves go through it to the server.
            method_args: settings of the FedSM / FedCross site routines (e.g. selector settings).
            hd95: also report the 95% Hausdorff distance (voxels) in evaluations (slower).
        """
        super().__init__()
        self.datalist = datalist
        self.engine = engine  # the settings as given; self.cfg is the checked EngineConfig
        self.cfg = EngineConfig.from_dict(engine)
        self.validate_before_train = validate_before_train
        self.eval_section = eval_section
        self.tb_writer_id = tb_writer_id
        self.method_args = method_args
        self.hd95 = bool(hd95)
        self.site = "?"
        self.seg_engine: SegEngine | None = None
        self.setup_error: str | None = None
        self.tb_writer = None
        self.local_params: dict | None = None  # last locally trained weights, for submit_model
        self.state: dict = {}  # per-method site state kept across rounds (e.g. FedSM's selector optimizer)
        self.app_dir: Path | None = None  # the job's app dir at this site (FedBN keeps its normalization there)
        self._norm_keys: list[str] | None = None
        self._dp_selector_warned = False
        self.handlers: dict[str, Callable] = {}
        for cls in reversed(type(self).__mro__):
            for task, method in vars(cls).get("TASKS", {}).items():
                self.handlers[task] = getattr(self, method)

    # ---- set-up ------------------------------------------------------------------------------------
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._setup(fl_ctx)

    def _setup(self, fl_ctx: FLContext) -> None:
        self.site = fl_ctx.get_identity_name()
        self.tb_writer = fl_ctx.get_engine().get_component(self.tb_writer_id) if self.tb_writer_id else None
        workspace = fl_ctx.get_engine().get_workspace()
        self.app_dir = Path(workspace.get_app_dir(fl_ctx.get_job_id()))
        try:
            # what the server may ask of this site (its own local/fedseg_site.json "limits")
            self.limits = read_site_limits(workspace.get_root_dir(), self.site)
            # a site that requires DP-SGD refuses a job without it (its own local/fedseg_site.json "require_dp"), and
            # a site's privacy budget per job ("max_epsilon") requires it too
            max_epsilon = read_site_max_epsilon(workspace.get_root_dir(), self.site)
            check_site_dp(self.site, read_site_requires_dp(workspace.get_root_dir(), self.site), self.cfg.dp, max_epsilon)
            path = resolve_site_datalist(self.site, self.datalist, workspace.get_root_dir())
            # from here on the log names cases by their datalist index (unless the privacy scope allows names)
            self.redact = CaseRedactor(path, case_names_allowed(fl_ctx))
            summary = validate_site_data(path, self.site, num_classes=self.cfg.num_classes)
            self._check_summary(summary, path)
            self.seg_engine = SegEngine(self.cfg, load_datalist(path, self.site), site=self.site)
            if self.seg_engine.dp is not None:
                self.seg_engine.dp.max_epsilon = max_epsilon
        except DataValidationError as e:
            self.setup_error = f"DATA ERROR {e}"
        except TaskRefused as e:  # the site's own rules refuse the whole job (e.g. "require_dp")
            self.setup_error = f"REFUSED the job at site {self.site}: {e}"
            self.audit(fl_ctx, self.setup_error)
        except Exception as e:  # an unexpected failure must still name the site
            self.setup_error = f"DATA ERROR [site {self.site}] cannot set up the engine: {type(e).__name__}: {e}"
        if self.setup_error:
            # Every task of this site now fails with this message: the workflows carry on without the site while
            # min_clients valid sites remain. (A client-side panic would leave the server waiting.)
            self.log_error(fl_ctx, self.setup_error)
            return
        self.log_info(
            fl_ctx,
            f"site {self.site}: datalist {path} OK: {summary.get('counts')}; device {self.seg_engine.device}; "
            f"{self.seg_engine.steps_per_epoch()} steps/epoch"
            + (f"; DP-SGD on ({self.seg_engine.dp.describe()})" if self.cfg.dp is not None else "")
            + (f"; privacy budget max_epsilon {max_epsilon:g}" if max_epsilon is not None else ""),
        )
        for warning in summary.get("warnings", []):
            self.log_warning(fl_ctx, f"DATA WARNING [site {self.site}] {warning}")

    def _check_summary(self, summary: dict, path: str) -> None:
        """The site's data must match what the job's network expects."""
        for key in ("spatial_dims", "in_channels"):
            found = summary.get(key)
            wanted = getattr(self.cfg, key)
            if found is not None and int(found) != int(wanted):
                raise DataValidationError(self.site, path, f"{key} is {found} but the job's network expects {wanted}")

    # ---- dispatch ------------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.seg_engine is None:
            self.log_error(fl_ctx, f"task {task_name} refused: {self.setup_error or 'DATA ERROR engine not set up'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        handler = self.handlers.get(task_name)
        if handler is None:
            self.log_error(fl_ctx, f"unknown task {task_name!r}; this executor handles {sorted(self.handlers)}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            model = FLModelUtils.from_shareable(shareable)
            self.check_limits(task_name, model.meta or {})
            owner = shareable.get_header(AppConstants.MODEL_OWNER)
            if owner:  # cross-site evaluation: whose model this is (the server's or a site's)
                model.meta = {**(model.meta or {}), "model_owner": str(owner)}
            start = time.perf_counter()
            result = handler(model, fl_ctx, abort_signal)
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            self.log_info(fl_ctx, f"task {task_name} done in {time.perf_counter() - start:.1f}s")
            return FLModelUtils.to_shareable(result)
        except (TaskRefused, PrivacyBudgetExceeded) as e:  # the site's own rules: said plainly, and audited
            self.refuse(fl_ctx, task_name, e)
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        except Exception as e:
            self.log_exception(fl_ctx, f"[site {self.site}] task {task_name} failed: {type(e).__name__}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def refuse(self, fl_ctx: FLContext, task_name: str, reason: Exception) -> None:
        """A task this site's own configuration refuses (caps, privacy budget): one log line and an audit event."""
        msg = self._redact(f"REFUSED task {task_name} at site {self.site}: {reason}")
        self.log_error(fl_ctx, msg)
        self.audit(fl_ctx, msg)

    def audit(self, fl_ctx: FLContext, msg: str) -> None:
        """An NVFlare audit event of the job at this site (its audit.log in a deployment)."""
        try:
            add_job_audit_event(fl_ctx, ref=f"fedseg:refused:{self.site}", msg=self._redact(msg))
        except Exception as e:  # noqa: BLE001 (an audit failure must not hide the refusal; it is said)
            self.log_error(fl_ctx, f"audit event failed: {type(e).__name__}: {e}")

    # ---- logging: cases by index, not by file name (fedseg.fl.case_names) ------------------------------
    def _redact(self, msg) -> str:
        return (getattr(self, "redact", None) or CaseRedactor())(msg)

    def log_info(self, fl_ctx: FLContext, msg: str, fire_event=False):
        super().log_info(fl_ctx, self._redact(msg), fire_event)

    def log_warning(self, fl_ctx: FLContext, msg: str, fire_event=True):
        super().log_warning(fl_ctx, self._redact(msg), fire_event)

    def log_error(self, fl_ctx: FLContext, msg: str, fire_event=True):
        super().log_error(fl_ctx, self._redact(msg), fire_event)

    def log_exception(self, fl_ctx: FLContext, msg: str, fire_event=False):
        """As FLComponent.log_exception, with the message and the traceback (exception texts name files) redacted."""
        self.logger.error(generate_log_message(fl_ctx, self._redact(msg)))
        self.logger.error(self._redact(secure_format_traceback()))

    def check_limits(self, task_name: str, meta: dict) -> None:
        """A task that asks more than this site's caps (fedseg.fl.site_limits) is refused before anything runs."""
        method = self.method_args or {}
        job_settings = {
            "engine local_epochs": self.cfg.local_epochs,
            "engine local_steps": self.cfg.local_steps,
            "method_args local_epochs": method.get("local_epochs"),
            "method_args local_steps": method.get("local_steps"),
        }
        check_task_limits(self.site, task_name, meta, getattr(self, "limits", None) or DEFAULT_LIMITS, job_settings)

    # ---- helpers shared by the method handlers ------------------------------------------------------
    def track(self, tag: str, value: float, step: int) -> None:
        """Training curves to the server's TensorBoard through NVFlare's experiment tracking. With DP-SGD a training
        loss (computed on the site's training cases without noise) is not sent."""
        if self.cfg.dp is not None and tag.endswith("loss"):  # "train/loss", "fedcross/model0_train_loss", ...
            return
        if self.tb_writer is not None:
            self.tb_writer.add_scalar(tag, float(value), global_step=int(step))

    def progress(self, fl_ctx: FLContext, label: str, round_num, every: int = 10) -> Callable[[int, float], None]:
        """Per-step callback: the mean loss of every `every` steps to TensorBoard (one event per step cost
        ~10% of training throughput), a log line every 50 steps of a long local run."""
        window: list[float] = []

        def on_step(step: int, loss: float) -> None:
            window.append(loss)
            if len(window) == every:
                self.track(f"{label}/loss", sum(window) / every, int(round_num or 0) * 100000 + step)
                window.clear()
            if step and step % 50 == 0:
                self.log_info(fl_ctx, f"{label} round {round_num}: step {step} loss {loss:.4f}")

        return on_step

    def privacy_report(self, fl_ctx: FLContext, task: str, metrics: dict) -> dict:
        """With DP-SGD: the site's privacy loss so far (dp_epsilon at dp_delta, over every network this site has
        trained in this job) into a training task's metrics, and one line in the site's log. The training losses
        ("*_loss": means over the site's training cases, without noise) stay at the site."""
        dp = self.seg_engine.dp
        if dp is not None:
            withheld = sorted(k for k in metrics if k.endswith(DP_WITHHELD_SUFFIX))
            for key in withheld:
                del metrics[key]
            metrics.update(dp.metrics())
            self.log_info(
                fl_ctx,
                f"DP-SGD at site {self.site}, task {task}: {dp.describe()}" + (f"; not sent: {withheld}" if withheld else ""),
            )
        return metrics

    def new_net(self, params: dict | None):
        net = self.seg_engine.new_network()
        if params is not None:
            load_numpy_state(net, params, self.site)
        return net

    # ---- FedBN: the site's own normalization layers ---------------------------------------------------
    def norm_keys(self) -> list[str]:
        """The state_dict keys of this site's network that are normalization (by module type)."""
        if self._norm_keys is None:
            self._norm_keys = norm_state_keys(self.seg_engine.new_network())
        return self._norm_keys

    def local_norm_path(self) -> Path:
        return self.app_dir / FEDBN_DIR / LOCAL_NORM_FILE

    def own_norm(self) -> dict | None:
        """The normalization entries this site kept from its last FedBN training of this job (None: none yet)."""
        path = self.local_norm_path()
        return load_model_set(path)[0]["norm"] if path.exists() else None

    def fedbn_params(self, params: dict, rnd, fl_ctx: FLContext) -> dict:
        """FedBN's start of a round: the received model with this site's own normalization (round 0: the received)."""
        if not self.norm_keys():
            raise ValueError(
                f"[site {self.site}] FedBN refused: the engine's network (norm {self.cfg.network.get('norm', 'instance')!r}) "
                "has no normalization parameters, so FedBN would be FedAvg; set the engine's network norm to "
                "'instance_affine' or 'batch'"
            )
        if not rnd:  # a new training run: nothing of an earlier one carries over
            self.local_norm_path().unlink(missing_ok=True)
        own = self.own_norm()
        if own is None:
            self.log_info(
                fl_ctx, f"FedBN round {rnd}: starting from the received normalization ({len(self.norm_keys())} entries)"
            )
            return params
        self.log_info(fl_ctx, f"FedBN round {rnd}: own normalization kept ({len(own)} entries) over the received model")
        return with_own(params, own)

    def keep_norm(self, params: dict, rnd) -> None:
        path = self.local_norm_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model_set(path, {"norm": {k: params[k] for k in self.norm_keys()}}, {"site": self.site, "round": rnd})

    def personalized(self, params: dict, meta: dict, fl_ctx: FLContext) -> dict:
        """What `validate` scores: with FedBN, a server model gets this site's own normalization (the site's
        personalized model, also saved as fedbn/personalized_<name>.pt); a site's own model or any model
        outside FedBN is scored as it came."""
        owner = str(meta.get("model_owner", ""))
        if meta.get("keep_local") != "norm" and not owner.startswith(SERVER_MODEL_PREFIX):
            return params
        own = self.own_norm()
        if own is None:
            if meta.get("keep_local") == "norm":
                self.log_warning(fl_ctx, "FedBN: no own normalization at this site yet; scoring the received model")
            return params
        params = with_own(params, own)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", owner or str(meta.get("model_name") or "model")).removesuffix(".pt")
        info = {"site": self.site, "source": owner or meta.get("model_name"), "engine": self.cfg.to_dict()}
        save_model_set(self.app_dir / FEDBN_DIR / f"personalized_{name}.pt", {"global": params}, info)
        self.log_info(fl_ctx, f"FedBN: scoring {owner or meta.get('model_name')} with this site's own normalization")
        return params

    # ---- FedAvg / FedProx / FedBN / cross-site evaluation --------------------------------------------
    def train(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        meta = model.meta or {}
        rnd = model.current_round
        keep_local = meta.get("keep_local", "none")
        if keep_local not in KEEP_LOCAL:
            raise ValueError(f"task meta 'keep_local' must be one of {KEEP_LOCAL}, got {keep_local!r}")
        params = self.fedbn_params(model.params, rnd, fl_ctx) if keep_local == "norm" else model.params
        net = self.new_net(params)
        metrics = {}
        if self.validate_before_train and self.seg_engine.cases("validation"):
            began = time.perf_counter()
            metrics.update(self.seg_engine.evaluate(net, "validation").summary("val_"))
            metrics["validate_seconds"] = time.perf_counter() - began  # the server's per-round time split
            self.track("val_dice", metrics["val_dice"], rnd or 0)
        mu = planned_number(meta, AlgorithmConstants.FEDPROX_MU, float, 0.0) or 0.0
        steps = self.seg_engine.local_steps(
            epochs=planned_number(meta, "local_epochs", int, 1) or (self.method_args or {}).get("local_epochs"),
            steps=planned_number(meta, "local_steps", int, 1) or (self.method_args or {}).get("local_steps"),
        )
        max_steps = planned_number(meta, "max_steps", int, 1)
        if max_steps and steps > max_steps:
            self.log_info(fl_ctx, f"round {rnd}: training {max_steps} steps, the server's plan, instead of {steps}")
            steps = max_steps
        local_optimizer = meta.get("local_optimizer", "fresh")
        if local_optimizer not in LOCAL_OPTIMIZER:
            raise ValueError(f"task meta 'local_optimizer' must be one of {LOCAL_OPTIMIZER}, got {local_optimizer!r}")
        optimizer = self.seg_engine.new_optimizer(net)
        if not rnd:  # round 0 begins a new training run (e.g. the next run of a benchmark job): nothing carries over
            self.state.pop("train_optimizer", None)
        if local_optimizer == "keep" and self.state.get("train_optimizer"):
            # this site's own Adam moments from its previous round (they never leave the site)
            load_optimizer_state(optimizer, net, self.state["train_optimizer"])
        stats = self.seg_engine.train(
            net,
            steps,
            optimizer=optimizer,
            prox_mu=mu,
            should_stop=lambda: abort_signal.triggered,
            on_step=self.progress(fl_ctx, "train", rnd),
        )
        if local_optimizer == "keep":
            self.state["train_optimizer"] = optimizer_state_to_numpy(optimizer, net)
        self.log_info(
            fl_ctx,
            f"round {rnd}: {stats.steps} steps, loss {stats.mean_loss:.4f}, {stats.images / max(stats.seconds, 1e-9):.1f} img/s"
            + (f", FedProx mu={mu}" if mu else "")
            + (f", received model val_dice={metrics['val_dice']:.4f}" if "val_dice" in metrics else ""),
        )
        self.local_params = state_to_numpy(net)
        if keep_local == "norm":
            self.keep_norm(self.local_params, rnd)
        metrics.update(stats.as_metrics(), train_seconds=stats.seconds)
        self.privacy_report(fl_ctx, "train", metrics)
        return FLModel(
            params=self.local_params,
            params_type=ParamsType.FULL,
            metrics=metrics or None,
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps},
        )

    def validate(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        # only validation / testing cases are ever scored for the server (fedseg.fl.privacy)
        section = check_scorable_section(self.site, (model.meta or {}).get("section", self.eval_section))
        if not self.seg_engine.cases(section):
            section = "validation"
        params = self.personalized(model.params, model.meta or {}, fl_ctx)
        result = self.seg_engine.evaluate(self.new_net(params), section, with_hd95=self.hd95)
        metrics = result.summary()
        metrics["dice_per_case"] = [float(x) for x in result.case_dice]
        metrics["section"] = section
        model_name = (model.meta or {}).get("model_name", "")
        self.log_info(fl_ctx, f"validate {model_name} on {section}: dice {metrics['dice']:.4f} ± {metrics['dice_std']:.4f}")
        return FLModel(metrics=metrics)

    def submit_model(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        if self.local_params is None:
            raise RuntimeError(f"site {self.site} has no locally trained model to submit yet")
        return FLModel(params=self.local_params, params_type=ParamsType.FULL)


def _site_index(site: str, site_names: list[str]) -> int:
    if site not in site_names:
        raise ValueError(f"site {site} is not in the server's site mapping {site_names}")
    return site_names.index(site)


def _summary(result) -> dict:
    summary = result.summary()
    summary["dice_per_case"] = [float(x) for x in result.case_dice]
    return summary


class FedSMExecutor(SegExecutor):
    """FedSM and SoftPull sites (fedseg.fl.fedsm_controller): the shared tasks plus fedsm_train / fedsm_evaluate
    (FLModel <-> fedseg.methods.fedsm)."""

    TASKS = {"fedsm_train": "fedsm_train", "fedsm_evaluate": "fedsm_evaluate"}

    def fedsm_train(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        meta = model.meta or {}
        site_names = list(meta["site_names"])
        rnd = int(model.current_round or 0)
        engine = self.seg_engine
        steps = engine.local_steps(epochs=meta.get("local_epochs"), steps=meta.get("local_steps"))
        updated, metrics, seg_steps = fedsm_local_round(
            engine,
            unpack(model.params),
            _site_index(self.site, site_names),
            site_names,
            meta.get("selector"),
            float(meta.get("gamma", 0.9)),
            steps,
            should_stop=lambda: abort_signal.triggered,
            on_step=self.progress(fl_ctx, "fedsm_global", rnd),
            seed=engine.cfg.seed + rnd,
        )
        self.privacy_report(fl_ctx, "fedsm_train", metrics)
        uncovered = sorted(group for group in updated if group.startswith("selector"))
        if engine.dp is not None and uncovered and not self._dp_selector_warned:
            self._dp_selector_warned = True  # once per job
            self.log_warning(
                fl_ctx,
                f"DP-SGD at site {self.site} covers the segmentation networks (global and personalized) only: the "
                f"selector parts of the FedSM reply {uncovered} are computed from this site's training images without "
                'differential privacy; a DP site withholds them with its privacy scope ("optimizer_state": "drop" '
                'drops selector_stats and selector_optim, zero_vars ["^selector/"] the selector\'s weights)',
            )
        for key, value in metrics.items():
            self.track(f"fedsm/{key}", value, rnd)
        self.local_params = updated["personal"]  # cross-site evaluation would see this site's personalized model
        self.log_info(fl_ctx, f"FedSM round {rnd}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return FLModel(
            params=pack(updated),
            params_type=ParamsType.FULL,
            metrics=metrics,
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: seg_steps},
        )

    def fedsm_evaluate(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        """Scores the final model set on this site's test cases: global, own personalized, super model, the
        selector's routing (accuracy, routed to own model, counts per model) and, when the server sends "gammas",
        the super model's Dice at each of them (validation or testing only)."""
        meta = model.meta or {}
        site_names = list(meta["site_names"])
        section = check_scorable_section(self.site, meta.get("section", "testing"))
        groups = unpack(model.params)
        engine = self.seg_engine
        settings = SelectorSettings.from_meta(len(site_names), meta.get("selector") or {})
        global_net = self.new_net(groups["global"])
        personal = {k[len(PERSONAL_PREFIX) :]: self.new_net(v) for k, v in groups.items() if k.startswith(PERSONAL_PREFIX)}
        selector = None
        if "selector" in groups:
            selector = new_selector(engine, settings)
            load_numpy_state(selector, groups["selector"], self.site)
        _site_index(self.site, site_names)
        gammas = meta.get("gammas")
        scored = score_super_model(
            engine,
            global_net,
            personal,
            selector,
            site_names,
            self.site,
            float(meta.get("gamma", 0.9)),
            settings.size(engine.cfg.spatial_dims),
            section,
            with_hd95=self.hd95,
            gammas=[float(g) for g in gammas] if isinstance(gammas, (list, tuple)) else None,
        )
        metrics = {"section": section}
        for key in ("selector_accuracy", "routed_own", "routing", "mean_confidence", "gamma_sweep"):
            if key in scored:
                metrics[key] = scored[key]
        for name, result in scored["scores"].items():
            metrics[name] = _summary(result)
        self.log_info(
            fl_ctx,
            "FedSM evaluation: "
            + ", ".join(f"{n} {metrics[n]['dice']:.4f}" for n in scored["scores"])
            + (
                f", selector accuracy {scored['selector_accuracy']:.3f}, routed to own model "
                f"{scored['routed_own']:.3f}, routing {scored['routing']}"
                if selector
                else ""
            ),
        )
        return FLModel(metrics=metrics)


class FedCrossExecutor(SegExecutor):
    """FedCross and FedCrossEns sites (fedseg.fl.fedcross_controller): the shared tasks plus cross_train /
    cross_validate (FLModel <-> fedseg.methods.fedcross)."""

    TASKS = {"cross_train": "cross_train", "cross_validate": "cross_validate"}

    def cross_train(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        """One visit: params = pack({"model": weights, "optim": optimizer state}); meta says which model, its
        schedule position and the visit budget."""
        started_at = time.time()  # the server measures its hand-over latency with it
        meta = model.meta or {}
        groups = unpack(model.params)
        m, c = int(meta["model_index"]), int(meta["communication"])
        visits_done = int(meta.get("visits_done", 0))
        engine = self.seg_engine
        steps = engine.local_steps(epochs=meta.get("visit_epochs") or None, steps=meta.get("visit_steps") or None)
        schedule = LrSchedule.from_meta(meta["lr_schedule"])
        weights, optim, stats = cross_visit(
            engine,
            groups["model"],
            groups.get("optim"),
            steps,
            schedule,
            visits_done,
            should_stop=lambda: abort_signal.triggered,
            on_step=self.progress(fl_ctx, f"cross_model{m}", c),
        )
        self.track(f"fedcross/model{m}_train_loss", stats.mean_loss, c)
        self.local_params = weights
        lr_first, lr_last = schedule.lr(visits_done), schedule.lr(visits_done + (stats.steps - 1) / max(steps, 1))
        self.log_info(
            fl_ctx,
            f"FedCross communication {c}: model {m} (visit {visits_done + 1}) trained {stats.steps} steps, "
            f"loss {stats.mean_loss:.4f}, lr {lr_first:.2e} -> {lr_last:.2e}",
        )
        metrics = self.privacy_report(
            fl_ctx, "cross_train", {"train_loss": stats.mean_loss, "lr_first": lr_first, "lr_last": lr_last}
        )
        return FLModel(
            params=pack({"model": weights, "optim": optim}),
            params_type=ParamsType.FULL,
            metrics=metrics,
            meta={
                FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps,
                "model_index": m,
                "communication": c,
                "started_at": started_at,
            },
        )

    def cross_validate(self, model: FLModel, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        """Scores the K models sent (groups m0, m1, ...) and their ensemble on a section of this site's data
        (validation or testing only). Case names are not sent: the server has no use for them."""
        meta = model.meta or {}
        groups = unpack(model.params)
        k = int(meta["num_models"])
        engine = self.seg_engine
        section = check_scorable_section(self.site, meta.get("section", "validation"))
        if not engine.cases(section):
            fallback = "validation" if section != "validation" else "testing"
            self.log_warning(fl_ctx, f"no '{section}' cases at {self.site}; scoring '{fallback}' instead")
            section = fallback
        metrics = {"section": section, "engine": engine.cfg.to_dict()}
        if not engine.cases(section):
            self.log_warning(fl_ctx, f"{self.site} has no cases to score the ensemble on")
            return FLModel(metrics={**metrics, "n_cases": 0})
        nets = [self.new_net(groups[member_key(m)]) for m in range(k)]
        # HD95 is costly: only for the final test scoring, not every communication's validation
        scored = score_ensemble(engine, nets, section, with_hd95=self.hd95 and section == "testing")
        metrics.update(
            {
                "n_cases": len(scored.ensemble.case_names),
                "ensemble": _summary(scored.ensemble),
                "members": [_summary(r) for r in scored.members],
                "uncertainty": scored.uncertainty(),
            }
        )
        u = metrics["uncertainty"]
        self.log_info(
            fl_ctx,
            f"FedCross {section} at {self.site}: ensemble dice {metrics['ensemble']['dice']:.4f}, members "
            + ", ".join(f"{s['dice']:.4f}" for s in metrics["members"])
            + f"; mean std wrong {u['mean_std_wrong']:.4f} vs right {u['mean_std_right']:.4f}, "
            f"AUROC of the std for wrong voxels {u['auroc']:.4f}",
        )
        return FLModel(metrics=metrics)
