#!/usr/bin/env python3
"""Submit a FedSeg job with the FLARE API, wait for it, download the result and print the per-site Dice table.

Works with any admin startup kit: the POC's (workspaces/poc/flare/<project>/prod_00/<user>) or one that
provisioning made for a real deployment. The job is signed with the kit's certificate on submission.

    python poc/submit.py --kit PATH/TO/lead@hospital-a.org --job jobs/fedavg [--user lead@hospital-a.org]
                         [--timeout 3600] [--download DIR] [--no-wait] [--abort-on-timeout]

Exit code: 0 when the job finished with status FINISHED:COMPLETED, 1 otherwise, 2 when the server refused
the submission (e.g. a "member" user: no submit_job right).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMPLETED = "FINISHED:COMPLETED"


@dataclass
class JobOutcome:
    job_id: str
    status: str = ""
    result_dir: str | None = None
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def kit_user(kit: str | os.PathLike) -> str:
    """A provisioned admin kit's folder is named after its user (the certificate's common name)."""
    return Path(kit).resolve().name


def open_session(kit: str | os.PathLike, user: str | None = None, timeout: float = 30.0, retry_for: float = 120.0):
    """Log in with the kit. A busy or just-started server can fail the login handshake (e.g. an empty
    certificate challenge): that is retried for `retry_for` seconds; a refused authorization is not."""
    from nvflare.fuel.flare_api.api_spec import AuthorizationError
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    deadline = time.monotonic() + retry_for
    while True:
        try:
            return new_secure_session(user or kit_user(kit), str(Path(kit).resolve()), timeout=timeout)
        except AuthorizationError:
            raise
        except Exception as e:  # noqa: BLE001 - transient connection/handshake failures
            if time.monotonic() > deadline:
                raise
            print(f"login as {user or kit_user(kit)} failed ({type(e).__name__}: {e}); retrying", flush=True)
            time.sleep(3)


def submit_job(
    kit: str | os.PathLike,
    job_dir: str | os.PathLike,
    user: str | None = None,
    wait: bool = True,
    timeout: float = 3600.0,
    download_to: str | os.PathLike | None = None,
    poll_interval: float = 2.0,
    abort_on_timeout: bool = False,
    log=print,
) -> JobOutcome:
    """Submit job_dir as `user` (default: the kit's name); optionally wait and download the result.

    Raises nvflare.fuel.flare_api.api_spec.AuthorizationError when the user may not submit jobs, and
    TimeoutError when the job is not done within `timeout` seconds (it is aborted first if
    abort_on_timeout).
    """
    from nvflare.fuel.flare_api.api_spec import MonitorReturnCode

    start = time.perf_counter()
    session = open_session(kit, user)
    try:
        job_id = session.submit_job(str(Path(job_dir).resolve()))
        log(f"submitted {Path(job_dir).name} as {user or kit_user(kit)} (FLARE API): job {job_id}")
        outcome = JobOutcome(job_id=job_id)
        if not wait:
            return outcome
        rc, meta = session.monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=poll_interval)
        outcome.meta = meta or session.get_job_meta(job_id) or {}
        outcome.status = str(outcome.meta.get("status", ""))
        outcome.seconds = time.perf_counter() - start
        if rc == MonitorReturnCode.TIMEOUT:
            if abort_on_timeout:
                try:
                    session.abort_job(job_id)
                except Exception as e:  # noqa: BLE001 - best effort, the timeout is the error to report
                    log(f"abort of job {job_id} failed: {e}")
            raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (status {outcome.status or '?'})")
        log(f"job {job_id}: {outcome.status} after {outcome.seconds:.0f}s")
        if download_to is not None:  # "" : leave it in the kit's transfer/ folder
            if download_to:
                Path(download_to).mkdir(parents=True, exist_ok=True)
            outcome.result_dir = session.download_job_result(job_id, destination=str(download_to) or None)
            log(f"result downloaded to {outcome.result_dir}")
        return outcome
    finally:
        session.close()


def print_results(result_dir: str | os.PathLike, log=print) -> bool:
    """Print the per-site Dice table of a downloaded job; False when the result has none."""
    if str(REPO / "custom") not in sys.path:
        try:
            import fedseg  # noqa: F401
        except ImportError:
            sys.path.insert(0, str(REPO / "custom"))
    from fedseg.report import format_table, load_results

    try:
        log(format_table(load_results(result_dir)))
        return True
    except FileNotFoundError as e:
        log(str(e))
        return False


def main(argv: list[str] | None = None) -> int:
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    p = argparse.ArgumentParser(prog="poc/submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", required=True, help="admin startup kit folder (holds startup/fed_admin.json)")
    p.add_argument("--job", required=True, help="job folder, e.g. jobs/fedavg")
    p.add_argument("--user", help="user name (default: the kit folder's name)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job (default 3600)")
    p.add_argument("--download", help="move the downloaded result here (default: the kit's transfer/ folder)")
    p.add_argument("--no-wait", action="store_true", help="only submit and print the job id")
    p.add_argument("--abort-on-timeout", action="store_true")
    o = p.parse_args(argv)
    try:
        outcome = submit_job(o.kit, o.job, o.user, wait=not o.no_wait, timeout=o.timeout,
                             download_to=None if o.no_wait else (o.download or ""),
                             abort_on_timeout=o.abort_on_timeout)
    except AuthorizationError as e:
        print(f"submission refused: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 1
    if o.no_wait:
        print(json.dumps({"job_id": outcome.job_id}))
        return 0
    if outcome.result_dir:
        print_results(outcome.result_dir)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
