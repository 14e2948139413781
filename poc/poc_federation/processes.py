"""The POC's processes and listening sockets, through psutil (fedseg_tools.localhost_poc, shared with FedSegPocEnv):
finding every process of a POC root (also after a crash of the tool, from the marker variable and the recorded
sessions), killing them, and running a command in its own session."""

from __future__ import annotations

from .common import MARK_ENV  # first: it puts this checkout's custom/ (the fedseg package) on sys.path

# isort: split
from fedseg_tools import localhost_poc
from fedseg_tools.localhost_poc import (
    is_alive,
    is_loopback,
    kill_processes,
    kill_tree,
    port_listeners,
    process_listeners,
    run_in_session,
)

__all__ = [
    "find_processes",
    "is_alive",
    "is_loopback",
    "kill_processes",
    "kill_tree",
    "port_listeners",
    "process_listeners",
    "run_in_session",
]


def find_processes(root, sessions: list[int] | tuple = ()) -> dict[int, str]:
    """pid -> command line of every live process of the POC at `root`: the ones that carry the marker
    variable, NVFlare processes whose command line names the root, members of the recorded sessions, and every
    descendant of those (by parent pid, whatever its session or environment)."""
    return localhost_poc.find_processes(root, MARK_ENV, sessions)
