"""The benchmark report's matched-step baselines and its "Gap closed" section (markdown from the raw cells).

Matched-step baselines (fedseg_tools.bench.budget, group "matched"): FedAvg, local-only and centralized trained again
for f*B steps (R*f rounds of E epochs), f = every multiple of B a paper-protocol run uses (2 for FedSM/SoftPull,
N for FedCrossEns). They are rows of the paper-protocol tables, and the paper runs' baselines for the gap.

Gap closed (fedseg_tools.bench.gap): per dataset, the share (method - FedAvg) / (centralized - FedAvg) per seed, mean ±
standard error over seeds, every run against FedAvg and centralized trained for the same number of steps: an
equal-steps run against "fedavg" and "centralized", a run of f*B steps against "fedavg-<f>B" and
"centralized-<f>B". Raw results without matched-step runs say so instead of a share.
"""

from __future__ import annotations

from fedseg_tools.bench import report_data as br
from fedseg_tools.bench.budget import matched_key
from fedseg_tools.bench.gap import format_closed, format_gap, gap_closed

NO_MATCHED = "no matched-step baselines in this run"


def baselines_at(cells: list[dict], multiple: int) -> tuple[str, str] | None:
    """(FedAvg key, centralized key) trained for multiple*B steps, or None when this run has no such pair."""
    keys = set(br.run_keys(cells))
    pair = (
        ("fedavg", "centralized") if multiple == 1 else (matched_key("fedavg", multiple), matched_key("centralized", multiple))
    )
    return pair if set(pair) <= keys else None


def _per_seed(cells: list[dict], key: str) -> dict:
    a = br.aggregate(cells, key)
    return dict(zip(a["seeds"], a["dice"]))


def gap_rows(cells: list[dict]) -> list[dict]:
    """Every run of the two protocol tables (but the baselines it is measured against) with its gap-closed summary:
    {"key", "name", "protocol", "multiple", "baselines" (the FedAvg and centralized keys, or None), "summary"
    (fedseg_tools.bench.gap.gap_closed, or None without baselines)}."""
    rows = []
    equal_pair = baselines_at(cells, 1)
    for protocol in ("equal", "paper"):
        for key, shared in br.protocol_rows(cells, protocol):
            rec = br._first_rec(cells, key)
            info = br.run_info(key, rec)
            if shared or key in ("fedavg", "centralized") or (info["group"] == "matched" and info["method"] != "local"):
                continue
            multiple = br.multiple_of(key, rec) if protocol == "paper" else 1
            pair = equal_pair if multiple == 1 else baselines_at(cells, multiple)
            summary = None
            if pair:
                summary = gap_closed(_per_seed(cells, key), _per_seed(cells, pair[0]), _per_seed(cells, pair[1]))
            name = br.matched_name(key, rec) if info["group"] == "matched" else br.run_name(key, rec)
            rows.append(
                {"key": key, "name": name, "protocol": protocol, "multiple": multiple, "baselines": pair, "summary": summary}
            )
    return rows


def _closed_text(row: dict) -> str:
    return format_closed(row["summary"]) if row["summary"] else NO_MATCHED


def gap_section(ds: str, cells: list[dict]) -> list[str]:
    """The per-dataset "Gap closed" table (empty when FedAvg or centralized did not run)."""
    if not baselines_at(cells, 1):
        return []
    rows = []
    for r in gap_rows(cells):
        base = (
            " / ".join(
                br.NAMES.get(k, k) if r["multiple"] == 1 else br.matched_name(k, br._first_rec(cells, k))
                for k in r["baselines"]
            )
            if r["baselines"]
            else "- (not run)"
        )
        rows.append(
            [
                r["name"],
                "equal steps" if r["protocol"] == "equal" else "paper protocol",
                f"{r['multiple']}B",
                base,
                format_gap(r["summary"]) if r["summary"] else "-",
                _closed_text(r),
            ]
        )
    missing = [] if br.matched_keys(cells) else [f"The paper-protocol runs have {NO_MATCHED}: no share is given for them.", ""]
    return [
        f"**Gap closed on {ds}**: the share of the centralized − FedAvg gap each run closes, (run − FedAvg) / "
        "(centralized − FedAvg) per seed, mean ± standard error over seeds (0% = FedAvg, 100% = centralized, negative = "
        "below FedAvg). Every run is measured against FedAvg and centralized trained for the same number of steps "
        "(a 2B run against the 2B ones). Where the gap itself (paired over seeds) is below 2 standard errors, or "
        'measured on fewer than 2 seeds, it says "gap within noise" instead of a share.',
        "",
        br._table(["run", "protocol", "steps", "against (FedAvg / centralized)", "centralized − FedAvg", "gap closed"], rows),
        "",
        *missing,
    ]


def gap_sentence(cells: list[dict], rows: list[dict] | None = None) -> str | None:
    """The headline's gap-closed sentence for one dataset (None when FedAvg or centralized did not run); rows:
    gap_rows(cells) when already computed (the headline facts)."""
    if not baselines_at(cells, 1):
        return None
    parts = []
    rows = gap_rows(cells) if rows is None else rows
    for protocol, multiple in dict.fromkeys((r["protocol"], r["multiple"]) for r in rows):
        group = [r for r in rows if r["protocol"] == protocol and r["multiple"] == multiple]
        with_gap = next((r for r in group if r["summary"]), None)
        label = "equal steps (B" if protocol == "equal" else f"paper protocol ({multiple}B"
        if with_gap is None:
            parts.append(f"{label}): {NO_MATCHED}")
            continue
        gap = with_gap["summary"]
        if gap["within_noise"]:
            parts.append(f"{label}; centralized − FedAvg {format_gap(gap)}): gap within noise")
            continue
        runs = ", ".join(f"{r['name']} {_closed_text(r)}" for r in group)
        parts.append(f"{label}; centralized − FedAvg {format_gap(gap)}): {runs}")
    return (
        "Share of the centralized − FedAvg gap closed (mean ± standard error over seeds, against FedAvg and centralized "
        "at the same steps): " + "; ".join(parts) + "."
    )
