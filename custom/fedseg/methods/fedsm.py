"""FedSM at a site (no FLARE): train the global model, this site's personalized model and the model selector,
and score the super model.

The selector is a site classifier on a small thumbnail of the z-scored image. Every site sees only its own
label, so its Adam moments are averaged by the server with its weights (as in the reference) and travel back:
every local step then uses a shared, balanced estimate of the gradient scale instead of one site's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedseg.algorithms.routing import GLOBAL, route
from fedseg.engine import SegEngine, SiteClassifier, load_numpy_state, load_optimizer_state, optimizer_state_to_numpy, state_to_numpy

DEFAULT_SELECTOR = {"input_size": 32, "channels": [8, 16, 32, 64], "lr": 3e-3, "epochs": 2, "batch_size": 8}


@dataclass
class SelectorSettings:
    num_sites: int
    input_size: int = DEFAULT_SELECTOR["input_size"]
    channels: Sequence[int] = tuple(DEFAULT_SELECTOR["channels"])
    lr: float = DEFAULT_SELECTOR["lr"]
    epochs: int = DEFAULT_SELECTOR["epochs"]
    batch_size: int = DEFAULT_SELECTOR["batch_size"]

    @classmethod
    def from_meta(cls, num_sites: int, values: dict | None) -> "SelectorSettings":
        merged = {**DEFAULT_SELECTOR, **(values or {})}
        return cls(num_sites=int(num_sites), **{k: merged[k] for k in DEFAULT_SELECTOR})


def build_selector(spatial_dims: int, in_channels: int, s: SelectorSettings) -> SiteClassifier:
    """The selector sees two views per image channel (see selector_input), hence 2 x in_channels."""
    return SiteClassifier(num_sites=s.num_sites, spatial_dims=spatial_dims, in_channels=2 * in_channels,
                          input_size=s.input_size, channels=s.channels)


def new_selector(engine: SegEngine, s: SelectorSettings) -> SiteClassifier:
    return build_selector(engine.cfg.spatial_dims, engine.cfg.in_channels, s).to(engine.device)


def thumbnail(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, size, ...): the selector sees the whole field of view at a fixed size."""
    mode = "bilinear" if image.ndim == 4 else "trilinear"
    return F.interpolate(image.float(), size=(size,) * (image.ndim - 2), mode=mode, align_corners=False)


def selector_input(image: torch.Tensor, image_raw: torch.Tensor, size: int) -> torch.Tensor:
    """Selector input: the z-scored image (appearance, noise, bias field, anatomy) and the signed log of the
    stored intensities (scanner units and ranges differ between hospitals), both as fixed-size thumbnails."""
    raw = image_raw.float()
    log_intensity = torch.sign(raw) * torch.log1p(raw.abs())
    return torch.cat([thumbnail(image, size), thumbnail(log_intensity, size)], dim=1)


def _thumbnails(engine: SegEngine, section: str, size: int) -> torch.Tensor:
    images = [selector_input(item["image"].unsqueeze(0), item["image_raw"].unsqueeze(0), size)
              for _, item in engine.eval_batches(section)]
    return torch.cat(images).to(engine.device)


def train_selector(engine: SegEngine, selector: SiteClassifier, optim_state: dict | None, site_index: int,
                   s: SelectorSettings, seed: int = 0) -> tuple[dict, dict, int]:
    """Local selector epochs on this site's training thumbnails, all labelled site_index."""
    images = _thumbnails(engine, "training", s.input_size)
    labels = torch.full((images.shape[0],), int(site_index), dtype=torch.long, device=engine.device)
    optimizer = torch.optim.Adam(selector.parameters(), lr=s.lr)
    load_optimizer_state(optimizer, selector, optim_state)
    generator = torch.Generator().manual_seed(seed)
    selector.train()
    steps = 0
    for _ in range(s.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, len(order), s.batch_size):
            idx = order[start : start + s.batch_size].to(engine.device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(selector(images[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            steps += 1
    return state_to_numpy(selector), optimizer_state_to_numpy(optimizer, selector), steps


@torch.no_grad()
def selector_probs(engine: SegEngine, selector: SiteClassifier, image: torch.Tensor, image_raw: torch.Tensor, size: int) -> np.ndarray:
    selector.eval()
    logits = selector(selector_input(image, image_raw, size).to(engine.device))
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


@torch.no_grad()
def score_super_model(engine: SegEngine, global_net, personal_nets: dict[str, torch.nn.Module], selector: SiteClassifier | None,
                      site_names: list[str], own_site: str, gamma: float, size: int, section: str,
                      with_hd95: bool = False) -> dict:
    """Per-site scores of global, own personalized and super model, selector accuracy and routing counts.
    Without a selector (SoftPull alone) only the global and own personalized model are scored."""
    if selector is None:
        result = {"global": engine.evaluate(global_net, section, with_hd95)}
        if own_site in personal_nets:
            result["personalized"] = engine.evaluate(personal_nets[own_site], section, with_hd95)
        return {"scores": result}
    own_index = site_names.index(own_site)
    routes = []

    def super_probs(item: dict) -> torch.Tensor:
        image = item["image"].unsqueeze(0)
        choice = route(selector_probs(engine, selector, image, item["image_raw"].unsqueeze(0), size)[0], site_names, gamma)
        routes.append(choice)
        net = global_net if choice.model == GLOBAL else personal_nets.get(choice.model, global_net)
        return engine.predict_probs(net, image)

    result = {
        "global": engine.evaluate(global_net, section, with_hd95),
        "super": engine.score_items(super_probs, section, with_hd95),
    }
    if own_site in personal_nets:
        result["personalized"] = engine.evaluate(personal_nets[own_site], section, with_hd95)
    correct = sum(int(r.site_index == own_index) for r in routes)
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.model] = counts.get(r.model, 0) + 1
    return {
        "scores": result,
        "selector_accuracy": correct / max(len(routes), 1),
        "routing": counts,
        "mean_confidence": float(np.mean([r.confidence for r in routes])) if routes else float("nan"),
    }


def fedsm_local_round(engine: SegEngine, groups: dict, site_index: int, site_names: list[str], selector_values: dict | None,
                      gamma: float, steps: int, should_stop: Callable[[], bool] | None = None,
                      on_step: Callable[[int, float], None] | None = None, seed: int = 0) -> tuple[dict, dict, int]:
    """One FedSM round at a site. groups: {"global", "personal"} plus {"selector", "selector_optim"} when the
    job uses the selector (SoftPull alone sends none), all numpy dicts.

    Returns (updated groups, metrics measured on the RECEIVED models before training, segmentation steps).
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
    if engine.cases("validation"):
        if use_selector:
            # other sites' personalized models are not sent in training rounds: routing to another site uses
            # the global model here; the final evaluation scores the full super model
            scored = score_super_model(engine, global_net, {own: personal_net}, selector, site_names, own, gamma,
                                       s.input_size, "validation")
            for name, res in scored["scores"].items():
                metrics[f"val_{name}_dice"] = res.summary()["dice"]
            metrics["val_selector_acc"] = scored["selector_accuracy"]
        else:
            metrics["val_global_dice"] = engine.evaluate(global_net, "validation").summary()["dice"]
            metrics["val_personalized_dice"] = engine.evaluate(personal_net, "validation").summary()["dice"]

    global_stats = engine.train(global_net, steps, should_stop=should_stop, on_step=on_step)
    personal_stats = engine.train(personal_net, steps, should_stop=should_stop)
    metrics.update({"train_global_loss": global_stats.mean_loss, "train_personal_loss": personal_stats.mean_loss})
    updated = {"global": state_to_numpy(global_net), "personal": state_to_numpy(personal_net)}
    if use_selector:
        updated["selector"], updated["selector_optim"], sel_steps = train_selector(
            engine, selector, groups.get("selector_optim"), site_index, s, seed)
        metrics["selector_steps"] = float(sel_steps)
    return updated, metrics, global_stats.steps
