"""The "Cost of federation" section, from raw/cost.json (fedseg_tools.bench.cost): the FL overhead ratio against a plain
loop, the FedCross relay against FedAvg, the site executor's throughput against a plain MONAI loop, and what the
bench's jobs change to improve the ratios."""

from __future__ import annotations

from fedseg_tools.bench.cost import ratios
from fedseg_tools.bench.report_data import _finite, _fmt, _table

POLLING = {
    "shipped": "FLARE defaults (task_request_interval 2 s, task_check_period 0.5 s)",
    "tuned": "bench settings (task_request_interval 0.1 s, task_check_period 0.1 s)",
}
EXECUTOR = {
    "shipped": "as shipped (validate_before_train, the mean loss of every 10 steps to TensorBoard)",
    "lean": "validate_before_train=false, no TensorBoard events",
}


def cost_ratios(cost: dict) -> dict:
    """The cost record's ratios, recomputed from its raw measurements when it has them (so that the report can add
    ratios to older records)."""
    if cost.get("plain") and cost.get("jobs"):
        return ratios(cost)
    return cost.get("ratios") or {}


def _loads(values: list) -> list[float]:
    return [round(x, 1) for x in values]


def _intro(cost: dict) -> str:
    return (
        f"Same command and machine as above; cost phase started {cost.get('started', '?')} (load average "
        f"{_loads(cost.get('load_average_at_start', []))} at start, {_loads(cost.get('load_average_at_end', []))} "
        f"at end), {_fmt(cost.get('seconds'), 0)} s. Dataset `{cost['dataset']}` ({len(cost['sites'])} sites), FedAvg for "
        f"{cost['rounds']} rounds from the same initial weights on the same engine; small work = {cost['small_epochs']} epoch "
        f"per round, realistic = {cost['realistic_epochs']} epochs per round. FL: the NVFlare simulator job (sites = parallel "
        "processes sharing the cores); plain: the same training steps and step-weighted averaging in a plain Python loop, "
        "one process, sites one after the other (1 thread, as every site). Ratio > 1: the FL run is slower. Wall times "
        "move with the machine's other load (the load averages above); CPU seconds and the per-round overhead (training "
        "wall time minus the slowest site's task, round by round) are the robust numbers."
    )


def overhead_table(fl_overhead: dict) -> list[str]:
    rows = []
    for key, v in fl_overhead.items():
        work, setting = key.split("/")
        rows.append(
            [
                work,
                POLLING[setting],
                _fmt(v.get("fl_training_seconds"), 1),
                _fmt(v.get("plain_training_seconds"), 1),
                f"**{_fmt(v.get('training_wall_ratio'), 2)}**",
                _fmt(v.get("overhead_per_round_seconds"), 2),
                _fmt(v.get("training_cpu_ratio"), 2),
                _fmt(v.get("fl_job_seconds"), 1),
                _fmt(v.get("plain_process_seconds"), 1),
                _fmt(v.get("job_wall_ratio"), 2),
                _fmt(v.get("cpu_ratio"), 2),
            ]
        )
    header = [
        "work/round",
        "settings",
        "FL training s",
        "plain loop s",
        "training wall ratio",
        "FL overhead s/round",
        "training CPU ratio",
        "FL job s (all)",
        "plain process s (all)",
        "job wall ratio",
        "job CPU ratio",
    ]
    return [
        "### FL overhead ratio",
        "",
        _table(header, rows),
        "",
        "FL training: the FedAvg workflow from its first task to its last aggregation; FL job: the whole simulator run "
        "(start-up of a server and one process per site, warm-up, shut-down); plain process: the plain loop's whole "
        "process (imports, data). Training CPU: the sites' CPU during their training tasks plus the server's during the "
        "workflow, against the plain loop's CPU.",
        "",
    ]


def relay_lines(relay: dict | None) -> list[str]:
    """The cost phase's relay measurement: FedCross against FedAvg at the same steps in one job."""
    if not relay:
        return []
    if "error" in relay:
        return ["### FedCross relay", "", f"The relay measurement failed: `{relay['error']}`", ""]
    hand = relay.get("handover_seconds") or {}
    split = relay.get("communication_seconds") or {}
    row = [
        _fmt(relay.get("fedavg_wall_seconds"), 1),
        _fmt(relay.get("fedcross_wall_seconds"), 1),
        f"**{_fmt(relay.get('fedcross_vs_fedavg_wall'), 2)}**",
        f"{_fmt(hand.get('median'), 3)} / {_fmt(hand.get('mean'), 3)} / {_fmt(hand.get('max'), 3)}",
        *(_fmt((split.get(key) or {}).get("mean"), 2) for key in ("seconds", "train_s", "validate_s")),
        str(relay.get("validated_communications", "-")),
    ]
    header = [
        "FedAvg workflow s",
        "FedCross workflow s",
        "FedCross / FedAvg wall",
        "hand-over s (median / mean / max)",
        "communication s (mean)",
        "training s (mean)",
        "validation s (mean)",
        "validated communications",
    ]
    return [
        "### FedCross relay",
        "",
        f"FedAvg ({relay.get('fedavg_rounds')} rounds, small work per round), then FedCross with one model "
        f"({relay.get('fedcross_communications')} communications) at the same steps from the same initial weights, each "
        "in its own job with the bench's polling settings. Every site trains with one thread: FedAvg's sites at once, "
        "FedCross's one at a time, so where the machine has fewer cores than sites the ratio also counts the cores a "
        "relay leaves idle. Hand-over: from the last result at the server (a visit's, or after a validated communication "
        "a validation's) to the next visit starting at its site (one clock: the simulator's processes share the "
        "machine). FedCross validates every N communications and after the last (validate_every).",
        "",
        _table(header, [row]),
        "",
        *_fedavg_round_lines(relay.get("fedavg_round_seconds") or {}),
    ]


def _fedavg_round_lines(split: dict) -> list[str]:
    """FedAvg's rounds in the relay measurement, split as its controller's history records them."""
    if not any(split.values()):
        return []
    keys = ("tasks", "tasks_beyond_slowest_site", "screen_and_aggregate", "save")
    return [
        "FedAvg's rounds in that measurement (mean / max seconds per round, its controller's history): the tasks from "
        "sending to the last result; of these, what FLARE added beyond the slowest site's own validation and training "
        "(transfers, (de)serialisation, polling, building the network); the server's screening and aggregation; saving.",
        "",
        _table(
            ["tasks", "beyond the slowest site", "screen and aggregate", "save"],
            [[f"{_fmt((split.get(k) or {}).get('mean'), 3)} / {_fmt((split.get(k) or {}).get('max'), 3)}" for k in keys]],
        ),
        "",
    ]


def _throughput_row(setting: str, v: dict) -> list[str]:
    task, loop = v.get("train_task_seconds"), v.get("engine_train_seconds_estimate")
    rest = task - loop if _finite(task) and _finite(loop) else None
    return [
        EXECUTOR[setting],
        _fmt(v.get("executor_images_per_second"), 1),
        _fmt(v.get("engine_images_per_second_logged"), 1),
        _fmt(v.get("plain_engine_images_per_second"), 1),
        _fmt(v.get("plain_monai_images_per_second"), 1),
        _fmt(v.get("executor_vs_monai"), 2),
        _fmt(v.get("executor_images_per_cpu_second"), 1),
        _fmt(v.get("plain_monai_images_per_cpu_second"), 1),
        f"**{_fmt(v.get('executor_vs_monai_cpu'), 2)}**",
        _fmt(v.get("engine_vs_monai_cpu"), 2),
        f"{_fmt(task, 1)} = {_fmt(loop, 1)} + {_fmt(rest, 1)}",
    ]


def throughput_table(cost: dict, throughput: dict) -> list[str]:
    header = [
        "executor settings",
        "executor img/s",
        "engine img/s (in task)",
        "plain engine img/s",
        "plain MONAI img/s",
        "executor / MONAI (wall)",
        "executor img/CPU-s",
        "plain MONAI img/CPU-s",
        "executor / MONAI (CPU)",
        "plain engine / MONAI (CPU)",
        "train-task s = engine loop + rest",
    ]
    return [
        "### Site executor throughput",
        "",
        f"Site `{cost['throughput_site']}` alone, FedAvg, {cost['realistic_epochs']} epochs per round. Executor img/s = images "
        "trained / wall time of the site's whole `train` tasks (TaskMeter); img/CPU-s = the same per CPU second of the site "
        "process (robust to other load). Engine img/s (in task) = what the engine logs for its own training loop inside that "
        "task, per-step callback included; plain engine = SegEngine.train in a plain process; plain MONAI = a hand-written "
        "MONAI loop (CacheDataset, DataLoader, the same network, DiceCELoss, Adam, same transforms and batch size). "
        "Ratio < 1: the executor is slower.",
        "",
        _table(header, [_throughput_row(setting, v) for setting, v in throughput.items()]),
        "",
        "Between the two rows the engine's own loop differs only by the TensorBoard events (its wall img/s also by "
        'the machine\'s other load); "rest" is the task time outside the training loop (validating the received model, '
        "building the network, converting weights, the meter).",
        "",
    ]


def changes_lines(fl_overhead: dict, throughput: dict) -> list[str]:
    ship, tuned = fl_overhead.get("small/shipped") or {}, fl_overhead.get("small/tuned") or {}
    return [
        "### What was changed to improve the ratios",
        "",
        f"- **Server polling (changed, in the bench's jobs):** FLARE tells a site to come back for its next task after "
        f"`task_request_interval` = 2 s, and workflows check task status every 0.5 s. With small work per round that is most of "
        f"the round: FL overhead {_fmt(ship.get('overhead_per_round_seconds'), 2)} s per round and a training wall ratio of "
        f"{_fmt(ship.get('training_wall_ratio'), 2)} with FLARE's defaults, {_fmt(tuned.get('overhead_per_round_seconds'), 2)} s "
        f"and {_fmt(tuned.get('training_wall_ratio'), 2)} with 0.1 s / 0.1 s. Every bench job uses the tuned values (a FedCross "
        "relay, with N×R communications, pays the polling most). The shipped jobs/ poll every 0.2 s "
        '(`"server": {"task_request_interval": 0.2}` in config_fed_server.json, fedseg.recipes.TASK_REQUEST_INTERVAL), '
        "and FedSeg's workflows return from a task as soon as its last result is in, not at the next status check.",
        "- **Executor (measured):** scoring the received model on the validation cases before every round "
        "(`validate_before_train`, it feeds FLARE's best-model selection) and the TensorBoard events to the server (the "
        "mean loss of every 10 optimizer steps) cost the executor "
        f"{_fmt((throughput.get('shipped') or {}).get('executor_vs_monai_cpu'), 2)} → "
        f"{_fmt((throughput.get('lean') or {}).get('executor_vs_monai_cpu'), 2)} of the plain MONAI loop's images per CPU second "
        "when both are off.",
        "- **Fixed costs the ratio does not hide:** a simulator job starts a server and one process per site, each importing "
        "torch, MONAI and NVFlare (the job ratio); the bench's warm-up builds each site's training cache and takes the first "
        "optimizer step before any method is timed.",
        "",
    ]


def cost_section(cost: dict | None) -> list[str]:
    L = ["## Cost of federation (measured in the same run)", ""]
    if not cost:
        return L + ["Not measured in this run (preset without a cost phase, or --no-cost).", ""]
    if "error" in cost:
        return L + [f"The cost phase failed: `{cost['error']}`", ""]
    r = cost_ratios(cost)
    fl_overhead, throughput = r.get("fl_overhead") or {}, r.get("throughput") or {}
    L += [_intro(cost), ""]
    L += overhead_table(fl_overhead)
    L += relay_lines(cost.get("relay"))
    L += throughput_table(cost, throughput)
    return L + changes_lines(fl_overhead, throughput)
