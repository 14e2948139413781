"""The benchmark report's "Unseen centre (leave-one-centre-out)" section, from the cells' "unseen" records
(fedseg_tools.bench.unseen): per held-out centre, every method's deployable model on that centre's test cases next to
the same method's headline model on the centres it was trained with.
"""

from __future__ import annotations

from fedseg_tools.bench import report_data as br

INTRO = (
    "Each cell below trains every method on the other centres only (same data conversion, split, budget and seeds "
    "as the normal cell) and then scores the model each method would deploy at a hospital that never took part on "
    "the held-out centre's test cases, with the same engine evaluation (per-case Dice, mean over cases). **unseen** is "
    "that Dice, **seen** the same method's headline model on the training centres' own test cases (mean over them), "
    "both mean ± std over seeds. Deployed on the unseen centre: FedAvg/FedProx the best global model; FedBN the best "
    "global model, whose normalization is the sites' average (on the seen centres each site keeps its own); SoftPull "
    "its global model; FedSM the super model, its selector choosing between the personalized models and the global "
    "model (routed to global: share of the unseen centre's cases / of the seen centres' cases, at the run's gamma), "
    "and its global model alone; FedCross its model; FedCrossEns the ensemble, with its uncertainty (mean over cases "
    "of the per-voxel std of the members' foreground probability) on the unseen vs the seen centres; centralized its "
    "model; local-only every trained centre's own model (their mean, and the best of them per seed)."
)

# the model each method deploys at a centre that never took part
DEPLOYED = {
    "fedavg": "best global model",
    "fedprox": "best global model",
    "fedbn": "best global model, average normalization",
    "softpull": "global model",
    "fedsm": "super model",
    "fedcross": "model",
    "fedcrossens": "ensemble",
    "centralized": "model",
    "local": "each trained centre's own model, mean",
}


def holdout_datasets(cells_by_ds: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {ds: cells for ds, cells in cells_by_ds.items() if any(c.get("unseen") for c in cells)}


def per_seed(cells: list[dict], key: str, field: str, sub: str | None = None) -> list[float]:
    """One value per seed of a scored run's field (sub: a field inside it, e.g. "global" -> "dice")."""
    out = []
    for c in cells:
        run = ((c.get("unseen") or {}).get("runs") or {}).get(key) or {}
        value = run.get(field)
        out.append((value or {}).get(sub) if sub is not None and isinstance(value, dict) else value)
    return out


def _pair(a: list, b: list, digits: int = 2) -> str:
    if not any(br._finite(x) for x in a + b):
        return "-"
    return f"{br._fmt(br._mean(a), digits)} / {br._fmt(br._mean(b), digits)}"


def run_rows(cells: list[dict], key: str) -> list[list[str]]:
    """The table rows of one run: its deployed model, plus FedSM's global model and local-only's best model."""
    rec = br._first_rec(cells, key)
    name, method = br.run_name(key, rec), br.run_info(key, rec)["method"]
    unseen, seen = per_seed(cells, key, "dice"), per_seed(cells, key, "seen_dice")
    routed, spread = "-", "-"
    if method == "fedsm":
        routed = _pair(per_seed(cells, key, "global_share"), per_seed(cells, key, "seen_global_share"))
    if method == "fedcrossens":
        spread = _pair(per_seed(cells, key, "uncertainty", "unseen"), per_seed(cells, key, "uncertainty", "seen"), 4)
    rows = [[f"{name}: {DEPLOYED.get(method, 'model')}", br._pm(unseen), br._pm(seen), routed, spread]]
    if method == "fedsm":
        alone = per_seed(cells, key, "global", "dice")
        rows.append([f"{name}: global model alone", br._pm(alone), br._pm(per_seed(cells, key, "seen_global_dice")), "-", "-"])
    if method == "local":
        best = per_seed(cells, key, "best_dice")
        rows.append([f"{name}: best trained centre's model", br._pm(best), br._pm(seen), "-", "-"])
    return rows


def errors(cells: list[dict]) -> list[str]:
    out = []
    for c in cells:
        for key, run in ((c.get("unseen") or {}).get("runs") or {}).items():
            if run.get("error"):
                out.append(f"- seed {c.get('seed')}, {key}: not scored ({run['error'][:300]})")
    return out


def centre_table(ds: str, cells: list[dict]) -> list[str]:
    unseen = [c["unseen"] for c in cells if c.get("unseen")]
    centre = unseen[0].get("centre", "?")
    scored = {k for u in unseen for k in (u.get("runs") or {})}
    keys = [k for k in br.run_keys(cells, ("main",)) if k in scored]
    rows = [row for k in keys for row in run_rows(cells, k)]
    header = [
        "method: deployed model",
        "unseen",
        "seen",
        "FedSM: routed to global, unseen / seen",
        "FedCrossEns: std unseen / seen",
    ]
    seen_sites = ", ".join(unseen[0].get("seen_sites") or [])
    return [
        f"### Unseen centre {centre} (`{ds}`: trained on {seen_sites})",
        "",
        f"{unseen[0].get('n_cases', '?')} test cases of {centre}; seeds {sorted(c.get('seed') for c in cells)}.",
        "",
        br._table(header, rows),
        "",
        *errors(cells),
        *([""] if errors(cells) else []),
    ]


def unseen_section(cells_by_ds: dict[str, list[dict]]) -> list[str]:
    """The report section, or nothing when no cell held a centre out."""
    held = holdout_datasets(cells_by_ds)
    if not held:
        return []
    L = ["## Unseen centre (leave-one-centre-out)", "", INTRO, ""]
    for ds, cells in held.items():
        L += centre_table(ds, [c for c in cells if c.get("unseen")])
    return L
