"""Lets `PYTHONPATH=custom nvflare simulator jobs/<name> -w <workspace> ...` run FedSeg's code-less jobs as typed.

Why: FedSeg's jobs carry no code (no BYOC), so NVFlare 2.9 builds their components only when the site's
class_allow_list names them (nvflare/app_common/widgets/component_path_authorizer.py reads
<site>/local/resources.json, else resources.json.default, else NVFlare's built-in list, which lacks FedSeg).
`nvflare simulator` makes every simulated site's local/ folder by copying <workspace>/local/ (SimulatorRunner:
_cleanup_workspace keeps it, _setup_local_startup copies it), and on a fresh workspace that folder is empty, so
the built-in list applies and the job stops with "ComponentNotAuthorized ... is not in allow_list".

What: Python imports `sitecustomize` from the path at start-up, so with custom/ on PYTHONPATH this module runs
first in the `nvflare` process. Only when that process is `nvflare simulator`, and only when the simulation
workspace has no resources.json(.default) of its own, it writes <workspace>/local/resources.json with exactly the
classes FedSeg's jobs need, by exact class path (fedseg.fl.allowlist.allow_fedseg): what a site
administrator writes at a real site with `python -m fedseg.fl.allowlist <site>`, and what SimEnv runs get from
fedseg.recipes. Nothing else changes:
  * a real site (server_train / client_train processes, POC included) is never touched: its allow-list is its
    own local/resources.json, still enforced, still refusing every class it does not list;
  * no job gains a right: no byoc, no package prefix, no "*", enforcement stays "enforce";
  * a simulation workspace whose local/ already has a resources.json(.default) keeps it as it is.
Any other Python process that starts with custom/ on its path only pays for the sys.argv check below.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_SIMULATOR_WORKSPACE = "simulator_workspace"  # nvflare simulator's own default for a missing -w


class _ArgvError(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    def error(self, message):  # a command line the simulator itself will refuse: not ours to report
        raise _ArgvError(message)


def simulator_workspace(argv: list[str]) -> str | None:
    """The simulation workspace of an `nvflare simulator ...` command line, else None. Parsed with the simulator's
    own argument definitions, so every form argparse accepts counts: "-w X", "-wX", "-w=X", "--workspace X",
    "--workspace=X" and unambiguous abbreviations such as "--work X"."""
    if len(argv) < 2 or os.path.basename(argv[0]) != "nvflare" or argv[1] != "simulator":
        return None
    try:
        from nvflare.private.fed.app.simulator.simulator import define_simulator_parser

        parser = _QuietParser(prog="nvflare simulator", add_help=False)
        define_simulator_parser(parser)
        parser.add_argument("--schema", action="store_true")  # added by nvflare's cli to the same sub-command
        args, _ = parser.parse_known_args(argv[2:])
    except (_ArgvError, ImportError):
        return None
    return args.workspace or DEFAULT_SIMULATOR_WORKSPACE


def allow_fedseg_in_simulation(workspace: str) -> str | None:
    """Write <workspace>/local/resources.json with FedSeg's classes unless the workspace has its own policy;
    return the file written, else None. A symlink (local/ itself, or a resources.json(.default) link, dangling
    or not) counts as the workspace's own policy: nothing is ever written through a link."""
    local = os.path.join(workspace, "local")
    if os.path.islink(local):
        return None
    if any(os.path.lexists(os.path.join(local, f)) for f in ("resources.json", "resources.json.default")):
        return None
    from fedseg.fl.allowlist import allow_fedseg

    path = os.path.join(local, "resources.json")
    allow_fedseg(path)
    return path


def _main() -> None:
    workspace = simulator_workspace(sys.argv)
    if workspace is None:
        return
    try:
        written = allow_fedseg_in_simulation(workspace)
    except Exception as e:  # noqa: BLE001 - never break the simulator: it then reports the refused class itself
        print(
            f"fedseg: could not write the simulation allow-list in {workspace}/local: {type(e).__name__}: {e}", file=sys.stderr
        )
        return
    if written:
        print(f"fedseg: wrote {written}: the classes FedSeg's jobs need (exact paths), log streaming off", file=sys.stderr)


_main()
