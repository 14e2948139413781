"""The engine's settings: one flat, JSON-friendly record shared by jobs, baselines and benchmarks."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

# FedAvg/FedProx local optimizer across rounds: a fresh Adam every round, or each site keeps its own moments
LOCAL_OPTIMIZER = ("fresh", "keep")


@dataclass
class EngineConfig:
    """Everything the MONAI engine needs to train and evaluate one segmentation network at one site.

    num_classes counts the background (binary segmentation: 2). roi_size is the training patch and the
    sliding-window size for inference. Local budget per round/visit: local_steps if > 0, else local_epochs
    passes over the site's training cases. dp: None, or {"noise_multiplier", "max_grad_norm", "delta"}: every
    training step is DP-SGD with the site's privacy accounted (fedseg.engine.dp; AMP is then off).
    """

    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    roi_size: list[int] = field(default_factory=lambda: [64, 64])
    network: dict[str, Any] = field(default_factory=lambda: {"arch": "unet", "channels": [16, 32, 64, 128]})
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"
    momentum: float = 0.99
    local_epochs: int = 1
    local_steps: int = 0
    amp: bool = True
    cache_rate: float = 1.0
    num_workers: int = 0
    num_threads: int = 0
    seed: int = 0
    sw_batch_size: int = 4
    overlap: float = 0.25
    dp: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> EngineConfig:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.roi_size) != self.spatial_dims:
            raise ValueError(f"roi_size {self.roi_size} must have {self.spatial_dims} entries")
        if self.num_classes < 2:
            raise ValueError("num_classes counts the background and must be >= 2")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ValueError("set local_epochs >= 1 or local_steps >= 1")
        if self.dp is not None:
            from fedseg.engine.dp import DPSettings

            DPSettings.from_value(self.dp)

    def network_args(self) -> dict[str, Any]:
        """Constructor arguments of fedseg.engine.networks.SegNetwork (what the server persistor needs too)."""
        return {
            **self.network,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.num_classes,
        }


# The engine every shipped job (jobs/, the recipes' defaults) trains with; resolve_engine merges overrides over it.
DEFAULT_ENGINE: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "num_classes": 2,
    "roi_size": [64, 64],
    "network": {"arch": "unet", "channels": [16, 32, 64, 128], "num_res_units": 1},
    "batch_size": 4,
    "lr": 0.001,
    "local_epochs": 2,
}


def resolve_engine(overrides: dict | None) -> dict:
    """DEFAULT_ENGINE with `overrides` merged over it ("network" key by key), checked: a bad setting fails here,
    where the job is written, not at the sites."""
    engine = copy.deepcopy(DEFAULT_ENGINE)
    for key, value in (overrides or {}).items():
        if key == "network" and isinstance(value, dict):
            engine["network"] = {**engine["network"], **value}
        else:
            engine[key] = value
    cfg = EngineConfig.from_dict(engine)
    if cfg.dp is not None:  # DP-SGD needs a network it can train per example (no BatchNorm): refused here already
        from fedseg.engine.dp import check_dp_network
        from fedseg.engine.networks import SegNetwork

        check_dp_network(SegNetwork(**cfg.network_args()), cfg.network.get("norm", "instance"))
    return engine
