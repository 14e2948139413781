"""The class allow-list a site or server needs to run FedSeg jobs that carry no code (non-BYOC).

NVFlare 2.9 rejects every component path of a code-less job that is not on the site's
local/resources.json "class_allow_list". FedSeg adds one prefix to NVFlare's default list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

FEDSEG_PREFIX = "fedseg."


def fedseg_allow_list() -> list[str]:
    return list(DEFAULT_CLASS_ALLOW_LIST) + [FEDSEG_PREFIX]


def allow_fedseg(resources_file: str | os.PathLike, extra_prefixes: tuple[str, ...] = ()) -> dict:
    """Add the fedseg prefix (and any extra ones) to a resources.json (created if absent; *.default used as its base)."""
    path = Path(resources_file)
    base = path if path.exists() else path.with_name(path.name + ".default")
    resources = json.loads(base.read_text()) if base.exists() else {}
    allow = resources.get("class_allow_list") or list(DEFAULT_CLASS_ALLOW_LIST)
    for prefix in (FEDSEG_PREFIX, *extra_prefixes):
        if prefix not in allow:
            allow.append(prefix)
    resources["class_allow_list"] = allow
    resources.setdefault("class_list_enforcement_mode", "enforce")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return resources
