"""The `fedseg` command: one entry point for FedSeg's tools (installed by `pip install ./custom`).

Each subcommand hands the rest of the command line to the module's own ``main(argv)``, so ``fedseg infer --help``
prints that module's help. Modules are imported only when their subcommand runs: ``fedseg --help`` loads
neither torch nor NVFlare.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

# subcommand -> ("module:function", one line of help). The function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("fedseg_tools.demo:main", "every method on the built-in data at one small budget, one per-site table"),
    "data": ("fedseg_tools.cli:data_main", "datasets: synthetic (built-in), convert (2-D image folders), validate"),
    "run": ("fedseg_tools.sim:main", "run a job folder in the NVFlare simulator (every process stopped at the end)"),
    "sim": ("fedseg_tools.sim:main", "the same as run"),
    "report": ("fedseg.report:main", "per-site results table of finished runs"),
    "infer": ("fedseg.infer:main", "segment NIfTI files with a trained model"),
    "export": ("fedseg.export:main", "write a trained model as a MONAI bundle"),
    "bench": ("fedseg_tools.bench.run:main", "the benchmark: every method and baseline at equal budgets, report"),
    "jobs": ("fedseg.jobgen:main", "write NVFlare job folders (as jobs/ in the repository)"),
    "allowlist": ("fedseg.fl.allowlist:main", "write or check a site's class allow-list for FedSeg jobs"),
    "poc": ("fedseg_tools.cli:poc_main", "a local NVFlare POC federation (needs a repository checkout)"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "synthetic": ("fedseg.data.synthetic:main", "generate the built-in multi-site dataset"),
    "convert": ("fedseg.data.convert:main", "convert per-site 2-D image/mask folders to NIfTI + datalists"),
    "validate": ("fedseg_tools.cli:validate_main", "read every case of a site's datalist and report problems"),
}
POC_SCRIPT = Path("poc") / "fedseg_poc.py"
REPO_ENV = "FEDSEG_REPO"  # a repository checkout, for `fedseg poc` run from elsewhere


def load(target: str) -> Callable[[list[str]], int | None]:
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def usage(prog: str, commands: dict[str, tuple[str, str]], title: str) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} <command> [arguments]   ({prog} <command> --help for its options)", "", title, ""]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in commands.items()]
    return "\n".join(lines)


def dispatch(prog: str, commands: dict[str, tuple[str, str]], title: str, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog, commands, title))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, commands, title)}", file=sys.stderr)
        return 2
    sys.argv = [f"{prog} {name}", *rest]  # a module that reads sys.argv, or names itself from it, sees its own
    code = load(commands[name][0])(rest)
    return int(code or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"fedseg {version('fedseg')}")
        except PackageNotFoundError:
            print("fedseg (not installed: run from the source tree)")
        return 0
    return dispatch(
        "fedseg",
        COMMANDS,
        "FedSeg: federated segmentation (FedSM, FedCross, FedAvg/FedProx) on NVIDIA FLARE 2.9 and MONAI. Commands:",
        argv,
    )


def data_main(argv: list[str]) -> int:
    return dispatch("fedseg data", DATA_COMMANDS, "Dataset commands:", argv)


def validate_main(argv: list[str]) -> int:
    import argparse
    import json

    from fedseg.data.datalist import SECTIONS
    from fedseg.data.errors import DataValidationError
    from fedseg.data.validate import validate_site_data

    p = argparse.ArgumentParser(
        prog="fedseg data validate",
        description="Open and check every case a site's "
        "datalist lists (the same check the site runs before training); exit 1 on a problem.",
    )
    p.add_argument("datalist", help="the site's datalist.json")
    p.add_argument("--site", help="site name used in messages (default: the datalist's folder name)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--num-classes", type=int, help="classes incl. background (default: the datalist's num_classes)")
    o = p.parse_args(argv)
    site = o.site or Path(o.datalist).resolve().parent.name
    try:
        summary = validate_site_data(o.datalist, site, sections=tuple(o.sections), num_classes=o.num_classes)
    except (DataValidationError, ValueError) as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


def find_checkout(start: Path | None = None) -> Path | None:
    """The FedSeg repository the POC tool is in: $FEDSEG_REPO, else the current folder or one above it, else
    the source tree this package runs from (PYTHONPATH=custom or an editable install). None when none is."""
    candidates = [Path(os.environ[REPO_ENV])] if os.environ.get(REPO_ENV) else []
    here = (start or Path.cwd()).resolve()
    candidates += [here, *here.parents, Path(__file__).resolve().parents[2]]
    return next((c for c in candidates if (c / POC_SCRIPT).is_file()), None)


def poc_main(argv: list[str]) -> int:
    """poc/fedseg_poc.py of a repository checkout: the POC stages the repository's jobs/ and poc/ files (project,
    authorization policy), which a pip-installed package does not carry."""
    repo = find_checkout()
    if repo is None:
        print(
            f"fedseg poc: no FedSeg repository checkout found (looked for {POC_SCRIPT} in ${REPO_ENV}, the current "
            f"folder and its parents). The POC uses the repository's poc/ and jobs/ folders: run it inside a "
            f"checkout, or set {REPO_ENV}=/path/to/fedseg",
            file=sys.stderr,
        )
        return 2
    script = repo / POC_SCRIPT
    sys.path.insert(0, str(script.parent))  # the POC script imports its sibling modules
    spec = importlib.util.spec_from_file_location("fedseg_poc", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
