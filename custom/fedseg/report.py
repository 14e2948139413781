"""Per-site result tables from a finished run (simulator workspace, downloaded POC job, or baseline output).

Every FedSeg run ends in one common record, "fedseg_results.json":
    {"method": str, "section": "testing",
     "models": {model_name: {site: {"dice": mean, "dice_std": std, "n_cases": n, "dice_per_case": [...]}}},
     "extra": {...}}
FedAvg/FedProx/FedBN runs produce it from FLARE's cross-site evaluation (cross_val_results.json); FedSM, FedCross
and the baselines write it directly. `python -m fedseg.report PATH` finds it under PATH and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

RESULTS_FILE = "fedseg_results.json"
CSE_FILE = "cross_val_results.json"


def _model_label(name: str, method: str = "fedavg") -> str:
    """FLARE's CSE names: SRV_FL_global_model.pt -> global, SRV_best_FL_global_model.pt -> best global. FedBN sites
    score a server model with their own normalization: each site's personalized model."""
    if name.startswith("SRV_"):
        stem = name[4:].replace(".pt", "")
        kind = "personalized" if method == "fedbn" else "global"
        return {"FL_global_model": f"{kind} (last)", "best_FL_global_model": f"{kind} (best)"}.get(stem, stem)
    return f"site update: {name}"


def from_cross_site_val(cse: dict, method: str = "fedavg") -> dict:
    """Convert FLARE's cross_val_results.json ({site: {model: metrics}}) into the common record."""
    models: dict[str, dict] = {}
    for site, per_model in sorted(cse.items()):
        for model_name, metrics in (per_model or {}).items():
            if not isinstance(metrics, dict) or "dice" not in metrics:
                continue
            models.setdefault(_model_label(model_name, method), {})[site] = {
                k: metrics[k] for k in ("dice", "dice_std", "n_cases", "dice_per_case", "hd95") if k in metrics
            }
    order = sorted(models, key=lambda name: (name.startswith("site update:"), name))  # global models first
    return {"method": method, "section": "testing", "models": {k: models[k] for k in order}, "extra": {}}


def find_results(path: str | os.PathLike) -> Path:
    """The results file of a run: fedseg_results.json first, else FLARE's cross_val_results.json."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (RESULTS_FILE, CSE_FILE):
        hits = sorted(path.rglob(name), key=lambda p: p.stat().st_mtime)
        if hits:
            return hits[-1]
    raise FileNotFoundError(f"no {RESULTS_FILE} or {CSE_FILE} under {path}: did the run finish?")


def load_results(path: str | os.PathLike, method: str | None = None) -> dict:
    file = find_results(path)
    data = json.loads(file.read_text())
    if file.name == CSE_FILE:
        data = from_cross_site_val(data, method or _guess_method(file))
    return data


def _guess_method(file: Path) -> str:
    for parent in file.parents:
        meta = parent / "meta.json"
        if meta.is_file():
            try:
                return json.loads(meta.read_text()).get("name", "fedavg")
            except ValueError:
                break
    return "fedavg"


def site_mean(per_site: dict) -> float:
    values = [v["dice"] for v in per_site.values() if isinstance(v, dict) and _finite(v.get("dice"))]
    return sum(values) / len(values) if values else float("nan")


def worst_site(per_site: dict) -> float:
    """The worst site's test Dice: the minimum over sites ({site: dice} or {site: {"dice": ...}}); sites without a
    finite Dice are left out; NaN when none has one. Next to the mean over sites it says whether a model that looks
    good on average fails one hospital."""
    values = [v.get("dice") if isinstance(v, dict) else v for v in per_site.values()]
    values = [float(v) for v in values if _finite(v) and not isinstance(v, bool)]
    return min(values) if values else float("nan")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def format_table(results: dict, title: str | None = None) -> str:
    """Rows: models; columns: sites (test Dice mean ± std over cases), the mean over sites and the worst site."""
    models = results.get("models", {})
    sites = sorted({s for per_site in models.values() for s in per_site})
    header = ["model"] + sites + ["mean over sites", "worst site"]
    rows = []
    for name, per_site in models.items():
        row = [name]
        for s in sites:
            v = per_site.get(s)
            row.append(f"{v['dice']:.3f} ± {v.get('dice_std', 0.0):.3f} (n={int(v.get('n_cases', 0))})" if v else "-")
        row += [f"{site_mean(per_site):.3f}", f"{worst_site(per_site):.3f}"]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [f"{title or results.get('method', 'run')}: per-site test Dice (mean ± std over cases)"]
    out += [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    health = (results.get("extra") or {}).get("selector_status") or {}
    if isinstance(health, dict) and health.get("status") not in (None, "learned"):
        out.append(f"WARNING: FedSM selector {health['status']}: " + "; ".join(map(str, health.get("reasons") or [])))
    for key, value in (results.get("extra") or {}).items():
        if isinstance(value, float):
            out.append(f"{key}: {value:.4g}")
        elif isinstance(value, (int, str)):
            out.append(f"{key}: {value}")
        elif (
            isinstance(value, dict)
            and value
            and len(value) <= 16
            and all(isinstance(v, (int, float, dict)) for v in value.values())
        ):
            # per-site extras, e.g. selector accuracy or routing counts
            out.append(f"{key}: " + "; ".join(f"{k}={_short(v)}" for k, v in value.items()))
    return "\n".join(out)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path", help="simulator workspace, downloaded job folder, or a results JSON file")
    p.add_argument("--method", help="method name to show (default: from the job's meta.json)")
    p.add_argument("--json", help="also write the common results record here")
    o = p.parse_args(argv)
    results = load_results(o.path, o.method)
    print(format_table(results))
    if o.json:
        Path(o.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
