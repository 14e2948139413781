"""One POC federation, kept in its root folder: prepare, start, submit, stop, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import flare_api, provision, submission
from .common import (
    CUSTOM,
    DEFAULT_JOB,
    DEFAULT_PORT,
    DEFAULT_ROOT,
    MARK_ENV,
    PROJECT_ADMIN,
    PROJECT_TEMPLATE,
    SUBMIT_WAYS,
    PocError,
    log,
)
from .gpus import plan_gpus, resolve_gpus, set_gpu_capacity
from .jobs import stage_job
from .ports import acquire_port, port_is_free, port_lock_file, release_port, reserve_port
from .processes import find_processes, is_loopback, kill_processes, port_listeners, process_listeners, run_in_session

# isort: split
from fedseg_tools.localhost_poc import wait_until_registered


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

    def run_cmd(
        self,
        args: list[str],
        timeout: float,
        input_text: str | None = None,
        check: bool = True,
        log_name: str | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command in the POC's environment and its own session; its output is appended to logs/<log_name>."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        result = run_in_session(args, self.env(), timeout, input_text=input_text, cwd=cwd or self.root)
        if log_name:
            with open(self.logs / log_name, "a") as f:
                f.write(f"$ {' '.join(args)}\n{result.stdout}\n[rc={result.returncode}]\n")
        if check and result.returncode != 0:
            raise PocError(f"command failed (rc={result.returncode}): {' '.join(args)}\n{result.stdout[-3000:]}")
        return result

    def nvflare(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return self.run_cmd([sys.executable, "-m", "nvflare.cli", *args], timeout=timeout, **kw)

    # ---- prepare ------------------------------------------------------------------------------------
    def prepare(
        self,
        sites: list[str] | None = None,
        port: int = DEFAULT_PORT,
        data: str | os.PathLike | None = None,
        size: str = "small",
        dims: int = 2,
        seed: int = 0,
        gpus: str = "auto",
        gpu_job_mem: float = 2.0,
        privacy_sites: list[str] = (),
        template: Path = PROJECT_TEMPLATE,
    ) -> dict:
        if self.processes():
            raise PocError(f"a POC is running from {self.root}: stop it first (python poc/fedseg_poc.py stop)")
        self.root.mkdir(parents=True, exist_ok=True)
        old_port = self.state.get("port")
        if not port:
            port = reserve_port(self.root)
        elif not acquire_port(port, self.root):
            raise PocError(
                f"port {port} is reserved by another POC ({port_lock_file(port)}); choose another with --port "
                "(0: any free port)"
            )
        if old_port and old_port != port:
            release_port(old_port, self.root)
        project = provision.render_project(Path(template), sites, port)
        site_names = [p["name"] for p in provision.participants_of(project, "client")]
        server = provision.participants_of(project, "server")[0]["name"]
        admins = {p["name"]: p.get("role", "") for p in provision.participants_of(project, "admin")}
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

        # 1. localhost only.
        provision.bind_server_to_localhost(prod, server, site_names, port)
        # 2. the fedseg package, its allow-list and FedSeg's authorization policy (no BYOC for anyone; leads manage
        #    their own jobs; members only view) at the server and every site.
        policy = provision.load_authorization_policy()
        for name in [server] + site_names:
            provision.install_fedseg(prod / name, policy)
        # 3. every site's own data folder, through the site-local configuration.
        if data:
            data_paths = provision.user_data(Path(data), site_names)
        else:
            data_paths = provision.prepare_data(self.root / "data", site_names, size, dims, seed)
        for site, datalist in data_paths.items():
            provision.write_site_config(prod / site, datalist)
        # 4. a site-enforced privacy scope where asked for.
        for site in privacy_sites:
            provision.install_privacy_scope(prod / site)
        # 5. GPUs.
        gpu_ids, gpu_mem = resolve_gpus(gpus)
        plan = plan_gpus(site_names, gpu_ids, gpu_mem, gpu_job_mem)
        for site, cap in plan["site_capacity"].items():
            set_gpu_capacity(prod / site / "local" / "resources.json", cap["num_of_gpus"], cap["mem_per_gpu_in_GiB"])

        for admin in admins:
            (prod / admin / "transfer").mkdir(parents=True, exist_ok=True)

        self.state = {
            "root": str(self.root),
            "project": project["name"],
            "prod_dir": str(prod),
            "server": server,
            "port": int(port),
            "sites": site_names,
            "admins": admins,
            "data": {s: str(p) for s, p in data_paths.items()},
            "privacy_sites": list(privacy_sites),
            "gpu": plan,
            "sessions": [],
        }
        self.save_state()
        log(
            f"prepared {project['name']} in {prod} ({time.perf_counter() - start:.1f}s): server {server} on "
            f"localhost:{port}, sites {', '.join(site_names)}, admins {', '.join(f'{a} ({r})' for a, r in admins.items())}"
        )
        log(
            "GPUs: " + (f"{plan['assignments']} (jobs ask for {plan['resource_spec']})" if gpu_ids else "none: jobs run on CPU")
        )
        if privacy_sites:
            log(f"privacy scope hospital_private switched on at {', '.join(privacy_sites)}")
        return self.state

    # ---- start --------------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> None:
        """Start the server and every site, then wait until all sites are registered (at most `timeout` s).

        `nvflare poc start` only spawns the processes (--no-wait): its own readiness wait can block in one admin
        call far beyond its deadline on a loaded machine. Readiness is asked here instead, one bounded probe at a
        time, each in its own process that is killed when it overruns."""
        self._need_state()
        running = self.processes()
        if running:
            raise PocError(f"this POC is already running ({len(running)} processes); stop it first")
        if not acquire_port(self.port, self.root):
            raise PocError(
                f"port {self.port} is reserved by another POC ({port_lock_file(self.port)}); prepare again with another --port"
            )
        if not port_is_free(self.port):
            raise PocError(f"port {self.port} is in use ({port_listeners(self.port)}); choose another with --port")
        args = [sys.executable, "-m", "nvflare.cli", "poc", "start", "--no-wait"]
        if self.state["gpu"]["gpu_ids"]:
            args += ["-gpu", *[str(i) for i in self.state["gpu"]["gpu_ids"]]]
        self.logs.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(self.logs / "start.log", "a") as out:
            proc = subprocess.Popen(
                args,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
            # Its children (start.sh -> sub_start.sh watchdogs -> server/client processes) stay in this session.
            self.state.setdefault("sessions", []).append(proc.pid)
            self.save_state()
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()  # the spawner only: the processes it started are checked below
                proc.wait()
                raise PocError(f"nvflare poc start did not return within {timeout:.0f}s\n{self._start_diagnostics()}") from None
        if rc != 0:
            raise PocError(f"nvflare poc start failed (rc={rc})\n{self._start_diagnostics()}")
        self.wait_ready(deadline=time.monotonic() + timeout)
        self.check_localhost()
        log(
            f"started server and {len(self.sites)} sites in {time.perf_counter() - start:.1f}s; "
            f"listening: {sorted({f'{a}:{p}' for _, a, p in process_listeners(self.processes())})}"
        )

    def wait_ready(self, deadline: float, probe_timeout: float = 30.0) -> None:
        """Until every site is registered at the server: probe as the project admin, one bounded probe at a time."""
        try:
            wait_until_registered(
                PROJECT_ADMIN,
                self.kit(PROJECT_ADMIN),
                self.sites,
                self.env(),
                deadline,
                alive=lambda: bool(self.processes()),
                probe_timeout=probe_timeout,
                cwd=self.root,
            )
        except RuntimeError as e:
            raise PocError(f"{e}\n{self._start_diagnostics()}") from None

    def _start_diagnostics(self) -> str:
        """What a failed start leaves to read: the spawner's output and the tail of each participant's log."""
        parts = []
        logs = [self.logs / "start.log"] + [self.kit(n) / "log.txt" for n in [self.state.get("server", "server"), *self.sites]]
        for path in logs:
            if path.is_file():
                parts.append(f"--- {path} (tail)\n{path.read_text(errors='replace')[-1500:]}")
        parts.append(f"--- processes: {self.processes()}")
        return "\n".join(parts)

    def check_localhost(self) -> list[tuple[int, str, int]]:
        listeners = process_listeners(self.processes())
        public = [x for x in listeners if not is_loopback(x[1])]
        if public:
            raise PocError(f"POC processes listen on non-loopback addresses: {public}")
        if not any(port == self.port for _, _, port in listeners):
            raise PocError(f"the server does not listen on 127.0.0.1:{self.port}: {listeners}")
        return listeners

    # ---- jobs ---------------------------------------------------------------------------------------
    def stage_job(
        self, job: str | os.PathLike, scope: str | None = None, num_rounds: int | None = None, name: str | None = None
    ) -> Path:
        """Copy the job into <root>/jobs/<name> (default: the job's folder name) and adapt its meta.json to this
        POC (GPU request, privacy scope)."""
        dest = self.root / "jobs" / (name or Path(job).resolve().name)
        return stage_job(job, dest, self.state["gpu"]["resource_spec"], scope=scope, num_rounds=num_rounds)

    def submit(
        self,
        job: str | os.PathLike = DEFAULT_JOB,
        via: str = "api",
        user: str = PROJECT_ADMIN,
        timeout: float = 1800,
        wait: bool = True,
        scope: str | None = None,
        num_rounds: int | None = None,
        stage_name: str | None = None,
    ) -> SubmitResult:
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
            outcome = flare_api.submit_job(
                self.kit(user), staged, user, wait=wait, timeout=timeout, download_to=results if wait else None, log=log
            )
            job_id, status, result_dir = outcome.job_id, outcome.status, outcome.result_dir
        elif via == "cli":
            job_id, status, result_dir = submission.submit_with_cli(self, staged, user, timeout, wait, results)
        else:
            job_id, status, result_dir = submission.submit_with_console(self, staged, user, timeout, wait, results)
        return SubmitResult(job_id, status, result_dir, time.perf_counter() - start, via, user)

    def console(self, user: str, commands: list[str], timeout: float = 120) -> str:
        return submission.console(self, user, commands, timeout=timeout)

    def console_submit(self, user: str, staged: Path) -> tuple[str | None, str]:
        return submission.console_submit(self, user, staged)

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
        services = [self.state.get("server", "server")] + self.sites
        if prod and prod.is_dir():  # tell every watchdog (sub_start.sh) to exit instead of restarting
            for service in services:
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
            for service in services:
                for name in ("shutdown.fl", "pid.fl", "daemon_pid.fl", "restart.fl"):
                    (prod / service / name).unlink(missing_ok=True)
        if self.state:
            self.state["sessions"] = []
            self.save_state()
        busy = port_listeners(self.port) if self.state else []
        if self.state.get("port") and not left:
            release_port(self.port, self.root)
        log(
            f"stopped in {time.perf_counter() - start:.1f}s; processes left: {len(left)}; "
            f"listeners on port {self.port}: {busy or 'none'}"
        )
        return left

    def status(self) -> dict:
        procs = self.processes()
        return {
            "root": str(self.root),
            "prepared": bool(self.state.get("prod_dir")),
            "port": self.port,
            "sites": self.sites,
            "processes": procs,
            "listeners": process_listeners(procs),
        }
