"""Pure math of the FedSeg server workflows (numpy only; no FLARE or torch imports).

* :mod:`.aggregation` -- update validation, weighted and robust averaging, applying diffs
* :mod:`.screening`   -- reading what a site sends back: fields, optimizer state, update magnitudes
* :mod:`.softpull`    -- FedSM SoftPull mixing of personalized models
* :mod:`.routing`     -- FedSM super-model routing (global vs personalized)
* :mod:`.schedules`   -- FedCross / FedCrossEns site-visit schedules
"""

from .aggregation import (
    AGGREGATIONS,
    UpdateRejected,
    aggregate,
    aggregate_shared,
    check_update,
    robust_average,
    weighted_average,
)
from .routing import GLOBAL, Route, route, route_batch, softmax
from .schedules import KINDS, assign, validate_explicit
from .softpull import softpull, softpull_weights

__all__ = [
    "AGGREGATIONS",
    "GLOBAL",
    "KINDS",
    "Route",
    "UpdateRejected",
    "aggregate",
    "aggregate_shared",
    "assign",
    "check_update",
    "robust_average",
    "route",
    "route_batch",
    "softmax",
    "softpull",
    "softpull_weights",
    "validate_explicit",
    "weighted_average",
]
