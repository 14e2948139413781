"""Quick checks of the POC tool's pure parts (poc/poc_federation): project rendering, the parsing of what the
`nvflare job` CLI and the admin console print, GPU requests, port locks, and finding a POC's processes through
psutil (also orphans of a crashed tool). The POC itself runs in tests/test_poc.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "poc"))
from poc_federation.common import MARK_ENV, PROJECT_TEMPLATE, PocError  # noqa: E402
from poc_federation.gpus import asks_for_gpus, resolve_gpus  # noqa: E402
from poc_federation.ports import lock_is_stale  # noqa: E402
from poc_federation.processes import find_processes, is_alive, is_loopback, kill_tree  # noqa: E402
from poc_federation.provision import hospital_names, org_of, participants_of, render_project  # noqa: E402
from poc_federation.submission import console_job_id, console_job_status, finished_status, json_envelope  # noqa: E402

JOB_ID = "9c8689a7-89a4-4014-a4a4-2daf5b27b7d4"


def test_render_project_sets_sites_and_port_on_the_template():
    project = render_project(PROJECT_TEMPLATE, ["hospital-a", "st.mary"], 18555)
    server = participants_of(project, "server")
    assert len(server) == 1 and server[0]["fed_learn_port"] == 18555 and "admin_port" not in server[0]
    assert participants_of(project, "client") == [
        {"name": "hospital-a", "type": "client", "org": "hospital_a"},
        {"name": "st.mary", "type": "client", "org": "st_mary"},
    ]
    assert project["participants"][0]["type"] == "server"  # server first, then the sites, then the admins
    assert {p["role"] for p in participants_of(project, "admin")} >= {"project_admin", "lead", "member"}
    template_sites = [p["name"] for p in participants_of(render_project(PROJECT_TEMPLATE, None, 1), "client")]
    assert template_sites == hospital_names(3)
    with pytest.raises(PocError, match="no client sites"):
        render_project(PROJECT_TEMPLATE, [], 18555)


def test_site_names():
    assert hospital_names(2) == ["hospital-a", "hospital-b"] and len(hospital_names(26)) == 26
    for n in (0, 27):
        with pytest.raises(PocError, match="--sites must be between 1 and 26"):
            hospital_names(n)
    assert org_of("hospital-a.b c") == "hospital_a_b_c"


def test_cli_and_console_replies_are_parsed():
    submitted = f'Trying to connect...\n{{\n  "status": "ok",\n  "data": {{"job_id": "{JOB_ID}"}}\n}}\n'
    assert json_envelope(submitted)["data"]["job_id"] == JOB_ID
    assert json_envelope('{"a": 1}') == {"a": 1} and json_envelope("no json here") == {}
    waited = {"status": "ok", "data": {"job": {"job_status": "FINISHED:COMPLETED"}, "others": [{"status": "RUNNING"}]}}
    assert finished_status(waited) == "FINISHED:COMPLETED"
    assert finished_status([{"status": "RUNNING"}, {"x": {"status": "FINISHED:ABORTED"}}]) == "FINISHED:ABORTED"
    assert finished_status({"status": "RUNNING"}) == "" and finished_status("FINISHED:COMPLETED") == ""
    listed = f'> list_jobs -d {JOB_ID}\n{{"job_id": "{JOB_ID}", "status": "FINISHED:COMPLETED", "name": "fedavg"}}'
    assert console_job_status(listed) == "FINISHED:COMPLETED" and console_job_status("Done") == ""
    assert console_job_id(f"> submit_job fedavg\nSubmitted job: {JOB_ID}\nDone") == JOB_ID
    assert console_job_id("Error: user 'member@hospital-a.org' is not authorized for 'submit_job'") is None


def test_gpu_requests():
    assert asks_for_gpus({"@default": {"num_of_gpus": 1}}) and asks_for_gpus({"site-1": {"num_of_gpus": 2}})
    assert not asks_for_gpus({"@default": {"num_of_gpus": 0}}) and not asks_for_gpus({}) and not asks_for_gpus(None)
    assert resolve_gpus("none") == ([], 0.0) and resolve_gpus("cpu") == ([], 0.0)
    ids, mem = resolve_gpus("0,1")
    assert ids == [0, 1] and mem > 0


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5"]))


def test_port_lock_staleness(tmp_path):
    live_pid = os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    root = tmp_path / "root"
    root.mkdir()
    assert not lock_is_stale({"root": str(tmp_path / "gone"), "pid": live_pid}, 18600)  # its process is alive
    assert lock_is_stale({"root": str(tmp_path / "gone"), "pid": dead_pid}, 18600)  # root gone
    assert lock_is_stale({"root": str(root), "pid": dead_pid}, 18600)  # root never prepared
    (root / "state.json").write_text(json.dumps({"port": 18600}))
    assert not lock_is_stale({"root": str(root), "pid": dead_pid}, 18600)  # the prepared POC still uses it
    assert lock_is_stale({"root": str(root), "pid": dead_pid}, 18601)  # ... but another port no more


def test_orphans_of_a_crashed_tool_are_found_by_their_marker(tmp_path):
    """A tool that dies right after starting a process (no state, no session recorded): its orphan is found through
    the marker variable, and the orphan's child in a session of its own, without the marker, as a descendant."""
    root = tmp_path / "root"
    pid_file = tmp_path / "pids"
    child = "import subprocess, sys, time; subprocess.Popen(['sleep', '300'], env={}, start_new_session=True); time.sleep(300)"
    tool = (
        f"import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True, "
        f"env=dict(os.environ, {MARK_ENV}={str(root)!r})); open({str(pid_file)!r}, 'w').write(str(p.pid)); os._exit(1)"
    )
    assert subprocess.run([sys.executable, "-c", tool], timeout=60).returncode == 1  # the "tool" crashed
    orphan = int(pid_file.read_text())
    try:
        deadline = time.monotonic() + 30
        found = {}
        while time.monotonic() < deadline and len(found) < 2:
            found = find_processes(root)
            time.sleep(0.2)
        assert orphan in found and len(found) == 2, found
        (grandchild,) = set(found) - {orphan}
        assert "sleep 300" in found[grandchild]
        assert os.getsid(grandchild) != os.getsid(orphan) and MARK_ENV not in psutil.Process(grandchild).environ()
        assert find_processes(tmp_path / "another_root") == {}
    finally:
        kill_tree(orphan)
    for pid in found:
        assert not is_alive(pid)
    assert find_processes(root) == {}
