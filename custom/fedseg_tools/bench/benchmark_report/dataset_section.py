"""A dataset's own tables: the budget line, both protocols' test Dice tables, the other models of the same runs,
HD95, every model of every run, and the cost of every run (time, CPU, steps, traffic, memory)."""

from __future__ import annotations

from fedseg.report import worst_site
from fedseg_tools.bench.benchmark_report.facts import all_models, flattened, mean_curve, plotted_runs
from fedseg_tools.bench.report_data import (
    HEADLINE,
    _finite,
    _first_rec,
    _fmt,
    _mean,
    _pm,
    _pts,
    _table,
    aggregate,
    protocol_rows,
    run_info,
    run_keys,
    run_name,
)

ORACLE_MODELS = ("FedSM personalized (own site)", "SoftPull personalized (own site)", "personalized (own site)")
ORACLE_NOTE = "oracle routing: uses the site's identity"
PROTOCOL_TITLES = {
    "equal": "Equal steps: every method trains B segmentation steps",
    "paper": "Each paper's own protocol: FedSM/SoftPull train every network the full E epochs per round (2B); "
    "FedCrossEns gives every member the full schedule of a single FedCross model (N·B); the other "
    "methods' own protocol is the equal-steps plan (same run); FedAvg, local-only and centralized trained for the "
    "paper runs' steps (R·f rounds of E epochs) are the matched-step rows",
}
RUN_COST_INTRO = (
    "Cost per run (mean over seeds). Wall: the run's own time, from its first task to its final scores "
    "(training, its per-round validation, final scoring; the shared simulator start-up, warm-up and shut-down are not "
    "included; local-only: summed over its sites, which ran one after the other). CPU: CPU seconds of all site "
    "processes during the run's tasks plus the server process during the run (baselines: their process). Steps: "
    "segmentation-network optimizer steps measured at the sites / planned. Traffic: bytes of every task the site "
    "received / sent during the run (TaskMeter, FOBS-serialised size), per site per budget round R. Memory: peak "
    "RSS of a site process during the run (max over sites) and of the server process."
)


def dataset_sites(cells: list[dict]) -> list[str]:
    return sorted({s for c in cells for s in c.get("sites", [])})


def steps_text(a: dict) -> str:
    """Steps used against the budget, "<steps> / <B> = <multiple>B", from a run's aggregate."""
    r = _mean(a["ratio"])
    return f"{_fmt(_mean(a['steps']), 0)} / {_fmt(_mean(a['budget']), 0)} = {r:.2g}B" if _finite(r) else "-"


def _flat_text(cells: list[dict], key: str) -> str:
    flat, gain = flattened(mean_curve(cells, key))
    if flat is None:
        return "- (too few points)"
    return f"{'yes' if flat else '**no**'} ({_pts(gain)})"


def dataset_header(ds: str, cells: list[dict]) -> list[str]:
    b = cells[0].get("budget", {})
    return [
        f"## {ds}",
        "",
        f"Budget B = {b.get('total_steps')} segmentation steps per seed (R={b.get('rounds')}, E={b.get('epochs')}, batch "
        f"{b.get('batch_size')}, steps per epoch {b.get('site_steps_per_epoch')}). Seeds: {sorted(c['seed'] for c in cells)}.",
        "",
    ]


def _protocol_row(cells: list[dict], key: str, shared: bool, sites: list[str]) -> list[str]:
    rec = _first_rec(cells, key)
    a = aggregate(cells, key)
    name = run_name(key, rec) + (" (same run)" if shared else "")
    model = rec.get("headline_model") or HEADLINE.get(run_info(key, rec)["method"], "")
    if not a["dice"]:
        failed = f"{(a['status'] or ['not run'])[0]}: {(a['errors'] or [''])[0][:80]}"
        return [name, model] + ["-"] * len(sites) + [failed, "-", "-", "-"]
    return (
        [name, model]
        + [_pm(a["per_site"].get(s, [])) for s in sites]
        + [f"**{_pm(a['dice'])}**", _pm(a["worst"]), steps_text(a), _flat_text(cells, key)]
    )


def protocol_table(cells: list[dict], protocol: str, sites: list[str]) -> list[str]:
    runs = protocol_rows(cells, protocol)
    rows = [_protocol_row(cells, key, shared, sites) for key, shared in runs]
    matched = any(run_info(k, _first_rec(cells, k))["group"] == "matched" for k, _ in runs)
    note = ["No matched-step baselines in this run (FedAvg, local-only and centralized at 2B / N·B steps).", ""]
    return [
        f"**{PROTOCOL_TITLES[protocol]}.** Test Dice, mean ± std over seeds, per site, of the mean over sites and of the "
        "worst site (each seed's minimum over sites); steps used: measured at the sites; flattened?: the rise of the "
        "validation curve over its last 25% (a least-squares line through those points; Dice points, < 1 point = "
        "flattened).",
        "",
        _table(
            ["method", "model"] + sites + ["mean over sites", "worst site", "steps used / B", "flattened? (last-25% gain)"],
            rows,
        ),
        "",
        *(note if protocol == "paper" and not matched else []),
    ]


def other_models_table(cells: list[dict], sites: list[str]) -> list[str]:
    rows = []
    for key in plotted_runs(cells):
        rec = _first_rec(cells, key)
        for model in all_models(cells, key):
            if model == rec.get("headline_model") or model.startswith("member") or model.startswith("local:"):
                continue
            a = aggregate(cells, key, model)
            if not a["dice"]:
                continue
            note = f" — {ORACLE_NOTE}" if model in ORACLE_MODELS else ""
            rows.append(
                [run_name(key, rec), model + note]
                + [_pm(a["per_site"].get(s, [])) for s in sites]
                + [_pm(a["dice"]), _pm(a["worst"])]
            )
    if not rows:
        return []
    return [
        "Other models of the same runs (the last model where the headline is the best-validated one, FedSM's "
        'global and personalized models ...); a "personalized (own site)" row routes every case to its own '
        "site's model: it uses the site's identity (oracle routing).",
        "",
        _table(["run", "model"] + sites + ["mean over sites", "worst site"], rows),
        "",
    ]


def hd95_table(cells: list[dict], sites: list[str]) -> list[str]:
    rows = []
    for key in plotted_runs(cells):
        a = aggregate(cells, key)
        if a["dice"] and any(_finite(x) for x in a["hd95"]):
            rows.append(
                [run_name(key, _first_rec(cells, key))]
                + [_fmt(_mean(a["per_site_hd95"].get(s, [])), 2) for s in sites]
                + [_pm(a["hd95"], 2)]
            )
    if not rows:
        return []
    return [
        "HD95 (voxels; mean over seeds; cases with an empty prediction are left out by MONAI's metric):",
        "",
        _table(["run"] + sites + ["mean over sites"], rows),
        "",
    ]


def every_model_table(cells: list[dict], sites: list[str]) -> list[str]:
    """Every model of every run (local-only's per-site models left out), folded away."""
    rows = []
    for key in run_keys(cells):
        for model, per_site in all_models(cells, key).items():
            if model.startswith("local:"):
                continue
            seeds = max(len(v) for v in per_site.values())
            per_seed = [{s: v[i] for s, v in per_site.items() if i < len(v)} for i in range(seeds)]
            rows.append(
                [run_name(key, _first_rec(cells, key)), model]
                + [_fmt(_mean(per_site.get(s, []))) for s in sites]
                + [_pm([_mean(list(d.values())) for d in per_seed]), _pm([worst_site(d) for d in per_seed])]
            )
    return [
        "<details><summary>Every model of every run (FedSM global / personalized / super, FedCrossEns members, "
        "ablation and optimizer-state runs ...)</summary>",
        "",
        _table(["run", "model"] + sites + ["mean over sites", "worst site"], rows),
        "",
        "</details>",
        "",
    ]


def _run_cost_row(cells: list[dict], key: str, a: dict, fedavg_wall: float, fedavg_cpu: float) -> list[str]:
    fedsm = run_info(key, _first_rec(cells, key))["method"] == "fedsm"
    return [
        run_name(key, _first_rec(cells, key)),
        _pm(a["wall"], 1),
        _fmt(_mean(a["wall"]) / fedavg_wall, 2) if _finite(fedavg_wall) else "-",
        _pm(a["cpu"], 1),
        _fmt(_mean(a["cpu"]) / fedavg_cpu, 2) if _finite(fedavg_cpu) else "-",
        f"{_fmt(_mean(a['steps']), 0)} / {_fmt(_mean(a['planned']), 0)}",
        _fmt(_mean(a["selector_steps"]), 0) if fedsm else "",
        _fmt(_mean(a["mb_in"]), 2),
        _fmt(_mean(a["mb_out"]), 2),
        _fmt(_mean(a["rss"]), 0),
        _fmt(_mean(a["server_rss"]), 0),
    ]


def run_cost_table(cells: list[dict]) -> list[str]:
    """Time, CPU, steps, traffic and memory of every run that has results, and the simulator jobs' own time."""
    fedavg = aggregate(cells, "fedavg")
    fedavg_wall, fedavg_cpu = _mean(fedavg["wall"]), _mean(fedavg["cpu"])
    aggs = {key: aggregate(cells, key) for key in run_keys(cells)}
    rows = [_run_cost_row(cells, key, a, fedavg_wall, fedavg_cpu) for key, a in aggs.items() if a["dice"]]
    header = [
        "run",
        "wall s",
        "× FedAvg",
        "CPU s",
        "× FedAvg",
        "seg steps (measured / planned)",
        "selector steps (extra)",
        "MB received / site / round",
        "MB sent / site / round",
        "peak RSS / site MB",
        "server peak RSS MB",
    ]
    L = [RUN_COST_INTRO, "", _table(header, rows), ""]
    jobs = list({j.get("name"): j for c in cells for j in c.get("jobs", [])}.values())  # a shared job serves every seed
    if jobs:
        L += [
            f"Simulator jobs: {len(jobs)}; time outside the runs (start-up, warm-up, shut-down) "
            f"{_pm([j.get('outside_methods_seconds') for j in jobs], 1)} s per job.",
            "",
        ]
    return L
