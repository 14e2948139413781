"""FedCross / FedCrossEns without FLARE: one site visit of a travelling model, ensemble scoring with
uncertainty. The learning-rate schedule that travels with each model is fedseg.algorithms.lr_schedule; the
server's side (initial members, model-set files, fingerprints) is in fedseg.modelset and fedseg.algorithms.

A model's state is (weights, optimizer state, number of visits done). One visit at a site loads all three,
trains the visit budget with the learning rate of the model's own schedule position, and returns the new
weights and optimizer state. The ensemble of K models predicts the mean of their softmax; its uncertainty
is the per-voxel standard deviation of the class probabilities across the K models (mean over classes,
which for two classes is the std of the foreground probability) and, as a second map, the predictive
entropy of the mean softmax. How well the std flags the ensemble's errors is scored at each site as the
voxel-level AUROC of the std for "ensemble prediction != label", from fixed-bin histograms (no voxel data
leaves the site).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedseg.algorithms.lr_schedule import LrSchedule
from fedseg.engine import (
    EvalResult,
    SegEngine,
    TrainStats,
    load_numpy_state,
    load_optimizer_state,
    optimizer_state_to_numpy,
    state_to_numpy,
)


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


# ---- uncertainty quality: does the ensemble's std flag its errors? --------------------------------------------
STD_BINS = 1000  # fixed-bin histograms of the per-voxel std on [0, STD_MAX]
STD_MAX = 0.5  # the population std of values in [0, 1] is at most 0.5 (larger values fall in the last bin)


def std_histogram(values, bins: int = STD_BINS, top: float = STD_MAX) -> np.ndarray:
    """Counts of `values` in `bins` equal bins on [0, top]; values outside are clipped into the end bins."""
    values = np.asarray(values, dtype=np.float64).ravel()
    index = np.clip(np.floor(values / top * bins), 0, bins - 1).astype(np.int64)
    return np.bincount(index, minlength=bins).astype(np.int64)


def auroc_from_histograms(positive, negative) -> float:
    """AUROC of a score for telling positives (here: wrongly segmented voxels) from negatives (right ones),
    from the two histograms of the score over the same bins: P(score_pos > score_neg) + P(equal) / 2, where
    two values in the same bin count as equal. Exact for scores that are constant within a bin, otherwise
    exact up to the binning. NaN when either class is empty."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"histograms must be 1-D and of the same length, got {pos.shape} and {neg.shape}")
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("histogram counts must be >= 0")
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


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
    hist_wrong: np.ndarray = field(default_factory=lambda: np.zeros(STD_BINS, np.int64))
    hist_right: np.ndarray = field(default_factory=lambda: np.zeros(STD_BINS, np.int64))

    def uncertainty(self) -> dict:
        """Summaries only (no voxel data): mean std on wrong / right voxels, per-case means, and the voxel-level
        AUROC of the std for finding the wrong voxels (from the fixed-bin histograms, which stay at the site)."""
        return {
            "auroc": auroc_from_histograms(self.hist_wrong, self.hist_right),
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
        scores.hist_wrong += std_histogram(voxel_std[wrong].cpu().numpy())
        scores.hist_right += std_histogram(voxel_std[~wrong].cpu().numpy())
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
