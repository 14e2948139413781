"""The "Budget and extra cost, per run" section: every run's plan (protocol, configuration, its steps as a multiple
of the budget B) and the extra work it reported."""

from __future__ import annotations

from fedseg_tools.bench.report_data import _finite, _first_rec, _table, run_info, run_keys, run_name

INTRO = (
    "The budget B is the total number of segmentation-network training steps summed over sites (and over a method's "
    "networks), set by FedAvg with R rounds × E local epochs: B = R·E·Σᵢ sᵢ with sᵢ = ⌈nᵢ/batch⌉. Extra work a run "
    "does is not hidden: the paper-protocol runs use a multiple of B (stated), and work outside the segmentation "
    "steps is listed here and measured in the tables above."
)


def configuration(method: str, group: str, p: dict) -> str:
    """How a run spends its steps, from its plan."""
    if group == "matched":
        return f"R·f = {p.get('rounds')} rounds × {p.get('local_epochs')} epochs (steps matched to the paper-protocol runs)"
    rounds = f"{p.get('rounds')} rounds × {p.get('local_epochs')} epochs"
    visits = f"{p.get('communications')} communications × {p.get('visit_epochs')}-epoch visits"
    return {
        "local": "each site alone, R·E·sᵢ steps",
        "centralized": "pooled cases, B steps",
        "fedavg": rounds,
        "fedprox": f"{rounds}, mu 0.01",
        "fedbn": f"{rounds}, normalization kept at the sites",
        "fedsm": f"{rounds} for each of 2 networks",
        "softpull": f"{rounds} for each of 2 networks",
        "fedcross": f"{visits}, 1 model (cyclic)",
        "fedcrossens": f"{visits}, K = N models (Latin)",
        "nvflare_cyclic": f"FedCross's plan: {p.get('communications')} visits of {p.get('visit_epochs')} epochs, fixed order",
        "nvflare_fedavg": f"FedAvg's plan: {rounds}",
    }.get(method, "-")


def steps_of(plan: dict) -> str:
    multiple = plan.get("budget_multiple")
    if _finite(multiple):
        return f"{multiple:.2g}B"
    return "B" if plan.get("within_budget", True) else "**≠ B**"


def budget_section(cells: list[dict]) -> list[str]:
    plans, names = {}, {}
    for c in cells:
        for key, rec in c.get("methods", {}).items():
            plans.setdefault(key, rec.get("plan") or {})
            names.setdefault(key, run_name(key, rec))
    rows = []
    for key in run_keys(cells):
        p = plans.get(key)
        if not p:
            continue
        i = run_info(key, _first_rec(cells, key))
        extra = "; ".join(f"{k}: {v}" for k, v in (p.get("extra_cost") or {}).items())
        rows.append([names[key], p.get("protocol", "equal"), configuration(i["method"], i["group"], p), steps_of(p), extra])
    return [
        "## Budget and extra cost, per run",
        "",
        INTRO,
        "",
        _table(["run", "protocol", "configuration", "steps", "extra cost (reported)"], rows),
        "",
    ]
