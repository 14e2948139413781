"""What a site lets the server ask of it: caps on the compute and memory of a task, in the site's own
configuration (local/fedseg_site.json, key "limits"; no job can change it).

    {"datalist": "/data/fedseg/datalist.json",
     "limits": {"max_local_steps": 5000, "max_selector_input_size_3d": 96}}

Every cap left out keeps its default (DEFAULT_LIMITS: generous for FedSeg's methods, far from what would exhaust a
hospital's machine). Before a task runs, the site executor checks the task's settings (what the server sends in the
task, and the job's own engine settings) against the caps; a value above a cap fails the task at that site with a
message naming the site, the setting, the value and the cap, and nothing runs.

A site can also require differential privacy of every job it trains for ("require_dp": true): a job whose engine
has no "dp" setting (DP-SGD, fedseg.engine.dp) is refused by that site when the job starts, and nothing is trained.

    {"datalist": "/data/fedseg/datalist.json", "require_dp": true}

And it can cap its privacy loss for each job ("max_epsilon": a number > 0, at the job's own delta): such a site
requires DP as above, and once the next training of a task would bring its epsilon above the cap, it refuses that
training (nothing is trained) and every later one; the server carries on without it (its site health).

    {"datalist": "/data/fedseg/datalist.json", "max_epsilon": 8.0}
"""

from __future__ import annotations

import math
import os

from fedseg.data.datalist import SITE_CONFIG_RELPATH, _read_site_config
from fedseg.engine.dp import check_max_epsilon

LIMITS_KEY = "limits"
REQUIRE_DP_KEY = "require_dp"
MAX_EPSILON_KEY = "max_epsilon"
DEFAULT_LIMITS = {
    "max_local_steps": 20000,  # optimizer steps of one local round or FedCross visit
    "max_local_epochs": 200,  # epochs of one local round or visit
    "max_models": 16,  # FedCross(Ens): models scored together (cross_validate)
    "max_gammas": 32,  # FedSM: gammas of one evaluation sweep
    "max_selector_input_size": 512,  # FedSM selector input edge, 2-D
    "max_selector_input_size_3d": 160,  # FedSM selector input edge, 3-D (memory grows with its cube)
    "max_selector_epochs": 100,  # FedSM selector epochs per round
}


class TaskRefused(ValueError):
    """A task asks more than the site allows."""


def read_site_limits(workspace_root: str, site: str) -> dict:
    """The site's caps: DEFAULT_LIMITS with the "limits" of <workspace_root>/local/fedseg_site.json over them."""
    config_path = os.path.join(workspace_root, SITE_CONFIG_RELPATH)
    given = _read_site_config(config_path, site).get(LIMITS_KEY, {})
    where = f'{config_path}: "{LIMITS_KEY}"'
    if not isinstance(given, dict):
        raise ValueError(f"{where} must be a JSON object of caps, got {given!r}")
    unknown = sorted(set(given) - set(DEFAULT_LIMITS))
    if unknown:
        raise ValueError(f"{where}: unknown cap(s) {unknown}; known: {sorted(DEFAULT_LIMITS)}")
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return {**DEFAULT_LIMITS, **given}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def check_task_limits(site: str, task: str, meta: dict, limits: dict, job_settings: dict | None = None) -> None:
    """Raise TaskRefused when the task's meta (or the job's own settings, job_settings: name -> value) asks more
    than a cap. Values that are not numbers are left to the task's own checks."""
    asked: list[tuple[str, object, str]] = []
    for key in ("local_steps", "visit_steps"):
        asked.append((key, meta.get(key), "max_local_steps"))
    for key in ("local_epochs", "visit_epochs"):
        asked.append((key, meta.get(key), "max_local_epochs"))
    asked.append(("num_models", meta.get("num_models"), "max_models"))
    gammas = meta.get("gammas")
    if isinstance(gammas, (list, tuple)):
        asked.append(("number of gammas", len(gammas), "max_gammas"))
    selector = meta.get("selector")
    if isinstance(selector, dict):
        asked += [
            ("selector input_size", selector.get("input_size"), "max_selector_input_size"),
            ("selector input_size_3d", selector.get("input_size_3d"), "max_selector_input_size_3d"),
            ("selector epochs", selector.get("epochs"), "max_selector_epochs"),
        ]
    for name, value in (job_settings or {}).items():
        cap = "max_local_steps" if name.endswith("local_steps") else "max_local_epochs"
        asked.append((name, value, cap))
    for name, value, cap in asked:
        number = _number(value)
        if number is not None and number > limits[cap]:
            raise TaskRefused(
                f"site {site} refuses task {task}: {name} {value} is above this site's cap {cap} = {limits[cap]} "
                f'(the site\'s local/fedseg_site.json "{LIMITS_KEY}"); nothing was run'
            )


def read_site_requires_dp(workspace_root: str, site: str) -> bool:
    """Whether <workspace_root>/local/fedseg_site.json says "require_dp": true (default false)."""
    config_path = os.path.join(workspace_root, SITE_CONFIG_RELPATH)
    value = _read_site_config(config_path, site).get(REQUIRE_DP_KEY, False)
    if not isinstance(value, bool):
        raise ValueError(f'{config_path}: "{REQUIRE_DP_KEY}" must be true or false, got {value!r}')
    return value


def read_site_max_epsilon(workspace_root: str, site: str) -> float | None:
    """The site's privacy budget per job: "max_epsilon" of <workspace_root>/local/fedseg_site.json (None: no cap)."""
    config_path = os.path.join(workspace_root, SITE_CONFIG_RELPATH)
    return check_max_epsilon(_read_site_config(config_path, site).get(MAX_EPSILON_KEY), f'{config_path}: "{MAX_EPSILON_KEY}"')


def check_site_dp(site: str, requires_dp: bool, engine_dp, max_epsilon: float | None = None) -> None:
    """Raise TaskRefused when the site requires differential privacy (require_dp, or a privacy budget) and the
    job's engine has no "dp" setting."""
    if engine_dp is not None or not (requires_dp or max_epsilon is not None):
        return
    why = f'"{REQUIRE_DP_KEY}": true' if requires_dp else f'"{MAX_EPSILON_KEY}": {max_epsilon:g}'
    raise TaskRefused(
        f"site {site} requires differential privacy ({why} in its local/fedseg_site.json) but the job's engine has "
        'no "dp" setting (DP-SGD: noise_multiplier, max_grad_norm, delta); nothing is trained'
    )
