"""The POC's processes and listening sockets, through psutil: finding every process of a POC root (also after
a crash of the tool, from the marker variable and the recorded sessions), killing them, and running a command
in its own session."""

from __future__ import annotations

import os
import subprocess

import psutil

from .common import MARK_ENV

GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def _is_of_poc(p: psutil.Process, root: str, sessions) -> bool:
    """A process of the POC at `root`: an NVFlare process whose command line names the root, a member of a
    session the tool recorded, or one that carries the marker variable. False for zombies and kernel threads."""
    cmdline = " ".join(p.cmdline()).strip()
    if not cmdline or p.status() == psutil.STATUS_ZOMBIE:
        return False  # kernel thread, gone, or a zombie: nothing left to stop
    if root in cmdline and ("nvflare" in cmdline or "/startup/" in cmdline):
        return True
    if sessions and os.getsid(p.pid) in sessions:
        return True
    return p.environ().get(MARK_ENV) == root


def find_processes(root, sessions: list[int] | tuple = ()) -> dict[int, str]:
    """pid -> command line of every live process of the POC at `root`: the ones that carry the marker
    variable, NVFlare processes whose command line names the root, members of the recorded sessions, and every
    descendant of those (by parent pid, whatever its session or environment)."""
    root_s = str(root)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid in mine:
            continue
        try:
            if _is_of_poc(p, root_s, sessions):
                found[p.pid] = p
        except (*GONE, ProcessLookupError):
            continue
    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                if child.pid not in mine:
                    found.setdefault(child.pid, child)
        except GONE:
            continue
    out = {}
    for pid, p in found.items():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline()).strip()
        except GONE:
            continue
    return out


def process_listeners(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the given processes hold."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except GONE:
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr]
    return sorted(set(out))


def port_listeners(port: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on the machine on that port."""
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    return sorted({(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.port == port})


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1") or addr.startswith("::ffff:127.")


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited; only its parent's wait is missing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_processes(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (collected first: children in sessions of their own too)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=10)


def run_in_session(
    args: list[str], env: dict, timeout: float, input_text: str | None = None, cwd=None
) -> subprocess.CompletedProcess:
    """Run a command in its own session, stdout and stderr together: Ctrl-C reaches only the tool, and on a
    timeout or interrupt the command's whole process tree is killed before the exception goes on."""
    proc = subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        out, _ = proc.communicate(input=input_text, timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, "")
