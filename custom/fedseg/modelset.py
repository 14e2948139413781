"""Model sets on disk: FedSM's {global, personalized per site, selector} and FedCross's K members.

One torch file of tensors plus a JSON "info" record (round, site order, settings), readable with
torch.load(weights_only=True). Written atomically: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def save_model_set(path: str | os.PathLike, groups: dict, info: dict) -> None:
    """Atomically write a model set: {group: {key: array}} (nested one level deeper for per-site/per-member
    groups) plus JSON-able info, as torch tensors so torch.load(weights_only=True) can read it back."""

    def to_tensors(obj):
        if isinstance(obj, dict):
            return {k: to_tensors(v) for k, v in obj.items()}
        return torch.as_tensor(np.asarray(obj))

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"groups": to_tensors(groups), "info": json.dumps(info, default=json_default)}, tmp)
    os.replace(tmp, path)


def load_model_set(path: str | os.PathLike) -> tuple[dict, dict]:
    """Inverse of save_model_set: (groups as numpy arrays, info)."""

    def to_numpy(obj):
        if isinstance(obj, dict):
            return {k: to_numpy(v) for k, v in obj.items()}
        return obj.numpy()

    data = torch.load(path, map_location="cpu", weights_only=True)
    return to_numpy(data["groups"]), json.loads(data["info"])
