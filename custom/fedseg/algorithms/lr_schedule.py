"""The learning-rate schedule that travels with each FedCross model (pure; no torch).

The server plans it (kind, base rate, the model's planned number of visits) and sends it with every visit; the
site computes the rate at every step from the model's position in its own plan (visits done + the fraction of
this visit), so the rate decays smoothly across hand-overs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

LR_SCHEDULES = ("constant", "poly", "cosine")


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

    kind: str = "constant"
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
    def from_meta(cls, values: dict) -> LrSchedule:
        return cls(**{k: values[k] for k in ("kind", "base_lr", "total_visits", "power")})
