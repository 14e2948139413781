"""The README's quick start stays true: its recipe example builds every method's job (exported through NVFlare's
own Recipe.export), and every job folder its simulator commands name exists. Running them is tests/test_recipes.py
(SimEnv) and tests/test_export.py (plain `nvflare simulator jobs/<name>`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _block(after: str, lang: str) -> str:
    text = README.read_text()
    assert after in text, f"README lost its {after!r} part"
    return text.split(after, 1)[1].split(f"```{lang}", 1)[1].split("```", 1)[0]


def test_readme_recipe_example_builds_every_method(tmp_path):
    code = _block("**The recipe way**", "python")
    assert ".execute(env)" in code
    script = tmp_path / "readme_job.py"
    # the README's code as written, except that each recipe is exported instead of executed
    script.write_text("OUT = " + repr(str(tmp_path / "jobs")) + "\n" + code.replace(".execute(env)", ".export(OUT)"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "custom")}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    controllers = {}
    for job in sorted((tmp_path / "jobs").iterdir()):
        server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
        controllers[job.name] = [w["path"] for w in server["workflows"]][0]
        client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
        assert not (job / "app" / "custom").exists(), f"{job.name}: the job carries code"
        assert client["executors"][0]["executor"]["path"].startswith("fedseg.fl.executor.")
    assert controllers == {
        "fedavg": "fedseg.fl.fedavg_controller.FedAvgController",
        "fedsm": "fedseg.fl.fedsm_controller.FedSMController",
        "fedcross": "fedseg.fl.fedcross_controller.FedCrossController",
        "fedcrossens": "fedseg.fl.fedcross_controller.FedCrossController",
    }
    fedcrossens = json.loads((tmp_path / "jobs" / "fedcrossens" / "app" / "config" / "config_fed_server.json").read_text())
    assert fedcrossens["workflows"][0]["args"]["num_models"] == 4


def test_readme_simulator_commands_name_shipped_job_folders():
    commands = _block("**The job-folder way**", "bash")
    named = re.findall(r"nvflare simulator (jobs/\w+)", commands)
    assert named, "the README shows no `nvflare simulator jobs/<name>` command"
    for job in named:
        assert (REPO / job / "meta.json").is_file(), f"README names {job}, which is not a job folder"
