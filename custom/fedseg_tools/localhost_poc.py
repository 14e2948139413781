"""A POC federation on this machine, localhost only: its server port, its processes and its kits.

One implementation for both POC runners of FedSeg: the POC tool (poc/fedseg_poc.py, package poc/poc_federation)
and FedSegPocEnv (fedseg_tools.poc_env, NVFlare's PocEnv for FedSeg's recipes). Each POC has a root folder; the root
owns the server port, its processes are found by the root, and its startup kits are prepared here for FedSeg.

Ports. The port is reserved with a lock file per port in one folder shared by every POC on this machine
(PORT_LOCK_DIR), created with O_CREAT|O_EXCL: of two runs that pick the same port at the same moment, exactly one
gets it. A socket held open cannot be used instead, because NVFlare's server binds the port itself, in another
process, some time after provisioning wrote the port into the startup kits. Ports come from fixed ranges below the
kernel's ephemeral range (32768-60999 on Linux), so that outgoing connections of other programs do not take them;
the tool and FedSegPocEnv have disjoint ranges, so the tool's POCs and the tests' PocEnv runs never compete.

Processes. Only through psutil: a POC's processes carry a marker variable (value: the root), NVFlare's command lines
name the root, and the tool records the sessions it started; every descendant of those belongs to the POC too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "fedseg-poc-ports"
POC_TOOL_PORTS = (18500, 18999)  # poc/fedseg_poc.py (port 0) and tests/test_poc.py
POC_ENV_PORTS = (19000, 19499)  # FedSegPocEnv (port 0) and tests/test_recipes_poc.py
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fedseg"  # the runtime package installed in every kit (no tooling)
GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


class NoFreePortError(RuntimeError):
    pass


# ---- ports ----------------------------------------------------------------------------------------------------------
def port_lock_file(port: int) -> Path:
    return PORT_LOCK_DIR / f"{int(port)}.lock"


def port_listeners(port: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on the machine on that port."""
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr]
    return sorted({(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.port == port})


def port_is_free(port: int) -> bool:
    """Nothing listens on `port` (any address) and 127.0.0.1:port can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of a previous run in TIME_WAIT are fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not port_listeners(port)


def lock_is_stale(info: dict, port: int) -> bool:
    """A lock (its recorded root and reserving pid) that may be taken over: its reserving process is gone, and its
    root is gone or is a prepared POC tool root (state.json) that no longer uses the port.

    Of the two former rules the stricter one is kept for a root that exists without state.json (a FedSegPocEnv
    workspace, or a tool root whose first prepare failed): it keeps its lock, as FedSegPocEnv did, because a crashed
    run's POC may still be starting on that port; the POC tool took such a lock over. The price: such a lock stays
    until its root is removed (reserve_port then picks another port of the range)."""
    if psutil.pid_exists(int(info.get("pid", 0))):
        return False
    if not info.get("root"):
        return True
    root = Path(info["root"])
    if not root.exists():
        return True
    state_file = root / "state.json"
    if not state_file.is_file():
        return False
    try:
        return json.loads(state_file.read_text()).get("port") != port
    except (OSError, ValueError):
        return False  # being rewritten (the tool replaces it atomically) or damaged: keep the lock


def acquire_port(port: int, root: str | os.PathLike) -> bool:
    """Reserve `port` for the POC at `root`: True when it is now (or was already) this root's, False when another
    POC holds it. A lock that cannot be read is never taken over (the stricter of the two former rules: the POC
    tool took one over after 10 s, but its owner may only be slow between creating and writing it, which on a
    loaded machine can take that long, and two POCs would then share the port)."""
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
            except (OSError, ValueError):
                return False  # being written by its owner right now, or damaged: not ours
            if info.get("root") == root_s:
                return True
            if not lock_is_stale(info, int(port)):
                return False
            lock.unlink(missing_ok=True)  # stale: take it over (O_EXCL again, so a racing taker loses)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"root": root_s, "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def release_port(port: int, root: str | os.PathLike) -> None:
    """Remove the lock of `port` if `root` holds it."""
    lock = port_lock_file(port)
    try:
        if json.loads(lock.read_text()).get("root") == str(Path(root).resolve()):
            lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def reserve_port(root: str | os.PathLike, lo: int, hi: int) -> int:
    """A free port in [lo, hi] reserved for the POC at `root` (released by release_port). The candidates are tried
    in random order, so that runs reserving at the same moment rarely contend for the same lock."""
    candidates = list(range(lo, hi + 1))
    random.shuffle(candidates)
    for port in candidates:
        if not acquire_port(port, root):
            continue
        if port_is_free(port):
            return port
        release_port(port, root)  # some other program listens there
    raise NoFreePortError(f"no free port in {lo}..{hi} (locks in {PORT_LOCK_DIR})")


# ---- processes ------------------------------------------------------------------------------------------------------
def _is_of_poc(p: psutil.Process, root: str, marker_env: str, sessions) -> bool:
    """A process of the POC at `root`: an NVFlare process whose command line names the root, a member of one of
    the given sessions, or one that carries marker_env=root. False for zombies and kernel threads.

    A command line that merely names the root is not enough (FedSegPocEnv took any): an editor or a `tail` of a
    log under the root is no process of the POC, and stop() would kill it."""
    cmdline = " ".join(p.cmdline()).strip()
    if not cmdline or p.status() == psutil.STATUS_ZOMBIE:
        return False  # kernel thread, gone, or a zombie: nothing left to stop
    if root in cmdline and ("nvflare" in cmdline or "/startup/" in cmdline):
        return True
    if sessions and os.getsid(p.pid) in sessions:
        return True
    return p.environ().get(marker_env) == root


def find_processes(root: str | os.PathLike, marker_env: str, sessions: list[int] | tuple = ()) -> dict[int, str]:
    """pid -> command line of every live process of the POC at `root` (see _is_of_poc) and of every descendant of
    those (by parent pid, whatever its session or environment); this process and its parents excluded."""
    root_s = str(root)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid in mine:
            continue
        try:
            if _is_of_poc(p, root_s, marker_env, sessions):
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
    """(pid, address, port) of every listening TCP socket (IPv4 and IPv6) the given processes hold."""
    out = set()
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except GONE:
            continue
        out |= {(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}
    return sorted(out)


def is_loopback(address: str) -> bool:
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"


def localhost_problem(listeners: list[tuple[int, str, int]], server_port: int) -> str | None:
    """What is wrong with a POC's listening sockets (pid, address, port): one off a loopback address, or no
    server socket on 127.0.0.1:server_port. None when all is well."""
    public = [x for x in listeners if not is_loopback(x[1])]
    if public:
        return f"POC processes listen on non-loopback addresses (pid, address, port): {public}"
    if not any(addr == "127.0.0.1" and port == server_port for _, addr, port in listeners):
        return f"the server does not listen on 127.0.0.1:{server_port}; listening: {listeners}"
    return None


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


# ---- the kits, between provisioning and start -----------------------------------------------------------------------
def bind_server_to_localhost(server_kit: Path, port: int) -> None:
    """The server's FL and admin endpoints on localhost:port: NVFlare binds all interfaces for a non-loopback
    target (the provisioned "<server name>:port")."""
    fed_server = Path(server_kit) / "startup" / "fed_server.json"
    conf = json.loads(fed_server.read_text())
    for server in conf["servers"]:
        server["service"]["target"] = f"localhost:{port}"
        server["admin_server"] = "localhost"
        server["admin_port"] = int(port)
    fed_server.write_text(json.dumps(conf, indent=2))


def site_target_problem(site_kit: Path, port: int) -> str | None:
    """What is wrong with the server address a site's kit connects to (anything but localhost:port); None if fine."""
    fed_client = Path(site_kit) / "startup" / "fed_client.json"
    target = json.loads(fed_client.read_text())["servers"][0]["service"]["target"]
    if target != f"localhost:{port}":
        return f"{Path(site_kit).name}: {fed_client} connects to {target!r}, expected 'localhost:{port}'"
    return None


def install_fedseg(kit: Path, package_dir: Path = PACKAGE_DIR, policy: dict | None = None) -> None:
    """The fedseg package in the kit's local/custom (NVFlare puts it on the path of the server or site and of its
    job processes, as a hospital installs it), FedSeg's classes on its class allow-list (local/resources.json,
    exact class paths) and, when given, an authorization policy as local/authorization.json."""
    from fedseg.fl.allowlist import allow_fedseg, workspace_role  # imports NVFlare: only where a kit is prepared

    local = Path(kit) / "local"
    allow_fedseg(local / "resources.json", role=workspace_role(kit))  # the server's or a site's classes
    if policy is not None:
        (local / "authorization.json").write_text(json.dumps(policy, indent=2) + "\n")
    dest = local / "custom" / "fedseg"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(package_dir, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_site_config(site_kit: Path, datalist: Path) -> None:
    """local/fedseg_site.json: the site's own data location, which its executor reads instead of the job's."""
    (Path(site_kit) / "local" / "fedseg_site.json").write_text(json.dumps({"datalist": str(datalist)}, indent=2) + "\n")


# ---- readiness ------------------------------------------------------------------------------------------------------
# One readiness probe (argv: admin user, its kit, the sites): exit 0 when every site is registered at the server.
# It runs in a child process because NVFlare's admin session can hang for good while it closes (a connector thread
# blocked in a websocket connect that has no timeout, seen while the server was still starting): a probe that does
# not answer is killed and the next one tried.
READINESS_PROBE = """
import sys
from nvflare.fuel.flare_api.flare_api import Session
user, kit, *sites = sys.argv[1:]
session = Session(username=user, startup_path=kit, secure_mode=True)
try:
    session.try_connect(5.0)
    registered = {c.name for c in session.get_system_info().client_info}
finally:
    session.close()
missing = sorted(set(sites) - registered)
print("registered: " + ", ".join(sorted(registered)) + "; missing: " + (", ".join(missing) or "none"))
sys.exit(3 if missing else 0)
"""


def run_in_session(
    args: list[str], env: dict, timeout: float, input_text: str | None = None, cwd=None
) -> subprocess.CompletedProcess:
    """Run a command in its own session, stdout and stderr together: Ctrl-C reaches only the caller, and on a
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


def wait_until_registered(
    user: str,
    kit: str | os.PathLike,
    sites: list[str],
    env: dict,
    deadline: float,
    alive,
    probe_timeout: float = 30.0,
    cwd=None,
) -> None:
    """Until every site is registered at the server: probe as `user` (admin kit `kit`), one bounded probe at a
    time. Raises RuntimeError, with the last probe's answer, when `alive()` says the POC's processes are gone or
    time.monotonic() passes `deadline`."""
    probe = [sys.executable, "-c", READINESS_PROBE, user, str(kit), *sites]
    last = ""
    while True:
        try:
            result = run_in_session(probe, env, timeout=probe_timeout, cwd=cwd)
            if result.returncode == 0:
                return
            last = result.stdout.strip()[-500:] or f"rc={result.returncode}"
        except subprocess.TimeoutExpired:
            last = f"a readiness probe did not answer within {probe_timeout:.0f}s"
        if not alive():
            raise RuntimeError(f"the POC processes exited during start-up; last probe: {last}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the POC did not become ready in time; last probe: {last}")
        time.sleep(2)
