"""Quick checks of the POC tool's pure parts (poc/poc_federation): project rendering, the parsing of what the
`nvflare job` CLI and the admin console print, GPU requests, port locks, and finding a POC's processes through
psutil (also orphans of a crashed tool). Ports and processes are fedseg_tools.localhost_poc's, shared with
FedSegPocEnv: the rules merged from the two former copies are checked here. The POC itself runs in
tests/test_poc.py."""

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
from poc_federation.ports import (  # noqa: E402
    PORT_LOCK_DIR,
    PORT_RANGE,
    acquire_port,
    lock_is_stale,
    port_lock_file,
    release_port,
    reserve_port,
)
from poc_federation.processes import find_processes, is_alive, is_loopback, kill_tree  # noqa: E402
from poc_federation.provision import hospital_names, org_of, participants_of, render_project  # noqa: E402
from poc_federation.submission import console_job_id, console_job_status, finished_status, json_envelope  # noqa: E402

from fedseg_tools import poc_env  # noqa: E402
from fedseg_tools.localhost_poc import POC_ENV_PORTS, POC_TOOL_PORTS  # noqa: E402

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
    # a root without state.json (a FedSegPocEnv workspace, or a tool root whose prepare failed) keeps its lock: the
    # stricter of the two former rules (a crashed run's POC may still be starting there)
    assert not lock_is_stale({"root": str(root), "pid": dead_pid}, 18600)
    (root / "state.json").write_text(json.dumps({"port": 18600}))
    assert not lock_is_stale({"root": str(root), "pid": dead_pid}, 18600)  # the prepared POC still uses it
    assert lock_is_stale({"root": str(root), "pid": dead_pid}, 18601)  # ... but another port no more
    (root / "state.json").write_text("{")
    assert not lock_is_stale({"root": str(root), "pid": dead_pid}, 18601)  # unreadable state: keep the lock


def test_an_unreadable_port_lock_is_never_taken_over(tmp_path):
    """Its owner may be between creating and writing it (slow on a loaded machine): even an old one is kept."""
    owner, other = tmp_path / "owner", tmp_path / "other"
    port = reserve_port(owner)
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1] and port_lock_file(port).parent == PORT_LOCK_DIR
    try:
        assert acquire_port(port, owner) and not acquire_port(port, other)
        port_lock_file(port).write_text('{"root": "/tmp/x", "pi')  # a lock half written
        old = time.time() - 3600
        os.utime(port_lock_file(port), (old, old))
        assert not acquire_port(port, other) and not acquire_port(port, owner)
    finally:
        port_lock_file(port).unlink(missing_ok=True)
    assert acquire_port(port, other)
    release_port(port, other)
    assert not port_lock_file(port).exists()


def test_the_tool_and_fedseg_poc_env_take_ports_from_disjoint_ranges():
    assert PORT_RANGE == POC_TOOL_PORTS and poc_env.PORT_RANGE == POC_ENV_PORTS
    assert POC_TOOL_PORTS[1] < POC_ENV_PORTS[0] or POC_ENV_PORTS[1] < POC_TOOL_PORTS[0]
    assert max(POC_TOOL_PORTS[1], POC_ENV_PORTS[1]) < 32768  # below the kernel's ephemeral range


def processes_of(root, at_least: int, timeout: float = 30) -> dict[int, str]:
    """find_processes(root) once it finds at least that many (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    found = find_processes(root)
    while len(found) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        found = find_processes(root)
    return found


def test_a_process_that_only_names_the_root_is_not_of_the_poc(tmp_path):
    """find_processes takes a process by its command line only when it is NVFlare's (or a kit's startup script): an
    editor or a `tail` of a log under the root is no process of the POC, and stop would kill it."""
    root = tmp_path / "root"
    sleeper = "import time; time.sleep(300)"
    bystander = subprocess.Popen([sys.executable, "-c", sleeper, f"{root}/logs/server.log"])
    flare = subprocess.Popen([sys.executable, "-c", sleeper, "-m", "nvflare.private.fed.app.server.server_train", str(root)])
    kit = subprocess.Popen([sys.executable, "-c", sleeper, f"{root}/prod_00/site-1/startup/sub_start.sh"])
    try:
        for p in (bystander, flare, kit):  # all three running their command line before the POC's are looked for
            deadline = time.monotonic() + 30
            while psutil.Process(p.pid).cmdline()[:2] != [sys.executable, "-c"] and time.monotonic() < deadline:
                time.sleep(0.1)
        found = processes_of(root, at_least=2)
        assert set(found) == {flare.pid, kit.pid}, found
    finally:
        for p in (bystander, flare, kit):
            p.kill()
            p.wait()


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
        found = processes_of(root, at_least=2)
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
