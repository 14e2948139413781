"""The class allow-list a site or the server needs to run FedSeg jobs that carry no code (non-BYOC).

NVFlare 2.9 refuses every component of a code-less job whose path is not on the site's "class_allow_list"
(local/resources.json, else local/resources.json.default). FedSeg's list holds exactly the classes its jobs
reference on that side (not NVFlare's default list), each by its exact class path, never a package prefix: NVFlare instantiates any callable found at
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
    python -m fedseg.fl.allowlist <site workspace> --check   # what would let a job run code or take more than
                                                             # FedSeg needs here (extra classes, log streaming); exit 1 if any

and once before the plain simulator command on a fresh workspace (NVFlare's simulator copies <workspace>/local/
to the server and every simulated site, so the list written there is what they enforce):

    python -m fedseg.fl.allowlist --simulation <workspace>   # then: nvflare simulator jobs/<name> -w <workspace> ...
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path

# Exactly the classes FedSeg's shipped jobs reference, per side: jobs/ and fedseg.jobgen's output (with the
# meter), every Recipe (any tracking, the meter, cross-site evaluation) and the shipped privacy scope
# (poc/privacy.json). tests/test_allowlist_minimal.py recomputes both sets from those sources and fails when they
# differ. Nothing else of NVFlare's default list is needed (e.g. its JobLogStreamer, which streams a site's log,
# is not).
SITE_CLASSES = (
    "fedseg.fl.executor.SegExecutor",
    "fedseg.fl.executor.FedSMExecutor",
    "fedseg.fl.executor.FedCrossExecutor",
    "fedseg.fl.privacy.LayerPrivacyFilter",
    "fedseg.fl.meter.TaskMeter",
    "nvflare.app_opt.tracking.tb.tb_writer.TBWriter",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
)
SERVER_CLASSES = (
    "fedseg.fl.persistor.SegModelPersistor",
    "fedseg.fl.fedavg_controller.FedAvgController",
    "fedseg.fl.fedsm_controller.FedSMController",
    "fedseg.fl.fedcross_controller.FedCrossController",
    "fedseg.fl.tracking.MLflowServerReceiver",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
)
# FedSeg's own classes on either side
FEDSEG_CLASSES = tuple(c for c in (*SITE_CLASSES, *SERVER_CLASSES) if c.startswith("fedseg."))
# "site": a hospital's kit, "server": the server's kit, "all": a workspace that is both (the simulator copies one
# local/ folder to the server and every site)
ROLES = ("site", "server", "all")
# NVFlare 2.9's resources.json switch for streaming a site's job log to the server (JobLogStreamer, SiteLogStreamer);
# NVFlare allows it unless it is false
ALLOW_LOG_STREAMING = "allow_log_streaming"
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


def needed_classes(role: str = "all") -> tuple[str, ...]:
    """The classes FedSeg's jobs need on a site's ("site"), the server's ("server") or a simulation's ("all") list."""
    if role not in ROLES:
        raise AllowListError(f"role must be one of {ROLES}, got {role!r}")
    return tuple(dict.fromkeys([*(SITE_CLASSES if role != "server" else ()), *(SERVER_CLASSES if role != "site" else ())]))


def workspace_role(workspace: str | os.PathLike) -> str:
    """A provisioned server kit has startup/fed_server.json, a site's startup/fed_client.json; anything else (a
    simulation workspace) is "all"."""
    startup = Path(workspace) / "startup"
    if (startup / "fed_server.json").is_file():
        return "server"
    if (startup / "fed_client.json").is_file():
        return "site"
    return "all"


def fedseg_allow_list(extra_classes: tuple[str, ...] = (), role: str = "all") -> list[str]:
    """The classes FedSeg's jobs need (see needed_classes) plus any extra exact class paths."""
    return list(dict.fromkeys([*needed_classes(role), *map(check_class_path, extra_classes)]))


def allow_fedseg(resources_file: str | os.PathLike, extra_classes: tuple[str, ...] = (), role: str = "all") -> dict:
    """Write resources_file (a site's local/resources.json) whose class_allow_list is exactly what FedSeg's jobs
    need on that side (needed_classes(role)) plus extra_classes (exact class paths), with log streaming off
    ("allow_log_streaming": false: a site's job log, which names its cases, never goes to the server). The base is
    the file itself, else its *.default (what provisioning wrote); every other setting of the base is kept;
    enforcement is "enforce" unless the base says otherwise. Every other entry of the base's list (NVFlare's
    default list, FedSeg entries of older versions such as the "fedseg." prefix) is dropped."""
    extra = [check_class_path(c) for c in extra_classes]
    needed = needed_classes(role)
    path = Path(resources_file)
    base = path if path.exists() else path.with_name(path.name + ".default")
    try:
        resources = json.loads(base.read_text()) if base.exists() else {}
    except ValueError as e:
        raise AllowListError(f"{base}: not valid JSON ({e})") from e
    if not isinstance(resources, dict):
        raise AllowListError(f"{base}: expected a JSON object")
    allow = resources.get("class_allow_list")
    if allow is not None and not isinstance(allow, list):
        raise AllowListError(f"{base}: class_allow_list must be a list")
    resources["class_allow_list"] = list(dict.fromkeys([*needed, *extra]))
    resources[ALLOW_LOG_STREAMING] = False
    resources.setdefault("class_list_enforcement_mode", "enforce")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a new file put in place: a symlink at path is replaced, never written through
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(resources, indent=2) + "\n")
    os.replace(tmp, path)
    return resources


def allow_fedseg_in_simulation(workspace: str | os.PathLike) -> Path | None:
    """Give a simulation workspace (`nvflare simulator -w <workspace>`) the classes FedSeg's jobs need (role "all")
    in <workspace>/local/resources.json and return that file; None when local/ already holds a
    resources.json(.default) (the workspace's own policy, kept as it is). Nothing is ever written through a
    symlink (local/ itself or a policy file, dangling or not): AllowListError naming the link."""
    local = Path(workspace) / "local"
    for path in (local, local / "resources.json", local / "resources.json.default"):
        if path.is_symlink():
            raise AllowListError(f"{path}: is a symlink; the allow-list is never written through a link")
    if any((local / name).exists() for name in ("resources.json", "resources.json.default")):
        return None
    local.mkdir(parents=True, exist_ok=True)
    allow_fedseg(local / "resources.json")
    return local / "resources.json"


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


def check_site(workspace: str | os.PathLike, role: str | None = None) -> list[str]:
    """What lets a job run code at this site or take more than FedSeg needs: a class allow-list with prefixes, '*'
    or warn mode, entries beyond the classes FedSeg's jobs need on this side (named), log streaming allowed,
    FedSeg's classes missing, roles with the byoc right. Empty when the site is as FedSeg wants it. role: "site",
    "server" or "all"; by default read from the kit (workspace_role)."""
    role = role or workspace_role(workspace)
    needed = needed_classes(role)
    local = Path(workspace) / "local"
    problems = []
    resources_file = _site_file(local, "resources.json")
    if resources_file is None:
        problems.append(f"{local}: no resources.json(.default): NVFlare's default class list applies, without FedSeg's classes")
    else:
        resources = json.loads(resources_file.read_text())
        problems += [f"{resources_file}: {w}" for w in warnings_for(resources)]
        allow = resources.get("class_allow_list") or []
        missing = [c for c in needed if c not in allow]
        if missing:
            problems.append(f"{resources_file}: FedSeg classes not allowed (jobs will fail here): {missing}")
        extra = [e for e in allow if e not in needed and e != "*"]
        if extra:
            problems.append(
                f"{resources_file}: class_allow_list allows {len(extra)} class(es) beyond what FedSeg's jobs need on "
                f"this side ({role}): {extra}"
            )
        if resources.get(ALLOW_LOG_STREAMING, True) is not False:
            problems.append(
                f'{resources_file}: "{ALLOW_LOG_STREAMING}" is not false: NVFlare streams a job\'s log from this '
                "site to the server when a job asks for it (set it to false)"
            )
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
    p.add_argument(
        "workspace",
        help="the site's (or the server's) workspace: the folder with startup/ and local/; "
        "with --simulation: the workspace `nvflare simulator -w` will use (made if missing)",
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        help="which side's classes: 'site', 'server' or 'all' (a simulation workspace); "
        "default: from the kit (startup/fed_server.json: server, startup/fed_client.json: site, else all)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="change nothing: report what would let a job run code here "
        "(allow-list prefixes, '*', warn mode, roles with byoc); exit 1 when anything is found",
    )
    p.add_argument(
        "--simulation",
        action="store_true",
        help="prepare a simulation workspace for `nvflare simulator -w WORKSPACE` (every class, both sides); "
        "a workspace with its own resources.json(.default) is left as it is",
    )
    o = p.parse_args(argv)
    if o.simulation:
        return _prepare_simulation(o.workspace)
    local = Path(o.workspace) / "local"
    if not local.is_dir():
        print(f"{o.workspace}: no local/ folder: not a site or server workspace (startup kit)", file=sys.stderr)
        return 2
    if o.check:
        role = o.role or workspace_role(o.workspace)
        problems = check_site(o.workspace, role)
        for problem in problems:
            print(f"PROBLEM: {problem}")
        if not problems:
            print(
                f"{o.workspace}: OK: exactly the {len(needed_classes(role))} classes FedSeg's jobs need ({role}), "
                "log streaming off, nobody has byoc"
            )
        return 1 if problems else 0
    role = o.role or workspace_role(o.workspace)
    try:
        resources = allow_fedseg(local / "resources.json", role=role)
    except AllowListError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {local / 'resources.json'} ({role}): exactly the {len(resources['class_allow_list'])} classes "
        f"FedSeg's jobs need: {', '.join(resources['class_allow_list'])}; {ALLOW_LOG_STREAMING}: false"
    )
    for w in warnings_for(resources):
        print(f"WARNING: {w}", file=sys.stderr)
    return 0


def _prepare_simulation(workspace: str) -> int:
    try:
        written = allow_fedseg_in_simulation(workspace)
    except AllowListError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if written is None:
        print(f"{Path(workspace) / 'local'}: the workspace's own resources.json(.default) is kept as it is")
    else:
        print(f"wrote {written}: the {len(needed_classes())} classes FedSeg's jobs need (exact paths), log streaming off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
