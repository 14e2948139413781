"""Run a FedSeg job in the NVFlare simulator as a child process tree, and always clean it up.

Used by the demo, the tests and the benchmark. On timeout, error or Ctrl-C every process the run started is
stopped: the simulator runs in its own session, and NVFlare starts each client worker in a session of its
own (setsid), so killing the simulator's process group is not enough. The run's process tree is collected
with psutil while it runs (setsid workers are still children of the simulator by parent pid), and at the end
every process that carries the run's marker variable is found as well (workers that outlived their parent).

    python -m fedseg_tools.sim jobs/fedavg --data data/synth2d -n 4 -w workspaces/fedavg
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds fedseg/ (custom/)
# Every process of a run inherits this variable (a fresh id per run): the final sweep finds them all by it.
RUN_MARK_ENV = "FEDSEG_SIM_RUN"
POLL_SECONDS = 0.5  # how often the run's process tree is collected


@dataclass
class SimResult:
    returncode: int
    workspace: Path
    seconds: float
    log_tail: str
    pids: tuple[int, ...] = ()  # every process of the run that was seen (the simulator, its workers, ...)
    left: tuple[int, ...] = ()  # those still alive after SIGKILL (empty unless something is badly wrong)

    @property
    def job_dir(self) -> Path:
        return self.workspace / "server" / "simulate_job"

    def errors(self) -> str:
        """Everything FLARE wrote to error logs (a job can end with rc 0 and still have failed)."""
        texts = []
        for path in sorted(self.workspace.rglob("error_log.txt")):
            text = path.read_text(errors="replace").strip()
            if text:
                texts.append(f"== {path.relative_to(self.workspace)}\n{text}")
        return "\n".join(texts)

    def log(self, who: str = "server") -> str:
        path = self.workspace / who / "log.txt"
        return path.read_text(errors="replace") if path.exists() else ""


class ProcessTree:
    """Every process started under one root process (psutil handles: a pid reused later is not ours)."""

    def __init__(self, root_pid: int, mark: tuple[str, str] | None = None):
        self.mark = mark  # (variable, value) in the environment of every process of the run
        self.seen: dict[int, psutil.Process] = {}
        try:
            self.seen[root_pid] = psutil.Process(root_pid)
        except psutil.NoSuchProcess:
            pass

    def collect(self) -> None:
        """Add the descendants (children by ppid, whatever their session) of every process seen so far."""
        for p in list(self.seen.values()):
            try:
                for child in p.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def marked(self) -> list[psutil.Process]:
        if not self.mark:
            return []
        key, value = self.mark
        me = os.getpid()
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != me and p.environ().get(key) == value:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def alive(self) -> list[psutil.Process]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def kill_all(self, grace: float = 10) -> list[psutil.Process]:
        """SIGTERM to everything of the run, SIGKILL to what is left after `grace` s; returns what survived."""
        self.collect()
        for p in self.marked():
            self.seen.setdefault(p.pid, p)
        self.collect()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            procs = self.alive()
            if not procs:
                return []
            for p in procs:
                try:
                    p.send_signal(sig)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            psutil.wait_procs(procs, timeout=wait)
            self.collect()  # a process may have started a child meanwhile
        return self.alive()


def package_env(data_root: str | os.PathLike | None = None, on_pythonpath: bool = True) -> dict:
    """The environment of a child process that runs FedSeg code: os.environ with the fedseg package first on
    PYTHONPATH (as an installed site has it; dropped with on_pythonpath=False, for BYOC), one BLAS thread, and with
    data_root the sites' datalist source <data_root>/<site>/datalist.json."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != PACKAGE_ROOT]
    if on_pythonpath:
        paths.insert(0, str(PACKAGE_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if data_root is not None:
        env["FEDSEG_DATA"] = str(Path(data_root).resolve())
        # the site-controlled source (the process environment), so no job setting is needed or used
        env["FEDSEG_DATALIST"] = os.path.join(env["FEDSEG_DATA"], "{SITE_NAME}", "datalist.json")
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores; one BLAS thread each avoids thrashing
    return env


def run_process_tree(
    cmd: list[str], env: dict, out_path: Path, timeout: float, cwd: str | None = None
) -> tuple[int, list, set]:
    """Run ``cmd`` in a session of its own (output to ``out_path``) and stop EVERY process of it at the end, on
    timeout (return code -9) or on Ctrl-C: its process tree is collected while it runs (NVFlare's setsid'ed
    workers are children by ppid) and marked with a per-run environment variable. Returns (return code,
    processes still alive after SIGKILL, pids seen)."""
    mark = uuid.uuid4().hex
    env = {**env, RUN_MARK_ENV: mark}
    deadline = time.monotonic() + timeout
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        tree = ProcessTree(proc.pid, (RUN_MARK_ENV, mark))
        rc = None
        try:
            while rc is None:
                tree.collect()  # while the parent lives, its setsid'ed workers are its children
                try:
                    rc = proc.wait(timeout=min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        rc = -9
        finally:
            left = tree.kill_all()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    return rc, left, set(tree.seen)


def run_simulator(
    job: str | os.PathLike,
    workspace: str | os.PathLike,
    n_clients: int,
    data_root: str | os.PathLike | None = None,
    threads: int | None = None,
    gpu: str | None = None,
    on_pythonpath: bool = True,
    extra_env: dict | None = None,
    timeout: float = 1800,
    clients: list[str] | None = None,
    allow_classes: tuple[str, ...] = (),
    resume_dirs: tuple[str | os.PathLike, ...] = (),
) -> SimResult:
    """nvflare simulator JOB -w WS -n N -t T [-gpu ...] with the fedseg package on PYTHONPATH (as an installed
    site has it) unless on_pythonpath=False (then the job must carry its code: BYOC).

    The sites' class allow-list is the product's (fedseg.fl.allowlist) plus allow_classes (exact class paths,
    e.g. tests' fault-injecting executors). resume_dirs: folders outside the job the server may load checkpoints
    from (the server operator's "resume_dirs" in local/fedseg_server.json; e.g. the benchmark's initial
    checkpoints). Every process of the run is stopped when it ends, times out
    (returncode -9) or is interrupted; SimResult.pids lists them all, SimResult.left what could not be stopped."""
    workspace = Path(workspace).resolve()
    env = {**package_env(data_root, on_pythonpath), **(extra_env or {})}
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(Path(job).resolve()), "-w", str(workspace)]
    cmd += ["-c", ",".join(clients)] if clients else ["-n", str(n_clients)]
    cmd += ["-t", str(threads or n_clients)]
    if gpu:
        cmd += ["-gpu", gpu]
    workspace.parent.mkdir(parents=True, exist_ok=True)
    if on_pythonpath:
        # as at an installed site: the simulator copies <workspace>/local into the server's and every site's local/
        from fedseg.fl.allowlist import allow_fedseg

        allow_fedseg(workspace / "local" / "resources.json", tuple(allow_classes))
    if resume_dirs:
        from fedseg.fl.base_controller import SERVER_CONFIG_RELPATH

        (workspace / "local").mkdir(parents=True, exist_ok=True)
        dirs = [str(Path(d).resolve()) for d in resume_dirs]
        (workspace / SERVER_CONFIG_RELPATH).write_text(json.dumps({"resume_dirs": dirs}, indent=2) + "\n")
    start = time.perf_counter()
    out_path = workspace.parent / f"{workspace.name}.simulator.out"
    rc, left, seen = run_process_tree(cmd, env, out_path, timeout)
    tail = out_path.read_text(errors="replace")[-4000:]
    if left:
        tail += f"\n[fedseg_tools.sim] processes of this run still alive after SIGKILL: {[p.pid for p in left]}"
    return SimResult(
        returncode=rc,
        workspace=workspace,
        seconds=time.perf_counter() - start,
        log_tail=tail,
        pids=tuple(sorted(seen)),
        left=tuple(p.pid for p in left),
    )


def main(argv: list[str] | None = None) -> int:
    from fedseg.report import format_table, load_results

    p = argparse.ArgumentParser(
        prog="python -m fedseg_tools.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("job")
    p.add_argument("--data", required=True, help="folder with one <site>/datalist.json per site (site-1..site-N)")
    p.add_argument("-n", "--clients", type=int, default=4)
    p.add_argument("-w", "--workspace", required=True)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-gpu", "--gpu", help="GPU ids as for nvflare simulator -gpu, e.g. 0 or 0,1")
    o = p.parse_args(argv)
    print(f"running {o.job} in the NVFlare simulator with {o.clients} sites (workspace {o.workspace}) ...", flush=True)
    try:
        result = run_simulator(o.job, o.workspace, o.clients, o.data, o.threads, o.gpu)
    except KeyboardInterrupt:  # run_simulator has stopped every process of the run before this
        print("interrupted: every process of the run was stopped", flush=True)
        return 130
    errors = result.errors()
    if result.returncode != 0 or errors:
        print(result.log_tail)
        print(errors or f"simulator exited with {result.returncode}")
        return 1
    print(f"finished in {result.seconds:.0f}s")
    print(format_table(load_results(result.workspace, Path(o.job).name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
