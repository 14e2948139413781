"""The server port of a POC, reserved for its root: fedseg_tools.localhost_poc's lock files (shared with
FedSegPocEnv, which has a port range of its own), with the tool's range and its error type. The lock belongs to
the POC root and lives from prepare (or reserve_port) to stop."""

from __future__ import annotations

import os

from .common import PocError  # first: it puts this checkout's custom/ (the fedseg package) on sys.path

# isort: split
from fedseg_tools import localhost_poc
from fedseg_tools.localhost_poc import PORT_LOCK_DIR, acquire_port, lock_is_stale, port_is_free, port_lock_file, release_port

__all__ = [
    "PORT_LOCK_DIR",
    "PORT_RANGE",
    "acquire_port",
    "lock_is_stale",
    "port_is_free",
    "port_lock_file",
    "release_port",
    "reserve_port",
]

PORT_RANGE = localhost_poc.POC_TOOL_PORTS


def reserve_port(root: str | os.PathLike, lo: int = PORT_RANGE[0], hi: int = PORT_RANGE[1]) -> int:
    """A free port in [lo, hi] reserved for the POC at `root` (see fedseg_tools.localhost_poc); stop() releases it."""
    try:
        return localhost_poc.reserve_port(root, lo, hi)
    except localhost_poc.NoFreePortError as e:
        raise PocError(str(e)) from None
