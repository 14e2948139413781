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
  FedBN         same as FedAvg (the sites keep their normalization layers; only on a network that has some)
  FedSM         trains TWO segmentation networks per site per round (global g and personalized p_i):
  SoftPull        policy "epochs" (default): R rounds, E/2 epochs per network  (needs E even)
                  policy "rounds": R/2 rounds, E epochs per network             (needs R even)
                  policy "extra":  R rounds, E epochs per network = 2B; the second B is reported as extra cost
                FedSM's site selector is NOT a segmentation network: its steps are extra cost, reported.
  FedCross      K = 1 model relayed site to site (cyclic); one site trains per communication, so it needs
                N times the communications: C = N * R * E / v communications of v epochs (default v = E,
                C = N * R); each site hosts the model C / N times.                          (sum: B)
  FedCrossEns   K = N models, every site trains one of them per communication:
                C = R * E / v communications of v epochs (default: the longest v <= E that makes
                C a multiple of N, e.g. v = E, C = R when N divides R).                    (sum: B)
                Each member sees about B / N steps; the ensemble costs K forward passes per prediction and
                K models of validation traffic per communication: reported as extra cost.

Budget violations (an E or R that cannot be split) raise ValueError instead of silently giving a method
more or less work. FedCrossEns's Latin schedule needs whole blocks: C must be a multiple of N.

Two protocols (every report shows both, side by side):
  "equal"  equal steps: the plans above, every method gets B.
  "paper"  each paper's own protocol, with its extra compute reported next to its Dice:
             FedSM / SoftPull  every network trains the full E epochs per round for R rounds (2B in all)
             FedCrossEns       every member gets the full schedule of a single FedCross model:
                               C = N * R * E / v communications (N times the equal-steps plan; N*B in all)
           Every other method's own protocol IS the equal-steps plan (one run serves both tables).
  Matched-step baselines (run_specs(matched_steps=True)): next to the paper-protocol runs, FedAvg, local-only and
  centralized trained for the SAME number of steps, f*B for every multiple f the paper runs use (2 for FedSM /
  SoftPull, N for FedCrossEns; one set when N == 2). Their plan is the equal-steps plan with the rounds multiplied:
  R*f rounds of the same E epochs (the same local work per round, more rounds; local-only and centralized: R*f
  checkpoints of the same chunk size). Keys "<method>-<f>B" ("fedavg-2B", "local-4B", "centralized-4B" ...).

A benchmark cell runs RunSpecs (run_specs): a method under a protocol with optional controller settings
(e.g. the FedSM ablation's SoftPull lambda, FedAvg's local optimizer state), each with its own key.
NVFlare's stock workflows ("nvflare_cyclic", "nvflare_fedavg": CyclicRecipe / FedAvgRecipe through a
Client API script, fedseg_tools.bench.stock) get FedCross's and FedAvg's plans.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from fedseg.algorithms.schedules import plan_latin
from fedseg_tools.bench.tuning import tuning_runs

METHODS = ("local", "centralized", "fedavg", "fedprox", "fedbn", "fedsm", "softpull", "fedcross", "fedcrossens")
FL_METHODS = ("fedavg", "fedprox", "fedbn", "fedsm", "softpull", "fedcross", "fedcrossens")
BASELINES = ("local", "centralized")
FEDSM_POLICIES = ("epochs", "rounds", "extra")
PROTOCOLS = ("equal", "paper")
PROTOCOL_NAMES = {"equal": "equal steps (every method B)", "paper": "each paper's own protocol"}
PAPER_DIFFERS = ("fedsm", "softpull", "fedcrossens")  # methods whose own protocol is not the equal-steps plan
STOCK = ("nvflare_cyclic", "nvflare_fedavg")  # NVFlare's own workflows as peers (fedseg_tools.bench.stock)
STOCK_PLAN = {"nvflare_cyclic": "fedcross", "nvflare_fedavg": "fedavg"}  # the FedSeg method whose plan a peer gets
FEDSM_ABLATION_LAMBDAS = (0.5, 0.9, 1.0)  # with the default 0.7 (the paper-protocol FedSM run): {0.5, 0.7, 0.9, 1.0}
MATCHED_BASELINES = ("fedavg", "local", "centralized")  # trained again at the paper runs' steps (matched_steps)


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
    def from_counts(cls, rounds: int, epochs: int, train_counts: dict, batch_size: int) -> Budget:
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
    protocol: str = "equal"
    budget_steps: int = 0  # B of the cell (0: unknown)

    @property
    def budget_multiple(self) -> float:
        """Planned segmentation steps / B (1 = equal steps; 2 for FedSM's own protocol ...)."""
        return self.seg_steps_total / self.budget_steps if self.budget_steps else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "budget_multiple": self.budget_multiple}


def _divides(name: str, total: int, part: int) -> int:
    if part < 1 or total % part:
        raise ValueError(f"{name}: {part} does not divide {total}; choose rounds/epochs so the budget splits exactly")
    return total // part


def plan_method(
    method: str,
    budget: Budget,
    fedsm_policy: str = "epochs",
    fedcross_visit_epochs: int | None = None,
    fedcrossens_visit_epochs: int | None = None,
) -> MethodPlan:
    """The configuration that gives `method` the budget B (see the module docstring)."""
    plan = _plan_method(method, budget, fedsm_policy, fedcross_visit_epochs, fedcrossens_visit_epochs)
    plan.budget_steps = budget.total_steps
    return plan


def _plan_method(
    method: str, budget: Budget, fedsm_policy: str, fedcross_visit_epochs: int | None, fedcrossens_visit_epochs: int | None
) -> MethodPlan:
    r, e, n = budget.rounds, budget.epochs, budget.n_sites
    per_site = {s: budget.site_steps(s) for s in budget.sites}
    if method == "local":
        return MethodPlan(
            method,
            budget.total_steps,
            per_site,
            rounds=r,
            local_epochs=e,
            num_models=n,
            extra_cost={"models": f"{n} site models (one per site), no communication"},
        )
    if method == "centralized":
        return MethodPlan(
            method,
            budget.total_steps,
            {"pooled": budget.total_steps},
            rounds=r,
            local_epochs=e,
            extra_cost={"data": "all sites' images pooled in one place (not federated)"},
        )
    if method in ("fedavg", "fedprox", "fedbn"):
        extra = {"proximal term": "one extra weight-distance term per step (mu = 0.01)"} if method == "fedprox" else {}
        if method == "fedbn":
            extra = {"personalized models": f"{n} site normalizations kept at the sites (never averaged into a site's model)"}
        return MethodPlan(
            method, budget.total_steps, per_site, rounds=r, local_epochs=e, model_downloads_per_site=float(r), extra_cost=extra
        )
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
            extra["selector"] = (
                "site classifier: its head fitted from the sites' feature statistics every round (default, no steps), "
                "or trained at the sites (its steps are reported, not counted in B)"
            )
            extra["inference"] = "selector + one segmentation network per prediction"
        return MethodPlan(
            method,
            total,
            steps,
            rounds=rounds,
            local_epochs=epochs,
            num_models=1 + n,
            networks_per_site_round=2,
            model_downloads_per_site=float(rounds),
            extra_cost=extra,
            within_budget=total == budget.total_steps,
        )
    if method == "fedcross":
        v = fedcross_visit_epochs or e
        per_visit_site = _divides(f"fedcross: visit of {v} epochs", r * e, v)  # visits per site
        c = n * per_visit_site
        steps = {s: per_visit_site * v * budget.site_steps_per_epoch[s] for s in budget.sites}
        return MethodPlan(
            method,
            sum(steps.values()),
            steps,
            communications=c,
            visit_epochs=v,
            num_models=1,
            model_downloads_per_site=float(per_visit_site),
            extra_cost={
                "sequential": f"one site trains per communication: {c} communications in sequence",
                "validation": "the model is scored on every site's validation cases after every communication",
            },
        )
    if method == "fedcrossens":
        if fedcrossens_visit_epochs:
            v = fedcrossens_visit_epochs
            c = _divides(f"fedcrossens: visit of {v} epochs", r * e, v)
            _latin_blocks(c, n)
        else:  # the longest visit of at most E epochs that splits the R*E epochs per site into whole Latin blocks
            try:
                c, v = plan_latin(r * e, n, e)
            except ValueError as err:
                raise ValueError(f"fedcrossens: R={r} rounds x E={e} epochs: {err}") from None
        steps = {s: c * v * budget.site_steps_per_epoch[s] for s in budget.sites}
        return MethodPlan(
            method,
            sum(steps.values()),
            steps,
            communications=c,
            visit_epochs=v,
            num_models=n,
            model_downloads_per_site=float(c),
            extra_cost={
                "ensemble": f"{n} members: {n} forward passes per prediction",
                "validation": f"all {n} models scored on every site after every communication",
                "members": f"each member trains about B/{n} steps",
            },
        )
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def _latin_blocks(communications: int, n_sites: int) -> None:
    if n_sites > 1 and communications % n_sites:
        raise ValueError(
            f"fedcrossens: {communications} communications is not a whole number of Latin blocks of "
            f"{n_sites} sites (every member visits every site once per block); choose R*E/v a multiple of {n_sites}"
        )


def plan_paper(
    method: str,
    budget: Budget,
    fedcross_visit_epochs: int | None = None,
    fedcrossens_visit_epochs: int | None = None,
    **_ignored,
) -> MethodPlan:
    """The method's own paper protocol (see the module docstring); its extra compute is in seg_steps_total."""
    r, e, n = budget.rounds, budget.epochs, budget.n_sites
    if method in ("fedsm", "softpull"):
        plan = plan_method(method, budget, fedsm_policy="extra")
        plan.extra_cost["protocol"] = f"FedSM paper: each of its 2 networks trains the full E={e} epochs per round (2B)"
    elif method == "fedcrossens":
        v = fedcrossens_visit_epochs or e
        c = n * _divides(f"fedcrossens: visit of {v} epochs", r * e, v)
        steps = {s: c * v * budget.site_steps_per_epoch[s] for s in budget.sites}
        plan = MethodPlan(
            method,
            sum(steps.values()),
            steps,
            communications=c,
            visit_epochs=v,
            num_models=n,
            model_downloads_per_site=float(c),
            within_budget=False,
            extra_cost={
                "ensemble": f"{n} members: {n} forward passes per prediction",
                "validation": f"all {n} models scored on every site after every communication",
                "protocol": f"FedCrossEns paper: every member the full schedule of one FedCross model "
                f"({c} communications; {n}B in all)",
            },
        )
    else:
        plan = plan_method(method, budget, fedcross_visit_epochs=fedcross_visit_epochs)
    plan.protocol = "paper"
    plan.budget_steps = budget.total_steps
    plan.within_budget = plan.seg_steps_total == budget.total_steps
    return plan


def plan_methods(methods, budget: Budget, **options) -> dict[str, MethodPlan]:
    return {m: plan_method(m, budget, **options) for m in methods}


@dataclass
class RunSpec:
    """One run of a benchmark cell: `method` under `protocol`, with controller `options` (overrides of the
    method's workflow arguments). key: unique in the cell (its results' name); group: "main", "ablation"
    (the FedSM ablation), "optimizer" (local optimizer state measurement), "tuning" (a candidate value of an
    argument chosen on validation, fedseg_tools.bench.tuning), "matched" (matched-step baselines) or "stock" (NVFlare's
    own workflows)."""

    key: str
    method: str
    protocol: str = "equal"
    options: dict = field(default_factory=dict)
    group: str = "main"
    rounds_factor: int = 1  # the plan's R multiplied by this, E kept ("matched" group: f*B steps)

    def as_dict(self) -> dict:
        return asdict(self)


def paper_multiples(methods, n_sites: int | None) -> list[int]:
    """The multiples of B that the paper-protocol runs of `methods` train: 2 (FedSM / SoftPull), N = n_sites
    (FedCrossEns); unique, sorted, > 1 (N == 2 gives one multiple)."""
    found = set()
    if {"fedsm", "softpull"} & set(methods):
        found.add(2)
    if "fedcrossens" in methods:
        if not n_sites:
            raise ValueError("the matched-step baselines of FedCrossEns's paper protocol (N*B) need the number of sites")
        found.add(int(n_sites))
    return sorted(f for f in found if f > 1)


def matched_key(method: str, multiple: int) -> str:
    """The run key of a matched-step baseline: "fedavg-2B", "centralized-4B" ..."""
    return f"{method}-{int(multiple)}B"


def run_specs(
    methods,
    protocols=PROTOCOLS,
    fedsm_ablation: bool = False,
    optimizer_variants: tuple = (),
    stock=(),
    matched_steps: bool = False,
    n_sites: int | None = None,
    tuning: bool = False,
) -> list[RunSpec]:
    """The runs of one cell. Every method once under the equal-steps plan (its key is the method); with the
    "paper" protocol also FedSM / SoftPull / FedCrossEns under their papers' protocols ("<method>-paper").
    fedsm_ablation: FedSM at the paper budget with SoftPull lambda in FEDSM_ABLATION_LAMBDAS ("fedsm-paper-lam50"
    ...; lambda 0.7 is "fedsm-paper", half the budget per network is "fedsm"). optimizer_variants: FedAvg and
    FedProx again with local_optimizer set to each of these ("fedavg-opt-keep" ...). stock: NVFlare peers.
    matched_steps (with the "paper" protocol): FedAvg, local-only and centralized (those in methods) again at every
    multiple f of B the paper runs train (paper_multiples; n_sites = N), R*f rounds of E epochs
    ("fedavg-2B" ..., group "matched"). tuning: FedProx and FedSM again with each candidate value of the argument
    they may choose (fedseg_tools.bench.tuning: the choice is made on validation Dice; group "tuning")."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {PROTOCOLS}")
    unknown = [m for m in [*methods, *stock] if m not in METHODS + STOCK]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {METHODS + STOCK}")
    specs = [RunSpec(m, m) for m in methods if m in METHODS]
    if "paper" in protocols:
        specs += [RunSpec(f"{m}-paper", m, "paper") for m in methods if m in PAPER_DIFFERS]
    if fedsm_ablation and "fedsm" in methods:
        specs += [
            RunSpec(f"fedsm-paper-lam{round(100 * lam)}", "fedsm", "paper", {"lam": lam}, "ablation")
            for lam in FEDSM_ABLATION_LAMBDAS
        ]
    for value in optimizer_variants:
        specs += [
            RunSpec(f"{m}-opt-{value}", m, "equal", {"local_optimizer": value}, "optimizer")
            for m in ("fedavg", "fedprox")
            if m in methods
        ]
    if matched_steps and "paper" in protocols:
        specs += [
            RunSpec(matched_key(m, f), m, "paper", group="matched", rounds_factor=f)
            for f in paper_multiples(methods, n_sites)
            for m in MATCHED_BASELINES
            if m in methods
        ]
    if tuning and "equal" in protocols:
        specs += [RunSpec(key, m, "equal", options, "tuning") for key, m, options in tuning_runs(methods)]
    specs += [RunSpec(m, m, "equal", group="stock") for m in stock]
    if "equal" not in protocols:  # only the paper protocol: the shared runs stay, the equal-only ones go
        specs = [s for s in specs if s.protocol == "paper" or s.method not in PAPER_DIFFERS]
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)), keys
    return specs


def plan_run(spec: RunSpec, budget: Budget, **options) -> MethodPlan:
    """The plan of one run: its protocol's plan of its method (a stock peer: the plan of its FedSeg twin). A run
    with rounds_factor f (a matched-step baseline): the equal-steps plan of R*f rounds of E epochs (f*B steps)."""
    method = STOCK_PLAN.get(spec.method, spec.method)
    f = int(spec.rounds_factor or 1)
    if f != 1:
        plan = plan_method(method, Budget(budget.rounds * f, budget.epochs, dict(budget.site_steps_per_epoch)), **options)
        plan.protocol = spec.protocol
        plan.within_budget = False
        plan.extra_cost["matched steps"] = (
            f"{f}B: R={budget.rounds * f} rounds x E={budget.epochs} epochs, the steps of the paper-protocol runs at {f}B"
        )
    elif spec.protocol == "paper":
        plan = plan_paper(method, budget, **options)
    else:
        plan = plan_method(method, budget, **options)
    plan.method = spec.method
    plan.budget_steps = budget.total_steps
    return plan


def plan_runs(specs: list[RunSpec], budget: Budget, **options) -> dict[str, MethodPlan]:
    return {s.key: plan_run(s, budget, **options) for s in specs}


def check_equal_budget(plans: dict[str, MethodPlan], budget: Budget) -> list[str]:
    """Names of the methods whose planned segmentation steps differ from the budget (empty: all equal).
    A method run under the "extra" FedSM policy is listed (its extra network is reported as cost)."""
    return sorted(m for m, p in plans.items() if p.seg_steps_total != budget.total_steps)
