"""Several named weight sets in one flat params dict, because FLARE's FLModel carries one `params` dict.

FedSM sends {global, personal, selector, selector_optim} in one task and FedCross sends {model, optim}:
pack() prefixes every key with "<group>/", unpack() splits them back. Pure; no FLARE, no torch.
"""

from __future__ import annotations

GROUP_SEP = "/"


def pack(groups: dict[str, dict]) -> dict:
    flat = {}
    for group, params in groups.items():
        if GROUP_SEP in group:
            raise ValueError(f"group name {group!r} must not contain {GROUP_SEP!r}")
        for key, value in (params or {}).items():
            flat[f"{group}{GROUP_SEP}{key}"] = value
    return flat


def unpack(flat: dict) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for key, value in (flat or {}).items():
        group, sep, name = key.partition(GROUP_SEP)
        if not sep:
            raise KeyError(f"param key {key!r} has no '<group>{GROUP_SEP}' prefix")
        groups.setdefault(group, {})[name] = value
    return groups
