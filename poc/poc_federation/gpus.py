"""GPUs of the POC: what this machine has, and how sites and jobs use them."""

from __future__ import annotations

import json
from pathlib import Path

from .common import log


def detect_gpus() -> tuple[list[int], float]:
    """(GPU ids usable by this torch, memory of the smallest one in GiB); ([], 0) on a CPU-only machine."""
    try:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            return [], 0.0
        mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30
    except Exception:  # noqa: BLE001 - no CUDA build, no driver: CPU
        return [], 0.0
    # NVFlare's -gpu check and GPUResourceManager see GPUs through nvidia-smi; without it they cannot allocate.
    from nvflare.fuel.utils.gpu_utils import get_host_gpu_ids

    try:
        host_ids = get_host_gpu_ids() or []
    except Exception:  # noqa: BLE001
        host_ids = []
    ids = [i for i in range(n) if i in host_ids]
    if not ids:
        log(
            f"torch sees {n} GPU(s) but nvidia-smi lists none: NVFlare cannot assign them, planning for CPU "
            "(the engine still uses a GPU its process can see)"
        )
        return [], 0.0
    return ids, mem


def resolve_gpus(gpus: str) -> tuple[list[int], float]:
    """--gpus: auto (what detect_gpus finds), none/cpu, or ids like 0,1 -> (ids, memory per GPU in GiB)."""
    if gpus == "auto":
        return detect_gpus()
    if gpus in ("none", "cpu", ""):
        return [], 0.0
    ids = [int(x) for x in gpus.split(",") if x.strip()]
    _, mem = detect_gpus()
    return ids, mem or 8.0


def plan_gpus(sites: list[str], gpu_ids: list[int], gpu_mem_gib: float, job_mem_gib: float = 2.0) -> dict:
    """How the POC uses GPUs: `nvflare poc start -gpu <ids>` gives each site CUDA_VISIBLE_DEVICES round-robin
    (NVFlare's own client_gpu_assignments); each site's GPUResourceManager is told how many GPUs it has
    (POC provisions num_of_gpus 0); staged jobs without a resource_spec ask for one GPU per site.
    Without GPUs: no -gpu, resource managers stay at 0 GPUs and staged jobs ask for none (they run on CPU)."""
    if not gpu_ids:
        return {"gpu_ids": [], "assignments": {s: [] for s in sites}, "site_capacity": {}, "resource_spec": {}}
    from nvflare.tool.poc.poc_commands import client_gpu_assignments

    assignments = client_gpu_assignments(list(sites), list(gpu_ids))
    capacity_gib = max(1, int(gpu_mem_gib))
    job_mem = min(float(job_mem_gib), capacity_gib)
    return {
        "gpu_ids": list(gpu_ids),
        "assignments": assignments,
        "site_capacity": {s: {"num_of_gpus": len(ids), "mem_per_gpu_in_GiB": capacity_gib} for s, ids in assignments.items()},
        "resource_spec": {"@default": {"num_of_gpus": 1, "mem_per_gpu_in_GiB": job_mem}},
    }


def set_gpu_capacity(resources_file: Path, num_of_gpus: int, mem_gib: float) -> None:
    resources = json.loads(resources_file.read_text())
    for comp in resources.get("components", []):
        if comp.get("path", "").endswith("GPUResourceManager"):
            comp.setdefault("args", {}).update({"num_of_gpus": int(num_of_gpus), "mem_per_gpu_in_GiB": mem_gib})
    resources_file.write_text(json.dumps(resources, indent=2) + "\n")


def asks_for_gpus(resource_spec) -> bool:
    """Whether a job's meta.json resource_spec requests a GPU at any site."""
    if not isinstance(resource_spec, dict):
        return False
    return any(isinstance(v, dict) and (v.get("num_of_gpus") or 0) > 0 for v in resource_spec.values())
