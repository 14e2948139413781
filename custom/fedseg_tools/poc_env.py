"""FedSegPocEnv: NVFlare 2.9's PocEnv for FedSeg's recipes, on localhost only, with FedSeg installed at every kit.

    from fedseg_tools.poc_env import FedSegPocEnv
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

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from nvflare.apis.job_def import DEFAULT_STUDY
from nvflare.job_config.api import FedJob
from nvflare.recipe.poc_env import DEFAULT_ADMIN_USER, PocEnv
from nvflare.recipe.utils import collect_non_local_scripts
from nvflare.tool.poc.poc_commands import (
    _start_poc,
    add_he_builder,
    get_prod_dir,
    prepare_poc_provision,
    update_clients,
    update_server_name,
)

from fedseg_tools.localhost_poc import (
    PACKAGE_DIR,
    POC_ENV_PORTS,
    NoFreePortError,
    acquire_port,
    bind_server_to_localhost,
    find_processes,
    install_fedseg,
    kill_processes,
    localhost_problem,
    port_is_free,
    port_lock_file,
    process_listeners,
    release_port,
    reserve_port,
    run_in_session,
    site_target_problem,
    wait_until_registered,
    write_site_config,
)

# Ports, processes and kit preparation are fedseg_tools.localhost_poc's, shared with poc/fedseg_poc.py (same lock
# folder); this environment takes its own port range, disjoint from the tool's.
PORT_RANGE = POC_ENV_PORTS
# Every process the POC starts carries this variable (value: the env's workspace), so stop() finds them all.
MARK_ENV = "FEDSEG_POC_ENV_ROOT"
SERVER = "server"
PROJECT_NAME = "example_project"  # the name in NVFlare's default POC project
STOP_WAIT = 60  # seconds for the processes to end after the admin shutdown before they are signalled
# NVFlare's admin shutdown of server and sites (argv: POC workspace, admin user), run in a child process
ADMIN_SHUTDOWN = """
import sys
from nvflare.tool.poc.poc_commands import _stop_poc, setup_service_config
workspace, user = sys.argv[1:]
project_config, service_config = setup_service_config(workspace)
_stop_poc(workspace, excluded=[user], services_list=[], project_config=project_config, service_config=service_config)
"""


def _unmarked_environ() -> dict:
    """This process's environment without the POC marker: helpers it starts are not processes of the POC."""
    return {k: v for k, v in os.environ.items() if k != MARK_ENV}


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
                try:
                    self.port = reserve_port(self.root, *PORT_RANGE)
                except NoFreePortError as e:
                    raise PocEnvError(str(e)) from None
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
            problem = site_target_problem(prod / site, self.port)
            if problem:
                raise PocEnvError(problem)
        for site, datalist in self.datalists.items():
            write_site_config(prod / site, datalist)
        return prod

    def start(self) -> None:
        """Start server and sites (NVFlare's _start_poc), wait until every site is connected, check localhost."""
        if not port_is_free(self.port):
            raise PocEnvError(f"port {self.port} is in use on 127.0.0.1")
        with _environ({MARK_ENV: str(self.root), "PYTHONPATH": site_pythonpath(os.environ.get("PYTHONPATH", ""))}):
            _start_poc(poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username], services_list=[])
        # not NVFlare's _wait_for_poc_system_ready: its admin session can hang for good (localhost_poc explains)
        env = _unmarked_environ()
        try:
            wait_until_registered(
                self.username,
                self.prod_dir / self.username,
                list(self.clients),
                env,
                deadline=time.monotonic() + float(self.start_timeout),
                alive=lambda: bool(self.processes()),
                cwd=self.root,
            )
        except RuntimeError as e:
            raise PocEnvError(str(e)) from None
        self.check_localhost()

    # ---- inspection ---------------------------------------------------------------------------------------------
    def processes(self) -> dict[int, str]:
        return find_processes(self.root, MARK_ENV)

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
        # NVFlare's admin shutdown in a child process with a time limit: its admin session can hang in-process
        # (localhost_poc explains); a shutdown that hangs or fails leaves the steps below to stop everything
        env = _unmarked_environ()
        try:
            result = run_in_session(
                [sys.executable, "-c", ADMIN_SHUTDOWN, str(self.poc_workspace), self.username], env, timeout=self.stop_wait
            )
            if result.returncode != 0:
                self.logger.info(
                    f"admin shutdown of the POC failed ({result.stdout.strip()[-300:]}); stopping its processes directly"
                )
        except subprocess.TimeoutExpired:
            self.logger.info(f"admin shutdown of the POC did not end within {self.stop_wait}s; stopping its processes directly")
        prod = self.prod_dir
        for kit in [SERVER, *self.clients]:
            if (prod / kit).is_dir():
                (prod / kit / "shutdown.fl").touch()
        deadline = time.monotonic() + self.stop_wait
        while self.processes() and time.monotonic() < deadline:
            time.sleep(1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            kill_processes(self.processes(), sig)
            for _ in range(20):
                if not self.processes():
                    break
                time.sleep(0.5)
