"""Submission through the `nvflare job` CLI and through the admin console (fl_admin.sh), and the parsing of
what they print. `fed` is the PocFederation: its kits, and its way of running commands in the POC's
environment. (The FLARE API way is flare_api.)"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from . import flare_api
from .common import PocError, log


def json_envelope(text: str):
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


def finished_status(obj) -> str:
    """The first FINISHED:* value of a job_status or status key anywhere in a parsed reply; '' when none."""
    if isinstance(obj, dict):
        for key in ("job_status", "status"):
            value = obj.get(key)
            if isinstance(value, str) and value.startswith("FINISHED"):
                return value
        values = list(obj.values())
    elif isinstance(obj, list):
        values = obj
    else:
        return ""
    for value in values:
        found = finished_status(value)
        if found:
            return found
    return ""


def console_job_status(text: str) -> str:
    """The job status in the output of the console's `list_jobs -d <id>` (the job's meta as JSON)."""
    m = re.search(r'"status":\s*"([A-Z_:]+)"', text)
    return m.group(1) if m else ""


def console_job_id(text: str) -> str | None:
    """The job id in the console's reply to `submit_job`; None when the submission was refused."""
    m = re.search(r"Submitted job:\s*([0-9a-fA-F-]{36})", text)
    return m.group(1) if m else None


# ---- `nvflare job` CLI ------------------------------------------------------------------------------


def submit_with_cli(fed, staged: Path, user: str, timeout: float, wait: bool, results: Path):
    """`nvflare job submit`, `job wait` and `job download` with the user's kit: (job id, status, result folder)."""
    kit = str(fed.kit(user))
    out = fed.nvflare(
        "--format",
        "json",
        "job",
        "submit",
        "-j",
        str(staged),
        "--startup-kit",
        kit,
        timeout=120,
        check=False,
        log_name="cli.log",
    )
    reply = json_envelope(out.stdout)
    job_id = (reply.get("data") or {}).get("job_id") if isinstance(reply, dict) else None
    if out.returncode != 0 or not job_id:
        raise PocError(f"nvflare job submit failed (rc={out.returncode}): {out.stdout[-2000:]}")
    log(f"submitted {staged.name} as {user} (nvflare job submit): job {job_id}")
    if not wait:
        return job_id, "", None
    out = fed.nvflare(
        "--format",
        "json",
        "job",
        "wait",
        job_id,
        "--timeout",
        str(int(timeout)),
        "--interval",
        "2",
        "--startup-kit",
        kit,
        timeout=timeout + 60,
        check=False,
        log_name="cli.log",
    )
    status = finished_status(json_envelope(out.stdout)) or flare_api.job_status(kit, user, job_id)
    log(f"job {job_id}: {status}")
    out = fed.nvflare(
        "job",
        "download",
        job_id,
        "-o",
        str(results),
        "--force",
        "--startup-kit",
        kit,  # -> results/<id>
        timeout=300,
        check=False,
        log_name="cli.log",
    )
    result_dir = results / job_id
    if out.returncode != 0 or not result_dir.exists():
        raise PocError(f"nvflare job download failed: {out.stdout[-2000:]}")
    log(f"result downloaded to {result_dir}")
    return job_id, status, str(result_dir)


# ---- admin console ----------------------------------------------------------------------------------


def console(fed, user: str, commands: list[str], timeout: float = 120) -> str:
    """Run admin-console commands through the kit's fl_admin.sh (stdin), return its output."""
    script = fed.kit(user) / "startup" / "fl_admin.sh"
    out = fed.run_cmd(
        ["bash", str(script)],
        timeout=timeout,
        input_text="\n".join(commands + ["bye"]) + "\n",
        check=False,
        log_name="console.log",
    )
    return out.stdout


def console_submit(fed, user: str, staged: Path) -> tuple[str | None, str]:
    """`submit_job <folder>` in the admin console of `user`: (job id or None when refused, console output)."""
    dest = fed.kit(user) / "transfer" / staged.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(staged, dest)  # submit_job takes a folder name relative to the kit's transfer/ (upload_dir)
    out = console(fed, user, [f"submit_job {staged.name}"])
    return console_job_id(out), out


def submit_with_console(fed, staged: Path, user: str, timeout: float, wait: bool, results: Path):
    """submit_job, list_jobs -d until finished, download_job in the user's admin console: (job id, status,
    result folder)."""
    transfer = fed.kit(user) / "transfer"
    job_id, out = console_submit(fed, user, staged)
    if not job_id:
        raise PocError(f"submit_job through the admin console failed:\n{out[-2000:]}")
    log(f"submitted {staged.name} as {user} (admin console submit_job): job {job_id}")
    if not wait:
        return job_id, "", None
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        out = console(fed, user, [f"list_jobs -d {job_id}"])
        status = console_job_status(out)
        if status.startswith("FINISHED"):
            break
        time.sleep(3)
    else:
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s (status {status or '?'})")
    log(f"job {job_id}: {status}")
    out = console(fed, user, [f"download_job {job_id}"], timeout=300)
    downloaded = transfer / job_id
    if not downloaded.exists():
        raise PocError(f"download_job failed:\n{out[-2000:]}")
    result_dir = results / job_id
    shutil.rmtree(result_dir, ignore_errors=True)
    shutil.move(str(downloaded), result_dir)
    log(f"result downloaded to {result_dir}")
    return job_id, status, str(result_dir)
