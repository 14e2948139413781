"""MONAI training/evaluation engine (no FLARE imports at module level)."""

from fedseg.engine.config import EngineConfig
from fedseg.engine.engine import (
    EvalResult,
    SegEngine,
    TrainStats,
    load_numpy_state,
    load_optimizer_state,
    optimizer_state_to_numpy,
    select_device,
    state_to_numpy,
)
from fedseg.engine.networks import SegNetwork, build_segmentation_network

__all__ = [
    "EngineConfig",
    "EvalResult",
    "SegEngine",
    "SegNetwork",
    "TrainStats",
    "build_segmentation_network",
    "load_numpy_state",
    "load_optimizer_state",
    "optimizer_state_to_numpy",
    "select_device",
    "state_to_numpy",
]
