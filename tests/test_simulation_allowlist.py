"""`python -m fedseg.fl.allowlist --simulation <workspace>`: the one set-up command before the plain
`nvflare simulator jobs/<name> -w <workspace>` (the runs themselves are in test_export.py). A fresh workspace gets
FedSeg's list, a workspace with its own policy keeps it, and nothing is written through a symlink."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import CUSTOM

from fedseg.fl.allowlist import FEDSEG_CLASSES, needed_classes


def prepare(workspace) -> subprocess.CompletedProcess:
    """The command as typed, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "fedseg.fl.allowlist", "--simulation", str(workspace)],
        env={**os.environ, "PYTHONPATH": str(CUSTOM)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_fresh_workspace_gets_exactly_fedsegs_classes(tmp_path):
    out = prepare(tmp_path / "ws")
    assert out.returncode == 0, out.stderr
    resources = json.loads((tmp_path / "ws" / "local" / "resources.json").read_text())
    assert resources["class_allow_list"] == list(needed_classes("all"))
    assert set(FEDSEG_CLASSES) <= set(resources["class_allow_list"]) and "*" not in resources["class_allow_list"]
    assert resources["class_list_enforcement_mode"] == "enforce" and resources["allow_log_streaming"] is False
    assert "wrote" in out.stdout
    again = prepare(tmp_path / "ws")  # a second run (the same workspace, the next simulation) keeps what is there
    assert again.returncode == 0 and "kept" in again.stdout


def test_an_existing_simulation_policy_is_kept(tmp_path):
    for name in ("resources.json", "resources.json.default"):
        local = tmp_path / name / "local"
        local.mkdir(parents=True)
        own = {"class_allow_list": ["nvflare.app_common.workflows.fedavg.FedAvg"], "class_list_enforcement_mode": "enforce"}
        (local / name).write_text(json.dumps(own))
        out = prepare(tmp_path / name)
        assert out.returncode == 0 and "kept" in out.stdout, out.stderr
        assert json.loads((local / name).read_text()) == own and sorted(os.listdir(local)) == [name]


def test_a_symlinked_resources_json_is_never_written_through(tmp_path):
    """A dangling local/resources.json symlink (or a symlinked local/) would make the write land at the link's
    target: the command refuses, naming the link, and the link stays as it is."""
    target = tmp_path / "elsewhere" / "resources.json"
    target.parent.mkdir()
    ws = tmp_path / "ws"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / "resources.json").symlink_to(target)
    out = prepare(ws)
    assert out.returncode == 1 and "symlink" in out.stderr and str(ws / "local" / "resources.json") in out.stderr
    assert not target.exists() and (ws / "local" / "resources.json").is_symlink()

    ws2 = tmp_path / "ws2"
    ws2.mkdir()
    (ws2 / "local").symlink_to(target.parent, target_is_directory=True)
    out = prepare(ws2)
    assert out.returncode == 1 and "symlink" in out.stderr
    assert not target.exists() and not os.listdir(target.parent)
