"""A job folder staged for this POC: a copy whose meta.json asks for what this POC has."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .common import PocError, log
from .gpus import asks_for_gpus


def stage_job(
    job: str | os.PathLike, dest: Path, resource_spec: dict, scope: str | None = None, num_rounds: int | None = None
) -> Path:
    """Copy the job folder to `dest` and adapt the copy: the POC's GPU request (resource_spec) when the job has
    none, no GPU request on a CPU-only POC (empty resource_spec), the privacy scope, and num_rounds of every
    server workflow that has one."""
    src = Path(job).resolve()
    if not (src / "meta.json").is_file():
        raise PocError(f"{src} is not a job folder (no meta.json)")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    meta_file = dest / "meta.json"
    meta = json.loads(meta_file.read_text())
    if resource_spec and not meta.get("resource_spec"):
        meta["resource_spec"] = resource_spec
    elif not resource_spec and asks_for_gpus(meta.get("resource_spec")):
        log(f"CPU-only POC: dropping the GPU request {meta['resource_spec']} from the staged copy of {src.name}")
        meta["resource_spec"] = {}
    if scope:
        meta["scope"] = scope
    meta_file.write_text(json.dumps(meta, indent=2))
    if num_rounds is not None:
        for server_conf in dest.glob("*/config/config_fed_server.json"):
            conf = json.loads(server_conf.read_text())
            for wf in conf.get("workflows", []):
                if "num_rounds" in wf.get("args", {}):
                    wf["args"]["num_rounds"] = int(num_rounds)
            server_conf.write_text(json.dumps(conf, indent=2))
    if any(dest.glob("**/custom")):
        log(f"note: {src.name} carries code (custom/): a BYOC job, the submitter needs the byoc right")
    return dest
