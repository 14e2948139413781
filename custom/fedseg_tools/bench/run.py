"""The benchmark runner: datasets -> (dataset, seed) cells -> every method -> raw results -> report.

    python -m fedseg_tools.bench --preset quick --out bench_results
    python -m fedseg_tools.bench --preset full --out bench_results --publish            # on a GPU machine
    python -m fedseg_tools.bench --preset quick --datasets synth2d --seeds 0 --methods fedavg fedsm local
    python -m fedseg_tools.bench --preset quick --data-dir /data/my_sites --datasets my_sites   # any datalist folder
    python -m fedseg_tools.bench --report-only --out bench_results [--publish]              # report from raw results

Per (dataset, seed) cell: a seeded initial checkpoint shared by every method; the FL methods run in the
NVFlare simulator (one job with all of them one after another, or one job per method with --isolate),
local-only and centralized in a separate process. A method whose FLARE job is not available (not in
fedseg.jobgen.JOBS) is reported as missing. In a shared job, a method that did not finish is re-run once in
its own job.

Output folder: data/ (generated and converted datasets), runs/<dataset>/seed<k>/ (jobs, simulator
workspaces, cell.json), raw/ (results.json, results.csv, methods.csv, cost.json, run.json), BENCHMARKS.md
and the PNG plots. --publish copies the raw files and plots to docs/benchmarks/ and writes BENCHMARKS.md at
the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedseg_tools.bench import budget as budget_mod
from fedseg_tools.bench.collect import meter_records, method_record, timeline, windows
from fedseg_tools.bench.jobs import build_job, fedbn_refusal, label, save_initial_checkpoint, workflow_args
from fedseg_tools.bench.machine import machine_info
from fedseg_tools.bench.presets import (
    REPO,
    DatasetSpec,
    Preset,
    cell_engine,
    datalist_dataset,
    get_preset,
)
from fedseg_tools.bench.unseen import add_loco_datasets, federation_dir, holdout_preset, score_cell
from fedseg_tools.sim import package_env

_print_lock = threading.Lock()
STOP = threading.Event()  # set on SIGTERM: no further job, baseline or peer is started


class Stopped(RuntimeError):
    """The benchmark was asked to stop (SIGTERM)."""


def check_stop() -> None:
    if STOP.is_set():
        raise Stopped("the benchmark was stopped (SIGTERM)")


def log(msg: str) -> None:
    with _print_lock:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- machine ---------------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process and of every child process that has finished (simulators, baselines)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        u = resource.getrusage(who)
        total += u.ru_utime + u.ru_stime
    return total


# ---- data ------------------------------------------------------------------------------------------------------
def downscale_pictures(src: Path, dst: Path, image_size: int, image_format: str = "png") -> dict:
    """A copy of a folder dataset (<site>/images, <site>/masks pictures) with every picture scaled so that its
    long side is image_size pixels (area averaging; masks averaged then thresholded at half, written 0/255 PNG).
    Returns {site: pictures}. Used for the standard preset's polyp data (small images to fit 2 CPU cores).
    A site's group file (sequence.csv / groups.csv) is copied with it."""
    import shutil

    from PIL import Image

    from fedseg.data.groups import GROUP_FILE_NAMES

    counts = {}
    for site_dir in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        pics = 0
        for name in GROUP_FILE_NAMES:  # the split unit travels with the pictures (stems are unchanged)
            if (site_dir / name).is_file():
                (dst / site_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(site_dir / name, dst / site_dir.name / name)
        for kind in ("images", "masks"):
            folder = site_dir / kind
            if not folder.is_dir():
                continue
            out = dst / site_dir.name / kind
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
                    continue
                with Image.open(f) as im:
                    im.load()
                    im = im.convert("L") if kind == "masks" else im.convert("RGB")
                    w, h = im.size
                    scale = image_size / max(w, h)
                    size = (max(1, round(w * scale)), max(1, round(h * scale)))
                    small = im.resize(size, Image.BOX)
                    if kind == "masks":
                        small = small.point(lambda v: 255 if v > 127 else 0)
                    if kind == "images" and image_format == "jpg":  # smaller to carry; masks stay lossless
                        small.save(out / f"{f.stem}.jpg", quality=95)
                    else:
                        small.save(out / f"{f.stem}.png")
                pics += kind == "images"
        if pics:
            counts[site_dir.name] = pics
    return counts


def prepare_dataset(spec: DatasetSpec, data_root: Path) -> tuple[Path | None, str]:
    """(folder with <site>/datalist.json, note). None when an optional source is missing."""
    if spec.kind == "datalist":
        return Path(spec.source), f"datalist folder {spec.source}"
    out = data_root / spec.name
    marker = out / "bench_dataset.json"
    wanted = {"kind": spec.kind, "source": spec.source, "options": spec.options}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return out, f"reused {out}"
    if spec.kind == "synthetic":
        from fedseg.data.synthetic import generate_dataset

        generate_dataset(str(out), overwrite=True, **spec.options)
        note = "fedseg.data.synthetic " + ", ".join(f"{k}={v}" for k, v in spec.options.items())
    elif spec.kind in ("polyp", "folder"):
        if not Path(spec.source).is_dir():
            if spec.required:
                raise FileNotFoundError(f"dataset {spec.name}: source folder {spec.source} not found")
            return None, f"skipped: {spec.source} not found"
        import shutil

        from fedseg.data.convert import convert_folder_dataset

        options = {k: v for k, v in spec.options.items() if v is not None and k != "image_size"}
        source = Path(spec.source)
        if spec.options.get("image_size"):
            staged = data_root / f".{spec.name}_pictures"
            shutil.rmtree(staged, ignore_errors=True)
            downscale_pictures(source, staged, int(spec.options["image_size"]))
            source = staged
        try:
            convert_folder_dataset(str(source), str(out), overwrite=True, **options)
        finally:
            if source != Path(spec.source):
                shutil.rmtree(source, ignore_errors=True)
        note = f"fedseg.data.convert of {spec.source} " + ", ".join(f"{k}={v}" for k, v in options.items())
        if spec.options.get("image_size"):
            note += f", pictures downscaled to {spec.options['image_size']} px on the long side"
    else:
        raise ValueError(f"unknown dataset kind {spec.kind!r}")
    marker.write_text(json.dumps(wanted))
    return out, note


# ---- progress --------------------------------------------------------------------------------------------------
# one round (FedAvg/FedSM) or communication (FedCross) costs about this many segmentation steps of other work
# (validation of the received model, task hand-over, aggregation): the progress estimate's weight
ROUND_OVERHEAD_STEPS = 25


def run_units(plan: budget_mod.MethodPlan) -> float:
    """Estimated work of one run, in segmentation steps (its planned steps plus its rounds' overhead)."""
    rounds = plan.communications or plan.rounds or 1
    return float(plan.seg_steps_total + ROUND_OVERHEAD_STEPS * rounds * (2 if plan.method == "fedcrossens" else 1))


class Progress:
    """A progress line every `every` seconds while the benchmark runs: per running dataset, the run in
    progress with its round, plus elapsed and estimated remaining time over the whole benchmark (from the
    planned work of every run: finished runs count fully, the running one by its rounds done)."""

    def __init__(self, every: float = 60.0, out=None):
        self.every = float(every)
        self.began = time.time()
        self.lock = threading.Lock()
        self.total: dict[tuple, float] = {}  # (dataset, key, seed) -> units
        self.rounds: dict[tuple, int] = {}
        self.done: set[tuple] = set()
        self.active: dict[str, dict] = {}  # dataset -> {"workspace", "sites", "what"}
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def plan(self, dataset: str, runs: list[tuple[str, int]], plans: dict) -> None:
        with self.lock:
            for key, seed in runs:
                self.total[(dataset, key, seed)] = run_units(plans[key])
                self.rounds[(dataset, key, seed)] = int(plans[key].communications or plans[key].rounds or 1)

    def running(self, dataset: str, what: str, workspace: Path | None = None, sites: list[str] | None = None) -> None:
        with self.lock:
            self.active[dataset] = {"what": what, "workspace": workspace, "sites": sites or []}

    def finished(self, dataset: str, runs: list[tuple[str, int]]) -> None:
        with self.lock:
            self.done.update((dataset, k, s) for k, s in runs)
            self.active.pop(dataset, None)

    def _current(self, dataset: str, info: dict) -> tuple[str, float, int]:
        """(text, units done so far, runs ended) for one dataset's running job: its runs that ended count fully,
        the run in progress by its rounds (or communications) done."""
        ws = info.get("workspace")
        if ws is None:
            return info["what"], 0.0, 0
        from fedseg_tools.bench.collect import meter_records, timeline

        def ident(name: str) -> tuple:
            key, _, seed = name.rpartition("__s")
            return dataset, key, int(seed) if seed.isdigit() else -1

        open_runs, ended, n_ended = {}, 0.0, 0
        for e in timeline(ws):
            if e["phase"] == "start":
                open_runs[e["method"]] = e["time"]
            elif e["method"] in open_runs:
                open_runs.pop(e["method"])
                ended += self.total.get(ident(e["method"]), 0.0)
                n_ended += 1
        if not open_runs:
            return info["what"] + " (starting / between runs)", ended, n_ended
        name, started = max(open_runs.items(), key=lambda kv: kv[1])
        rounds_seen = set()
        for recs in meter_records(ws, info["sites"]).values():
            for r in recs:
                if (
                    (r.get("t_in") or 0) >= started
                    and r.get("round") is not None
                    and r.get("task_name") in ("train", "cross_train", "fedsm_train")
                ):
                    rounds_seen.add(int(r["round"]))
        total_rounds = self.rounds.get(ident(name), 0)
        done = min(len(rounds_seen), total_rounds) if total_rounds else len(rounds_seen)
        key, seed = ident(name)[1:]
        unit = "communication" if key.startswith("fedcross") else "round"
        text = f"seed {seed}: {key} {unit} {done}/{total_rounds or '?'}"
        return text, ended + (self.total.get(ident(name), 0.0) * done / total_rounds if total_rounds else 0.0), n_ended

    def line(self) -> str:
        with self.lock:
            active = dict(self.active)
            done_units = sum(self.total.get(k, 0.0) for k in self.done)
            total = sum(self.total.values())
        parts, partial, ended = [], 0.0, 0
        for ds, info in sorted(active.items()):
            try:
                text, units, n = self._current(ds, info)
            except Exception as e:  # noqa: BLE001 - a progress line must never break the run
                text, units, n = f"{info['what']} ({type(e).__name__})", 0.0, 0
            parts.append(f"{ds} {text}")
            partial += units
            ended += n
        elapsed = time.time() - self.began
        frac = (done_units + partial) / total if total else 0.0
        left = f"~{elapsed * (1 - frac) / frac / 60:.0f} min left" if frac > 0.02 else "time left: estimating"
        runs = f"{len(self.done) + ended}/{len(self.total)} runs done"
        return f"{'; '.join(parts) or 'preparing'}; {runs}, {elapsed / 60:.0f} min elapsed, {left}"

    def start(self) -> None:
        def loop():
            while not self.stop_event.wait(self.every):
                log("progress: " + self.line())

        self.thread = threading.Thread(target=loop, name="bench-progress", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


PROGRESS = Progress()


# ---- one cell ------------------------------------------------------------------------------------------------
def _run_fl_job(job: Path, workspace: Path, data_dir: Path, sites: list[str], timeout: float) -> dict:
    from fedseg_tools.bench.jobs import simulate_bench_job

    result = simulate_bench_job(job, workspace, data_dir, sites, timeout)
    errors = result.errors()
    return {
        "returncode": result.returncode,
        "seconds": round(result.seconds, 2),
        "errors": errors[-4000:],
        "log_tail": result.log_tail[-2000:] if result.returncode else "",
    }


def _collect(
    workspace: Path, runs: list[tuple[str, int]], sites: list[str], plans: dict, specs: dict
) -> dict[tuple[str, int], dict]:
    wins = windows(timeline(workspace))
    records = meter_records(workspace, sites)
    out = {}
    for key, seed in runs:
        name = label(key, seed)
        rec = method_record(specs[key].method, workspace, sites, plans[key].as_dict(), wins.get(name), records, name)
        out[(key, seed)] = _tag(rec, specs[key])
    return out


def _tag(rec: dict, spec: budget_mod.RunSpec) -> dict:
    """A record with its run's key, protocol, group and options."""
    rec.update(key=spec.key, method=spec.method, protocol=spec.protocol, group=spec.group, options=dict(spec.options))
    return rec


def optimizer_variants(preset: Preset) -> tuple:
    """FedAvg/FedProx's local_optimizer setting that the default runs do NOT use (item 3's measurement)."""
    if not preset.optimizer_measure:
        return ()
    from fedseg_tools.bench.jobs import controller_default

    default = controller_default("fedseg.fl.fedavg_controller.FedAvgController", "local_optimizer")
    if default is None:
        return ()  # a controller without the setting: nothing to measure
    return ("keep",) if default == "fresh" else ("fresh",)


def cell_specs(preset: Preset, spec: DatasetSpec, methods: list[str], n_sites: int | None = None) -> list[budget_mod.RunSpec]:
    """The runs of one cell; n_sites (N) sets the N*B multiple of the matched-step baselines."""
    return budget_mod.run_specs(
        methods,
        preset.protocols,
        fedsm_ablation=preset.fedsm_ablation and spec.ablation,
        optimizer_variants=optimizer_variants(preset) if spec.ablation else (),
        stock=[m for m in preset.stock if m in budget_mod.STOCK] if spec.methods is None else [],
        matched_steps=preset.matched_steps,
        n_sites=n_sites,
        tuning=preset.tuning,
    )


def _skip_fedbn(key: str, specs: dict, plans: dict, engines: dict, cells: dict, ds_name: str) -> bool:
    """A FedBN run on a network without normalization parameters is not run (it would be FedAvg): recorded as
    "skipped" with the reason, which the report shows in its row."""
    if specs[key].method != "fedbn":
        return False
    reasons = {seed: fedbn_refusal(engine) for seed, engine in engines.items()}
    if not any(reasons.values()):
        return False
    for seed, reason in reasons.items():
        record = {"method": "fedbn", "status": "skipped", "plan": plans[key].as_dict(), "error": reason or "skipped"}
        cells[seed]["methods"][key] = _tag(record, specs[key])
    PROGRESS.finished(ds_name, [(key, seed) for seed in engines])
    log(f"{ds_name}: {key} {next(r for r in reasons.values() if r)}")
    return True


def run_dataset(
    ds_name: str, data_dir: Path, spec: DatasetSpec, preset: Preset, methods: list[str], ds_dir: Path
) -> list[dict]:
    """Every run (method x protocol x variant) and seed on one dataset; one cell record (cell.json) per seed.

    Shared mode (default): ONE simulator job runs every (seed, run) one after another and ONE process runs
    the baselines for every seed; each seed has its own initial network and controller seeds, the sites'
    data-order/augmentation random stream is seeded once (first seed) and continues from run to run.
    --isolate: one simulator job and one baseline process per (run, seed), each seeded by its seed alone.
    NVFlare's stock peers run after the FedSeg methods, each in its own SimEnv run (fedseg_tools.bench.stock).
    Matched-step baselines (preset.matched_steps): FedAvg at f*B runs in the simulator job like every FL run (its plan
    has R*f rounds); local-only and centralized at f*B run in one more baseline process per multiple f (R*f rounds)."""
    from fedseg import jobgen
    from fedseg_tools.baselines import site_train_counts

    ds_dir.mkdir(parents=True, exist_ok=True)
    counts = site_train_counts(data_dir)
    sites = sorted(counts)
    seeds = [int(x) for x in preset.seeds]
    rounds, epochs = spec.rounds or preset.rounds, spec.epochs or preset.epochs
    engines = {seed: cell_engine(spec, epochs, seed) for seed in seeds}
    batch = int(jobgen.resolve_engine(engines[seeds[0]])["batch_size"])
    budget = budget_mod.Budget.from_counts(rounds, epochs, counts, batch)
    specs = {s.key: s for s in cell_specs(preset, spec, methods, len(sites))}
    plans = budget_mod.plan_runs(list(specs.values()), budget, fedsm_policy=preset.fedsm_policy)
    inits = {seed: save_initial_checkpoint(ds_dir / f"init_s{seed}.pt", engines[seed], seed) for seed in seeds}
    cells = {
        seed: {
            "dataset": ds_name,
            "seed": seed,
            "sites": sites,
            "train_counts": counts,
            "budget": {
                "rounds": budget.rounds,
                "epochs": budget.epochs,
                "total_steps": budget.total_steps,
                "site_steps_per_epoch": budget.site_steps_per_epoch,
                "batch_size": batch,
            },
            "engine": engines[seed] if preset.isolate else engines[seeds[0]],
            "isolated": preset.isolate,
            "runs": {k: s.as_dict() for k, s in specs.items()},
            "methods": {},
            "jobs": [],
        }
        for seed in seeds
    }
    PROGRESS.plan(ds_name, [(k, seed) for seed in seeds for k in specs], plans)
    began = time.time()
    fl = [k for k, s in specs.items() if s.method in budget_mod.FL_METHODS]
    available = [k for k in fl if specs[k].method in jobgen.JOBS]
    for k in sorted(set(fl) - set(available)):
        for seed in seeds:
            cells[seed]["methods"][k] = _tag(
                {
                    "method": specs[k].method,
                    "status": "missing",
                    "plan": plans[k].as_dict(),
                    "error": "no FLARE job for this method in fedseg.jobgen.JOBS",
                },
                specs[k],
            )
        PROGRESS.finished(ds_name, [(k, seed) for seed in seeds])
    available = [k for k in available if not _skip_fedbn(k, specs, plans, engines, cells, ds_name)]
    runs = [(k, seed) for seed in seeds for k in available]
    groups = [[r] for r in runs] if preset.isolate else ([runs] if runs else [])
    pending = [(0, g) for g in groups]
    while pending:
        check_stop()
        attempt, group = pending.pop(0)
        single = len(group) == 1
        name = "bench_" + (label(*group[0]) if single else "all") + ("_retry" if attempt else "")
        engine = engines[group[0][1]] if single and (preset.isolate or attempt) else engines[seeds[0]]
        job = build_job(
            ds_dir / "jobs",
            name,
            group,
            plans,
            engine,
            inits,
            hd95=preset.hd95,
            task_request_interval=preset.task_request_interval,
            specs=specs,
            lr_schedule=preset.lr_schedule,
        )
        settings = workflow_args(job)
        ws = ds_dir / "ws" / name
        log(
            f"{ds_name}: {len(group)} run(s) ({', '.join(sorted({k for k, _ in group}))}; seeds "
            f"{sorted({s for _, s in group})}) in the NVFlare simulator, {len(sites)} sites ..."
        )
        PROGRESS.running(ds_name, name, ws, sites)
        job_record = _run_fl_job(job, ws, data_dir, sites, preset.timeout)
        job_record.update(name=name, runs=[label(k, s) for k, s in group])
        collected = _collect(ws, group, sites, plans, specs)
        done = [r for r in group if collected[r]["status"] in ("ok", "partial")]
        failed = [r for r in group if r not in done]
        for (k, seed), rec in collected.items():
            rec["workflow_args"] = settings.get(label(k, seed), {})
            if (k, seed) in done or k not in cells[seed]["methods"]:
                if (k, seed) in failed:
                    rec["error"] = (rec.get("error", "") + "\n" + job_record["errors"][-1500:]).strip()
                cells[seed]["methods"][k] = rec
        spent = sum(collected[r].get("wall_seconds", 0.0) for r in done)
        job_record["outside_methods_seconds"] = round(job_record["seconds"] - spent, 2)
        for seed in sorted({s for _, s in group}):
            cells[seed]["jobs"].append(job_record)
        PROGRESS.finished(ds_name, done if (failed and not single and not attempt) else group)
        log(
            f"{ds_name}: {name} finished in {job_record['seconds']:.0f}s (rc {job_record['returncode']}); "
            f"{len(done)}/{len(group)} runs done" + (f"; NOT done {[label(*r) for r in failed]}" if failed else "")
        )
        if failed and not single and not attempt:
            pending.extend((1, [r]) for r in failed)  # a run that broke the shared job gets its own job
    baselines = [k for k, s in specs.items() if s.method in budget_mod.BASELINES]
    factors = sorted({specs[k].rounds_factor for k in baselines})  # 1: equal steps; f: the matched f*B runs
    if baselines:
        batches = [[seed] for seed in seeds] if preset.isolate else [seeds]
        for factor in factors:
            keys = {specs[k].method: k for k in baselines if specs[k].rounds_factor == factor}  # method -> run key
            out_dir = ds_dir if factor == 1 else ds_dir / f"steps-{factor}B"
            out_dir.mkdir(parents=True, exist_ok=True)
            for batch_seeds in batches:
                check_stop()
                steps = "" if factor == 1 else f" at {factor}B steps"
                PROGRESS.running(ds_name, f"local-only / centralized{steps}, seeds {batch_seeds} (separate process)")
                got = run_baselines(
                    data_dir,
                    engines[batch_seeds[0]],
                    preset,
                    inits,
                    batch_seeds,
                    list(keys),
                    out_dir,
                    {m: plans[k] for m, k in keys.items()},
                    rounds * factor,  # matched steps: R*f rounds (checkpoints) of the same E epochs
                    epochs,
                )
                for seed in batch_seeds:
                    for m, rec in got[seed].items():
                        cells[seed]["methods"][keys[m]] = _tag(rec, specs[keys[m]])
                PROGRESS.finished(ds_name, [(k, s) for s in batch_seeds for k in keys.values()])
    stock = [k for k, s in specs.items() if s.method in budget_mod.STOCK]
    for k in stock:
        for seed in seeds:
            check_stop()
            PROGRESS.running(ds_name, f"seed {seed}: {k} (NVFlare stock recipe in SimEnv)")
            cells[seed]["methods"][k] = _tag(
                run_stock_peer(
                    specs[k].method,
                    data_dir,
                    sites,
                    engines[seed],
                    inits[seed],
                    seed,
                    plans[k],
                    budget,
                    ds_dir / "stock" / label(k, seed),
                    preset,
                ),
                specs[k],
            )
            PROGRESS.finished(ds_name, [(k, seed)])
    for seed in seeds:
        cells[seed]["seconds_dataset"] = round(time.time() - began, 1)
        (ds_dir / f"cell_s{seed}.json").write_text(json.dumps(cells[seed], indent=2, default=str))
    return [cells[seed] for seed in seeds]


def run_holdout_dataset(
    name: str, data_dir: Path, spec: DatasetSpec, preset: Preset, methods: list[str], ds_dir: Path
) -> list[dict]:
    """A holdout cell: the normal cell's runs on the other centres, then every deployable model on the unseen one."""
    federation = federation_dir(data_dir, spec.holdout, ds_dir / f"{name}_federation")
    cells = run_dataset(name, federation, spec, holdout_preset(preset), methods, ds_dir)
    unseen = data_dir / spec.holdout / "datalist.json"
    for cell in cells:
        check_stop()
        log(f"{name}: seed {cell['seed']}: scoring every deployable model on the unseen centre {spec.holdout} ...")
        cell["holdout"] = spec.holdout
        cell["unseen"] = score_cell(cell, ds_dir, unseen, federation, log)
        (ds_dir / f"cell_s{cell['seed']}.json").write_text(json.dumps(cell, indent=2, default=str))
    return cells


def run_stock_peer(
    method: str,
    data_dir: Path,
    sites: list[str],
    engine: dict,
    init: Path,
    seed: int,
    plan: budget_mod.MethodPlan,
    budget: budget_mod.Budget,
    out_dir: Path,
    preset: Preset,
) -> dict:
    """One NVFlare stock peer (fedseg_tools.bench.stock, H8's module) under the plan of its FedSeg twin:
    nvflare_cyclic = FedCross's plan (R*E/v rounds, each a visit of v epochs to every site in turn),
    nvflare_fedavg = FedAvg's (R rounds of E epochs). Same engine, data, initial checkpoint and seed."""
    base = {"method": method, "status": "missing", "plan": plan.as_dict()}
    try:
        from fedseg_tools.bench import stock
    except ImportError as e:
        return {**base, "error": f"fedseg_tools.bench.stock is not available: {e}"}
    if method == "nvflare_cyclic":
        v = plan.visit_epochs or budget.epochs
        rounds = plan.communications // max(budget.n_sites, 1)
        steps = {s: v * budget.site_steps_per_epoch[s] for s in sites}
    else:
        rounds = plan.rounds
        steps = {s: (plan.local_epochs or budget.epochs) * budget.site_steps_per_epoch[s] for s in sites}
    try:
        results = stock.run_stock(
            method,
            data_dir,
            sites,
            engine,
            init,
            rounds,
            steps,
            seed,
            out_dir,
            log=log,
            timeout=preset.timeout,
            with_hd95=preset.hd95,
        )
    except Exception as e:  # noqa: BLE001 - a failed peer is reported, the benchmark goes on
        log(f"{method} seed {seed}: FAILED {type(e).__name__}: {str(e)[:300]}")
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:]}
    rec = stock.as_method_record(results, plan.as_dict())
    models = results.get("models") or {}
    # the benchmark's rule for every method: the best-validated model where the workflow keeps one
    rec["headline_model"] = "global (best)" if "global (best)" in models else rec.get("headline_model") or "global (last)"
    return rec


def run_baselines(
    data_dir: Path,
    engine: dict,
    preset: Preset,
    inits: dict,
    seeds: list[int],
    methods: list[str],
    ds_dir: Path,
    plans: dict,
    rounds: int | None = None,
    epochs: int | None = None,
) -> dict[int, dict[str, dict]]:
    out_file = ds_dir / f"baselines_s{'_'.join(map(str, seeds))}.json"
    cmd = [
        sys.executable,
        "-m",
        "fedseg_tools.baselines",
        "benchmark",
        "--data",
        str(data_dir),
        "--engine",
        json.dumps(engine),
        "--rounds",
        str(rounds or preset.rounds),
        "--epochs",
        str(epochs or preset.epochs),
        "--seeds",
        *map(str, seeds),
        "--inits",
        *[str(inits[s]) for s in seeds],
        "--out",
        str(out_file),
        "--methods",
        *methods,
    ]
    cmd += ["--hd95"] if preset.hd95 else []
    log(f"{data_dir.name}: {', '.join(methods)} for seeds {seeds} (separate process) ...")
    proc = subprocess.run(cmd, env=package_env(), capture_output=True, text=True, timeout=preset.timeout)
    records: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    if proc.returncode != 0 or not out_file.exists():
        for seed in seeds:
            for m in methods:
                records[seed][m] = {
                    "method": m,
                    "status": "failed",
                    "plan": plans[m].as_dict(),
                    "error": (proc.stderr or proc.stdout)[-3000:],
                }
        return records
    data = json.loads(out_file.read_text())
    for seed in seeds:
        per_seed = data["seeds"].get(str(seed), {})
        for m in methods:
            got = per_seed.get(m)
            if not got:
                records[seed][m] = {"method": m, "status": "missing", "plan": plans[m].as_dict()}
                continue
            rec = {
                "method": m,
                "status": "ok",
                "plan": plans[m].as_dict(),
                "results": got["results"],
                "headline_model": "local (own site)" if m == "local" else "centralized",
                "traffic": {},
            }
            rec.update(
                {
                    k: got[k]
                    for k in (
                        "wall_seconds",
                        "cpu_seconds",
                        "memory",
                        "seg_steps",
                        "curve",
                        "wall_seconds_parallel",
                        "site_seconds",
                    )
                    if k in got
                }
            )
            records[seed][m] = rec
    return records


# ---- the whole run ------------------------------------------------------------------------------------------
def resolve_datasets(
    preset: Preset, names: list[str] | None, data_dirs: list[str] | None, holdout: list[str] | None = None
) -> dict[str, DatasetSpec]:
    """The preset's datasets plus --data-dir ones and their leave-one-centre-out cells (preset.loco, --holdout);
    --datasets picks among them by name."""
    specs = dict(preset.datasets)
    for d in data_dirs or []:
        spec = datalist_dataset(d)
        specs[spec.name] = spec
    specs.update(add_loco_datasets(specs, preset.loco, holdout))
    if not names:
        return specs
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; known: {sorted(specs)} (add one with --data-dir)")
    return {n: specs[n] for n in names}


def run_benchmark(preset: Preset, out: Path, datasets: dict[str, DatasetSpec], command: str, cost: bool = True) -> dict:
    from fedseg_tools.baselines import site_train_counts
    from fedseg_tools.bench import benchmark_report
    from fedseg_tools.bench import cost as cost_mod

    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    started, cpu_started = time.time(), _cpu_seconds()
    run_info = {
        "command": command,
        "preset": preset.name,
        "preset_description": preset.description,
        "seeds": list(preset.seeds),
        "rounds": preset.rounds,
        "epochs": preset.epochs,
        "methods": list(preset.methods),
        "isolate": preset.isolate,
        "parallel": preset.parallel,
        "fedsm_policy": preset.fedsm_policy,
        "task_request_interval": preset.task_request_interval,
        "protocols": list(preset.protocols),
        "fedsm_ablation": preset.fedsm_ablation,
        "optimizer_variants": list(optimizer_variants(preset)),
        "stock": list(preset.stock),
        "matched_steps": preset.matched_steps,
        "tuning": preset.tuning,
        "lr_schedule": preset.lr_schedule,
        "conclusive": preset.conclusive,
        "hd95": preset.hd95,
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "datasets": {},
    }
    global PROGRESS
    PROGRESS = Progress(preset.progress_every)
    PROGRESS.start()
    ready: dict[str, tuple[Path, DatasetSpec]] = {}
    for name, spec in datasets.items():
        path, note = prepare_dataset(spec, out / "data")
        run_info["datasets"][name] = {
            "note": note,
            "kind": spec.kind,
            "engine": spec.engine,
            "description": spec.description,
            "leakage_of": spec.leakage_of,
            "holdout": spec.holdout,  # leave-one-centre-out: this centre is not trained on (fedseg_tools.bench.unseen)
            "rounds": spec.rounds or preset.rounds,
            "epochs": spec.epochs or preset.epochs,
        }
        log(f"dataset {name}: {note}")
        if path is not None:
            trained = site_train_counts(path)  # a holdout cell trains on the other centres only
            run_info["datasets"][name]["sites"] = {s: n for s, n in trained.items() if s != spec.holdout}
            ready[name] = (path, spec)
    results: list[dict] = []

    def one(item):
        name, (path, spec) = item
        try:
            methods = [m for m in preset.methods if spec.methods is None or m in spec.methods]
            runner = run_holdout_dataset if spec.holdout else run_dataset  # holdout: leave-one-centre-out cell
            return runner(name, path, spec, preset, methods, out / "runs" / name)
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - one broken dataset must not lose the others
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            return [
                {"dataset": name, "seed": seed, "error": f"{type(e).__name__}: {e}", "methods": {}} for seed in preset.seeds
            ]

    try:
        with ThreadPoolExecutor(max_workers=max(1, preset.parallel)) as pool:
            for cells in pool.map(one, list(ready.items())):
                results.extend(cells)
    finally:
        PROGRESS.stop()
    run_info["cells_seconds"] = round(time.time() - started, 1)
    if cost and preset.cost is not None and preset.cost.dataset in ready:
        path, spec = ready[preset.cost.dataset]
        log(f"cost phase on {preset.cost.dataset}: FL overhead and executor throughput ...")
        try:
            cost_record = cost_mod.run_cost(preset, path, spec, out / "runs" / "cost", log=log)
        except Exception as e:  # noqa: BLE001
            log(f"cost phase FAILED: {type(e).__name__}: {e}")
            cost_record = {"error": f"{type(e).__name__}: {e}"}
        (out / "raw" / "cost.json").write_text(json.dumps(cost_record, indent=2, default=str))
    run_info["seconds"] = round(time.time() - started, 1)
    run_info["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 1)
    run_info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    benchmark_report.write_raw(out / "raw", results, run_info)
    log(f"raw results in {out / 'raw'}; total {run_info['seconds']:.0f}s")
    return run_info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="quick", choices=["smoke", "quick", "standard", "full"])
    p.add_argument("--out", default="bench_results", help="output folder (raw results, report, runs)")
    p.add_argument("--datasets", nargs="*", help="dataset names (default: the preset's; polyp only if its folder exists)")
    p.add_argument(
        "--data-dir", nargs="*", default=[], help="extra datasets in the datalist layout (<dir>/<site>/datalist.json)"
    )
    p.add_argument("--seeds", nargs="*", type=int)
    p.add_argument("--methods", nargs="*", choices=list(budget_mod.METHODS))
    p.add_argument("--rounds", type=int, help="R of the budget (FedAvg rounds)")
    p.add_argument("--epochs", type=int, help="E of the budget (local epochs per round)")
    p.add_argument("--parallel", type=int, help="(dataset, seed) cells at the same time")
    p.add_argument("--isolate", action="store_true", help="one simulator job per method")
    p.add_argument("--fedsm-policy", choices=budget_mod.FEDSM_POLICIES, help="FedSM/SoftPull under equal steps")
    p.add_argument("--protocols", nargs="*", choices=budget_mod.PROTOCOLS, help="default: both")
    p.add_argument("--no-ablation", action="store_true", help="skip the FedSM ablation and the optimizer-state runs")
    p.add_argument(
        "--no-matched-steps",
        action="store_true",
        help="skip the matched-step baselines (FedAvg, local-only, centralized at the paper runs' 2B and N*B steps)",
    )
    p.add_argument(
        "--no-tuning",
        action="store_true",
        help="skip the candidate runs of FedProx's mu and FedSM's lambda (chosen on validation: fedseg_tools.bench.tuning)",
    )
    p.add_argument(
        "--no-loco", action="store_true", help="skip the leave-one-centre-out cells (one per polyp centre in standard)"
    )
    p.add_argument(
        "--holdout",
        nargs="*",
        metavar="CENTRE",
        help="leave-one-centre-out cells <dataset>_loco_<CENTRE> for every dataset that has the centre (site folder)",
    )
    p.add_argument("--stock", nargs="*", choices=budget_mod.STOCK, help="NVFlare stock peers (default: the preset's)")
    p.add_argument("--no-cost", action="store_true", help="skip the FL-overhead / throughput measurements")
    p.add_argument("--no-hd95", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from OUT/raw")
    p.add_argument(
        "--publish",
        action="store_true",
        help="also write BENCHMARKS.md at the repository root and the raw files + plots to docs/benchmarks/",
    )
    return p


def _children() -> list[int]:
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _stop_children(signum, frame) -> None:
    """On SIGTERM: stop the simulators this run started (each in its own process group) and its other children."""
    import signal

    STOP.set()  # the dataset threads start nothing more; what runs now is stopped below
    for pid in _children():
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    import signal

    from fedseg_tools.bench import benchmark_report

    signal.signal(signal.SIGTERM, _stop_children)

    argv = list(sys.argv[1:] if argv is None else argv)
    o = build_parser().parse_args(argv)
    out = Path(o.out).resolve()
    command = "python -m fedseg_tools.bench " + " ".join(shlex.quote(a) for a in argv)
    if not o.report_only:
        preset = get_preset(o.preset)
        for key in ("seeds", "methods"):
            if getattr(o, key):
                setattr(preset, key, list(getattr(o, key)))
        for key in ("rounds", "epochs", "parallel"):
            if getattr(o, key):
                setattr(preset, key, int(getattr(o, key)))
        if o.isolate:
            preset.isolate = True
        if o.fedsm_policy:
            preset.fedsm_policy = o.fedsm_policy
        if o.protocols:
            preset.protocols = list(o.protocols)
        if o.no_ablation:
            preset.fedsm_ablation = preset.optimizer_measure = False
        if o.no_matched_steps:
            preset.matched_steps = False
        if o.no_loco:
            preset.loco = False
        if o.no_tuning:
            preset.tuning = False
        if o.stock is not None:
            preset.stock = list(o.stock)
        if o.no_hd95:
            preset.hd95 = False
        datasets = resolve_datasets(preset, o.datasets, o.data_dir, o.holdout)
        run_benchmark(preset, out, datasets, command, cost=not o.no_cost)
    md = benchmark_report.write_report(out / "raw", out)
    print(f"report: {md}")
    if o.publish:
        published = benchmark_report.publish(out, REPO)
        print(f"published: {published}")
    return 0
