"""The server port of a POC, reserved for its root.

The port is reserved with a lock file per port in one folder shared by every POC on this machine
(PORT_LOCK_DIR), created with O_CREAT|O_EXCL: of two runs that pick the same port at the same moment, exactly one
gets it. A socket held open cannot be used instead, because NVFlare's server binds the port itself, and in another
process, some time after `prepare` wrote the port into the startup kits. Ports come from a fixed range below the
kernel's ephemeral range (32768-60999 on Linux), so outgoing connections of other programs do not take them either.
The lock belongs to the POC root and lives from prepare (or reserve_port) to stop; a lock whose POC root is gone,
or whose root no longer uses that port and whose reserving process is dead, is stale and taken over.
"""

from __future__ import annotations

import json
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import psutil

from .common import PocError
from .processes import port_listeners

PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "fedseg-poc-ports"
PORT_RANGE = (18500, 18999)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of a previous run in TIME_WAIT are fine
        try:
            s.bind(("127.0.0.1", port))
            return not port_listeners(port)
        except OSError:
            return False


def port_lock_file(port: int) -> Path:
    return PORT_LOCK_DIR / f"{int(port)}.lock"


def lock_is_stale(info: dict, port: int) -> bool:
    """Stale: the reserving process is gone and its POC root is gone or no longer uses the port."""
    if psutil.pid_exists(int(info.get("pid", 0))):
        return False
    root = Path(info.get("root", ""))
    state_file = root / "state.json"
    if not info.get("root") or not state_file.is_file():
        return True
    try:
        return json.loads(state_file.read_text()).get("port") != port
    except (OSError, ValueError):
        return True


def acquire_port(port: int, root: str | os.PathLike) -> bool:
    """Reserve `port` for the POC at `root`: True when it is now (or was already) this root's, False when another
    POC holds it."""
    root_s = str(Path(root).resolve())
    PORT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(PORT_LOCK_DIR, 0o1777)  # shared by every user's POCs, like /tmp
    except OSError:
        pass
    lock = port_lock_file(port)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text())
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):  # being written by its owner right now, or damaged
                try:
                    if time.time() - lock.stat().st_mtime < 10:
                        return False
                except FileNotFoundError:
                    continue
                info = {}
            if info.get("root") == root_s:
                return True
            if info and not lock_is_stale(info, int(port)):
                return False
            lock.unlink(missing_ok=True)  # stale: take it over (O_EXCL again, so a racing taker loses)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"root": root_s, "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def release_port(port: int, root: str | os.PathLike) -> None:
    lock = port_lock_file(port)
    try:
        if json.loads(lock.read_text()).get("root") == str(Path(root).resolve()):
            lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def reserve_port(root: str | os.PathLike, lo: int = PORT_RANGE[0], hi: int = PORT_RANGE[1]) -> int:
    """A free port in [lo, hi] reserved for the POC at `root` (see PORT_LOCK_DIR); stop() releases it."""
    candidates = list(range(lo, hi + 1))
    random.shuffle(candidates)
    for port in candidates:
        if not acquire_port(port, root):
            continue
        if port_is_free(port):
            return port
        release_port(port, root)  # some other program listens there
    raise PocError(f"no free port in {lo}..{hi}")
