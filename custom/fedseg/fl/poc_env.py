"""FedSegPocEnv: NVFlare 2.9's PocEnv for FedSeg's recipes, on localhost only, with FedSeg installed at every kit.

    from fedseg.fl.poc_env import FedSegPocEnv
    from fedseg.recipes import FedAvgRecipe

    env = FedSegPocEnv(workspace="workspaces/poc_env", clients=["site-1", "site-2"],
                       datalist="data/synth2d/{SITE_NAME}/datalist.json")
    run = FedAvgRecipe(num_rounds=2, min_clients=2).execute(env)
    print(run.get_status(), run.get_result())      # get_result waits, copies the result out, stops the POC

It deploys as NVFlare's PocEnv does (provision a fresh POC with prepare_poc_provision, start it with _start_poc,
submit through the admin API) with three differences:
  * the POC lives under the caller's `workspace` folder (never the shared /tmp/nvflare/poc default), on a port
    reserved for it (lock files shared with poc/fedseg_poc.py, from a range of its own);
  * between provisioning and start, every kit is prepared as a FedSeg site: the server listens on 127.0.0.1 only
    (a non-loopback "target" in fed_server.json makes NVFlare bind all interfaces), the server's and every site's
    local/resources.json allows FedSeg's classes (fedseg.fl.allowlist: exact class paths, enforced), the fedseg
    package is installed in local/custom (NVFlare puts it on the path of the site and its job processes), and
    each site's local/fedseg_site.json names its datalist;
  * after the start, every listening socket of the POC's processes must be on a loopback address, else the POC is
    stopped and deploy raises. stop() ends every process of the POC (graceful admin shutdown, then the watchdogs'
    shutdown.fl, then signals) and releases the port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import yaml
from nvflare.apis.job_def import DEFAULT_STUDY
from nvflare.job_config.api import FedJob
from nvflare.recipe.poc_env import DEFAULT_ADMIN_USER, PocEnv
from nvflare.recipe.utils import collect_non_local_scripts
from nvflare.tool.poc.poc_commands import (
    _start_poc,
    _stop_poc,
    _wait_for_poc_system_ready,
    add_he_builder,
    get_prod_dir,
    prepare_poc_provision,
    setup_service_config,
    update_clients,
    update_server_name,
)

from fedseg.fl.allowlist import allow_fedseg

# poc/fedseg_poc.py reserves its ports in the same lock folder, from 18500-18999; this environment takes its own
# range, also below the kernel's ephemeral range (32768-60999) so that outgoing connections do not take it.
PORT_LOCK_DIR = Path(tempfile.gettempdir()) / "fedseg-poc-ports"
PORT_RANGE = (19000, 19499)
# Every process the POC starts carries this variable (value: the env's workspace), so stop() finds them all.
MARK_ENV = "FEDSEG_POC_ENV_ROOT"
SERVER = "server"
PROJECT_NAME = "example_project"  # the name in NVFlare's default POC project
PACKAGE_DIR = Path(__file__).resolve().parents[1]
STOP_WAIT = 60  # seconds for the processes to end after the admin shutdown before they are signalled
GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


class PocEnvError(RuntimeError):
    pass


# ---- what is written between provisioning and start (pure functions of files) -----------------------------------
def render_project(clients: list[str], port: int, use_he: bool = False) -> dict:
    """NVFlare's default POC project (nvflare/lighter/dummy_project.yml, as `nvflare poc prepare` uses it) with the
    server named "server", the given clients and the FL (= admin) port."""
    import nvflare.lighter

    project = yaml.safe_load((Path(nvflare.lighter.__file__).parent / "dummy_project.yml").read_text())
    project = update_server_name(project)
    project = update_clients(clients, len(clients), project)
    project = add_he_builder(use_he, project)
    for p in project["participants"]:
        if p["type"] == "server":
            p["fed_learn_port"] = int(port)
            p.pop("admin_port", None)
    return project


def bind_server_to_localhost(server_kit: Path, port: int) -> None:
    """The server's FL and admin endpoints on localhost:port: NVFlare binds all interfaces for a non-loopback
    target (the provisioned "server:port")."""
    fed_server = server_kit / "startup" / "fed_server.json"
    conf = json.loads(fed_server.read_text())
    for server in conf["servers"]:
        server["service"]["target"] = f"localhost:{port}"
        server["admin_server"] = "localhost"
        server["admin_port"] = int(port)
    fed_server.write_text(json.dumps(conf, indent=2))


def check_site_target(site_kit: Path, port: int) -> None:
    fed_client = site_kit / "startup" / "fed_client.json"
    target = json.loads(fed_client.read_text())["servers"][0]["service"]["target"]
    if target != f"localhost:{port}":
        raise PocEnvError(f"{site_kit.name}: {fed_client} connects to {target!r}, expected 'localhost:{port}'")


def install_fedseg(kit: Path, package_dir: Path = PACKAGE_DIR) -> None:
    """FedSeg's classes on the kit's class allow-list (local/resources.json) and the fedseg package in
    local/custom, which NVFlare appends to the path of the server or site and of its job processes."""
    allow_fedseg(kit / "local" / "resources.json")
    dest = kit / "local" / "custom" / "fedseg"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(package_dir, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def site_datalists(datalist: str | os.PathLike | dict | None, clients: list[str]) -> dict[str, Path]:
    """Each site's datalist file: a path template with "{SITE_NAME}", or a mapping site -> path (every site named);
    None: no site file is written (the sites take FEDSEG_DATALIST from the environment they inherit)."""
    if datalist is None:
        return {}
    if isinstance(datalist, dict):
        missing = sorted(set(clients) - set(datalist))
        unknown = sorted(set(datalist) - set(clients))
        if missing or unknown:
            raise PocEnvError(f"datalist: sites without a datalist {missing}, datalists of unknown sites {unknown}")
        paths = {site: Path(datalist[site]) for site in clients}
    else:
        paths = {site: Path(str(datalist).replace("{SITE_NAME}", site)) for site in clients}
    paths = {site: p.expanduser().resolve() for site, p in paths.items()}
    for site, path in paths.items():
        if not path.is_file():
            raise PocEnvError(f"{site}: datalist {path} does not exist")
    return paths


def write_site_config(site_kit: Path, datalist: Path) -> None:
    """local/fedseg_site.json: the site's own data location, which its executor reads before the job's."""
    (site_kit / "local" / "fedseg_site.json").write_text(json.dumps({"datalist": str(datalist)}, indent=2) + "\n")


# ---- ports ----------------------------------------------------------------------------------------------------------
def port_lock_file(port: int) -> Path:
    return PORT_LOCK_DIR / f"{int(port)}.lock"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's connections in TIME_WAIT are fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections(kind="tcp")
    )


def acquire_port(port: int, root: Path) -> bool:
    """Reserve `port` for the POC at `root` with an O_EXCL lock file: True when it is (now) this root's. A lock is
    taken over only when its process is dead and its root is gone (a crashed run's POC may still hold the port)."""
    PORT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock = port_lock_file(port)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(lock.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                return False  # being written by its owner, or damaged: not ours
            if info.get("root") == str(root):
                return True
            if psutil.pid_exists(int(info.get("pid", 0))) or Path(info.get("root") or "/").exists():
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"root": str(root), "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def release_port(port: int, root: Path) -> None:
    lock = port_lock_file(port)
    try:
        if json.loads(lock.read_text()).get("root") == str(root):
            lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def reserve_port(root: Path, lo: int = PORT_RANGE[0], hi: int = PORT_RANGE[1]) -> int:
    """A free port in [lo, hi], reserved for the POC at `root` (released by release_port)."""
    for port in range(lo, hi + 1):
        if acquire_port(port, root):
            if port_is_free(port):
                return port
            release_port(port, root)
    raise PocEnvError(f"no free port in {lo}..{hi} (locks in {PORT_LOCK_DIR})")


# ---- processes ------------------------------------------------------------------------------------------------------
def find_processes(root: Path) -> dict[int, str]:
    """pid -> command line of every live process of the POC at `root`: those that carry MARK_ENV=root or whose
    command line names root, and all their descendants (this process and its parents excluded)."""
    root_s = str(root)
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if p.pid in mine:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if root_s in " ".join(p.cmdline()) or p.environ().get(MARK_ENV) == root_s:
                found[p.pid] = p
        except GONE:
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in mine})
        except GONE:
            continue
    out = {}
    for pid, p in found.items():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline())
        except GONE:
            continue
    return out


def process_listeners(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket (IPv4 and IPv6) of the given processes."""
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


def site_pythonpath(pythonpath: str, package_dir: Path = PACKAGE_DIR) -> str | None:
    """PYTHONPATH for the POC's processes: this process's, without the folder fedseg is imported from here, so
    that the server and the sites load the copy installed in their local/custom, as a hospital's would."""
    keep = [p for p in pythonpath.split(os.pathsep) if p and Path(p).resolve() != package_dir.parent]
    return os.pathsep.join(keep) or None


@contextmanager
def _environ(values: dict[str, str | None]):
    """os.environ with `values` set (None: removed) for a moment, e.g. while NVFlare starts the POC's processes
    (they copy os.environ)."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FedSegPocEnv(PocEnv):
    def __init__(
        self,
        *,
        workspace: str | os.PathLike,
        num_clients: int | None = 2,
        clients: list[str] | None = None,
        datalist: str | os.PathLike | dict | None = None,
        port: int = 0,
        gpu_ids: list[int] | None = None,
        use_he: bool = False,
        study: str = DEFAULT_STUDY,
        start_timeout: float = 180,
        extra: dict | None = None,
    ):
        """A localhost-only POC under `workspace` (created; the POC itself is <workspace>/poc, re-provisioned on
        every deploy; downloaded job results go to <workspace>/results/<job id>).

        Args:
            num_clients / clients: the sites (site-1..N when clients is None).
            datalist: each site's datalist: a path template with "{SITE_NAME}" or a mapping site -> path, written
                to the site's local/fedseg_site.json; None: the sites inherit FEDSEG_DATALIST from this process.
            port: the server's FL and admin port on 127.0.0.1 (0: a free port of PORT_RANGE, reserved).
            gpu_ids: GPUs handed round-robin to the sites (CUDA_VISIBLE_DEVICES), as NVFlare's PocEnv does.
            start_timeout: seconds for the server and all sites to be up.
        """
        self.root = Path(workspace).resolve()
        with _environ({"NVFLARE_POC_WORKSPACE": str(self.root / "poc")}):  # PocEnv would look up (and create) ~/.nvflare
            super().__init__(
                num_clients=num_clients,
                clients=clients,
                gpu_ids=gpu_ids,
                use_he=use_he,
                username=DEFAULT_ADMIN_USER,
                study=study,
                extra=extra,
            )
        self.poc_workspace = str(self.root / "poc")
        self.clients = list(self.clients or [f"site-{i + 1}" for i in range(self.num_clients)])
        self.datalists = site_datalists(datalist, self.clients)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise PocEnvError(f"port must be 0 (any free port) or a TCP port, got {port!r}")
        self.requested_port = port
        self.port: int | None = None
        self.start_timeout = start_timeout
        self.stop_wait = STOP_WAIT

    # ---- deploy: prepare, start, check, submit ----------------------------------------------------------------------
    def deploy(self, job: FedJob) -> str:
        non_local = collect_non_local_scripts(job)
        if non_local:
            raise ValueError(f"The following scripts do not exist locally: {non_local}")
        self.stop(clean_up=True)  # like PocEnv: every deploy runs on a freshly provisioned POC
        try:
            self.prepare()
            self.start()
            return self._get_session_manager().submit_job(job)
        except BaseException:
            self.stop()
            raise

    @property
    def prod_dir(self) -> Path:
        return Path(get_prod_dir(self.poc_workspace, PROJECT_NAME))

    def prepare(self) -> Path:
        """Provision the POC (NVFlare's prepare_poc_provision) and prepare every kit for FedSeg; returns prod_00."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            if self.requested_port:
                if not acquire_port(self.requested_port, self.root):
                    raise PocEnvError(
                        f"port {self.requested_port} is reserved by another POC ({port_lock_file(self.requested_port)})"
                    )
                self.port = self.requested_port
            else:
                self.port = reserve_port(self.root)
        project = render_project(self.clients, self.port, self.use_he)
        project_file = self.root / "project.yml"
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))
        prepare_poc_provision(
            clients=[],
            number_of_clients=len(self.clients),
            workspace=self.poc_workspace,
            docker_image=None,
            use_he=self.use_he,
            project_conf_path=str(project_file),
            examples_dir=None,
        )
        prod = self.prod_dir
        bind_server_to_localhost(prod / SERVER, self.port)
        for kit in [SERVER, *self.clients]:
            install_fedseg(prod / kit)
        for site in self.clients:
            check_site_target(prod / site, self.port)
        for site, datalist in self.datalists.items():
            write_site_config(prod / site, datalist)
        return prod

    def start(self) -> None:
        """Start server and sites (NVFlare's _start_poc), wait until every site is connected, check localhost."""
        if not port_is_free(self.port):
            raise PocEnvError(f"port {self.port} is in use on 127.0.0.1")
        with _environ({MARK_ENV: str(self.root), "PYTHONPATH": site_pythonpath(os.environ.get("PYTHONPATH", ""))}):
            _start_poc(poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username], services_list=[])
        project_config, service_config = setup_service_config(self.poc_workspace)
        _wait_for_poc_system_ready(
            self.poc_workspace,
            project_config,
            service_config,
            services_list=[],
            excluded=[self.username],
            timeout_in_sec=int(self.start_timeout),
        )
        self.check_localhost()

    # ---- inspection ---------------------------------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        return find_processes(self.root)

    def listeners(self) -> list[tuple[int, str, int]]:
        return process_listeners(self.processes())

    def check_localhost(self) -> list[tuple[int, str, int]]:
        """The POC's listening sockets, checked by localhost_problem (PocEnvError; the caller stops the POC)."""
        listeners = self.listeners()
        problem = localhost_problem(listeners, self.port)
        if problem:
            raise PocEnvError(problem)
        return listeners

    # ---- results and stop ---------------------------------------------------------------------------------------
    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:
        """Wait for the job, download its result and copy it to <workspace>/results/<job id>, which outlives the
        POC workspace (Run.get_result stops the POC and removes its workspace right after)."""
        downloaded = super().get_job_result(job_id, timeout)
        if downloaded is None:
            return None
        dest = self.root / "results" / job_id
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(downloaded, dest)
        return str(dest)

    def stop(self, clean_up: bool = False) -> None:
        """Stop every process of the POC: the admin shutdown of server and sites, then shutdown.fl for the
        watchdogs (sub_start.sh), then SIGTERM / SIGKILL for what is left. Raises PocEnvError when a process
        survives. clean_up: also remove the POC workspace (<workspace>/poc; results/ stays)."""
        if self.processes():
            self._stop_processes()
        self._session_manager = None
        left = self.processes()
        if left:
            raise PocEnvError(f"POC processes still alive after stop: {left}")
        if self.port is not None:
            release_port(self.port, self.root)
            self.port = None
        if clean_up:
            shutil.rmtree(self.poc_workspace, ignore_errors=True)

    def _stop_processes(self) -> None:
        try:
            project_config, service_config = setup_service_config(self.poc_workspace)
            _stop_poc(
                self.poc_workspace,
                excluded=[self.username],
                services_list=[],
                project_config=project_config,
                service_config=service_config,
            )
        except Exception as e:  # noqa: BLE001 - the server may be down already; the steps below still run
            self.logger.info(f"admin shutdown of the POC failed ({e}); stopping its processes directly")
        prod = self.prod_dir
        for kit in [SERVER, *self.clients]:
            if (prod / kit).is_dir():
                (prod / kit / "shutdown.fl").touch()
        deadline = time.monotonic() + self.stop_wait
        while self.processes() and time.monotonic() < deadline:
            time.sleep(1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.processes()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            for _ in range(20):
                if not self.processes():
                    break
                time.sleep(0.5)
