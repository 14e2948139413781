"""Experiment tracking: importing the MLflow receiver turns mlflow's telemetry off. (The server's per-round
metrics in MLflow and TensorBoard, in a real simulator run of a tiny FedSM job: tests/test_fedsm.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import CUSTOM


def test_importing_the_receiver_turns_mlflow_telemetry_off(tmp_path):
    """mlflow's telemetry would send to the internet; a site has no such egress. In a clean environment (no CI or
    pytest variables, which mlflow itself treats as 'do not send'), importing the receiver leaves no client."""
    code = (
        "import fedseg.fl.tracking\nfrom mlflow.telemetry.client import get_telemetry_client\nprint(get_telemetry_client())\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(CUSTOM)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "None", out.stdout
