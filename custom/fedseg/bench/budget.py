"""The benchmark's training budget: pure functions, no FLARE, no torch.

Definition. The budget B of a benchmark cell (one dataset, one seed) is the total number of
segmentation-network optimizer steps, summed over all sites and over all segmentation networks a method
trains. It is set by a FedAvg reference of R rounds with E local epochs per round:

    B = R * E * sum_i s_i          s_i = ceil(n_train_i / batch_size)  (steps per epoch at site i)

Every method gets exactly B (the batch size, network, optimizer and data are the same for all):

  local-only    site i trains its own model for R * E * s_i steps                         (sum: B)
  centralized   one model, B steps on the pooled training cases of all sites
  FedAvg        R rounds x E epochs at every site
  FedProx       same as FedAvg (the proximal term costs compute, not steps)
  FedSM         trains TWO segmentation networks per site per round (global g and personalized p_i):
  SoftPull        policy "epochs" (default): R rounds, E/2 epochs per network  (needs E even)
                  policy "rounds": R/2 rounds, E epochs per network             (needs R even)
                  policy "extra":  R rounds, E epochs per network = 2B; the second B is reported as extra cost
                FedSM's site selector is NOT a segmentation network: its steps are extra cost, reported.
  FedCross      K = 1 model relayed site to site (cyclic); one site trains per communication, so it needs
                N times the communications: C = N * R * E / v communications of v epochs (default v = E,
                C = N * R); each site hosts the model C / N times.                          (sum: B)
  FedCrossEns   K = N models, every site trains one of them per communication:
                C = R * E / v communications of v epochs (default v = E, C = R).            (sum: B)
                Each member sees about B / N steps; the ensemble costs K forward passes per prediction and
                K models of validation traffic per communication: reported as extra cost.

Budget violations (an E or R that cannot be split) raise ValueError instead of silently giving a method
more or less work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

METHODS = ("local", "centralized", "fedavg", "fedprox", "fedsm", "softpull", "fedcross", "fedcrossens")
FL_METHODS = ("fedavg", "fedprox", "fedsm", "softpull", "fedcross", "fedcrossens")
BASELINES = ("local", "centralized")
FEDSM_POLICIES = ("epochs", "rounds", "extra")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over n_train cases (the engine's rule: the last batch may be smaller)."""
    if n_train < 1 or batch_size < 1:
        raise ValueError(f"n_train and batch_size must be >= 1, got {n_train}, {batch_size}")
    return math.ceil(n_train / batch_size)


@dataclass(frozen=True)
class Budget:
    """R rounds x E local epochs at sites with s_i steps per epoch."""

    rounds: int
    epochs: int
    site_steps_per_epoch: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rounds < 1 or self.epochs < 1:
            raise ValueError(f"rounds and epochs must be >= 1, got {self.rounds}, {self.epochs}")
        if not self.site_steps_per_epoch:
            raise ValueError("a budget needs at least one site")
        if any(int(s) < 1 for s in self.site_steps_per_epoch.values()):
            raise ValueError(f"steps per epoch must be >= 1, got {self.site_steps_per_epoch}")

    @classmethod
    def from_counts(cls, rounds: int, epochs: int, train_counts: dict, batch_size: int) -> "Budget":
        return cls(rounds, epochs, {s: steps_per_epoch(n, batch_size) for s, n in train_counts.items()})

    @property
    def sites(self) -> list[str]:
        return sorted(self.site_steps_per_epoch)

    @property
    def n_sites(self) -> int:
        return len(self.site_steps_per_epoch)

    def site_steps(self, site: str) -> int:
        return self.rounds * self.epochs * int(self.site_steps_per_epoch[site])

    @property
    def total_steps(self) -> int:
        return sum(self.site_steps(s) for s in self.sites)


@dataclass
class MethodPlan:
    """What a method is configured to do under the budget, and what it costs beyond the budget."""

    method: str
    seg_steps_total: int  # planned segmentation-network steps summed over sites and networks
    seg_steps_per_site: dict
    rounds: int | None = None  # FL rounds (FedAvg-style workflows)
    local_epochs: int | None = None  # epochs per network per round (per visit for FedCross)
    communications: int | None = None  # FedCross: visits per model
    visit_epochs: int | None = None
    num_models: int = 1  # models that exist at the end (K for FedCrossEns)
    networks_per_site_round: int = 1  # segmentation networks a site trains per round
    model_downloads_per_site: float = 0.0  # training-task model transfers server -> site, per site (planned)
    extra_cost: dict = field(default_factory=dict)  # name -> description of work beyond the budget
    within_budget: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def _divides(name: str, total: int, part: int) -> int:
    if part < 1 or total % part:
        raise ValueError(f"{name}: {part} does not divide {total}; choose rounds/epochs so the budget splits exactly")
    return total // part


def plan_method(method: str, budget: Budget, fedsm_policy: str = "epochs", fedcross_visit_epochs: int | None = None,
                fedcrossens_visit_epochs: int | None = None) -> MethodPlan:
    """The configuration that gives `method` the budget B (see the module docstring)."""
    r, e, n = budget.rounds, budget.epochs, budget.n_sites
    per_site = {s: budget.site_steps(s) for s in budget.sites}
    if method == "local":
        return MethodPlan(method, budget.total_steps, per_site, rounds=r, local_epochs=e, num_models=n,
                          extra_cost={"models": f"{n} site models (one per site), no communication"})
    if method == "centralized":
        return MethodPlan(method, budget.total_steps, {"pooled": budget.total_steps}, rounds=r, local_epochs=e,
                          extra_cost={"data": "all sites' images pooled in one place (not federated)"})
    if method in ("fedavg", "fedprox"):
        extra = {"proximal term": "one extra weight-distance term per step (mu = 0.01)"} if method == "fedprox" else {}
        return MethodPlan(method, budget.total_steps, per_site, rounds=r, local_epochs=e,
                          model_downloads_per_site=float(r), extra_cost=extra)
    if method in ("fedsm", "softpull"):
        if fedsm_policy not in FEDSM_POLICIES:
            raise ValueError(f"fedsm_policy must be one of {FEDSM_POLICIES}, got {fedsm_policy!r}")
        rounds, epochs = r, e
        if fedsm_policy == "epochs":
            epochs = _divides(f"{method}: E={e} epochs split over 2 networks", e, 2)
        elif fedsm_policy == "rounds":
            rounds = _divides(f"{method}: R={r} rounds split over 2 networks", r, 2)
        steps = {s: 2 * rounds * epochs * budget.site_steps_per_epoch[s] for s in budget.sites}
        total = sum(steps.values())
        extra = {"personalized models": f"{n} personalized networks kept on the server (one per site) and sent each round"}
        if fedsm_policy == "extra":
            extra["second network"] = f"personalized network trained for another {budget.total_steps} steps (2B in all)"
        if method == "fedsm":
            extra["selector"] = "site-classifier training every round (its steps are reported, not counted in B)"
            extra["inference"] = "selector + one segmentation network per prediction"
        return MethodPlan(method, total, steps, rounds=rounds, local_epochs=epochs, num_models=1 + n,
                          networks_per_site_round=2, model_downloads_per_site=float(rounds), extra_cost=extra,
                          within_budget=total == budget.total_steps)
    if method == "fedcross":
        v = fedcross_visit_epochs or e
        per_visit_site = _divides(f"fedcross: visit of {v} epochs", r * e, v)  # visits per site
        c = n * per_visit_site
        steps = {s: per_visit_site * v * budget.site_steps_per_epoch[s] for s in budget.sites}
        return MethodPlan(method, sum(steps.values()), steps, communications=c, visit_epochs=v, num_models=1,
                          model_downloads_per_site=float(per_visit_site),
                          extra_cost={"sequential": f"one site trains per communication: {c} communications in sequence",
                                      "validation": "the model is scored on every site's validation cases after every communication"})
    if method == "fedcrossens":
        v = fedcrossens_visit_epochs or e
        c = _divides(f"fedcrossens: visit of {v} epochs", r * e, v)
        steps = {s: c * v * budget.site_steps_per_epoch[s] for s in budget.sites}
        return MethodPlan(method, sum(steps.values()), steps, communications=c, visit_epochs=v, num_models=n,
                          model_downloads_per_site=float(c),
                          extra_cost={"ensemble": f"{n} members: {n} forward passes per prediction",
                                      "validation": f"all {n} models scored on every site after every communication",
                                      "members": f"each member trains about B/{n} steps"})
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def plan_methods(methods, budget: Budget, **options) -> dict[str, MethodPlan]:
    return {m: plan_method(m, budget, **options) for m in methods}


def check_equal_budget(plans: dict[str, MethodPlan], budget: Budget) -> list[str]:
    """Names of the methods whose planned segmentation steps differ from the budget (empty: all equal).
    A method run under the "extra" FedSM policy is listed (its extra network is reported as cost)."""
    return sorted(m for m, p in plans.items() if p.seg_steps_total != budget.total_steps)
