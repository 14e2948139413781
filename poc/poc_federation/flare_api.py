"""Submission through the FLARE API with any admin startup kit (the POC's, or one that provisioning made for a
real deployment): log in, submit (the job is signed with the kit's certificate), wait, download."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def job_status(kit: str | os.PathLike, user: str, job_id: str) -> str:
    """The job's status as the server reports it to `user`."""
    session = open_session(kit, user)
    try:
        return str(session.get_job_status(job_id) or "")
    finally:
        session.close()
