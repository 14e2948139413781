"""The MONAI training / evaluation engine of one site. It knows nothing about FLARE.

Everything a method needs at a site goes through `SegEngine`: build a network, train it for a number of
steps (optionally with a FedProx proximal term and a learning-rate function), evaluate it per case on a
datalist section, and predict a volume with sliding-window inference. With the engine setting "dp", every
training step is a DP-SGD step and the engine keeps the site's privacy accountant (fedseg.engine.dp).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from monai.utils import set_determinism

from fedseg.engine.config import EngineConfig
from fedseg.engine.dp import DPSettings, SiteDP, check_dp_network
from fedseg.engine.networks import SegNetwork

log = logging.getLogger("fedseg.engine")
# what Opacus's hooks leave on the modules of a network they were attached to (removed after a DP-SGD run)
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len")


def select_device() -> torch.device:
    """cuda:0 when a GPU is visible. FLARE (simulator -gpu, GPUResourceConsumer) sets CUDA_VISIBLE_DEVICES."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_transforms(keys: Sequence[str] = ("image", "label")) -> list:
    """Read NIfTI as channel-first tensors and z-score each image (hospital intensity scales differ)."""
    return [
        LoadImaged(keys=list(keys), image_only=True),
        EnsureChannelFirstd(keys=list(keys)),
        NormalizeIntensityd(keys="image", channel_wise=True),
    ]


def train_transforms(cfg: EngineConfig) -> Compose:
    roi = list(cfg.roi_size)
    return Compose(
        load_transforms()
        + [
            SpatialPadd(keys=["image", "label"], spatial_size=roi),
            EnsureTyped(keys=["image", "label"], track_meta=False),
            # everything above is cached once; the random part below runs every epoch
            RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=roi, pos=1, neg=1, num_samples=1),
        ]
        + [RandFlipd(keys=["image", "label"], spatial_axis=axis, prob=0.5) for axis in range(cfg.spatial_dims)]
        + [
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )


def eval_transforms(keys: Sequence[str] = ("image", "label")) -> Compose:
    """Deterministic loading for evaluation and inference. "image_raw" keeps the intensities as stored: the
    FedSM selector tells sites apart partly by them (scanner units differ between hospitals)."""
    load, channel_first, normalize = load_transforms(keys)
    return Compose([load, channel_first, CopyItemsd(keys="image", names="image_raw"), normalize])


@dataclass
class TrainStats:
    steps: int  # optimizer steps applied (under AMP, steps skipped for inf/NaN gradients are not counted)
    mean_loss: float  # over the applied steps
    seconds: float
    images: int
    skipped: int = 0  # AMP steps skipped by the GradScaler (inf/NaN gradients), retried with the next batch

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        return {f"{prefix}loss": self.mean_loss, f"{prefix}steps": float(self.steps)}


@dataclass
class EvalResult:
    """Per-case scores on one datalist section: dice[case, foreground_class], hd95 likewise (voxels)."""

    case_names: list[str]
    dice: np.ndarray
    hd95: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def case_dice(self) -> np.ndarray:
        """Mean over foreground classes, one value per case."""
        return self.dice.mean(axis=1) if self.dice.size else np.zeros(0)

    def summary(self, prefix: str = "") -> dict[str, float]:
        per_case = self.case_dice
        out = {
            f"{prefix}dice": float(per_case.mean()) if per_case.size else float("nan"),
            f"{prefix}dice_std": float(per_case.std()) if per_case.size else float("nan"),
            f"{prefix}n_cases": float(per_case.size),
        }
        if self.dice.ndim == 2 and self.dice.shape[1] > 1:
            for c in range(self.dice.shape[1]):
                out[f"{prefix}dice_class{c + 1}"] = float(self.dice[:, c].mean())
        if self.hd95 is not None and self.hd95.size:
            finite = self.hd95.mean(axis=1)
            finite = finite[np.isfinite(finite)]
            out[f"{prefix}hd95"] = float(finite.mean()) if finite.size else float("nan")
        return out


def case_name(path) -> str:
    if isinstance(path, (list, tuple)):  # multi-channel cases list one file per channel
        path = path[0]
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _plain(value):
    """MetaTensor -> Tensor (keeps the affine out of the math; inference reads it from the file)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _collate_or_none(items: list):
    """list_data_collate, and None for a Poisson draw of no case (a DP step of noise alone)."""
    return list_data_collate(items) if items else None


def _proximal_term(net, prox_mu: float):
    """FedProx: (loss, frozen copy of the received network) for mu > 0, else (None, None). The loss is
    mu/2 * sum over parameters of ||w - w_received||^2 (Li et al., 2020; the same term as NVFlare's PTFedProxLoss)."""
    if not prox_mu > 0:
        return None, None
    reference = copy.deepcopy(net).eval()
    for p in reference.parameters():
        p.requires_grad_(False)

    def prox_loss(model, ref) -> torch.Tensor:
        return (prox_mu / 2) * sum(torch.sum((p - r) ** 2) for p, r in zip(model.parameters(), ref.parameters()))

    return prox_loss, reference


class SegEngine:
    """Training and evaluation of segmentation networks on one site's datalist.

    Datasets are built once per section and cached in memory (CacheDataset), so a site that trains every
    round does not re-read its NIfTI files every round.

    With cfg.dp, every train() call is DP-SGD (fedseg.engine.dp) and all of them add to one accountant, the
    engine's `dp` (a SiteDP): its epsilon covers every network this engine has trained on the site's data.
    """

    def __init__(self, cfg: EngineConfig, datalist: dict, site: str = "local", device: torch.device | None = None):
        self.cfg = cfg
        self.datalist = datalist
        self.site = site
        self.device = device or select_device()
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        set_determinism(seed=cfg.seed)
        self._datasets: dict[tuple[str, bool], CacheDataset] = {}
        self._train_iter: Iterator[dict] | None = None
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        # DP-SGD clips unscaled per-example gradients: no AMP loss scaling under "dp"
        self.use_amp = bool(cfg.amp) and self.device.type == "cuda" and cfg.dp is None
        self._dp: SiteDP | None = None
        self._dp_iter: Iterator[dict | None] | None = None
        if cfg.dp is not None:  # a network with BatchNorm cannot be trained per example: refused before anything runs
            check_dp_network(self.new_network(), cfg.network.get("norm", "instance"))
        # one loss scaler per engine: its scale (and growth tracker) carries over from one train() call to the next,
        # instead of starting again at 2**16 and paying the skipped steps that find the scale every round
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)

    # ---- data ---------------------------------------------------------------------------------------
    def cases(self, section: str) -> list[dict]:
        return list(self.datalist.get(section) or [])

    def dataset(self, section: str, training: bool | None = None) -> CacheDataset:
        """Cached dataset of a section: with the random training transforms for "training" (unless
        training=False), with the deterministic evaluation transforms otherwise."""
        training = (section == "training") if training is None else training
        key = (section, training)
        if key not in self._datasets:
            cases = self.cases(section)
            if not cases:
                raise ValueError(f"[site {self.site}] datalist has no '{section}' cases")
            labelled = all("label" in case for case in cases)  # inference on new images has no labels
            transform = (
                train_transforms(self.cfg) if training else eval_transforms(("image", "label") if labelled else ("image",))
            )
            if training:
                transform.set_random_state(seed=self.cfg.seed)
            self._datasets[key] = CacheDataset(cases, transform=transform, cache_rate=self.cfg.cache_rate, progress=False)
        return self._datasets[key]

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.cases("training")) / self.cfg.batch_size))

    def local_steps(self, epochs: int | None = None, steps: int | None = None) -> int:
        """The local budget in optimizer steps: explicit steps win, then epochs, then the config."""
        if steps:
            return int(steps)
        if epochs:
            return int(epochs) * self.steps_per_epoch()
        if self.cfg.local_steps > 0:
            return self.cfg.local_steps
        return self.cfg.local_epochs * self.steps_per_epoch()

    def _train_batches(self) -> Iterator[dict]:
        if self._train_iter is None:
            generator = torch.Generator().manual_seed(self.cfg.seed)
            loader = DataLoader(
                self.dataset("training"),
                batch_size=self.cfg.batch_size,
                shuffle=True,
                num_workers=self.cfg.num_workers,
                collate_fn=list_data_collate,
                generator=generator,
                drop_last=False,
            )
            self._train_iter = _forever(loader)
        return self._train_iter

    # ---- differential privacy -----------------------------------------------------------------------
    @property
    def dp(self) -> SiteDP | None:
        """The site's DP-SGD state and accountant (None without the "dp" setting), one for the engine's life."""
        if self.cfg.dp is None:
            return None
        if self._dp is None:
            self._dp = SiteDP(DPSettings.from_value(self.cfg.dp), len(self.cases("training")), self.cfg.batch_size)
        return self._dp

    def privacy_spent(self) -> dict[str, float]:
        """{"dp_epsilon", "dp_delta"}: the privacy loss of everything this engine trained so far; {} without "dp"."""
        return self.dp.metrics() if self.dp is not None else {}

    def _dp_batches(self) -> Iterator[dict | None]:
        """Poisson-sampled training batches (None: no case drawn), drawn independently at every step."""
        if self._dp_iter is None:
            loader = DataLoader(
                self.dataset("training"),
                batch_sampler=self.dp.sampler(),
                num_workers=self.cfg.num_workers,
                collate_fn=_collate_or_none,
            )
            self._dp_iter = _forever(loader)
        return self._dp_iter

    # ---- networks -----------------------------------------------------------------------------------
    def new_network(self) -> SegNetwork:
        return SegNetwork(**self.cfg.network_args()).to(self.device)

    def new_optimizer(self, net: torch.nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        lr = self.cfg.lr if lr is None else lr
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(
                net.parameters(), lr=lr, momentum=self.cfg.momentum, nesterov=True, weight_decay=self.cfg.weight_decay
            )
        return torch.optim.Adam(net.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)

    # ---- training -----------------------------------------------------------------------------------
    def train(
        self,
        net: torch.nn.Module,
        num_steps: int,
        optimizer: torch.optim.Optimizer | None = None,
        prox_mu: float = 0.0,
        lr_at_step: Callable[[int], float] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> TrainStats:
        """Train `net` in place for `num_steps` applied optimizer steps.

        prox_mu > 0 adds FedProx's proximal term towards the weights `net` had on entry (_proximal_term).
        lr_at_step(i) sets the learning rate before step i (schedules that travel with a model).
        Under AMP the engine's GradScaler skips a step whose gradients are inf/NaN (and lowers its scale): that
        step is not counted and the next batch is tried, up to 2 * num_steps batches in all (then a warning and
        fewer steps; TrainStats.steps says how many were applied, TrainStats.skipped how many were skipped).
        With the "dp" setting every step is a DP-SGD step (see _train_dp).
        """
        optimizer = optimizer or self.new_optimizer(net)
        if self.cfg.dp is not None:
            return self._train_dp(net, num_steps, optimizer, prox_mu, lr_at_step, should_stop, on_step)
        prox_loss, reference = _proximal_term(net, prox_mu)
        scaler = self.scaler
        batches = self._train_batches()
        net.train()
        start, total_loss, images, done, skipped = time.perf_counter(), 0.0, 0, 0, 0
        max_batches = 2 * num_steps
        while done < num_steps:
            if should_stop is not None and should_stop():
                break
            if done + skipped >= max_batches:
                log.warning(
                    f"[site {self.site}] AMP skipped {skipped} of {done + skipped} steps (inf/NaN gradients); "
                    f"stopping at {done} of {num_steps} applied steps (at most {max_batches} batches)"
                )
                break
            if lr_at_step is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at_step(done)
            batch = next(batches)
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
                loss = self.loss_fn(net(image), label)
            if prox_loss is not None:
                loss = loss + prox_loss(net, reference)
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips optimizer.step() when the unscaled gradients hold inf/NaN
            scaler.update()  # ... and then lowers the scale: that is how a skipped step shows
            value = float(loss.detach())
            if scaler.is_enabled() and scaler.get_scale() < scale:
                skipped += 1
                continue
            if not math.isfinite(value):
                raise FloatingPointError(f"[site {self.site}] training loss became {value} at step {done}")
            total_loss += value
            images += image.shape[0]
            done += 1
            if on_step is not None:
                on_step(done - 1, value)
        return TrainStats(
            steps=done, mean_loss=total_loss / max(done, 1), seconds=time.perf_counter() - start, images=images, skipped=skipped
        )

    def _train_dp(
        self,
        net: torch.nn.Module,
        num_steps: int,
        optimizer: torch.optim.Optimizer,
        prox_mu: float,
        lr_at_step: Callable[[int], float] | None,
        should_stop: Callable[[], bool] | None,
        on_step: Callable[[int, float], None] | None,
    ) -> TrainStats:
        """DP-SGD: Poisson-sampled batches, every example's gradient clipped to max_grad_norm, Gaussian noise on
        their sum (Opacus), then `optimizer`'s own step; each step is recorded in the site's accountant.

        `net` is trained in place (Opacus's hooks are removed again on return) and `optimizer` keeps its state, as
        without DP. A step that draws no case is a step of noise alone; on_step is called for the other steps.
        FedProx's proximal gradient (no data in it) is added after the noise. TrainStats.mean_loss is over the
        steps that drew cases (with the proximal term, as without DP)."""
        from opacus import GradSampleModule

        dp = self.dp
        dp.check_budget(num_steps, self.site)  # the whole call or nothing: the accountant never passes the budget
        prox_loss, reference = _proximal_term(net, prox_mu)
        batches = self._dp_batches()
        params = [p for p in net.parameters() if p.requires_grad]
        model = GradSampleModule(net, loss_reduction="mean")
        dp_optimizer = dp.optimizer(optimizer, self.device)
        model.train()
        start, total_loss, images, done, scored = time.perf_counter(), 0.0, 0, 0, 0
        try:
            with warnings.catch_warnings():
                # the first layer's input needs no gradient: torch says so on every backward through Opacus's hooks
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                while done < num_steps:
                    if should_stop is not None and should_stop():
                        break
                    if lr_at_step is not None:
                        for group in optimizer.param_groups:
                            group["lr"] = lr_at_step(done)
                    drawn = self._dp_gradients(model, params, next(batches), dp_optimizer, done)
                    value = None if drawn is None else drawn[0]
                    images += 0 if drawn is None else drawn[1]
                    dp_optimizer.pre_step()  # clip per example, sum, add noise, divide by the expected batch size
                    if prox_loss is not None:
                        prox = prox_loss(net, reference)
                        for p, grad in zip(params, torch.autograd.grad(prox, params, allow_unused=True)):
                            if grad is not None:
                                p.grad = p.grad + grad
                        if value is not None:
                            value += float(prox.detach())
                    optimizer.step()
                    dp.record_step()
                    done += 1
                    if value is not None:
                        total_loss += value
                        scored += 1
                        if on_step is not None:
                            on_step(done - 1, value)
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            model._close()  # Opacus's hooks and per-example attributes off `net`: it is a plain network again
            for p in net.parameters():
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
            for module in net.modules():
                for attr in OPACUS_MODULE_ATTRS:
                    if hasattr(module, attr):
                        delattr(module, attr)
        return TrainStats(steps=done, mean_loss=total_loss / max(scored, 1), seconds=time.perf_counter() - start, images=images)

    def _dp_gradients(self, model, params: list, batch: dict | None, dp_optimizer, step: int) -> tuple[float, int] | None:
        """Every drawn example's gradient in p.grad_sample; returns (loss, examples), None for an empty draw."""
        dp_optimizer.zero_grad(set_to_none=True)
        if batch is None:  # nobody drawn: zero examples, the step adds the noise alone
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
            return None
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        loss = self.loss_fn(model(image), label)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"[site {self.site}] training loss became {value} at step {step}")
        for p in params:  # a parameter the forward did not use: every example's gradient is zero
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = p.new_zeros((image.shape[0], *p.shape))
        return value, int(image.shape[0])

    # ---- inference / evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def predict_probs(self, net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (B, num_classes, *spatial) with sliding windows of roi_size."""
        net.eval()
        with torch.autocast(device_type=self.device.type, enabled=self.use_amp):
            logits = sliding_window_inference(
                image.to(self.device),
                roi_size=list(self.cfg.roi_size),
                sw_batch_size=self.cfg.sw_batch_size,
                predictor=net,
                overlap=self.cfg.overlap,
                mode="gaussian",
            )
        return torch.softmax(logits.float(), dim=1)

    def eval_batches(self, section: str) -> Iterator[tuple[str, dict]]:
        ds = self.dataset(section, training=False)
        for i in range(len(ds)):
            item = ds[i]
            yield case_name(self.cases(section)[i]["image"]), {k: _plain(v) for k, v in item.items()}

    @torch.no_grad()
    def evaluate(
        self,
        net: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
        section: str = "validation",
        with_hd95: bool = False,
    ) -> EvalResult:
        """Per-case Dice (and HD95) of argmax predictions. `net` may also be any image -> probs callable."""
        probs_fn = net if not isinstance(net, torch.nn.Module) else (lambda x: self.predict_probs(net, x))
        return self.score(probs_fn, section, with_hd95)

    @torch.no_grad()
    def score(self, probs_fn: Callable[[torch.Tensor], torch.Tensor], section: str, with_hd95: bool = False) -> EvalResult:
        """Per-case scores of any (1, C, *spatial) image -> probabilities function."""
        return self.score_items(lambda item: probs_fn(item["image"].unsqueeze(0)), section, with_hd95)

    @torch.no_grad()
    def score_items(self, probs_fn: Callable[[dict], torch.Tensor], section: str, with_hd95: bool = False) -> EvalResult:
        """Like score, for functions that need the whole case (e.g. the raw intensities FedSM's selector uses)."""
        dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        names, dices, hds = [], [], []
        for name, item in self.eval_batches(section):
            label = item["label"].unsqueeze(0).to(self.device)
            probs = probs_fn(item)
            pred = one_hot(probs.argmax(dim=1, keepdim=True), num_classes=self.cfg.num_classes)
            truth = one_hot(label.long(), num_classes=self.cfg.num_classes)
            dices.append(dice_metric(pred, truth).cpu().numpy()[0])
            if with_hd95:
                hds.append(hd_metric(pred, truth).cpu().numpy()[0])
            names.append(name)
        dice = np.nan_to_num(np.stack(dices), nan=0.0) if dices else np.zeros((0, self.cfg.num_classes - 1))
        hd95 = np.stack(hds) if hds else None
        return EvalResult(case_names=names, dice=dice, hd95=hd95)


# ---- weights and optimizer state as numpy (what travels through FLARE) -----------------------------------
def state_to_numpy(net: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def load_numpy_state(net: torch.nn.Module, params: dict, site: str = "?") -> None:
    """Load numpy/torch params into net; a missing or unexpected key is a clear error, not a silent skip."""
    own = net.state_dict()
    missing = sorted(set(own) - set(params))
    unexpected = sorted(set(params) - set(own))
    if missing or unexpected:
        raise KeyError(f"[site {site}] model keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tensors = {}
    for k, v in params.items():
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"[site {site}] shape of {k}: got {tuple(t.shape)}, network has {tuple(own[k].shape)}")
        tensors[k] = t.to(own[k].dtype)
    net.load_state_dict(tensors, strict=True)


def optimizer_state_to_numpy(optimizer: torch.optim.Optimizer, net: torch.nn.Module) -> dict[str, np.ndarray]:
    """Optimizer state keyed by parameter name ("<param>::<state key>"), so it can be averaged and travel."""
    names = {id(p): n for n, p in net.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{names[id(p)]}::{key}"] = value.detach().cpu().numpy().copy()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, net: torch.nn.Module, flat: dict | None) -> None:
    """Inverse of optimizer_state_to_numpy; an empty/None state leaves a fresh optimizer."""
    if not flat:
        return
    params = dict(net.named_parameters())
    for key, value in flat.items():
        name, _, state_key = key.partition("::")
        if name not in params:
            raise KeyError(f"optimizer state for unknown parameter {name!r}")
        p = params[name]
        tensor = torch.tensor(np.asarray(value))  # a copy: Adam updates its state in place, the caller keeps its arrays
        if state_key == "step":
            tensor = tensor.to(torch.float32)  # Adam keeps its step count on the CPU as a float tensor
        else:
            tensor = tensor.to(device=p.device, dtype=p.dtype)
        optimizer.state[p][state_key] = tensor
