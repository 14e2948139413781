"""Run a FedSeg job in the NVFlare simulator as a child process group, and always clean it up.

Used by the demo, the tests and the benchmark. The simulator runs in its own session so that on timeout,
error or Ctrl-C the whole process group (server, client workers) is stopped.

    python -m fedseg.sim jobs/fedavg --data data/synth2d -n 4 -w workspaces/fedavg
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder that holds fedseg/ (custom/)


@dataclass
class SimResult:
    returncode: int
    workspace: Path
    seconds: float
    log_tail: str

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


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


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
    allow_prefixes: tuple[str, ...] = (),
) -> SimResult:
    """nvflare simulator JOB -w WS -n N -t T [-gpu ...] with the fedseg package on PYTHONPATH (as an installed
    site has it) unless on_pythonpath=False (then the job must carry its code: BYOC)."""
    workspace = Path(workspace).resolve()
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != PACKAGE_ROOT]
    if on_pythonpath:
        paths.insert(0, str(PACKAGE_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if data_root is not None:
        env["FEDSEG_DATA"] = str(Path(data_root).resolve())
        # the site-controlled source (the process environment), so no job setting is needed or used
        env["FEDSEG_DATALIST"] = os.path.join(env["FEDSEG_DATA"], "{SITE_NAME}", "datalist.json")
    env.setdefault("OMP_NUM_THREADS", "1")  # N clients share the cores; one BLAS thread each avoids thrashing
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "nvflare.cli", "simulator", str(Path(job).resolve()), "-w", str(workspace)]
    cmd += ["-c", ",".join(clients)] if clients else ["-n", str(n_clients)]
    cmd += ["-t", str(threads or n_clients)]
    if gpu:
        cmd += ["-gpu", gpu]
    workspace.parent.mkdir(parents=True, exist_ok=True)
    if on_pythonpath:
        # as at an installed site: the simulator copies <workspace>/local into the server's and every site's local/
        from fedseg.fl.allowlist import allow_fedseg

        allow_fedseg(workspace / "local" / "resources.json", tuple(allow_prefixes))
    start = time.perf_counter()
    out_path = workspace.parent / f"{workspace.name}.simulator.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -9
        finally:
            _kill_group(proc)
    tail = out_path.read_text(errors="replace")[-4000:]
    return SimResult(returncode=rc, workspace=workspace, seconds=time.perf_counter() - start, log_tail=tail)


def main(argv: list[str] | None = None) -> int:
    from fedseg.report import format_table, load_results

    p = argparse.ArgumentParser(prog="python -m fedseg.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job")
    p.add_argument("--data", required=True, help="folder with one <site>/datalist.json per site (site-1..site-N)")
    p.add_argument("-n", "--clients", type=int, default=4)
    p.add_argument("-w", "--workspace", required=True)
    p.add_argument("-t", "--threads", type=int)
    p.add_argument("-gpu", "--gpu", help="GPU ids as for nvflare simulator -gpu, e.g. 0 or 0,1")
    o = p.parse_args(argv)
    print(f"running {o.job} in the NVFlare simulator with {o.clients} sites (workspace {o.workspace}) ...", flush=True)
    result = run_simulator(o.job, o.workspace, o.clients, o.data, o.threads, o.gpu)
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
