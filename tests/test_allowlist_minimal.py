"""The class allow-list FedSeg writes is minimal: exactly the classes FedSeg's shipped jobs, its Recipes and its
privacy scope reference (recomputed here from those sources), per side; log streaming is off; `--check` fails on
anything more, naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUSTOM, JOBS, REPO
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from fedseg.fl import allowlist

LOG_STREAMER = "nvflare.app_common.logging.job_log_streamer.JobLogStreamer"


def _paths(obj):
    if isinstance(obj, dict):
        for key in ("path", "class_path"):
            if isinstance(obj.get(key), str):
                yield obj[key]
        for value in obj.values():
            yield from _paths(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _paths(value)


def referenced_classes(tmp_path: Path) -> dict[str, set[str]]:
    """What FedSeg's jobs reference, by side: jobs/, fedseg.jobgen's output (with the meter), every Recipe with every
    tracking choice, the meter and cross-site evaluation, and the shipped privacy scope (poc/privacy.json)."""
    from fedseg import jobgen
    from fedseg.recipes import TRACKING, FedAvgRecipe, FedBNRecipe, FedCrossRecipe, FedProxRecipe, FedSMRecipe

    assert jobgen.main(["--out", str(tmp_path / "gen"), "--meter"]) == 0
    for cls in (FedAvgRecipe, FedProxRecipe, FedBNRecipe, FedSMRecipe, FedCrossRecipe):
        for tracking in TRACKING:
            extra = {"cross_site_eval": True} if cls in (FedAvgRecipe, FedProxRecipe) else {}
            cls(tracking=tracking, meter=True, **extra).export(str(tmp_path / "recipes" / f"{cls.__name__}_{tracking}"))
    sides = {"site": set(), "server": set()}
    for root in (JOBS, tmp_path):
        for config in root.rglob("config_fed_*.json"):
            sides["site" if "client" in config.name else "server"] |= set(_paths(json.loads(config.read_text())))
    sides["site"] |= set(_paths(json.loads((REPO / "poc" / "privacy.json").read_text())))
    return sides


def test_allow_list_is_exactly_what_fedseg_jobs_reference(tmp_path):
    sides = referenced_classes(tmp_path)
    assert set(allowlist.SITE_CLASSES) == sides["site"]
    assert set(allowlist.SERVER_CLASSES) == sides["server"]
    assert "fedseg.fl.tracking.MLflowServerReceiver" not in allowlist.SITE_CLASSES  # the server's receiver only
    assert LOG_STREAMER not in allowlist.needed_classes("all")


def _kit(tmp_path: Path, name: str, role: str) -> Path:
    """A provisioned kit: startup/fed_client.json (site) or fed_server.json (server), NVFlare's default list with
    log streaming allowed in resources.json.default, and FedSeg's authorization policy."""
    kit = tmp_path / name
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    (kit / "startup" / ("fed_server.json" if role == "server" else "fed_client.json")).write_text("{}")
    default = {"format_version": 2, "allow_log_streaming": True, "class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST)}
    (kit / "local" / "resources.json.default").write_text(json.dumps(default))
    shutil.copy(REPO / "poc" / "authorization.json", kit / "local" / "authorization.json")
    return kit


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedseg.fl.allowlist", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(CUSTOM), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("role", ["site", "server"])
def test_tool_writes_the_minimal_list_with_log_streaming_off(tmp_path, role):
    kit = _kit(tmp_path, "hospital-a" if role == "site" else "server", role)
    out = _tool(kit)
    assert out.returncode == 0, out.stdout + out.stderr
    written = json.loads((kit / "local" / "resources.json").read_text())
    assert written["class_allow_list"] == list(allowlist.needed_classes(role))
    assert written["allow_log_streaming"] is False and written["class_list_enforcement_mode"] == "enforce"
    assert written["format_version"] == 2  # the rest of the kit's settings is kept
    check = _tool(kit, "--check")
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def test_check_fails_on_log_streaming_and_on_classes_beyond_fedsegs_needs(tmp_path):
    kit = _kit(tmp_path, "hospital-b", "site")
    # what an older FedSeg wrote: NVFlare's default list plus FedSeg's classes, streaming left on
    old = {"allow_log_streaming": True, "class_allow_list": [*DEFAULT_CLASS_ALLOW_LIST, *allowlist.FEDSEG_CLASSES]}
    (kit / "local" / "resources.json").write_text(json.dumps(old))
    out = _tool(kit, "--check")
    assert out.returncode == 1, out.stdout
    assert "allow_log_streaming" in out.stdout and LOG_STREAMER in out.stdout, out.stdout
    assert "nvflare.app_common.workflows.fedavg.FedAvg" in out.stdout  # an extra entry, named
    assert "fedseg.fl.tracking.MLflowServerReceiver" in out.stdout  # the server's receiver is extra at a site
    # streaming switched off but one extra class: still a failure, naming only that class
    (kit / "local" / "resources.json").write_text(
        json.dumps({"allow_log_streaming": False, "class_allow_list": [*allowlist.SITE_CLASSES, LOG_STREAMER]})
    )
    out = _tool(kit, "--check")
    assert out.returncode == 1 and LOG_STREAMER in out.stdout and "allow_log_streaming" not in out.stdout, out.stdout
