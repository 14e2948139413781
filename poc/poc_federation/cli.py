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
import signal

from .common import DEFAULT_JOB, DEFAULT_PORT, DEFAULT_ROOT, PROJECT_ADMIN, SUBMIT_WAYS, PocError, log
from .federation import PocFederation
from .provision import hospital_names
from .report import print_results


def _print_table(result_dir: str | None) -> bool:
    return bool(result_dir) and print_results(result_dir)


def _install_signal_handlers() -> None:
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    # Ctrl-C too, explicitly: a process started in the background of a non-interactive shell (a CI script, `cmd &`)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the federation would run on
    signal.signal(signal.SIGINT, raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python poc/fedseg_poc.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root",
        default=os.environ.get("FEDSEG_POC_ROOT_DIR", str(DEFAULT_ROOT)),
        help="POC root folder (default workspaces/poc; env FEDSEG_POC_ROOT_DIR)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def prepare_args(sp):
        sp.add_argument(
            "--sites", type=int, help="number of hospital sites hospital-a.. (default: the 3 in poc/project_poc.yml)"
        )
        sp.add_argument("--site-names", help="comma-separated site names instead of --sites")
        sp.add_argument(
            "--port",
            type=int,
            default=int(os.environ.get("FEDSEG_POC_PORT", DEFAULT_PORT)),
            help=f"server FL and admin port on 127.0.0.1 (default {DEFAULT_PORT}; env FEDSEG_POC_PORT; "
            "0: a free port, reserved for this POC)",
        )
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
        fed.prepare(
            sites=sites,
            port=o.port,
            data=o.data,
            size=o.size,
            dims=o.dims,
            seed=o.seed,
            gpus=o.gpus,
            gpu_job_mem=o.gpu_job_mem,
            privacy_sites=[s for s in o.privacy.split(",") if s],
        )

    def do_submit(wait: bool) -> int:
        result = fed.submit(o.job, via=o.submit, user=o.user, timeout=o.timeout, wait=wait, scope=o.scope, num_rounds=o.rounds)
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
