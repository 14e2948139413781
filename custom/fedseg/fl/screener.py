"""The server's screening of what sites return, shared by FedSeg's workflows.

Screener runs the checks of fedseg.algorithms.screening on a site's result and turns a failed check
(UpdateRejected) into a rejection reported under the site's name, so the round goes on without that result.
No FLARE here: the controller hands in how a rejection is reported (FedSegController.reject: a log line and an
NVFlare audit event) and how a warning is logged; a test hands in a list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from fedseg.algorithms import UpdateRejected, check_update
from fedseg.algorithms.screening import (
    cap_step_weights,
    check_metadata,
    clip_scales,
    clip_update,
    read_score,
    read_step_count,
    screen_directions,
    screen_magnitudes,
    update_directions,
    update_norm,
)

Reject = Callable[[str, str, str], None]  # (site, what was rejected, why)


class Screener:
    """Checks of site results with their thresholds; every rejection goes to ``reject(site, what, reason)``.

    Args:
        max_update_ratio: an update whose norm is above this many times the median of the other updates
            (of the round, and recent accepted ones) is rejected (0: no magnitude check).
        clip_ratio: every accepted update that is aggregated is bounded to this many times the median norm of
            the round's accepted updates (norm bounding; 0: none), so a sign-flipped or scaled update within
            max_update_ratio moves the model no further than an honest one may.
        min_update_cosine: with 3 or more updates in a round, one whose cosine with the mean of the other
            sites' updates is below this is rejected: it would undo what the others learned (-1: no check).
    """

    def __init__(
        self,
        reject: Reject,
        warn: Callable[[str], None],
        max_update_ratio: float = 10.0,
        clip_ratio: float = 2.0,
        min_update_cosine: float = -0.5,
    ):
        if float(max_update_ratio) < 0:
            raise ValueError(f"max_update_ratio must be >= 0, got {max_update_ratio}")
        if float(clip_ratio) < 0:
            raise ValueError(f"clip_ratio must be >= 0, got {clip_ratio}")
        if not -1.0 <= float(min_update_cosine) <= 1.0:
            raise ValueError(f"min_update_cosine must be in [-1, 1], got {min_update_cosine}")
        self.reject = reject
        self.warn = warn
        self.max_update_ratio = float(max_update_ratio)
        self.clip_ratio = float(clip_ratio)
        self.min_update_cosine = float(min_update_cosine)

    def metadata(self, site: str, meta, metrics, what: str) -> bool:
        """Whether a result's meta and metrics are within bounds (before anything formats or stores them)."""
        try:
            check_metadata(site, meta, "meta")
            check_metadata(site, metrics, "metrics")
            return True
        except UpdateRejected as e:
            self.reject(site, what, e.reason)
            return False

    def accept(self, site: str, params: dict, reference: dict, what: str) -> bool:
        """Whether an update may enter a model (keys, shapes, dtypes, finite values against ``reference``)."""
        try:
            check_update(site, params, reference)
            return True
        except UpdateRejected as e:
            self.reject(site, what, e.reason)
            return False

    def read(self, site: str, what: str, read_fn, *args):
        """``read_fn(site, *args)`` (a fedseg.algorithms.screening reader); None, rejected, when it raises."""
        try:
            return read_fn(site, *args)
        except UpdateRejected as e:
            self.reject(site, what, e.reason)
            return None

    def scores(self, metrics: Mapping[str, object], key: str) -> dict[str, float]:
        """{site: its score ``key``} of the sites' metrics ({site: metrics}); a malformed one is rejected."""
        return {s: v for s in sorted(metrics) if (v := self.read(s, "metrics", read_score, metrics[s], key)) is not None}

    def magnitudes(self, what: str, norms: dict[str, float], recent: Iterable[float] = ()) -> set[str]:
        """Sites whose update is too large against the others (fedseg.algorithms.screen_magnitudes)."""
        rejected = screen_magnitudes(norms, recent, self.max_update_ratio)
        for site, reason in sorted(rejected.items()):
            self.reject(site, what, reason)
        return set(rejected)

    def directions(self, what: str, updates: dict[str, dict], references: dict[str, dict]) -> tuple[set[str], dict]:
        """Sites whose update points against the others' (fedseg.algorithms.screen_directions), and every
        site's cosine with the others' mean (for the history)."""
        cosines = update_directions(updates, references)
        rejected = screen_directions(cosines, self.min_update_cosine)
        for site, reason in rejected.items():
            self.reject(site, what, reason)
        return set(rejected), cosines

    def bound(self, what: str, updates: dict[str, dict], references: dict[str, dict]) -> tuple[dict[str, dict], dict]:
        """Norm bounding of the accepted updates ({site: params}, each against ``references[site]``, what that site
        was sent): those above ``clip_ratio`` x the round's median norm are scaled down to it (logged).
        Returns (updates, {site: factor} of the clipped ones)."""
        norms = {s: update_norm(u, references[s]) for s, u in updates.items()}
        scales = clip_scales(norms, self.clip_ratio)
        for site, scale in scales.items():
            self.warn(
                f"BOUNDED {what} from {site}: norm {norms[site]:.4g} above {self.clip_ratio:g}x the round's median; "
                f"scaled by {scale:.3g}"
            )
        return {s: clip_update(u, references[s], scales[s]) if s in scales else u for s, u in updates.items()}, scales

    def step_weights(self, metas: Mapping[str, object], plan: int | None, max_weight_ratio: float) -> dict[str, float]:
        """Aggregation weights from the sites' result meta ({site: meta}): each site's validated step count, capped
        by ``plan`` steps or, without a plan, at ``max_weight_ratio`` x the median of the other sites' counts
        (both after the server operator's ceilings). A site whose count is malformed is left out (rejected)."""
        steps = {}
        for site, meta in sorted(metas.items()):
            value = self.read(site, "step count", read_step_count, meta, plan)
            if value is not None:
                steps[site], over_plan = value
                if over_plan:
                    self.warn(f"{site} reported more steps than the {plan} planned; its weight is capped at {plan}")
        if plan is not None:
            return {s: float(v) for s, v in steps.items()}
        weights, capped = cap_step_weights(steps, max_weight_ratio)
        for site, cap in capped.items():
            self.warn(
                f"{site} reported {steps[site]} steps, above {max_weight_ratio:g}x the other sites' median; "
                f"its weight is capped at {cap:g}"
            )
        return weights
