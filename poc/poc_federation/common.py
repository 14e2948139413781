"""Paths of the checkout, the POC's defaults, its error type and its log line (shared by every module)."""

from __future__ import annotations

import sys
from pathlib import Path

POC_DIR = Path(__file__).resolve().parents[1]
REPO = POC_DIR.parent
CUSTOM = REPO / "custom"
PACKAGE = CUSTOM / "fedseg"
PROJECT_TEMPLATE = POC_DIR / "project_poc.yml"
PRIVACY_FILE = POC_DIR / "privacy.json"
AUTHZ_FILE = POC_DIR / "authorization.json"  # FedSeg's policy: every site's and the server's local/authorization.json
DEFAULT_ROOT = REPO / "workspaces" / "poc"
DEFAULT_PORT = 18461
DEFAULT_JOB = REPO / "jobs" / "fedavg"
PROJECT_ADMIN = "admin@fedseg.org"
# Every process this tool starts carries this variable (value: the POC root) in its environment; NVFlare
# passes the environment on to the job processes, so teardown finds all of them by it.
MARK_ENV = "FEDSEG_POC_ROOT"
SUBMIT_WAYS = ("api", "cli", "console")

if str(CUSTOM) not in sys.path:  # the tool uses this checkout's fedseg (data generator, allow-list, report)
    sys.path.insert(0, str(CUSTOM))


class PocError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fedseg-poc] {msg}", flush=True)
