"""FedSM at a site (no FLARE): train the global model, this site's personalized model and the model selector,
and score the super model.

The model selector (SelectorNet) is a site classifier: which site does an image come from? Every site sees only
its own label, so a site alone would learn "everything is me". Three protocols (``selector.protocol``):
``"lda"`` (default: fixed seeded features; the sites send feature statistics and the server fits the head in
closed form, fedseg.algorithms.selector_head), ``"epoch"`` (NVIDIA's reference: one full-batch Adam step per local
epoch from the moments the server sent; weights, moments and step counts averaged) and ``"batch"`` (one Adam step
per mini-batch). Its input (SELECTOR_INPUT, recorded in every saved model set) is three views per image channel
on fixed scales: appearance (z-scored over all channels, clipped), stored intensity (signed log scale) and fine
detail (|z - 3x3 mean| at native resolution), area-averaged to ``input_size`` (``input_size_3d`` for volumes).
docs/methods.md describes each protocol, what the "epoch" protocol's averaging makes exactly equal to a
centralized step and what not, and the measurements that chose the defaults.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedseg.algorithms.routing import GLOBAL, route_batch
from fedseg.algorithms.selector_head import feature_statistics
from fedseg.engine import (
    SegEngine,
    load_numpy_state,
    load_optimizer_state,
    optimizer_state_to_numpy,
    state_to_numpy,
)
from fedseg.engine.engine import EvalResult

# the selector network and its input: one definition, in the standalone runtime that exported bundles carry
from fedseg.export.bundle_runtime import SelectorNet, selector_input

PROTOCOLS = ("lda", "epoch", "batch")
NORMS = ("group", "instance", "layer", "none")
DEFAULT_SELECTOR = {
    "protocol": "lda",
    "input_size": 64,
    "input_size_3d": 32,
    "channels": [16, 32, 64, 128],
    "norm": "group",
    "lr": 1e-3,
    "epochs": 4,
    "batch_size": 16,
    "shrinkage": 0.1,
}
# selector confidence thresholds of the final evaluation's sweep (all from one pass over the test cases)
GAMMA_SWEEP = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

SELECTOR_INPUT = {
    "views_per_channel": [
        "appearance: z-score over all channels, clipped to +-5 SD, / 5 -> [-1, 1]",
        "intensity: sign(x) log1p(|x|) / log1p(1e4) of the stored values, clipped -> [-1, 1]",
        "detail: |z - 3x3 box mean of z| at native resolution, clipped to [0, 1] SD",
    ],
    "resize": "area average to input_size (2-D) / input_size_3d (3-D) per axis",
}


@dataclass
class SelectorSettings:
    num_sites: int
    protocol: str = DEFAULT_SELECTOR["protocol"]
    input_size: int = DEFAULT_SELECTOR["input_size"]
    input_size_3d: int = DEFAULT_SELECTOR["input_size_3d"]
    channels: Sequence[int] = tuple(DEFAULT_SELECTOR["channels"])
    norm: str = DEFAULT_SELECTOR["norm"]
    lr: float = DEFAULT_SELECTOR["lr"]
    epochs: int = DEFAULT_SELECTOR["epochs"]
    batch_size: int = DEFAULT_SELECTOR["batch_size"]
    shrinkage: float = DEFAULT_SELECTOR["shrinkage"]

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"selector protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.norm not in NORMS:
            raise ValueError(f"selector norm must be one of {NORMS}, got {self.norm!r}")
        if (
            min(int(self.input_size), int(self.input_size_3d)) < 8
            or int(self.epochs) < 1
            or int(self.batch_size) < 1
            or not float(self.lr) > 0
            or not 0.0 <= float(self.shrinkage) <= 1.0
        ):
            raise ValueError(
                f"selector settings out of range: input_size {self.input_size} and input_size_3d "
                f"{self.input_size_3d} (>= 8), epochs {self.epochs} "
                f"(>= 1), batch_size {self.batch_size} (>= 1), lr {self.lr} (> 0), shrinkage {self.shrinkage} ([0, 1])"
            )
        if not self.channels:
            raise ValueError("selector channels must list at least one block width")

    def size(self, spatial_dims: int) -> int:
        """Input edge length for images of this dimensionality."""
        return int(self.input_size if int(spatial_dims) == 2 else self.input_size_3d)

    @classmethod
    def from_meta(cls, num_sites: int, values: dict | None) -> SelectorSettings:
        merged = {**DEFAULT_SELECTOR, **(values or {})}
        return cls(num_sites=int(num_sites), **{k: merged[k] for k in DEFAULT_SELECTOR})


def build_selector(spatial_dims: int, in_channels: int, s: SelectorSettings) -> SelectorNet:
    """Three views per image channel (see selector_input), hence 3 x in_channels input channels."""
    return SelectorNet(s.num_sites, spatial_dims, 3 * in_channels, s.channels, s.norm)


def new_selector(engine: SegEngine, s: SelectorSettings) -> SelectorNet:
    return build_selector(engine.cfg.spatial_dims, engine.cfg.in_channels, s).to(engine.device)


_INPUT_CACHE: weakref.WeakKeyDictionary[SegEngine, dict] = weakref.WeakKeyDictionary()


def section_inputs(engine: SegEngine, section: str, size: int) -> torch.Tensor:
    """Selector inputs of every case of a section, in datalist order (computed once per engine)."""
    cache = _INPUT_CACHE.setdefault(engine, {})
    key = (section, int(size))
    if key not in cache:
        items = engine.eval_batches(section)
        cache[key] = torch.cat([selector_input(item["image_raw"].unsqueeze(0), size) for _, item in items])
    return cache[key].to(engine.device)


def selector_epochs(
    selector: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, chunk: int
) -> int:
    """The "epoch" protocol: per epoch, gradients of all images accumulated (loss = sum of per-image
    cross-entropies / number of images, so the gradient is the mean over images) and one optimizer step."""
    n = inputs.shape[0]
    selector.train()
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            loss = F.cross_entropy(selector(inputs[part]), labels[part], reduction="sum") / n
            loss.backward()
        optimizer.step()
    return epochs


def selector_batches(
    selector: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
) -> int:
    """The "batch" protocol: shuffled mini-batches, one optimizer step per batch."""
    generator = torch.Generator().manual_seed(seed)
    selector.train()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(inputs.device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(selector(inputs[idx]), labels[idx]).backward()
            optimizer.step()
            steps += 1
    return steps


def train_selector_on(
    selector: nn.Module, optim_state: dict | None, inputs: torch.Tensor, site_index: int, s: SelectorSettings, seed: int = 0
) -> tuple[dict, dict, int]:
    """Local selector training on these inputs, all labelled site_index, from the received Adam state (moments
    and step count). Returns (weights, Adam state, optimizer steps), as numpy dicts."""
    labels = torch.full((inputs.shape[0],), int(site_index), dtype=torch.long, device=inputs.device)
    optimizer = torch.optim.Adam(selector.parameters(), lr=s.lr)
    # copies: torch.as_tensor would share the arrays' memory, and Adam updates its state in place
    load_optimizer_state(optimizer, selector, {k: np.array(v, copy=True) for k, v in (optim_state or {}).items()})
    if s.protocol == "epoch":
        steps = selector_epochs(selector, optimizer, inputs, labels, s.epochs, s.batch_size)
    else:
        steps = selector_batches(selector, optimizer, inputs, labels, s.epochs, s.batch_size, seed)
    return state_to_numpy(selector), optimizer_state_to_numpy(optimizer, selector), steps


@torch.no_grad()
def selector_statistics(selector: SelectorNet, inputs: torch.Tensor, chunk: int = 64) -> dict[str, np.ndarray]:
    """The "lda" protocol at a site: count, mean and scatter of the fixed features of these inputs
    (fedseg.algorithms.selector_head); nothing is trained."""
    selector.eval()
    parts = [selector.embed(inputs[i : i + chunk]).double().cpu() for i in range(0, inputs.shape[0], chunk)]
    features = torch.cat(parts).numpy() if parts else np.zeros((0, selector.head.in_features))
    return feature_statistics(features)


def train_selector(
    engine: SegEngine, selector: nn.Module, optim_state: dict | None, site_index: int, s: SelectorSettings, seed: int = 0
) -> tuple[dict, dict, int]:
    """train_selector_on this site's training images."""
    inputs = section_inputs(engine, "training", s.size(engine.cfg.spatial_dims))
    return train_selector_on(selector, optim_state, inputs, site_index, s, seed)


@torch.no_grad()
def predict_sites(selector: nn.Module, inputs: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Softmax probabilities (n, num_sites) for selector inputs."""
    selector.eval()
    out = [torch.softmax(selector(inputs[i : i + chunk]).double(), dim=1) for i in range(0, inputs.shape[0], chunk)]
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, selector.head.out_features))


@torch.no_grad()
def selector_probs(engine: SegEngine, selector: nn.Module, image_raw: torch.Tensor, size: int) -> np.ndarray:
    """Probabilities (B, num_sites) for a batch of images as stored."""
    return predict_sites(selector, selector_input(image_raw, size).to(engine.device))


# ---- routing: pure functions on selector probabilities ----------------------------------------------------
def routing_summary(probs: np.ndarray, own_index: int, site_names: list[str], gamma: float) -> dict:
    """What the selector does with one site's cases (probs: (n, S)):
    selector_accuracy: fraction whose argmax is the own site; routed_own: fraction routed to the own site's
    personalized model (argmax own AND confidence > gamma); routing: {model: count} over every site's model
    and "global" (this site's row of the routing confusion matrix); mean_confidence."""
    routes = route_batch(probs, site_names, gamma) if len(probs) else []
    n = max(len(routes), 1)
    counts = dict.fromkeys([*site_names, GLOBAL], 0)
    for r in routes:
        counts[r.model] += 1
    return {
        "selector_accuracy": sum(r.site_index == own_index for r in routes) / n,
        "routed_own": sum(r.model == site_names[own_index] for r in routes) / n,
        "routing": counts,
        "mean_confidence": float(np.mean([r.confidence for r in routes])) if routes else float("nan"),
    }


def routed_models(probs: np.ndarray, site_names: list[str], gamma: float) -> list[str]:
    return [r.model for r in route_batch(probs, site_names, gamma)] if len(probs) else []


def gamma_sweep(
    probs: np.ndarray, site_names: list[str], case_dice: dict[str, np.ndarray], gammas: Sequence[float] = GAMMA_SWEEP
) -> list[float]:
    """Super-model mean Dice at every gamma from one set of selector outputs and per-case Dice of each model
    (case_dice: {model name or "global": (n,)}); a case routed to a model without scores uses the global one."""
    out = []
    for g in gammas:
        chosen = routed_models(probs, site_names, g)
        values = [case_dice.get(m, case_dice[GLOBAL])[i] for i, m in enumerate(chosen)]
        out.append(float(np.mean(values)) if values else float("nan"))
    return out


def _pick(results: dict[str, EvalResult], chosen: list[str]) -> EvalResult:
    """The super model's scores: case i from the model it was routed to."""
    base = results[GLOBAL]
    rows = [results.get(m, base) for m in chosen]
    dice = np.stack([r.dice[i] for i, r in enumerate(rows)]) if rows else base.dice
    hd95 = None
    if base.hd95 is not None:
        hd95 = np.stack([r.hd95[i] for i, r in enumerate(rows)]) if rows else base.hd95
    return EvalResult(case_names=list(base.case_names), dice=dice, hd95=hd95)


@torch.no_grad()
def score_super_model(
    engine: SegEngine,
    global_net,
    personal_nets: dict[str, torch.nn.Module],
    selector: nn.Module | None,
    site_names: list[str],
    own_site: str,
    gamma: float,
    size: int,
    section: str,
    with_hd95: bool = False,
    gammas: Sequence[float] | None = None,
) -> dict:
    """Per-site scores of the global, own personalized and super model; the selector's routing_summary; and,
    with ``gammas``, the super model's mean Dice at each of them. Each model scores each case once: the super
    model (at any gamma) takes every case's score from the model it was routed to. Without a selector (SoftPull
    alone) only the global and own personalized model are scored."""
    scores = {"global": engine.evaluate(global_net, section, with_hd95)}
    if own_site in personal_nets:
        scores["personalized"] = engine.evaluate(personal_nets[own_site], section, with_hd95)
    if selector is None:
        return {"scores": scores}
    probs = predict_sites(selector, section_inputs(engine, section, size))
    chosen = routed_models(probs, site_names, gamma)
    needed = set(chosen) | {m for g in (gammas or ()) for m in routed_models(probs, site_names, g)}
    results = {GLOBAL: scores["global"]}
    if "personalized" in scores:
        results[own_site] = scores["personalized"]
    for name in sorted(needed - set(results)):
        if name in personal_nets:  # others' personalized models are not sent in training rounds: global instead
            results[name] = engine.evaluate(personal_nets[name], section, with_hd95)
    scores["super"] = _pick(results, chosen)
    out = {"scores": scores, **routing_summary(probs, site_names.index(own_site), site_names, gamma)}
    if gammas is not None:
        out["gamma_sweep"] = {
            "gammas": [float(g) for g in gammas],
            "dice": gamma_sweep(probs, site_names, {m: r.case_dice for m, r in results.items()}, gammas),
        }
    return out


def fedsm_local_round(
    engine: SegEngine,
    groups: dict,
    site_index: int,
    site_names: list[str],
    selector_values: dict | None,
    gamma: float,
    steps: int,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    seed: int = 0,
) -> tuple[dict, dict, int]:
    """One FedSM round at a site. groups: {"global", "personal"} plus {"selector", "selector_optim"} when the
    job uses the selector (SoftPull alone sends none), all numpy dicts.

    Returns (updated groups, metrics measured on the RECEIVED models before training, segmentation steps).
    The selector part of the update: {"selector", "selector_optim"} (trained) or, with the "lda" protocol,
    {"selector_stats"}: the feature statistics of this site's training images (the server fits the head).
    With the selector, the metrics include val_selector_acc, val_routed_own and "val_route/<model>" counts
    (this site's row of the routing confusion matrix on its validation cases; see routing_summary).
    """
    own = site_names[site_index]
    global_net = engine.new_network()
    load_numpy_state(global_net, groups["global"], engine.site)
    personal_net = engine.new_network()
    load_numpy_state(personal_net, groups["personal"], engine.site)
    use_selector = "selector" in groups
    selector, s = None, None
    if use_selector:
        s = SelectorSettings.from_meta(len(site_names), selector_values)
        selector = new_selector(engine, s)
        load_numpy_state(selector, groups["selector"], engine.site)

    metrics: dict[str, float] = {}
    began = time.perf_counter()
    if engine.cases("validation"):
        if use_selector:
            # other sites' personalized models are not sent in training rounds: routing to another site uses
            # the global model here; the final evaluation scores the full super model
            scored = score_super_model(
                engine,
                global_net,
                {own: personal_net},
                selector,
                site_names,
                own,
                gamma,
                s.size(engine.cfg.spatial_dims),
                "validation",
            )
            for name, res in scored["scores"].items():
                metrics[f"val_{name}_dice"] = res.summary()["dice"]
            metrics["val_selector_acc"] = scored["selector_accuracy"]
            metrics["val_routed_own"] = scored["routed_own"]
            metrics.update({f"val_route/{m}": float(c) for m, c in scored["routing"].items()})
        else:
            metrics["val_global_dice"] = engine.evaluate(global_net, "validation").summary()["dice"]
            metrics["val_personalized_dice"] = engine.evaluate(personal_net, "validation").summary()["dice"]

    validated = time.perf_counter()
    global_stats = engine.train(global_net, steps, should_stop=should_stop, on_step=on_step)
    personal_stats = engine.train(personal_net, steps, should_stop=should_stop)
    metrics.update({"train_global_loss": global_stats.mean_loss, "train_personal_loss": personal_stats.mean_loss})
    updated = {"global": state_to_numpy(global_net), "personal": state_to_numpy(personal_net)}
    trained = time.perf_counter()
    if use_selector and s.protocol == "lda":
        inputs = section_inputs(engine, "training", s.size(engine.cfg.spatial_dims))
        updated["selector_stats"] = selector_statistics(selector, inputs)
        metrics["selector_steps"] = 0.0
    elif use_selector:
        updated["selector"], updated["selector_optim"], sel_steps = train_selector(
            engine, selector, groups.get("selector_optim"), site_index, s, seed
        )
        metrics["selector_steps"] = float(sel_steps)
    # the server's per-round time split (a measurement, never used to decide)
    metrics.update(
        validate_seconds=validated - began, train_seconds=trained - validated, selector_seconds=time.perf_counter() - trained
    )
    return updated, metrics, global_stats.steps
