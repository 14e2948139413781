"""custom/sitecustomize.py: which workspace an `nvflare simulator` command line names, and that the simulation
allow-list is never written through a symlink."""

from __future__ import annotations

import json
import os

import pytest
import sitecustomize
from conftest import CUSTOM

from fedseg.fl.allowlist import FEDSEG_CLASSES

assert os.path.dirname(os.path.abspath(sitecustomize.__file__)) == str(CUSTOM)


@pytest.mark.parametrize(
    "args",
    [
        ["-w", "WS"],
        ["-wWS"],
        ["-w=WS"],
        ["--workspace", "WS"],
        ["--workspace=WS"],
        ["--work", "WS"],
        ["--work=WS"],
        ["--wo", "WS"],
        ["-n", "2", "-t", "2", "--work", "WS"],
        ["-n2", "-wWS", "-t2"],
    ],
)
def test_every_form_argparse_accepts_names_the_workspace(args):
    assert sitecustomize.simulator_workspace(["/venv/bin/nvflare", "simulator", "jobs/fedavg", *args]) == "WS"
    assert sitecustomize.simulator_workspace(["/venv/bin/nvflare", "simulator", *args, "jobs/fedavg"]) == "WS"


def test_other_command_lines():
    assert sitecustomize.simulator_workspace(["nvflare", "simulator", "jobs/fedavg"]) == "simulator_workspace"
    assert sitecustomize.simulator_workspace(["nvflare", "poc", "prepare"]) is None
    assert sitecustomize.simulator_workspace(["python", "simulator", "-w", "WS"]) is None


def test_a_symlinked_resources_json_is_never_written_through(tmp_path):
    """A dangling local/resources.json symlink (or a symlinked local/) would make the write land at the link's
    target: nothing is written there, and the link stays as it is."""
    target = tmp_path / "elsewhere" / "resources.json"
    target.parent.mkdir()
    ws = tmp_path / "ws"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / "resources.json").symlink_to(target)
    assert sitecustomize.allow_fedseg_in_simulation(str(ws)) is None
    assert not target.exists() and (ws / "local" / "resources.json").is_symlink()

    ws2 = tmp_path / "ws2"
    ws2.mkdir()
    (ws2 / "local").symlink_to(target.parent, target_is_directory=True)
    assert sitecustomize.allow_fedseg_in_simulation(str(ws2)) is None
    assert not target.exists()

    ws3 = tmp_path / "ws3"  # a plain fresh workspace still gets the list
    written = sitecustomize.allow_fedseg_in_simulation(str(ws3))
    assert written and set(FEDSEG_CLASSES) <= set(
        json.loads((ws3 / "local" / "resources.json").read_text())["class_allow_list"]
    )
