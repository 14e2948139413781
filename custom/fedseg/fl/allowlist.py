"""The class allow-list a site or the server needs to run FedSeg jobs that carry no code (non-BYOC).

NVFlare 2.9 refuses every component of a code-less job whose path is not on the site's "class_allow_list"
(local/resources.json, else local/resources.json.default). FedSeg adds its component classes to NVFlare's
default list, each by its exact class path, never a package prefix: NVFlare instantiates any callable found at
an allowed path, so a prefix such as "fedseg." would let a job call every function of the package (this
module's `allow_fedseg` included, which rewrites the allow-list).

How NVFlare 2.9 matches an entry (nvflare/app_common/widgets/component_path_authorizer.py,
`_path_matches_prefix`): a path is allowed when it equals the entry, or when the entry ends with "." and the
path starts with it, or when the path starts with the entry followed by ".". So "fedseg.fl.executor.SegExecutor"
does not allow "fedseg.fl.executor.SegExecutorEvil"; it does match "fedseg.fl.executor.SegExecutor.<name>",
but NVFlare loads a path by importing everything before the last dot as a module
(nvflare/fuel/utils/class_loader.load_class), and a class is not a module, so no such path can be built.

Run by the site's (or the server's) administrator, not by jobs:

    python -m fedseg.fl.allowlist <site workspace>           # writes <site workspace>/local/resources.json
    python -m fedseg.fl.allowlist <site workspace> --check   # what would let a job run code here; exit 1 if any
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

# Every FedSeg class a job may instantiate at a site or the server (the job folders of fedseg.jobgen and the
# recipes of fedseg.recipes, with or without the meter, and the site privacy filter of poc/privacy.json).
FEDSEG_CLASSES = (
    "fedseg.fl.executor.SegExecutor",
    "fedseg.fl.executor.FedSMExecutor",
    "fedseg.fl.executor.FedCrossExecutor",
    "fedseg.fl.persistor.SegModelPersistor",
    "fedseg.fl.fedavg_controller.FedAvgController",
    "fedseg.fl.fedsm_controller.FedSMController",
    "fedseg.fl.fedcross_controller.FedCrossController",
    "fedseg.fl.privacy.LayerPrivacyFilter",
    "fedseg.fl.meter.TaskMeter",
    "fedseg.fl.tracking.MLflowServerReceiver",
)
# The benchmark's workflows (fedseg.bench.jobs): allowed only in the benchmark's own simulator runs
# (fedseg.bench passes them to fedseg.sim.run_simulator), never at a site.
BENCH_CLASSES = (
    "fedseg.fl.executor.MultiMethodExecutor",
    "fedseg.bench.flow.BenchWarmup",
    "fedseg.bench.flow.BenchMark",
    "fedseg.bench.flow.BenchGlobalEval",
)
_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class AllowListError(ValueError):
    pass


def check_class_path(entry: str) -> str:
    """An exact dotted class path (module.Class): a package prefix ("pkg." or "*") is refused, and so is a path
    that can be imported here and is not a class (a function such as "subprocess.run")."""
    if not isinstance(entry, str) or not _CLASS_PATH.fullmatch(entry):
        raise AllowListError(
            f"class_allow_list entry {entry!r}: must be an exact class path like 'package.module.Class' "
            "(no package prefix ending in '.', no '*')"
        )
    module, name = entry.rsplit(".", 1)
    try:
        obj = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - not importable here (e.g. only on the site's path): checked by form only
        return entry
    if not isinstance(obj, type):
        raise AllowListError(f"class_allow_list entry {entry!r}: is a {type(obj).__name__}, not a class")
    return entry


def fedseg_allow_list(extra_classes: tuple[str, ...] = ()) -> list[str]:
    """NVFlare's default class allow-list plus FedSeg's classes (and any extra exact class paths)."""
    return list(dict.fromkeys([*DEFAULT_CLASS_ALLOW_LIST, *FEDSEG_CLASSES, *map(check_class_path, extra_classes)]))


def is_stale_fedseg_entry(entry: str) -> bool:
    """A FedSeg entry this version does not write: a package prefix from an older version ("fedseg."), or a
    class path under fedseg that is no longer a component."""
    return (entry == "fedseg" or entry.startswith("fedseg.")) and entry not in FEDSEG_CLASSES


def allow_fedseg(resources_file: str | os.PathLike, extra_classes: tuple[str, ...] = ()) -> dict:
    """Write resources_file (a site's local/resources.json) with FedSeg's classes (and extra_classes, exact
    class paths) on its class_allow_list. The base is the file itself, else its *.default (what provisioning
    wrote), else NVFlare's default list; every other setting of the base is kept; enforcement is "enforce"
    unless the base says otherwise; FedSeg entries of older versions (the "fedseg." prefix) are dropped."""
    extra = [check_class_path(c) for c in extra_classes]
    path = Path(resources_file)
    base = path if path.exists() else path.with_name(path.name + ".default")
    try:
        resources = json.loads(base.read_text()) if base.exists() else {}
    except ValueError as e:
        raise AllowListError(f"{base}: not valid JSON ({e})") from e
    if not isinstance(resources, dict):
        raise AllowListError(f"{base}: expected a JSON object")
    allow = resources.get("class_allow_list")
    if allow is None:
        allow = list(DEFAULT_CLASS_ALLOW_LIST)
    if not isinstance(allow, list):
        raise AllowListError(f"{base}: class_allow_list must be a list")
    allow = [e for e in allow if not is_stale_fedseg_entry(e)]
    resources["class_allow_list"] = list(dict.fromkeys([*allow, *FEDSEG_CLASSES, *extra]))
    resources.setdefault("class_list_enforcement_mode", "enforce")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new file put in place: a symlink at path is replaced, never written through
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(resources, indent=2) + "\n")
    os.replace(tmp, path)
    return resources


def warnings_for(resources: dict) -> list[str]:
    """What in a class allow-list lets a code-less job instantiate more than listed classes."""
    out = []
    allow = resources.get("class_allow_list") or []
    if "*" in allow:
        out.append("class_allow_list contains '*': every class and function is allowed, the list is ignored")
    out += [
        f"class_allow_list entry {e!r} is a package prefix: every callable under it is allowed"
        for e in allow
        if isinstance(e, str) and e.endswith(".")
    ]
    if resources.get("class_list_enforcement_mode", "enforce") != "enforce":
        out.append(
            f"class_list_enforcement_mode is {resources['class_list_enforcement_mode']!r}: "
            "unlisted classes are only logged, not refused"
        )
    return out


def byoc_roles(policy: dict) -> list[str]:
    """The roles an NVFlare authorization policy (authorization.json) gives the byoc right: they may submit jobs
    that bring code, which then runs at the site."""
    roles = []
    for role, conf in (policy.get("permissions") or {}).items():
        cond = conf if isinstance(conf, (str, list)) else (conf or {}).get("byoc", "none")
        conds = [cond] if isinstance(cond, str) else list(cond)
        if any(" ".join(str(c).lower().split()) not in ("none", "no") for c in conds):  # "not o:x" grants the rest
            roles.append(role)
    return roles


def _site_file(local: Path, name: str) -> Path | None:
    """What NVFlare reads: local/<name>, else local/<name>.default."""
    for f in (local / name, local / (name + ".default")):
        if f.is_file():
            return f
    return None


def check_site(workspace: str | os.PathLike) -> list[str]:
    """What lets a job run code at this site: a class allow-list with prefixes, '*' or warn mode, FedSeg's classes
    missing, roles with the byoc right. Empty when the site is as FedSeg wants it."""
    local = Path(workspace) / "local"
    problems = []
    resources_file = _site_file(local, "resources.json")
    if resources_file is None:
        problems.append(f"{local}: no resources.json(.default): NVFlare's default class list applies, without FedSeg's classes")
    else:
        resources = json.loads(resources_file.read_text())
        problems += [f"{resources_file}: {w}" for w in warnings_for(resources)]
        missing = [c for c in FEDSEG_CLASSES if c not in (resources.get("class_allow_list") or [])]
        if missing:
            problems.append(f"{resources_file}: FedSeg classes not allowed (jobs will fail here): {missing}")
    authz_file = _site_file(local, "authorization.json")
    if authz_file is None:
        problems.append(f"{local}: no authorization.json(.default)")
    else:
        roles = byoc_roles(json.loads(authz_file.read_text()))
        if roles:
            problems.append(
                f"{authz_file}: role(s) {roles} have the byoc right: their jobs may bring code that runs "
                "here (FedSeg jobs need none; install poc/authorization.json as local/authorization.json)"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedseg.fl.allowlist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("workspace", help="the site's (or the server's) workspace: the folder with startup/ and local/")
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing: report what would let a job run code here "
        "(allow-list prefixes, '*', warn mode, roles with byoc); exit 1 when anything is found",
    )
    o = p.parse_args(argv)
    local = Path(o.workspace) / "local"
    if not local.is_dir():
        print(f"{o.workspace}: no local/ folder: not a site or server workspace (startup kit)", file=sys.stderr)
        return 2
    if o.check:
        problems = check_site(o.workspace)
        for problem in problems:
            print(f"PROBLEM: {problem}")
        if not problems:
            print(f"{o.workspace}: OK: exact classes only ({len(FEDSEG_CLASSES)} of FedSeg's), nobody has byoc")
        return 1 if problems else 0
    try:
        resources = allow_fedseg(local / "resources.json")
    except AllowListError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {local / 'resources.json'}: {len(resources['class_allow_list'])} allowed classes, "
        f"FedSeg's: {', '.join(FEDSEG_CLASSES)}"
    )
    for w in warnings_for(resources):
        print(f"WARNING: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
