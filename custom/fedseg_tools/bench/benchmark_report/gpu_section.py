"""The GPU section, from raw/gpu.json (the GPU variant's speed and memory, fedseg_tools.bench.gpu); its table alone is
also what fedseg_tools.bench.gpu prints."""

from __future__ import annotations

from fedseg_tools.bench.report_data import _fmt, _table

MEASURES = (
    "Wall s is the method's whole run in the simulator (all rounds, hand-overs, validation and final evaluation); "
    "× FedAvg is its ratio to FedAvg's in the same run. Training images/s per site = segmentation steps × batch / "
    "seconds of that site's training tasks (which include scoring the received model on the site's validation "
    "cases); the range is over sites. It measures speed and memory, not accuracy (one seed, one protocol)."
)


def _mib_range(values: dict) -> str:
    if not values:
        return "–"
    lo, hi = min(values.values()) / 2**20, max(values.values()) / 2**20
    return f"{lo:.0f} MiB" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f} MiB"


def _rate_range(values: dict) -> str:
    if not values:
        return "–"
    lo, hi = min(values.values()), max(values.values())
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}"


def gpu_table_lines(gpu: dict) -> list[str]:
    """The GPU table from raw/gpu.json (rows written by fedseg_tools.bench.gpu.gpu_rows)."""
    rows = []
    for r in gpu.get("rows", []):
        rows.append(
            [
                r["method"],
                r["dataset"],
                _fmt(r.get("wall_seconds"), 1),
                _fmt(r.get("x_fedavg"), 2),
                _mib_range(r.get("peak_gpu_bytes") or {}),
                _rate_range(r.get("train_images_per_second") or {}),
            ]
        )
    return [
        _table(
            ["method", "dataset", "wall s (GPU)", "× FedAvg", "peak GPU memory / site (allocated)", "training images/s / site"],
            rows,
        )
    ]


def gpu_section(gpu: dict | None) -> list[str]:
    if not gpu:
        return [
            "## GPU",
            "",
            "The GPU variant was not run on a GPU. Nothing below is estimated.",
            "",
            _table(["method", "dataset", "wall s (GPU)", "× FedAvg", "peak GPU memory / site", "images/s / site"], []),
            "",
        ]
    m = gpu.get("machine") or {}
    L = [
        "## GPU",
        "",
        f"The standard preset's GPU variant (`python -m fedseg_tools.bench.gpu`): {gpu.get('preset', '')}. Machine: "
        f"{m.get('gpu', '?')} ({m.get('gpu_memory_mib', '?')} MiB, driver {m.get('driver', '?')}), {m.get('cpu_count', '?')} CPU "
        f"cores, Python {m.get('python', '?')}, torch {m.get('torch', '?')}, MONAI {m.get('monai', '?')}, NVFlare "
        f"{m.get('nvflare', '?')}; started {gpu.get('started', '?')}; the FL job took {_fmt(gpu.get('fl_job_seconds'), 0)} s.",
        f"Command: `{gpu.get('command_on_device', gpu.get('command'))}`; table: `{gpu.get('command')}`.",
        "",
        MEASURES,
        "",
    ]
    L += gpu_table_lines(gpu) + [""]
    for key in ("memory_note", "not_measured"):
        if gpu.get(key):
            L += [f"- {key.replace('_', ' ').capitalize()}: {gpu[key]}"]
    return L + [""]
