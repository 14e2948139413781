#!/usr/bin/env python3
"""FedSeg POC: a local NVFlare federation of hospitals on this machine, bound to localhost only.

One command does everything and always stops what it started (also on failure or Ctrl-C):

    python poc/fedseg_poc.py run [--sites 3] [--job jobs/fedavg] [--submit api|cli|console]

The steps, also available one by one (they share the POC root folder, default workspaces/poc):

    prepare   provision server, sites hospital-a.. and admin users (nvflare poc prepare -i project.yml);
              bind the server to localhost; install the fedseg package in every site's and the server's
              local/custom/, allow its classes (class_allow_list, exact class paths) and install FedSeg's
              authorization policy (poc/authorization.json: nobody may run code a job brings, leads manage
              their own jobs, members only view); generate the built-in dataset and give every site its own
              folder through local/fedseg_site.json; GPUs if there are any
    start     start server and sites (nvflare poc start), check every listening socket is on localhost
    submit    stage the job, submit it as --user through the FLARE API, the `nvflare job` CLI or the
              admin console (fl_admin.sh: submit_job), wait, download, print the per-site Dice table
    stop      nvflare poc stop, then wait for the watchdogs and kill whatever is left of this POC
    status    processes and listening sockets of this POC

Everything the nvflare CLI writes to ~/.nvflare goes to <root>/home (HOME is redirected). The server
port is --port / FEDSEG_POC_PORT (default 18461; 0 picks a free one in 18500-18999); the admin console uses
the same port. The port is reserved for this POC root (a lock file per port under <tmp>/fedseg-poc-ports)
from prepare to stop, so parallel POCs never pick the same one.
Layout of the POC root:
    project.yml  state.json  home/  logs/
    flare/<project>/prod_00/{server, hospital-a, ..., admin@fedseg.org, lead@hospital-a.org, ...}
    data/<site>/datalist.json   jobs/<job> (staged copies)   results/<job_id>/ (downloaded)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

POC_DIR = Path(__file__).resolve().parent
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

for _p in (str(CUSTOM), str(POC_DIR)):  # fedseg (data generator, allow-list, report) and submit.py
    if _p not in sys.path:
        sys.path.insert(0, _p)


class PocError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fedseg-poc] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Names, project, data
# --------------------------------------------------------------------------------------------------


def hospital_names(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise PocError(f"--sites must be between 1 and 26, got {n}")
    return [f"hospital-{c}" for c in string.ascii_lowercase[:n]]


def org_of(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", site)


def render_project(template: Path, sites: list[str] | None, port: int) -> dict:
    """The POC project: the template with its client list replaced (when sites is given) and the port set."""
    import yaml

    project = yaml.safe_load(template.read_text())
    participants = project["participants"]
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1:
        raise PocError(f"{template}: expected exactly one server participant")
    servers[0]["fed_learn_port"] = int(port)
    servers[0].pop("admin_port", None)  # admin console on the FL port
    if sites is not None:
        others = [p for p in participants if p.get("type") != "client"]
        clients = [{"name": s, "type": "client", "org": org_of(s)} for s in sites]
        project["participants"] = others[:1] + clients + others[1:]
    if not [p for p in project["participants"] if p.get("type") == "client"]:
        raise PocError("the POC project has no client sites")
    return project


def load_authorization_policy(path: Path = AUTHZ_FILE) -> dict:
    """FedSeg's authorization policy, checked: NVFlare parses it, and no role has the byoc right."""
    from nvflare.security.security import FLAuthorizer

    from fedseg.fl.allowlist import byoc_roles

    policy = json.loads(Path(path).read_text())
    FLAuthorizer("fedseg", policy)  # raises SyntaxError on an invalid policy
    byoc = byoc_roles(policy)
    if byoc:
        raise PocError(f"{path}: role(s) {byoc} would have the byoc right (run code a job brings); FedSeg jobs need none")
    return policy


def participants_of(project: dict, kind: str) -> list[dict]:
    return [p for p in project["participants"] if p.get("type") == kind]


def prepare_data(data_root: Path, sites: list[str], size: str, dims: int, seed: int) -> dict[str, Path]:
    """Built-in dataset with one folder per hospital: generate_dataset writes site-1..N, renamed here to the
    hospital names (datalist paths are relative to their folder, so moving a folder keeps it valid)."""
    from fedseg.data.synthetic import generate_dataset

    wanted = {"sites": sites, "size": size, "dims": dims, "seed": seed}
    marker = data_root / "fedseg_poc_data.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted and all(
        (data_root / s / "datalist.json").exists() for s in sites
    ):
        log(f"dataset: reusing {data_root}")
    else:
        shutil.rmtree(data_root, ignore_errors=True)
        log(f"dataset: generating the built-in {size} {dims}-D dataset for {len(sites)} sites in {data_root}")
        generate_dataset(str(data_root), n_sites=len(sites), spatial_dims=dims, seed=seed, size=size)
        for k, site in enumerate(sites, start=1):
            (data_root / f"site-{k}").rename(data_root / site)
            datalist_file = data_root / site / "datalist.json"
            datalist = json.loads(datalist_file.read_text())
            datalist["site"] = site
            datalist_file.write_text(json.dumps(datalist, indent=2))
        marker.write_text(json.dumps(wanted, indent=2))
    return {s: (data_root / s / "datalist.json").resolve() for s in sites}


def user_data(data: Path, sites: list[str]) -> dict[str, Path]:
    """--data DIR: DIR/<site>/datalist.json for every site (the FEDSEG_DATA convention)."""
    paths = {s: (data / s / "datalist.json").resolve() for s in sites}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PocError(f"--data {data}: missing datalist(s): {', '.join(missing)}")
    return paths


# --------------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------------


def detect_gpus() -> tuple[list[int], float]:
    """(GPU ids usable by this torch, memory of the smallest one in GiB); ([], 0) on a CPU-only machine."""
    try:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            return [], 0.0
        mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30
    except Exception:  # noqa: BLE001 - no CUDA build, no driver: CPU
        return [], 0.0
    # NVFlare's -gpu check and GPUResourceManager see GPUs through nvidia-smi; without it they cannot allocate.
    from nvflare.fuel.utils.gpu_utils import get_host_gpu_ids

    try:
        host_ids = get_host_gpu_ids() or []
    except Exception:  # noqa: BLE001
        host_ids = []
    ids = [i for i in range(n) if i in host_ids]
    if not ids:
        log(f"torch sees {n} GPU(s) but nvidia-smi lists none: NVFlare cannot assign them, planning for CPU "
            "(the engine still uses a GPU its process can see)")
        return [], 0.0
    return ids, mem


def plan_gpus(sites: list[str], gpu_ids: list[int], gpu_mem_gib: float, job_mem_gib: float = 2.0) -> dict:
    """How the POC uses GPUs: `nvflare poc start -gpu <ids>` gives each site CUDA_VISIBLE_DEVICES round-robin
    (NVFlare's own client_gpu_assignments); each site's GPUResourceManager is told how many GPUs it has
    (POC provisions num_of_gpus 0); staged jobs without a resource_spec ask for one GPU per site.
    Without GPUs: no -gpu, resource managers stay at 0 GPUs and staged jobs ask for none (they run on CPU)."""
    if not gpu_ids:
        return {"gpu_ids": [], "assignments": {s: [] for s in sites}, "site_capacity": {}, "resource_spec": {}}
    from nvflare.tool.poc.poc_commands import client_gpu_assignments

    assignments = client_gpu_assignments(list(sites), list(gpu_ids))
    capacity_gib = max(1, int(gpu_mem_gib))
    job_mem = min(float(job_mem_gib), capacity_gib)
    return {
        "gpu_ids": list(gpu_ids),
        "assignments": assignments,
        "site_capacity": {s: {"num_of_gpus": len(ids), "mem_per_gpu_in_GiB": capacity_gib} for s, ids in assignments.items()},
        "resource_spec": {"@default": {"num_of_gpus": 1, "mem_per_gpu_in_GiB": job_mem}},
    }


def set_gpu_capacity(resources_file: Path, num_of_gpus: int, mem_gib: float) -> None:
    resources = json.loads(resources_file.read_text())
    for comp in resources.get("components", []):
        if comp.get("path", "").endswith("GPUResourceManager"):
            comp.setdefault("args", {}).update({"num_of_gpus": int(num_of_gpus), "mem_per_gpu_in_GiB": mem_gib})
    resources_file.write_text(json.dumps(resources, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Processes and sockets (psutil)
# --------------------------------------------------------------------------------------------------


def find_processes(root: Path, sessions: list[int] | tuple = ()) -> dict[int, str]:
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
            cmdline = " ".join(p.cmdline()).strip()
            if not cmdline or p.status() == psutil.STATUS_ZOMBIE:
                continue  # kernel thread, gone, or a zombie: nothing left to stop
            by_cmd = root_s in cmdline and ("nvflare" in cmdline or "/startup/" in cmdline)
            if by_cmd or (sessions and os.getsid(p.pid) in sessions) or p.environ().get(MARK_ENV) == root_s:
                found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError):
            continue
    for p in list(found.values()):
        try:
            for child in p.children(recursive=True):
                if child.pid not in mine:
                    found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    out = {}
    for pid, p in found.items():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline()).strip()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _listening() -> list:
    return [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr]


def process_listeners(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the given processes hold."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN and c.laddr]
    return sorted(set(out))


def port_listeners(port: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on the machine on that port."""
    return sorted({(c.laddr.ip, c.laddr.port) for c in _listening() if c.laddr.port == port})


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("::1", "::ffff:127.0.0.1") or addr.startswith("::ffff:127.")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections of a previous run in TIME_WAIT are fine
        try:
            s.bind(("127.0.0.1", port))
            return not port_listeners(port)
        except OSError:
            return False


# The server port of a POC is reserved with a lock file per port in one folder shared by every POC on this machine
# (PORT_LOCK_DIR), created with O_CREAT|O_EXCL: of two runs that pick the same port at the same moment, exactly one
# gets it. A socket held open cannot be used instead, because NVFlare's server binds the port itself, and in another
# process, some time after `prepare` wrote the port into the startup kits. Ports come from a fixed range below the
# kernel's ephemeral range (32768-60999 on Linux), so outgoing connections of other programs do not take them either.
# The lock belongs to the POC root and lives from prepare (or reserve_port) to stop; a lock whose POC root is gone,
# or whose root no longer uses that port and whose reserving process is dead, is stale and taken over.
PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "fedseg-poc-ports"
PORT_RANGE = (18500, 18999)


def _port_lock(port: int) -> Path:
    return PORT_LOCK_DIR / f"{int(port)}.lock"


def _lock_is_stale(info: dict, port: int) -> bool:
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
    lock = _port_lock(port)
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
            if info and not _lock_is_stale(info, int(port)):
                return False
            lock.unlink(missing_ok=True)  # stale: take it over (O_EXCL again, so a racing taker loses)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"root": root_s, "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def release_port(port: int, root: str | os.PathLike) -> None:
    lock = _port_lock(port)
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


# --------------------------------------------------------------------------------------------------
# The federation
# --------------------------------------------------------------------------------------------------


@dataclass
class SubmitResult:
    job_id: str
    status: str
    result_dir: str | None
    seconds: float
    via: str
    user: str


class PocFederation:
    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root).resolve()
        self.home = self.root / "home"
        self.flare = self.root / "flare"  # NVFLARE_POC_WORKSPACE (wiped by every prepare)
        self.logs = self.root / "logs"
        self.state_file = self.root / "state.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    # ---- state and paths ----------------------------------------------------------------------------
    def save_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.state_file)

    def _need_state(self) -> None:
        if not self.state.get("prod_dir"):
            raise PocError(f"no POC prepared at {self.root}: run `python poc/fedseg_poc.py prepare` first")

    @property
    def prod_dir(self) -> Path:
        self._need_state()
        return Path(self.state["prod_dir"])

    @property
    def sites(self) -> list[str]:
        return list(self.state.get("sites", []))

    @property
    def port(self) -> int:
        return int(self.state.get("port", DEFAULT_PORT))

    def kit(self, name: str) -> Path:
        return self.prod_dir / name

    def admins(self) -> dict[str, str]:
        return dict(self.state.get("admins", {}))

    # ---- environment and CLI ------------------------------------------------------------------------
    def env(self) -> dict:
        """Environment of every NVFlare process started here."""
        env = dict(os.environ)
        env["HOME"] = str(self.home)  # ~/.nvflare (poc config, startup kit registry) stays in the POC root
        env["NVFLARE_POC_WORKSPACE"] = str(self.flare)
        env[MARK_ENV] = str(self.root)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # python3 in kits' scripts
        # Sites must load fedseg from their local/custom (as a hospital installs it), not from this checkout.
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != CUSTOM]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        else:
            env.pop("PYTHONPATH", None)
        env.setdefault("OMP_NUM_THREADS", "1")  # several sites share the cores
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def run_cmd(self, args: list[str], timeout: float, input_text: str | None = None, check: bool = True,
                log_name: str | None = None, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command in its own session (Ctrl-C reaches only us; on timeout the whole group is killed)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(args, env=self.env(), stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, cwd=cwd or self.root)
        try:
            out, _ = proc.communicate(input=input_text, timeout=timeout)
        except BaseException:
            kill_tree(proc.pid)
            proc.wait()
            raise
        if log_name:
            with open(self.logs / log_name, "a") as f:
                f.write(f"$ {' '.join(args)}\n{out}\n[rc={proc.returncode}]\n")
        result = subprocess.CompletedProcess(args, proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise PocError(f"command failed (rc={proc.returncode}): {' '.join(args)}\n{out[-3000:]}")
        return result

    def nvflare(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return self.run_cmd([sys.executable, "-m", "nvflare.cli", *args], timeout=timeout, **kw)

    # ---- prepare ------------------------------------------------------------------------------------
    def prepare(self, sites: list[str] | None = None, port: int = DEFAULT_PORT, data: str | os.PathLike | None = None,
                size: str = "small", dims: int = 2, seed: int = 0, gpus: str = "auto", gpu_job_mem: float = 2.0,
                privacy_sites: list[str] = (), template: Path = PROJECT_TEMPLATE) -> dict:
        if self.processes():
            raise PocError(f"a POC is running from {self.root}: stop it first (python poc/fedseg_poc.py stop)")
        self.root.mkdir(parents=True, exist_ok=True)
        old_port = self.state.get("port")
        if not port:
            port = reserve_port(self.root)
        elif not acquire_port(port, self.root):
            raise PocError(f"port {port} is reserved by another POC ({_port_lock(port)}); choose another with --port "
                           "(0: any free port)")
        if old_port and old_port != port:
            release_port(old_port, self.root)
        project = render_project(Path(template), sites, port)
        site_names = [p["name"] for p in participants_of(project, "client")]
        server = participants_of(project, "server")[0]["name"]
        admins = {p["name"]: p.get("role", "") for p in participants_of(project, "admin")}
        unknown = sorted(set(privacy_sites) - set(site_names))
        if unknown:
            raise PocError(f"--privacy: unknown site(s) {unknown}; sites are {site_names}")
        import yaml

        project_file = self.root / "project.yml"
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))

        start = time.perf_counter()
        self.nvflare("poc", "prepare", "-i", str(project_file), "--force", timeout=300, log_name="prepare.log")
        prod = self.flare / project["name"] / "prod_00"
        if not prod.is_dir():
            raise PocError(f"nvflare poc prepare did not create {prod}")

        # 1. localhost only: a non-loopback target makes the server listen on all interfaces.
        fed_server = prod / server / "startup" / "fed_server.json"
        conf = json.loads(fed_server.read_text())
        for s in conf["servers"]:
            s["service"]["target"] = f"localhost:{port}"
            s["admin_server"] = "localhost"
            s["admin_port"] = port
        fed_server.write_text(json.dumps(conf, indent=2))
        for site in site_names:
            target = json.loads((prod / site / "startup" / "fed_client.json").read_text())["servers"][0]["service"]["target"]
            if target != f"localhost:{port}":
                raise PocError(f"{site} would connect to {target}, expected localhost:{port}")

        # 2. the fedseg package where the server and every site load it, its classes allowed (exact class paths),
        #    and FedSeg's authorization policy (no BYOC for anyone; leads manage their own jobs; members only view).
        from fedseg.fl.allowlist import allow_fedseg

        policy = load_authorization_policy()
        for name in [server] + site_names:
            local = prod / name / "local"
            allow_fedseg(local / "resources.json")
            (local / "authorization.json").write_text(json.dumps(policy, indent=2) + "\n")
            dest = local / "custom" / "fedseg"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

        # 3. every site's own data folder, through the site-local configuration.
        data_paths = user_data(Path(data), site_names) if data else prepare_data(self.root / "data", site_names, size, dims, seed)
        for site, datalist in data_paths.items():
            (prod / site / "local" / "fedseg_site.json").write_text(json.dumps({"datalist": str(datalist)}, indent=2) + "\n")

        # 4. a site-enforced privacy scope where asked for.
        for site in privacy_sites:
            shutil.copy(PRIVACY_FILE, prod / site / "local" / "privacy.json")

        # 5. GPUs.
        if gpus == "auto":
            gpu_ids, gpu_mem = detect_gpus()
        elif gpus in ("none", "cpu", ""):
            gpu_ids, gpu_mem = [], 0.0
        else:
            gpu_ids = [int(x) for x in gpus.split(",") if x.strip()]
            _, gpu_mem = detect_gpus()
            gpu_mem = gpu_mem or 8.0
        plan = plan_gpus(site_names, gpu_ids, gpu_mem, gpu_job_mem)
        for site, cap in plan["site_capacity"].items():
            set_gpu_capacity(prod / site / "local" / "resources.json", cap["num_of_gpus"], cap["mem_per_gpu_in_GiB"])

        for admin in admins:
            (prod / admin / "transfer").mkdir(parents=True, exist_ok=True)

        self.state = {
            "root": str(self.root), "project": project["name"], "prod_dir": str(prod), "server": server,
            "port": int(port), "sites": site_names, "admins": admins, "data": {s: str(p) for s, p in data_paths.items()},
            "privacy_sites": list(privacy_sites), "gpu": plan, "sessions": [],
        }
        self.save_state()
        log(f"prepared {project['name']} in {prod} ({time.perf_counter() - start:.1f}s): server {server} on "
            f"localhost:{port}, sites {', '.join(site_names)}, admins {', '.join(f'{a} ({r})' for a, r in admins.items())}")
        log("GPUs: " + (f"{plan['assignments']} (jobs ask for {plan['resource_spec']})" if gpu_ids else "none: jobs run on CPU"))
        if privacy_sites:
            log(f"privacy scope hospital_private switched on at {', '.join(privacy_sites)}")
        return self.state

    # ---- start --------------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        self._need_state()
        running = self.processes()
        if running:
            raise PocError(f"this POC is already running ({len(running)} processes); stop it first")
        if not acquire_port(self.port, self.root):
            raise PocError(f"port {self.port} is reserved by another POC ({_port_lock(self.port)}); prepare again with "
                           "another --port")
        if not port_is_free(self.port):
            raise PocError(f"port {self.port} is in use ({port_listeners(self.port)}); choose another with --port")
        args = [sys.executable, "-m", "nvflare.cli", "poc", "start", "--timeout", str(int(timeout))]
        if self.state["gpu"]["gpu_ids"]:
            args += ["-gpu", *[str(i) for i in self.state["gpu"]["gpu_ids"]]]
        self.logs.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.logs / "start.log", "a") as out:
            proc = subprocess.Popen(args, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
            # Its children (start.sh -> sub_start.sh watchdogs -> server/client processes) stay in this session.
            self.state.setdefault("sessions", []).append(proc.pid)
            self.save_state()
            try:
                rc = proc.wait(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                raise PocError(f"nvflare poc start did not return within {timeout + 60:.0f}s")
        if rc != 0:
            raise PocError(f"nvflare poc start failed (rc={rc}); see {self.logs / 'start.log'}:\n"
                           + (self.logs / "start.log").read_text()[-3000:])
        self.check_localhost()
        log(f"started server and {len(self.sites)} sites in {time.perf_counter() - start:.1f}s; "
            f"listening: {sorted({f'{a}:{p}' for _, a, p in process_listeners(self.processes())})}")

    def check_localhost(self) -> list[tuple[int, str, int]]:
        listeners = process_listeners(self.processes())
        public = [x for x in listeners if not is_loopback(x[1])]
        if public:
            raise PocError(f"POC processes listen on non-loopback addresses: {public}")
        if not any(port == self.port for _, _, port in listeners):
            raise PocError(f"the server does not listen on 127.0.0.1:{self.port}: {listeners}")
        return listeners

    # ---- jobs ---------------------------------------------------------------------------------------
    def stage_job(self, job: str | os.PathLike, scope: str | None = None, num_rounds: int | None = None,
                  name: str | None = None) -> Path:
        """Copy the job into <root>/jobs/<name> (default: the job's folder name) and adapt its meta.json to this
        POC (GPU request, privacy scope)."""
        src = Path(job).resolve()
        if not (src / "meta.json").is_file():
            raise PocError(f"{src} is not a job folder (no meta.json)")
        dest = self.root / "jobs" / (name or src.name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        meta_file = dest / "meta.json"
        meta = json.loads(meta_file.read_text())
        spec = self.state["gpu"]["resource_spec"]
        if spec and not meta.get("resource_spec"):
            meta["resource_spec"] = spec
        elif not spec and _asks_for_gpus(meta.get("resource_spec")):
            log(f"CPU-only POC: dropping the GPU request {meta['resource_spec']} from the staged copy of {src.name}")
            meta["resource_spec"] = {}
        if scope:
            meta["scope"] = scope
        meta_file.write_text(json.dumps(meta, indent=2))
        if num_rounds is not None:
            for server_conf in dest.glob("*/config/config_fed_server.json"):
                conf = json.loads(server_conf.read_text())
                for wf in conf.get("workflows", []):
                    if "num_rounds" in wf.get("args", {}):
                        wf["args"]["num_rounds"] = int(num_rounds)
                server_conf.write_text(json.dumps(conf, indent=2))
        if any(dest.glob("**/custom")):
            log(f"note: {src.name} carries code (custom/): a BYOC job, the submitter needs the byoc right")
        return dest

    def submit(self, job: str | os.PathLike = DEFAULT_JOB, via: str = "api", user: str = PROJECT_ADMIN,
               timeout: float = 1800, wait: bool = True, scope: str | None = None,
               num_rounds: int | None = None, stage_name: str | None = None) -> SubmitResult:
        """Submit a job as `user` the chosen way; when wait, also wait for it and download its result."""
        if via not in SUBMIT_WAYS:
            raise PocError(f"--submit must be one of {SUBMIT_WAYS}")
        if user not in self.admins():
            raise PocError(f"unknown admin user {user}; this POC has {list(self.admins())}")
        staged = self.stage_job(job, scope=scope, num_rounds=num_rounds, name=stage_name)
        results = self.root / "results"
        results.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if via == "api":
            import submit as api

            outcome = api.submit_job(self.kit(user), staged, user, wait=wait, timeout=timeout,
                                     download_to=results if wait else None, log=log)
            job_id, status, result_dir = outcome.job_id, outcome.status, outcome.result_dir
        elif via == "cli":
            job_id, status, result_dir = self._submit_cli(staged, user, timeout, wait, results)
        else:
            job_id, status, result_dir = self._submit_console(staged, user, timeout, wait, results)
        return SubmitResult(job_id, status, result_dir, time.perf_counter() - start, via, user)

    def _submit_cli(self, staged: Path, user: str, timeout: float, wait: bool, results: Path):
        kit = str(self.kit(user))
        out = self.nvflare("--format", "json", "job", "submit", "-j", str(staged), "--startup-kit", kit,
                           timeout=120, check=False, log_name="cli.log")
        reply = _json_envelope(out.stdout)
        job_id = (reply.get("data") or {}).get("job_id") if isinstance(reply, dict) else None
        if out.returncode != 0 or not job_id:
            raise PocError(f"nvflare job submit failed (rc={out.returncode}): {out.stdout[-2000:]}")
        log(f"submitted {staged.name} as {user} (nvflare job submit): job {job_id}")
        if not wait:
            return job_id, "", None
        out = self.nvflare("--format", "json", "job", "wait", job_id, "--timeout", str(int(timeout)), "--interval", "2",
                           "--startup-kit", kit, timeout=timeout + 60, check=False, log_name="cli.log")
        status = _find_status(_json_envelope(out.stdout)) or self._status_api(user, job_id)
        log(f"job {job_id}: {status}")
        out = self.nvflare("job", "download", job_id, "-o", str(results), "--force", "--startup-kit", kit,  # -> results/<id>
                           timeout=300, check=False, log_name="cli.log")
        result_dir = results / job_id
        if out.returncode != 0 or not result_dir.exists():
            raise PocError(f"nvflare job download failed: {out.stdout[-2000:]}")
        log(f"result downloaded to {result_dir}")
        return job_id, status, str(result_dir)

    def console(self, user: str, commands: list[str], timeout: float = 120) -> str:
        """Run admin-console commands through the kit's fl_admin.sh (stdin), return its output."""
        script = self.kit(user) / "startup" / "fl_admin.sh"
        out = self.run_cmd(["bash", str(script)], timeout=timeout, input_text="\n".join(commands + ["bye"]) + "\n",
                           check=False, log_name="console.log")
        return out.stdout

    def console_submit(self, user: str, staged: Path) -> tuple[str | None, str]:
        """`submit_job <folder>` in the admin console of `user`: (job id or None when refused, console output)."""
        dest = self.kit(user) / "transfer" / staged.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(staged, dest)  # submit_job takes a folder name relative to the kit's transfer/ (upload_dir)
        out = self.console(user, [f"submit_job {staged.name}"])
        m = re.search(r"Submitted job:\s*([0-9a-fA-F-]{36})", out)
        return (m.group(1) if m else None), out

    def _submit_console(self, staged: Path, user: str, timeout: float, wait: bool, results: Path):
        transfer = self.kit(user) / "transfer"
        job_id, out = self.console_submit(user, staged)
        if not job_id:
            raise PocError(f"submit_job through the admin console failed:\n{out[-2000:]}")
        log(f"submitted {staged.name} as {user} (admin console submit_job): job {job_id}")
        if not wait:
            return job_id, "", None
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            out = self.console(user, [f"list_jobs -d {job_id}"])
            status = _console_status(out)
            if status.startswith("FINISHED"):
                break
            time.sleep(3)
        else:
            raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (status {status or '?'})")
        log(f"job {job_id}: {status}")
        out = self.console(user, [f"download_job {job_id}"], timeout=300)
        downloaded = transfer / job_id
        if not downloaded.exists():
            raise PocError(f"download_job failed:\n{out[-2000:]}")
        result_dir = results / job_id
        shutil.rmtree(result_dir, ignore_errors=True)
        shutil.move(str(downloaded), result_dir)
        log(f"result downloaded to {result_dir}")
        return job_id, status, str(result_dir)

    def _status_api(self, user: str, job_id: str) -> str:
        import submit as api

        session = api.open_session(self.kit(user), user)
        try:
            return str(session.get_job_status(job_id) or "")
        finally:
            session.close()

    # ---- stop and inspection ------------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        return find_processes(self.root, self.state.get("sessions", []))

    def stop(self, timeout: float = 90) -> dict[int, str]:
        """Stop everything this POC started; return what was still alive at the end (empty when clean)."""
        start = time.perf_counter()
        if self.state.get("prod_dir") and self.processes():
            try:  # graceful: the admin shutdown of server and clients
                self.nvflare("poc", "stop", timeout=60, check=False, log_name="stop.log")
            except subprocess.TimeoutExpired:
                log("nvflare poc stop timed out; continuing with local shutdown")
        prod = Path(self.state["prod_dir"]) if self.state.get("prod_dir") else None
        if prod and prod.is_dir():  # tell every watchdog (sub_start.sh) to exit instead of restarting
            for service in [self.state.get("server", "server")] + self.sites:
                if (prod / service).is_dir():
                    (prod / service / "shutdown.fl").touch()
        deadline = time.monotonic() + timeout
        while self.processes() and time.monotonic() < deadline - 10:
            time.sleep(1)
        left = self.processes()
        if left:
            log(f"terminating {len(left)} leftover process(es): {sorted(left)}")
            kill_processes(left, signal.SIGTERM)
            for _ in range(10):
                time.sleep(0.5)
                left = self.processes()
                if not left:
                    break
        if left:
            kill_processes(left, signal.SIGKILL)
            time.sleep(1)
            left = self.processes()
        if prod and prod.is_dir():
            for service in [self.state.get("server", "server")] + self.sites:
                for name in ("shutdown.fl", "pid.fl", "daemon_pid.fl", "restart.fl"):
                    (prod / service / name).unlink(missing_ok=True)
        if self.state:
            self.state["sessions"] = []
            self.save_state()
        busy = port_listeners(self.port) if self.state else []
        if self.state.get("port") and not left:
            release_port(self.port, self.root)
        log(f"stopped in {time.perf_counter() - start:.1f}s; processes left: {len(left)}; "
            f"listeners on port {self.port}: {busy or 'none'}")
        return left

    def status(self) -> dict:
        procs = self.processes()
        return {"root": str(self.root), "prepared": bool(self.state.get("prod_dir")), "port": self.port,
                "sites": self.sites, "processes": procs, "listeners": process_listeners(procs)}


def _asks_for_gpus(spec) -> bool:
    if not isinstance(spec, dict):
        return False
    return any(isinstance(v, dict) and (v.get("num_of_gpus") or 0) > 0 for v in spec.values())


def _json_envelope(text: str):
    """The JSON object printed by `nvflare --format json ...` (last parseable object in the output)."""
    for chunk in reversed(re.findall(r"^\{.*?^\}", text, flags=re.S | re.M)):
        try:
            return json.loads(chunk)
        except ValueError:
            continue
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _find_status(obj) -> str:
    if isinstance(obj, dict):
        for key in ("job_status", "status"):
            value = obj.get(key)
            if isinstance(value, str) and value.startswith("FINISHED"):
                return value
        for value in obj.values():
            found = _find_status(value)
            if found:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = _find_status(value)
            if found:
                return found
    return ""


def _console_status(text: str) -> str:
    """The job status in the output of the console's `list_jobs -d <id>` (the job's meta as JSON)."""
    m = re.search(r'"status":\s*"([A-Z_:]+)"', text)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _print_table(result_dir: str | None) -> bool:
    if not result_dir:
        return False
    import submit as api

    return api.print_results(result_dir)


def _install_signal_handlers() -> None:
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python poc/fedseg_poc.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("FEDSEG_POC_ROOT_DIR", str(DEFAULT_ROOT)),
                   help="POC root folder (default workspaces/poc; env FEDSEG_POC_ROOT_DIR)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def prepare_args(sp):
        sp.add_argument("--sites", type=int, help="number of hospital sites hospital-a.. (default: the 3 in poc/project_poc.yml)")
        sp.add_argument("--site-names", help="comma-separated site names instead of --sites")
        sp.add_argument("--port", type=int, default=int(os.environ.get("FEDSEG_POC_PORT", DEFAULT_PORT)),
                        help=f"server FL and admin port on 127.0.0.1 (default {DEFAULT_PORT}; env FEDSEG_POC_PORT; "
                             "0: a free port, reserved for this POC)")
        sp.add_argument("--data", help="folder with <site>/datalist.json per site (default: generate the built-in dataset)")
        sp.add_argument("--size", default="small", choices=["tiny", "small", "medium"], help="built-in dataset size")
        sp.add_argument("--dims", type=int, default=2, choices=[2, 3], help="built-in dataset dimensions (jobs/ are 2-D)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--gpus", default="auto", help="auto (torch.cuda.device_count()), none, or ids like 0,1")
        sp.add_argument("--gpu-job-mem", type=float, default=2.0, help="GiB per GPU that staged jobs request")
        sp.add_argument("--privacy", default="", help="comma-separated sites that switch on poc/privacy.json")

    def submit_args(sp):
        sp.add_argument("--job", default=str(DEFAULT_JOB), help="job folder (default jobs/fedavg)")
        sp.add_argument("--submit", default="api", choices=SUBMIT_WAYS, help="FLARE API, nvflare job CLI or admin console")
        sp.add_argument("--user", default=PROJECT_ADMIN, help=f"admin user that submits (default {PROJECT_ADMIN})")
        sp.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
        sp.add_argument("--scope", help="privacy scope the job asks for (meta.json scope)")
        sp.add_argument("--rounds", type=int, help="override num_rounds in the staged copy")

    prepare_args(sub.add_parser("prepare", help="provision and set up the POC"))
    sp = sub.add_parser("start", help="start server and sites")
    sp.add_argument("--timeout", type=float, default=180)
    sp = sub.add_parser("submit", help="submit a job, wait, download, print the per-site Dice table")
    submit_args(sp)
    sp.add_argument("--no-wait", action="store_true")
    sub.add_parser("stop", help="stop every process of this POC")
    sub.add_parser("status", help="processes and listening sockets of this POC")
    sp = sub.add_parser("run", help="prepare + start + submit + wait + results + stop (always)")
    prepare_args(sp)
    submit_args(sp)
    o = p.parse_args(argv)

    fed = PocFederation(o.root)
    sites = None
    if getattr(o, "site_names", None):
        sites = [s.strip() for s in o.site_names.split(",") if s.strip()]
    elif getattr(o, "sites", None):
        sites = hospital_names(o.sites)

    def do_prepare():
        fed.prepare(sites=sites, port=o.port, data=o.data, size=o.size, dims=o.dims, seed=o.seed, gpus=o.gpus,
                    gpu_job_mem=o.gpu_job_mem, privacy_sites=[s for s in o.privacy.split(",") if s])

    def do_submit(wait: bool) -> int:
        result = fed.submit(o.job, via=o.submit, user=o.user, timeout=o.timeout, wait=wait, scope=o.scope,
                            num_rounds=o.rounds)
        if not wait:
            print(json.dumps({"job_id": result.job_id}))
            return 0
        _print_table(result.result_dir)
        log(f"job {result.job_id} ({result.via}, {result.user}): {result.status} in {result.seconds:.0f}s")
        return 0 if result.status == "FINISHED:COMPLETED" else 1

    try:
        if o.cmd == "prepare":
            do_prepare()
        elif o.cmd == "start":
            _install_signal_handlers()
            try:
                fed.start(timeout=o.timeout)
            except BaseException:
                fed.stop()  # never leave a half-started federation behind
                raise
            log("running; submit with `python poc/fedseg_poc.py submit`, stop with `python poc/fedseg_poc.py stop`")
        elif o.cmd == "submit":
            return do_submit(wait=not o.no_wait)
        elif o.cmd == "stop":
            return 1 if fed.stop() else 0
        elif o.cmd == "status":
            st = fed.status()
            print(json.dumps({**st, "processes": {str(k): v for k, v in st["processes"].items()}}, indent=2))
        elif o.cmd == "run":
            _install_signal_handlers()
            rc = 1
            try:
                do_prepare()
                fed.start()
                rc = do_submit(wait=True)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the teardown short
                    signal.signal(sig, signal.SIG_IGN)
                left = fed.stop()
                if left:
                    log(f"ERROR: processes left behind: {left}")
                    rc = 1
            return rc
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (PocError, TimeoutError) as e:
        log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
