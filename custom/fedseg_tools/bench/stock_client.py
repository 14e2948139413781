"""Client API training script for NVFlare's stock recipes (CyclicRecipe, FedAvgRecipe) on FedSeg's engine.

What a FLARE user would write for FedSeg's data: `import nvflare.client as flare`, receive the model, score it
on the site's validation cases, train it with a FRESH Adam optimizer at a CONSTANT learning rate for the
planned number of steps, send it back with the number of steps. Nothing of FedSeg's FL layer is used.

    --config <abs path>   JSON written by fedseg_tools.bench.stock: {"engine": {...}, "local_steps": {site: steps}}

The site finds its datalist by its own name (fedseg.data.resolve_site_datalist: FEDSEG_DATALIST in the
environment, or the site's local/fedseg_site.json) and validates it. Every task it runs is also written as one
JSON line to stock_visits.jsonl in the current folder (the site's app folder in the simulator): the run's
learning curve and the check that the planned visits happened.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VISITS_FILE = "stock_visits.jsonl"


def _workspace_root() -> str | None:
    """The site's workspace (the folder that holds local/): the simulator runs the script in
    <site ws>/<job id>/app_<site>/ or <site ws>/<job id>/."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "local").is_dir():
            return str(folder)
    return None


def main(argv: list[str] | None = None) -> None:
    import nvflare.client as flare
    import torch

    from fedseg.data import load_datalist, resolve_site_datalist, validate_site_data
    from fedseg.engine import EngineConfig, SegEngine, load_numpy_state

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    o = p.parse_args(argv)
    config = json.loads(Path(o.config).read_text())
    cfg = EngineConfig.from_dict(config["engine"])

    flare.init()
    site = flare.get_site_name()
    if site not in config["local_steps"]:
        raise KeyError(f"[site {site}] {o.config}: no 'local_steps' for this site (planned: {sorted(config['local_steps'])})")
    steps = int(config["local_steps"][site])
    path = resolve_site_datalist(site, None, _workspace_root())
    validate_site_data(path, site, num_classes=cfg.num_classes)
    engine = SegEngine(cfg, load_datalist(path, site), site=site)
    visits = Path(VISITS_FILE).resolve()

    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        task = flare.get_task_name()
        net = engine.new_network()
        load_numpy_state(net, model.params, site)
        start = time.perf_counter()
        metrics = engine.evaluate(net, "validation").summary("val_")
        record = {
            "site": site,
            "task": task,
            "round": model.current_round,
            "pid": os.getpid(),
            "val_dice": metrics["val_dice"],
            "t_in": time.time(),
        }
        reply = flare.FLModel(metrics=metrics)
        if not flare.is_evaluate():
            stats = engine.train(net, steps)  # a fresh Adam every visit (engine.new_optimizer), constant LR
            metrics.update(stats.as_metrics())
            # applied steps (AMP may skip a few: then fewer than planned, and the run's record says so)
            record.update(
                steps=stats.steps, planned_steps=steps, skipped=getattr(stats, "skipped", 0), train_loss=stats.mean_loss
            )
            params = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            reply = flare.FLModel(params=params, metrics=metrics, meta={"NUM_STEPS_CURRENT_ROUND": stats.steps})
        record.update(seconds=time.perf_counter() - start, t_out=time.time())
        with open(visits, "a") as f:  # before sending: the job may end as soon as the last result arrives
            f.write(json.dumps(record) + "\n")
        flare.send(reply)
        del net
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
