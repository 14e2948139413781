"""Model sets on disk: FedSM's {global, personalized per site, selector} and FedCross's K members (and the
server's initial FedCross members).

One torch file of tensors plus a JSON "info" record (round, site order, settings), readable with
torch.load(weights_only=True). Written atomically: a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
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


# ---- FedCross / FedCrossEns: K travelling models ---------------------------------------------------------------
FEDCROSS_METHOD = "fedcross"


def member_key(m: int) -> str:
    return f"m{m}"


def save_members(path: str | Path, members: Sequence[dict], optimizers: Sequence[dict], info: dict) -> None:
    """K models with their optimizer states, plus info (communication, engine, network, schedule...)."""
    groups = {
        "members": {member_key(m): w for m, w in enumerate(members)},
        "optimizers": {member_key(m): o or {} for m, o in enumerate(optimizers)},
    }
    save_model_set(path, groups, {**info, "method": FEDCROSS_METHOD, "num_models": len(members)})


def load_members(path: str | Path) -> tuple[list[dict], list[dict], dict]:
    """Inverse of save_members: (weights per model, optimizer state per model, info)."""
    groups, info = load_model_set(path)
    if info.get("method") != FEDCROSS_METHOD:
        raise ValueError(f"{path} is not a FedCross model set (method {info.get('method')!r})")
    k = int(info["num_models"])
    members = [groups["members"][member_key(m)] for m in range(k)]
    optimizers = [groups.get("optimizers", {}).get(member_key(m), {}) for m in range(k)]
    return members, optimizers, info


def initial_members(network_args: dict, model0: dict, num_models: int, seed: int) -> list[dict]:
    """Model 0 is the given (persistor's) model; model m > 0 is a fresh network seeded with member_seed(seed, m)."""
    from fedseg.algorithms.schedules import member_seed
    from fedseg.engine import SegNetwork, state_to_numpy

    members = [dict(model0)]
    state = torch.random.get_rng_state()
    try:
        for m in range(1, num_models):
            torch.manual_seed(member_seed(seed, m))
            members.append(state_to_numpy(SegNetwork(**network_args)))
    finally:
        torch.random.set_rng_state(state)
    return members
