"""FedCross / FedCrossEns without FLARE: one site visit of a travelling model, ensemble scoring with
uncertainty, the learning-rate schedule that travels with each model, and the model-set files.

A model's state is (weights, optimizer state, number of visits done). One visit at a site loads all three,
trains the visit budget with the learning rate of the model's own schedule position, and returns the new
weights and optimizer state. The ensemble of K models predicts the mean of their softmax; its uncertainty
is the per-voxel standard deviation of the class probabilities across the K models (mean over classes,
which for two classes is the std of the foreground probability) and, as a second map, the predictive
entropy of the mean softmax.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fedseg.algorithms.screening import OPTIM_SEP, check_optimizer_state  # noqa: F401 (re-exported)
from fedseg.engine import (
    EvalResult,
    SegEngine,
    SegNetwork,
    TrainStats,
    load_numpy_state,
    load_optimizer_state,
    optimizer_state_to_numpy,
    state_to_numpy,
)
from fedseg.modelset import load_model_set, save_model_set

METHOD = "fedcross"
LR_SCHEDULES = ("constant", "poly", "cosine")


# ---- learning-rate schedule (travels with each model) -----------------------------------------------------
def lr_at(kind: str, base_lr: float, position: float, total: float, power: float = 0.9) -> float:
    """Learning rate of a model that has done `position` of its `total` planned visits (fractions allowed).

    constant: base_lr.  poly: base_lr * (1 - p) ** power.  cosine: base_lr * (1 + cos(pi p)) / 2.
    p = position / total, clipped to [0, 1], so a model that trains past its plan keeps the final rate.
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {LR_SCHEDULES}")
    for name, value in (("base_lr", base_lr), ("position", position), ("total", total), ("power", power)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total!r}")
    p = min(max(float(position) / float(total), 0.0), 1.0)
    if kind == "constant":
        return float(base_lr)
    if kind == "poly":
        return float(base_lr) * (1.0 - p) ** float(power)
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class LrSchedule:
    """What the server sends with each visit so the site computes the model's rate at every step."""

    kind: str = "poly"
    base_lr: float = 1e-3
    total_visits: int = 1
    power: float = 0.9

    def __post_init__(self):
        lr_at(self.kind, self.base_lr, 0, self.total_visits, self.power)  # validates

    def lr(self, position: float) -> float:
        return lr_at(self.kind, self.base_lr, position, self.total_visits, self.power)

    def as_meta(self) -> dict:
        return {"kind": self.kind, "base_lr": self.base_lr, "total_visits": self.total_visits, "power": self.power}

    @classmethod
    def from_meta(cls, values: dict) -> "LrSchedule":
        return cls(**{k: values[k] for k in ("kind", "base_lr", "total_visits", "power")})


# ---- one visit ----------------------------------------------------------------------------------------------
def cross_visit(
    engine: SegEngine,
    weights: dict,
    optim_state: dict | None,
    steps: int,
    schedule: LrSchedule,
    visits_done: int,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict, dict, TrainStats]:
    """Train a travelling model for `steps` steps at this site, continuing its optimizer and lr schedule.

    Within the visit the schedule position moves from visits_done to visits_done + 1, so the rate decays
    smoothly across visits instead of jumping at each hand-over.
    """
    net = engine.new_network()
    load_numpy_state(net, weights, engine.site)
    optimizer = engine.new_optimizer(net, lr=schedule.lr(visits_done))
    load_optimizer_state(optimizer, net, optim_state)
    stats = engine.train(
        net,
        steps,
        optimizer=optimizer,
        lr_at_step=lambda i: schedule.lr(visits_done + i / max(steps, 1)),
        should_stop=should_stop,
        on_step=on_step,
    )
    return state_to_numpy(net), optimizer_state_to_numpy(optimizer, net), stats


# ---- checks of what comes back ------------------------------------------------------------------------------
def fingerprint(weights: dict) -> str:
    """Short content hash of a weight dict: the history shows which communications changed which model."""
    digest = hashlib.sha1()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(weights[key]).tobytes())
    return digest.hexdigest()[:12]


# ---- initial models ---------------------------------------------------------------------------------------
def initial_members(network_args: dict, model0: dict, num_models: int, seed: int) -> list[dict]:
    """Model 0 is the given (persistor's) model; model m > 0 is a fresh network seeded with seed + m."""
    members = [dict(model0)]
    state = torch.random.get_rng_state()
    try:
        for m in range(1, num_models):
            torch.manual_seed(int(seed) + m)
            members.append(state_to_numpy(SegNetwork(**network_args)))
    finally:
        torch.random.set_rng_state(state)
    return members


# ---- the ensemble -------------------------------------------------------------------------------------------
def ensemble_maps(member_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, B, C, *spatial) softmax of K members -> mean probs (B, C, ...), std (B, ...), entropy (B, ...).

    std: per-voxel standard deviation across the K members (population std), averaged over classes.
    entropy: -sum_c p_c log p_c of the mean probabilities (nats; 0 = certain, log C = uniform).
    """
    mean = member_probs.mean(dim=0)
    std = member_probs.std(dim=0, unbiased=False).mean(dim=1) if member_probs.shape[0] > 1 else torch.zeros_like(mean[:, 0])
    entropy = -(mean * torch.log(mean.clamp_min(1e-12))).sum(dim=1)
    return mean, std, entropy


def segment(mean_probs: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Label map (B, *spatial) from mean probabilities (B, C, ...): argmax, or with a threshold t the most
    probable foreground class where its probability exceeds t (binary: foreground probability > t)."""
    if threshold is None:
        return mean_probs.argmax(dim=1)
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    fg_prob, fg_class = mean_probs[:, 1:].max(dim=1)
    return torch.where(fg_prob > float(threshold), fg_class + 1, torch.zeros_like(fg_class))


@dataclass
class EnsembleScores:
    """Scores of an ensemble and its members on one section, and its uncertainty on right vs wrong voxels."""

    ensemble: EvalResult
    members: list[EvalResult]
    mean_std_per_case: list[float] = field(default_factory=list)
    mean_entropy_per_case: list[float] = field(default_factory=list)
    std_sum_wrong: float = 0.0
    n_wrong: int = 0
    std_sum_right: float = 0.0
    n_right: int = 0

    def uncertainty(self) -> dict:
        return {
            "std_sum_wrong": self.std_sum_wrong,
            "n_wrong": self.n_wrong,
            "std_sum_right": self.std_sum_right,
            "n_right": self.n_right,
            "mean_std_wrong": self.std_sum_wrong / self.n_wrong if self.n_wrong else float("nan"),
            "mean_std_right": self.std_sum_right / self.n_right if self.n_right else float("nan"),
            "mean_std_per_case": self.mean_std_per_case,
            "mean_entropy_per_case": self.mean_entropy_per_case,
        }


@torch.no_grad()
def score_ensemble(engine: SegEngine, nets: Sequence[torch.nn.Module], section: str, with_hd95: bool = False) -> EnsembleScores:
    """Per-case Dice of the ensemble (argmax of the mean softmax) and of every member, in one inference pass.

    The engine scores everything: the ensemble through engine.score_items with the mean softmax, each member
    through engine.score replaying that member's stored argmax (so no member is run twice).
    """
    if not nets:
        raise ValueError("score_ensemble needs at least one network")
    member_preds: list[list[torch.Tensor]] = [[] for _ in nets]
    scores = EnsembleScores(ensemble=None, members=[])  # type: ignore[arg-type]

    def ensemble_probs(item: dict) -> torch.Tensor:
        probs = torch.stack([engine.predict_probs(net, item["image"].unsqueeze(0)) for net in nets])
        mean, std, entropy = ensemble_maps(probs)
        for m in range(len(nets)):
            member_preds[m].append(probs[m].argmax(dim=1).to(torch.uint8).cpu())
        label = item["label"].to(mean.device).long()[0]  # (*spatial)
        wrong = mean.argmax(dim=1)[0] != label
        voxel_std = std[0]
        scores.std_sum_wrong += float(voxel_std[wrong].double().sum())
        scores.n_wrong += int(wrong.sum())
        scores.std_sum_right += float(voxel_std[~wrong].double().sum())
        scores.n_right += int((~wrong).sum())
        scores.mean_std_per_case.append(float(voxel_std.mean()))
        scores.mean_entropy_per_case.append(float(entropy.mean()))
        return mean

    scores.ensemble = engine.score_items(ensemble_probs, section, with_hd95)
    num_classes = engine.cfg.num_classes
    for preds in member_preds:
        replay = iter(preds)

        def member_probs(image: torch.Tensor, replay=replay) -> torch.Tensor:
            pred = next(replay).long().to(engine.device)  # (B, *spatial)
            return torch.movedim(torch.nn.functional.one_hot(pred, num_classes).float(), -1, 1)

        scores.members.append(engine.score(member_probs, section, with_hd95))
    return scores


# ---- model-set files ------------------------------------------------------------------------------------------
def member_key(m: int) -> str:
    return f"m{m}"


def save_members(path: str | Path, members: Sequence[dict], optimizers: Sequence[dict], info: dict) -> None:
    """K models with their optimizer states, plus info (communication, engine, network, schedule...)."""
    groups = {
        "members": {member_key(m): w for m, w in enumerate(members)},
        "optimizers": {member_key(m): o or {} for m, o in enumerate(optimizers)},
    }
    save_model_set(path, groups, {**info, "method": METHOD, "num_models": len(members)})


def load_members(path: str | Path) -> tuple[list[dict], list[dict], dict]:
    """Inverse of save_members: (weights per model, optimizer state per model, info)."""
    groups, info = load_model_set(path)
    if info.get("method") != METHOD:
        raise ValueError(f"{path} is not a FedCross model set (method {info.get('method')!r})")
    k = int(info["num_models"])
    members = [groups["members"][member_key(m)] for m in range(k)]
    optimizers = [groups.get("optimizers", {}).get(member_key(m), {}) for m in range(k)]
    return members, optimizers, info
