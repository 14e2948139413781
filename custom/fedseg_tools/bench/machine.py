"""The machine a benchmark ran on, as every benchmark record states it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info() -> dict:
    import torch

    info = {
        "hostname_hash": abs(hash(platform.node())) % 10**6,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import monai
        import nvflare

        info.update(nvflare=nvflare.__version__, monai=monai.__version__)
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, IndexError, ValueError):
        pass
    return info
