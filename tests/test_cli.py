"""The `fedseg` command: its dispatch, and `pip install ./custom` into a fresh venv giving a working `fedseg`.

The fresh venv sees the project venv's packages through a .pth file (no download of torch and NVFlare again on
a 2-core CI machine without them cached) and installs the package with --no-deps; the installed metadata is
checked to declare every runtime dependency, so a plain `pip install ./custom` pulls them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import CUSTOM, REPO

from fedseg_tools import cli


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{cmd}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_every_command_names_a_module_main():
    """Every subcommand's target exists and is callable (imports each module: the lazy table is not stale)."""
    for table in (cli.COMMANDS, cli.DATA_COMMANDS):
        for name, (target, summary) in table.items():
            assert summary and callable(cli.load(target)), name


def test_help_lists_commands_without_importing_torch():
    code = "import sys; from fedseg_tools.cli import main; main(['--help']); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nvflare', 'monai')))"
    out = run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(CUSTOM)})
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out.stdout, name
    assert out.stdout.strip().splitlines()[-1] == "[]"  # no torch, NVFlare or MONAI loaded for the help


def test_subcommand_help_is_the_modules_own(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["data", "synthetic", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "fedseg.data.synthetic" in out and "--sites" in out and "--overwrite" in out  # the module's own parser


def test_unknown_command_is_refused(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_data_synthetic_and_validate(tmp_path, capsys):
    assert cli.main(["data", "synthetic", "--out", str(tmp_path / "d"), "--sites", "2", "--size", "tiny"]) == 0
    datalist = tmp_path / "d" / "site-1" / "datalist.json"
    assert cli.main(["data", "validate", str(datalist)]) == 0
    assert '"site": "site-1"' in capsys.readouterr().out
    broken = next((tmp_path / "d" / "site-1").rglob("*.nii.gz"))
    broken.write_bytes(b"not a nifti")
    assert cli.main(["data", "validate", str(datalist)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("INVALID:") and "site-1" in err


def test_poc_finds_the_checkout_or_says_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(cli.REPO_ENV, raising=False)
    assert cli.find_checkout(REPO / "custom" / "fedseg") == REPO  # a folder inside the checkout
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "fedseg" / "cli.py"))  # as installed
    monkeypatch.chdir(tmp_path)
    assert cli.find_checkout() is None
    assert cli.main(["poc", "status"]) == 2
    assert "no FedSeg repository checkout found" in capsys.readouterr().err
    monkeypatch.setenv(cli.REPO_ENV, str(REPO))
    assert cli.find_checkout() == REPO


# ---- pip install ./custom into a fresh venv -------------------------------------------------------------------
RUNTIME = {"nvflare", "torch", "monai", "nibabel", "numpy", "scipy", "psutil", "tensorboard"}
EXTRAS = {"bench": {"matplotlib", "pillow"}, "convert": {"pillow"}, "mlflow": {"mlflow-skinny", "alembic", "sqlalchemy"}}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv (from the base interpreter) that reads the project venv's packages through a .pth file, with
    fedseg installed from ./custom (copied: the build must not write into the checkout)."""
    tmp = tmp_path_factory.mktemp("pip")
    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp / "custom"
    shutil.copytree(CUSTOM, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_NO_INDEX"] = "1"  # offline: setuptools and everything else come from the project venv
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(source)], env=env, timeout=600)
    yield venv, env
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_installed_metadata_declares_the_dependencies(installed):
    venv, env = installed
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('fedseg')))"
    import json
    import re

    requires = json.loads(run([str(venv / "bin" / "python"), "-c", code], cwd=venv, env=env).stdout)
    names: dict[str, set] = {}
    for req in requires:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        extra = re.search(r"extra == \"(\w+)\"", req)
        names.setdefault(extra.group(1) if extra else "", set()).add(name)
    assert names[""] == RUNTIME
    assert any(r.startswith("nvflare") and "<2.10" in r and ">=2.9" in r for r in requires), requires
    for extra, packages in EXTRAS.items():
        assert packages <= names[extra], extra


@pytest.mark.slow
def test_installed_fedseg_command_runs_help_and_demo(installed, tmp_path):
    venv, env = installed
    fedseg = str(venv / "bin" / "fedseg")
    # outside the checkout: the installed package, not the source tree, is what runs
    out = run([fedseg, "--help"], cwd=tmp_path, env=env)
    assert "demo" in out.stdout and "infer" in out.stdout
    where = run([str(venv / "bin" / "python"), "-c", "import fedseg; print(fedseg.__file__)"], cwd=tmp_path, env=env)
    assert str(venv) in where.stdout, where.stdout
    run([fedseg, "data", "synthetic", "--out", "data", "--sites", "2", "--size", "tiny"], cwd=tmp_path, env=env)
    out = run(
        [fedseg, "demo", "--data", "data", "--sites", "2", "--rounds", "1", "--workspace", "ws"],
        cwd=tmp_path,
        env=env,
        timeout=1200,
    )
    assert "demo finished" in out.stdout, out.stdout[-3000:]
    for row in ("FedAvg", "FedSM super model", "FedCross", "FedCrossEns ensemble"):
        assert row in out.stdout, row
